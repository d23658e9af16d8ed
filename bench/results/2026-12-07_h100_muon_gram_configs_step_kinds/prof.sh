#!/usr/bin/env bash
# one GPU: where E32's extra step time goes, by kernel kind, against dense (bench/step_profile.py --save/--against)
export TORCHINDUCTOR_CACHE_DIR=/tmp/ind TRITON_CACHE_DIR=/tmp/tri PYTHONUNBUFFERED=1
bash .gpu/stage_data.sh .gpu data/wikiblogs >/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; git log --oneline -1 | cut -c1-60
E32="NUM_EXPERTS=32 TOP_K=4 SHARED_EXPERTS=1 MOE_LAYERS=1,2,3,4,5,6,7,8,9,10,11"
M="TRAIN_FILES=data/wikiblogs/wikiblogs_train_00000[12].bin TRAIN_SEQ_LEN=49152 TRAIN_BATCH_TOKENS=49152 NUM_ITERATIONS=800"
t() { start=$SECONDS; timeout $1 "${@:3}" > $OUT/$2.txt 2>&1; echo "$2 rc=$? $((SECONDS-start))s"; sed -n '/^forward+backward:/,/^timed/p' $OUT/$2.txt; }
t 240 prof_dense env $M python3 bench/step_profile.py --steps 20 --save $OUT/dense.json
t 300 prof_e32 env $M $E32 python3 bench/step_profile.py --steps 20 --save $OUT/e32.json --against $OUT/dense.json
