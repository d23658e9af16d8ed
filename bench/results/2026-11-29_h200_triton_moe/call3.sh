export TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor TRITON_CACHE_DIR=$PWD/.cache/triton PYTHONUNBUFFERED=1 TRITON_PRINT_AUTOTUNING=1
(CUDA_VISIBLE_DEVICES=0 timeout 330 python3 bench/moe_layer.py --configs 32x4+1,8x1+1 --rounds 3 --iters 20 > $OUT/layer.txt 2>&1) &
(CUDA_VISIBLE_DEVICES=1 timeout 330 python3 bench/moe_layer.py --configs 64x8+1 --rounds 3 --iters 20 > $OUT/layer64.txt 2>&1
 CUDA_VISIBLE_DEVICES=1 timeout 60 python3 bench/moe_layer.py --kernel-table --configs 64x8+1 > $OUT/kernel_table64.txt 2>&1) &
wait
grep -h "median\|rel err\|us \|total" $OUT/*.txt
