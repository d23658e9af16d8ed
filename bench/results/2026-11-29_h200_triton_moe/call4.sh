export TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor TRITON_CACHE_DIR=$PWD/.cache/triton PYTHONUNBUFFERED=1
bash .gpu/stage_data.sh .gpu data/wikiblogs > /dev/null
D=$PWD/data/wikiblogs
moe="NUM_EXPERTS=32 TOP_K=4 SHARED_EXPERTS=1 MOE_LAYERS=1,2,3,4,5,6,7,8,9,10,11 MOE_KERNEL=triton"
(env CUDA_VISIBLE_DEVICES=0 LOG_DIR=$OUT RUN_ID=mini_dense_2 timeout 320 bash bench/mini.sh $D > $OUT/console0.txt 2>&1) &
(env CUDA_VISIBLE_DEVICES=1 $moe LOG_DIR=$OUT RUN_ID=mini_e32k4s1_triton_2 timeout 320 bash bench/mini.sh $D > $OUT/console1.txt 2>&1) &
wait
grep -h "step:800/800 val\|compile_time\|peak" $OUT/mini_*.txt; tail -3 $OUT/console*.txt
