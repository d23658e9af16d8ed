#!/usr/bin/env bash
# call 3 (issue 17): E32 top-4 + 1 shared on 2 GPUs (49,152 tokens per GPU per step) with a 5-step profile and a
# watchdog; Muon's step per NS variant on 1 GPU (E32 and dense, one per GPU); dense on 2 GPUs if time is left
set -u
bash .gpu/stage_data.sh .gpu data/wikiblogs >/dev/null
export TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor TRITON_CACHE_DIR=$PWD/.cache/triton PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export TRAIN_FILES="data/wikiblogs/wikiblogs_train_00000[12].bin" VAL_FILES=data/wikiblogs/wikiblogs_val_000000.bin
export NUM_ITERATIONS=120 VAL_LOSS_EVERY=0 VAL_TOKENS=524288 TRAIN_SEQ_LEN=49152 LOG_DIR=/tmp/logs
E32="NUM_EXPERTS=32 TOP_K=4 SHARED_EXPERTS=1 MOE_LAYERS=1,2,3,4,5,6,7,8,9,10,11"
two_gpus() {  # id watchdog_s settings...
  local id=$1 limit=$2; shift 2
  env CUDA_VISIBLE_DEVICES=0,1 RUN_ID=$id TRAIN_BATCH_TOKENS=98304 PROFILE_STEPS=5 "$@" \
    torchrun --standalone --nproc_per_node=2 .gpu/fh.py > $OUT/$id.out 2>&1 &
  local pid=$! start=$SECONDS
  while kill -0 $pid 2>/dev/null; do
    sleep 5
    if [ $((SECONDS - start)) -gt $limit ] && ! grep -q '^compile_time' /tmp/logs/$id.txt 2>/dev/null; then
      echo "$id: no compile_time after ${limit}s: stacks to $id.out, stopped"; pkill -USR1 -f fh.py; sleep 5; kill $pid; sleep 3; pkill -9 -f fh.py
    fi
  done
  cp /tmp/logs/$id.txt $OUT/ 2>/dev/null
  echo "$id (${SECONDS}s): $(grep -E '^step:[0-9]+/[0-9]+ val' /tmp/logs/$id.txt) $(grep -E '^compile_time|^peak' /tmp/logs/$id.txt | tr '\n' ' ')"
  [ -f /tmp/logs/${id}_trace.json ] && python3 bench/exposed_comm.py /tmp/logs/${id}_trace.json --steps 5 | tee $OUT/${id}_exposed.txt
  rm -f /tmp/logs/${id}_trace.json
}
nvidia-smi -L
two_gpus e32_2gpu 260 $E32
(env CUDA_VISIBLE_DEVICES=0 $E32 timeout 200 python3 bench/muon_step.py --variants quintic/torch,quintic/triton,gram/triton --rounds 3 --iters 10 > $OUT/muon_e32.txt 2>&1; tail -8 $OUT/muon_e32.txt) &
(env CUDA_VISIBLE_DEVICES=1 timeout 200 python3 bench/muon_step.py --variants quintic/torch,gram/torch,quintic/triton,gram/triton --rounds 3 --iters 10 > $OUT/muon_dense.txt 2>&1; tail -8 $OUT/muon_dense.txt) &
wait
[ $SECONDS -lt 330 ] && two_gpus dense_2gpu 200 || echo "dense_2gpu: skipped at ${SECONDS}s"
