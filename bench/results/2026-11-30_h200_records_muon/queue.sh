#!/usr/bin/env bash
# runs the jobs of .gpu/jobs.txt in order, one at a time on GPU 0, skipping those done (.gpu/done/ID or
# .cache/done/ID) and those whose estimate does not fit before LIMIT seconds. Line: ID EST_S COMMAND...
set -u
bash .gpu/stage_data.sh .gpu data/wikiblogs >/dev/null
export TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor TRITON_CACHE_DIR=$PWD/.cache/triton PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export E32="NUM_EXPERTS=32 TOP_K=4 SHARED_EXPERTS=1 MOE_LAYERS=1,2,3,4,5,6,7,8,9,10,11"
LIMIT=${LIMIT:-560}
mkdir -p .cache/done; R=$OUT; OUT=/tmp/res; mkdir -p $OUT; export OUT
nvidia-smi -L; nvidia-smi --query-gpu=memory.used --format=csv
while read -r id est cmd; do
  [[ -z $id || $id == \#* ]] && continue
  [[ -e .gpu/done/$id || -e .cache/done/$id ]] && continue
  if (( SECONDS + est > LIMIT )); then echo "$id: skipped at ${SECONDS}s (estimate ${est}s)"; continue; fi
  start=$SECONDS
  timeout $((LIMIT + 25 - SECONDS)) bash -c "$cmd" > $OUT/$id.out 2>&1
  rc=$?
  echo "$id: rc=$rc $((SECONDS - start))s (at ${SECONDS}s)"
  [[ $rc == 0 ]] && { touch .cache/done/$id $OUT/$id.done; }
  [[ -f $OUT/$id.txt ]] && echo "   $(grep -E '^step:[0-9]+/[0-9]+ val' $OUT/$id.txt | tail -1) | $(grep -E '^compile_time|^peak' $OUT/$id.txt | tr '\n' ' ')"
  grep -E 'median|GFLOP' $OUT/$id.out | sed 's/^/   /'
done < .gpu/jobs.txt
echo "queue done at ${SECONDS}s"; tar czf $R/res.tgz -C /tmp res
