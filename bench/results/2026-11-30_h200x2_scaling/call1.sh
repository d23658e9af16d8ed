#!/usr/bin/env bash
# session 2026-11-30b call 1 (x2): where 2-GPU runs stall. tiny eager, tiny compiled, dense real reduce_scatter
set -u
LIMIT=${LIMIT:-575}
bash .gpu/stage_data.sh .gpu data/wikiblogs >/dev/null
export TORCHINDUCTOR_CACHE_DIR=/tmp/ind TRITON_CACHE_DIR=/tmp/tri PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
R=$OUT; OUT=/tmp/res; mkdir -p $OUT/logs
nvidia-smi -L; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; nproc
export TRAIN_FILES="data/wikiblogs/wikiblogs_train_00000[12].bin" VAL_FILES=data/wikiblogs/wikiblogs_val_000000.bin LOG_DIR=$OUT/logs
TINY="NUM_LAYERS=4 MODEL_DIM=128 NUM_HEADS=2 HEAD_DIM=64 MLP_HIDDEN=512 NUM_VALUE_EMBEDS=1 NO_ATTN_LAYERS=2
  LONG_WINDOW_LAYERS=0,3 WINDOW_MAX=256 TRAIN_SEQ_LEN=256 TRAIN_BATCH_TOKENS=512 VAL_SEQ_LEN=512 VAL_TOKENS=2048
  NUM_ITERATIONS=20 VAL_LOSS_EVERY=10 NUM_EXPERTS=4 TOP_K=2 EXPERT_HIDDEN=128 BUCKET_MB=1"
job() {  # id cap_s settings... ; runs 2-GPU trace_collectives
  local id=$1 cap=$2; shift 2
  local left=$((LIMIT - SECONDS)); (( cap > left )) && cap=$left
  (( cap < 30 )) && { echo "$id: skipped at ${SECONDS}s"; return; }
  local t=$SECONDS
  timeout $cap env RUN_ID=$id "$@" torchrun --standalone --nproc_per_node=2 bench/trace_collectives.py \
    --out $OUT/$id --stacks-every 30 > $OUT/$id.out 2>&1
  echo "== $id rc=$? $((SECONDS - t))s (at ${SECONDS}s)"
  grep -E '^step:[0-9]+/[0-9]+ val|^compile_time|^peak|error' $OUT/logs/$id.txt $OUT/$id.out 2>/dev/null | tail -6
  wc -l $OUT/$id/collectives_rank*.jsonl 2>/dev/null | head -2
}
job tiny_eager_rs 70 $TINY COMPILE=0 GRAD_REDUCE=reduce_scatter TORCH_CPP_LOG_LEVEL=INFO
job tiny_comp_rs 150 $TINY COMPILE=1 GRAD_REDUCE=reduce_scatter
job dense_rs 600 TORCH_CPP_LOG_LEVEL=INFO TORCH_LOGS=recompiles NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT \
  GRAD_REDUCE=reduce_scatter TRAIN_SEQ_LEN=49152 TRAIN_BATCH_TOKENS=98304 NUM_ITERATIONS=60 VAL_LOSS_EVERY=0 \
  VAL_TOKENS=524288 PROFILE_STEPS=5
f=$OUT/logs/dense_rs_trace.json; [ -f $f ] && python3 bench/exposed_comm.py $f --steps 5 > $OUT/dense_rs_exposed.txt 2>&1; cat $OUT/dense_rs_exposed.txt 2>/dev/null | tail -15; rm -f $f
echo "done at ${SECONDS}s"; tar czf $R/res.tgz -C /tmp res
