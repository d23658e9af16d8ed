#!/usr/bin/env bash
# call 5 (x2, last 248 s of device time): the barrier on NCCL (step 1 of a 2-GPU run no longer waits out a compile),
# and one BUCKET_MB=64 point of exposed communication; dense, reduce_scatter, 40 steps, cold compile
set -u
bash .gpu/stage_data.sh .gpu data/wikiblogs >/dev/null
export TORCHINDUCTOR_CACHE_DIR=/tmp/ind TRITON_CACHE_DIR=/tmp/tri PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
R=$OUT; OUT=/tmp/res5; mkdir -p $OUT/logs
export TRAIN_FILES="data/wikiblogs/wikiblogs_train_00000[12].bin" VAL_FILES=data/wikiblogs/wikiblogs_val_000000.bin LOG_DIR=$OUT/logs
timeout ${CAP:-150} env RUN_ID=dense_2rs_b64 TRAIN_SEQ_LEN=49152 TRAIN_BATCH_TOKENS=98304 NUM_ITERATIONS=40 VAL_LOSS_EVERY=0 \
  VAL_TOKENS=524288 PROFILE_STEPS=5 GRAD_REDUCE=reduce_scatter BUCKET_MB=64 \
  torchrun --standalone --nproc_per_node=2 train_gpt.py 2>&1 | grep -vE "FutureWarning|warnings.warn|check\(" > $OUT/dense_2rs_b64.out
echo "rc=${PIPESTATUS[0]} at ${SECONDS}s"
grep -E "^compile_time|^step:[1-3]/|^step:40/40 val|^peak" $OUT/logs/dense_2rs_b64.txt
f=$OUT/logs/dense_2rs_b64_trace.json; [ -f $f ] && python3 bench/exposed_comm.py $f --steps 5 | tee $OUT/exposed.txt && xz -T8 $f
tar czf $R/res5.tgz -C /tmp res5
