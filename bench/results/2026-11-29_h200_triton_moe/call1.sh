export TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor TRITON_CACHE_DIR=$PWD/.cache/triton PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
nvidia-smi -L; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
bash .gpu/stage_data.sh .gpu data/wikiblogs > /dev/null &
CUDA_VISIBLE_DEVICES=0 python3 .gpu/sanity.py 2>&1 | tee $OUT/sanity.txt; [ ${PIPESTATUS[0]} = 0 ] || exit 1
wait
D=$PWD/data/wikiblogs
mini="TRAIN_FILES=$D/wikiblogs_train_00000[12].bin VAL_FILES=$D/wikiblogs_val_000000.bin TRAIN_SEQ_LEN=49152 TRAIN_BATCH_TOKENS=49152 NUM_ITERATIONS=800"
moe="NUM_EXPERTS=32 TOP_K=4 SHARED_EXPERTS=1 MOE_LAYERS=1,2,3,4,5,6,7,8,9,10,11"
(export CUDA_VISIBLE_DEVICES=0
 timeout 330 python3 bench/moe_layer.py --configs 32x4+1,8x1+1 --rounds 3 --iters 20 > $OUT/layer.txt 2>&1
 timeout 150 python3 bench/moe_layer.py --kernel-table --configs 32x4,8x1,64x8 > $OUT/kernel_table.txt 2>&1) &
(export CUDA_VISIBLE_DEVICES=1
 env $mini timeout 150 python3 bench/step_profile.py --steps 20 --kernels 0 > $OUT/step_dense.txt 2>&1
 env $mini $moe timeout 170 python3 bench/step_profile.py --steps 20 --kernels 30 > $OUT/step_e32_triton.txt 2>&1
 env $mini $moe MOE_KERNEL=torch timeout 150 python3 bench/step_profile.py --steps 20 --kernels 0 > $OUT/step_e32_torch.txt 2>&1) &
wait
tail -n 30 $OUT/*.txt
