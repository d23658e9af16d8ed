#!/usr/bin/env bash
# call 1: fewest-steps recipe search at 624 steps (0.78 x 800) with main's code, one run per GPU at a time
set -u
bash .gpu/stage_data.sh .gpu data/wikiblogs >/dev/null
export TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor TRITON_CACHE_DIR=$PWD/.cache/triton PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
E32="NUM_EXPERTS=32 TOP_K=4 SHARED_EXPERTS=1 MOE_LAYERS=1,2,3,4,5,6,7,8,9,10,11"
run() {  # gpu id settings...
  local gpu=$1 id=$2; shift 2
  [ $SECONDS -lt 330 ] || { echo "$id: skipped at ${SECONDS}s"; return; }
  env CUDA_VISIBLE_DEVICES=$gpu LOG_DIR=$OUT RUN_ID=$id "$@" timeout $((570 - SECONDS)) bash bench/mini.sh data/wikiblogs > $OUT/$id.out 2>&1
  echo "$id: $(grep -E '^step:[0-9]+/[0-9]+ val' $OUT/$id.txt | tail -1) $(grep peak $OUT/$id.txt)"
}
nvidia-smi -L
(run 0 e32_624 $E32 NUM_ITERATIONS=624; run 0 e32_624_cd06 $E32 NUM_ITERATIONS=624 COOLDOWN_FRAC=0.6; run 0 e32_624_rlr003 $E32 NUM_ITERATIONS=624 ROUTER_LR=0.003) &
(run 1 e64k4_624 NUM_EXPERTS=64 TOP_K=4 SHARED_EXPERTS=1 EXPERT_HIDDEN=640 MOE_LAYERS=1,2,3,4,5,6,7,8,9,10,11 NUM_ITERATIONS=624; run 1 e64k8_624 NUM_EXPERTS=64 TOP_K=8 SHARED_EXPERTS=1 MOE_LAYERS=1,2,3,4,5,6,7,8,9,10,11 NUM_ITERATIONS=624) &
wait
