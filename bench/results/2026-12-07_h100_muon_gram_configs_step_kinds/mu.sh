#!/usr/bin/env bash
# Muon's step: the fused-epilogue triton path against torch (E32, dense), then torch against its max-autotune twin
export TORCHINDUCTOR_CACHE_DIR=/tmp/ind TRITON_CACHE_DIR=/tmp/tri PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; git log --oneline -1 | cut -c1-60
E32="NUM_EXPERTS=32 TOP_K=4 SHARED_EXPERTS=1 MOE_LAYERS=1,2,3,4,5,6,7,8,9,10,11"
t() { start=$SECONDS; timeout $1 "${@:3}" > $OUT/$2.txt 2>&1; echo "$2 rc=$? $((SECONDS-start))s"; grep -E "median|floor|roofs|round" $OUT/$2.txt; }
t 60 acc_e32 env $E32 python3 bench/muon_step.py --variants quintic/torch,quintic/triton,polar_express/triton --accuracy; grep x $OUT/acc_e32.txt | tail -4
t 160 muon_e32 env $E32 python3 bench/muon_step.py --variants quintic/triton,quintic/torch --rounds 5 --iters 10 --profile
t 120 muon_dense python3 bench/muon_step.py --variants quintic/triton,quintic/torch,gram/torch,gram/triton --rounds 5 --iters 20
t 190 muon_e32_autotune env $E32 python3 bench/muon_step.py --variants quintic/torch --autotune --rounds 5 --iters 10
