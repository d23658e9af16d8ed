export TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor TRITON_CACHE_DIR=$PWD/.cache/triton PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
bash .gpu/stage_data.sh .gpu data/wikiblogs > /dev/null &
CUDA_VISIBLE_DEVICES=0 python3 .gpu/sanity.py 2>&1 | tee $OUT/sanity.txt; [ ${PIPESTATUS[0]} = 0 ] || exit 1
wait
D=$PWD/data/wikiblogs
mini="TRAIN_FILES=$D/wikiblogs_train_00000[12].bin VAL_FILES=$D/wikiblogs_val_000000.bin TRAIN_SEQ_LEN=49152 TRAIN_BATCH_TOKENS=49152 NUM_ITERATIONS=800"
moe="NUM_EXPERTS=32 TOP_K=4 SHARED_EXPERTS=1 MOE_LAYERS=1,2,3,4,5,6,7,8,9,10,11"
(export CUDA_VISIBLE_DEVICES=0
 timeout 250 python3 bench/moe_layer.py --configs 32x4+1,8x1+1 --rounds 3 --iters 20 > $OUT/layer.txt 2>&1
 timeout 100 python3 bench/moe_layer.py --kernel-table --configs 32x4+1,8x1+1 >> $OUT/layer.txt 2>&1
 env $mini $moe timeout 170 python3 bench/step_profile.py --steps 20 --kernels 40 > $OUT/step_e32_triton.txt 2>&1) &
(export CUDA_VISIBLE_DEVICES=1
 env LOG_DIR=$OUT RUN_ID=mini_dense timeout 230 bash bench/mini.sh $D > $OUT/console.txt 2>&1
 env $moe LOG_DIR=$OUT RUN_ID=mini_e32k4s1_triton timeout 290 bash bench/mini.sh $D >> $OUT/console.txt 2>&1) &
wait
grep -h "median\|rel err\|us \|total" $OUT/layer.txt; grep -h "forward+backward\|muon\|step (sum" $OUT/step_e32_triton.txt
grep -h "step:800\|step_avg\|peak\|error" $OUT/mini_*.txt | grep -v "^step:[1-7]" | tail -8; tail -5 $OUT/console.txt
