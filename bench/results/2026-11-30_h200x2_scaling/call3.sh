#!/usr/bin/env bash
# call 2 (x2): issue 17 scaling, 1 vs 2 GPUs, 49,152 tokens per GPU per step, 150 steps, 5-step profile
set -u
LIMIT=${LIMIT:-580}
bash .gpu/stage_data.sh .gpu data/wikiblogs >/dev/null
export TORCHINDUCTOR_CACHE_DIR=/tmp/ind TRITON_CACHE_DIR=/tmp/tri PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
R=$OUT; OUT=/tmp/res3; mkdir -p $OUT/logs
export TRAIN_FILES="data/wikiblogs/wikiblogs_train_00000[12].bin" VAL_FILES=data/wikiblogs/wikiblogs_val_000000.bin LOG_DIR=$OUT/logs
export TRAIN_SEQ_LEN=49152 NUM_ITERATIONS=${ITERS:-150} VAL_LOSS_EVERY=0 VAL_TOKENS=524288 PROFILE_STEPS=5
E32="NUM_EXPERTS=32 TOP_K=4 SHARED_EXPERTS=1 MOE_LAYERS=1,2,3,4,5,6,7,8,9,10,11"
job() {  # id nproc cap_s settings...
  local id=$1 n=$2 cap=$3; shift 3
  [[ -e /tmp/done_$id ]] && return
  local left=$((LIMIT - SECONDS)); (( cap > left )) && { echo "$id: skipped at ${SECONDS}s"; return; }
  local t=$SECONDS
  timeout $cap env RUN_ID=$id TRAIN_BATCH_TOKENS=$((49152 * n)) "$@" torchrun --standalone --nproc_per_node=$n ${SCRIPT:-train_gpt.py} > $OUT/$id.out 2>&1
  local rc=$?; [[ $rc == 0 ]] && touch /tmp/done_$id
  echo "== $id rc=$rc $((SECONDS - t))s (at ${SECONDS}s)"
  grep -E '^step:[0-9]+/[0-9]+ val|^compile_time|^peak|error' $OUT/logs/$id.txt 2>/dev/null | tail -4
  python3 - $OUT/logs/$id.txt <<'PY'
import re, sys, statistics
t = [float(m.group(1)) for m in re.finditer(r"^step:\d+/\d+ train_time:(\d+)ms", open(sys.argv[1]).read(), re.M)]
d = [b - a for a, b in zip(t[10:], t[11:])]
print(f"   steps {len(t)}, median step (after 10) {statistics.median(d):.2f} ms" if d else "   no steps")
PY
  f=$OUT/logs/${id}_trace.json
  [ -f $f ] && { python3 bench/exposed_comm.py $f --steps 5 2>&1 | tail -1 | sed 's/^/   /'; rm -f $f; }
}






SCRIPT="bench/trace_collectives.py --out $OUT/e32_dbg --stacks-every 8" job e32_2dbg 2 200 $E32 GRAD_REDUCE=reduce_scatter TORCH_LOGS=recompiles PROFILE_STEPS=0 ITERS=30 NUM_ITERATIONS=30
job dense_1 1 160
job dense_2rs 2 100 GRAD_REDUCE=reduce_scatter
echo "done at ${SECONDS}s"; tar czf $R/res3.tgz -C /tmp res3
