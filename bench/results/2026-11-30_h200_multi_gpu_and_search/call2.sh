#!/usr/bin/env bash
# call 2 (issue 17): step time at 1 and 2 GPUs, dense and E32 top-4 + 1 shared, 49,152 tokens per GPU per step;
# exposed NCCL time from a 5-step profile at 2 GPUs; then main's old fp32 all_reduce at 2 GPUs if time is left
set -u
bash .gpu/stage_data.sh .gpu data/wikiblogs >/dev/null
export TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor TRITON_CACHE_DIR=$PWD/.cache/triton PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export TRAIN_FILES="data/wikiblogs/wikiblogs_train_00000[12].bin" VAL_FILES=data/wikiblogs/wikiblogs_val_000000.bin
export NUM_ITERATIONS=200 VAL_LOSS_EVERY=0 VAL_TOKENS=1048576 TRAIN_SEQ_LEN=49152 LOG_DIR=/tmp/logs
E32="NUM_EXPERTS=32 TOP_K=4 SHARED_EXPERTS=1 MOE_LAYERS=1,2,3,4,5,6,7,8,9,10,11"
run() {  # gpus id script settings...
  local gpus=$1 id=$2 script=$3; shift 3
  local n=$(( (${#gpus} + 1) / 2 ))
  [ $SECONDS -lt ${DEADLINE:-400} ] || { echo "$id: skipped at ${SECONDS}s"; return; }
  env CUDA_VISIBLE_DEVICES=$gpus RUN_ID=$id TRAIN_BATCH_TOKENS=$((49152 * n)) "$@" timeout $((575 - SECONDS)) \
    torchrun --standalone --nproc_per_node=$n $script > $OUT/$id.out 2>&1
  cp /tmp/logs/$id.txt $OUT/ 2>/dev/null
  echo "$id ($n GPU, ${SECONDS}s): $(grep -E '^step:200/200 val' /tmp/logs/$id.txt) $(grep -E '^compile_time|^peak' /tmp/logs/$id.txt | tr '\n' ' ')"
  if [ -f /tmp/logs/${id}_trace.json ]; then
    python3 bench/exposed_comm.py /tmp/logs/${id}_trace.json --steps 5 | tee $OUT/${id}_exposed.txt
    rm -f /tmp/logs/${id}_trace.json
  fi
}
nvidia-smi -L
(run 0 dense_1gpu train_gpt.py) &
(run 1 e32_1gpu train_gpt.py $E32) &
wait
run 0,1 dense_2gpu train_gpt.py PROFILE_STEPS=5
DEADLINE=330 run 0,1 e32_2gpu train_gpt.py $E32 PROFILE_STEPS=5
DEADLINE=440 run 0,1 dense_2gpu_old_fp32_allreduce .gpu/old/train_gpt_cb0aa50.py
