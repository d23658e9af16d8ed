#!/usr/bin/env bash
# The mini speedrun of shared/BENCHMARK.md on one GPU: record-21 recipe scaled to 800 steps of 49,152 tokens on
# wikiblogs. Usage: [NUM_EXPERTS=8 ...] bench/mini.sh [DATA_DIR]   (midi: NUM_ITERATIONS=2000 VAL_LOSS_EVERY=250
# TRAIN_SHARDS='[1-5]'). Any other setting passes through the environment.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
data=$(cd "${1:-$root/data/wikiblogs}" && pwd)
export TRAIN_FILES="$data/wikiblogs_train_00000${TRAIN_SHARDS:-[12]}.bin"
export VAL_FILES="$data/wikiblogs_val_000000.bin"
export NUM_ITERATIONS=${NUM_ITERATIONS:-800} VAL_LOSS_EVERY=${VAL_LOSS_EVERY:-100} VAL_TOKENS=${VAL_TOKENS:-4718592}
export TRAIN_SEQ_LEN=49152 TRAIN_BATCH_TOKENS=49152
unset TRAIN_SHARDS
exec torchrun --standalone --nproc_per_node=1 "$root/train_gpt.py"
