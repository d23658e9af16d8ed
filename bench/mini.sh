#!/usr/bin/env bash
# The mini speedrun of shared/BENCHMARK.md on one GPU: record-21 recipe scaled to 800 steps of 49,152 tokens on
# wikiblogs. Usage: [NUM_EXPERTS=8 ...] bench/mini.sh [--check] [DATA_DIR]   (midi: NUM_ITERATIONS=2000
# VAL_LOSS_EVERY=250 TRAIN_SHARDS='[1-5]'; --check: check the settings and shards only). Settings pass through,
# but TRAIN_SEQ_LEN, TRAIN_BATCH_TOKENS, TRAIN_FILES and VAL_FILES are the mini's own (set, they are refused).
set -euo pipefail
case "${1:-}" in
    -h|--help) sed -n '2,5s/^# \{0,1\}//p' "$0"; exit 0 ;;
esac
check=0
[[ ${1:-} == --check ]] && { check=1; shift; }
for fixed in TRAIN_SEQ_LEN TRAIN_BATCH_TOKENS TRAIN_FILES VAL_FILES; do  # the benchmark's own: refused, not dropped
    [[ -z ${!fixed+set} ]] || { echo "mini.sh: error: $fixed is set by the mini (49,152 tokens a step, the wikiblogs" \
        "shards of DATA_DIR); unset it, or run train_gpt.py through ./run.sh for other sizes or data" >&2; exit 2; }
done
[[ $# -le 1 ]] || { echo "mini.sh: error: one DATA_DIR at most, got: $*; settings go in the environment" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$root/data/wikiblogs}
[[ -d $dir ]] || { echo "mini.sh: error: data folder $dir does not exist; pass DATA_DIR or stage the corpus" \
                        "(../shared/tools/stage_data.sh ../shared/data data/wikiblogs)" >&2; exit 2; }
data=$(cd "$dir" && pwd)
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ') || gpus=0  # as multi.sh counts them; --check needs none
[[ $check == 1 || -n ${CUDA_VISIBLE_DEVICES:-} || $gpus -gt 0 ]] || { echo "mini.sh: error: no GPU found" \
    "(CUDA_VISIBLE_DEVICES, nvidia-smi -L); the mini runs on one GPU (--check checks settings and shards without)" >&2
    exit 2; }
export TRAIN_FILES="$data/wikiblogs_train_00000${TRAIN_SHARDS:-[12]}.bin"
export VAL_FILES="$data/wikiblogs_val_000000.bin"
export NUM_ITERATIONS=${NUM_ITERATIONS:-800} VAL_LOSS_EVERY=${VAL_LOSS_EVERY:-100} VAL_TOKENS=${VAL_TOKENS:-4718592}
export TRAIN_SEQ_LEN=49152 TRAIN_BATCH_TOKENS=49152
unset TRAIN_SHARDS
# one process checks first, as run.sh does: a refusal is one error line and exit 2, not torchrun's failure report
python3 "$root/train_gpt.py" --check || exit
[[ $check == 0 ]] || exit 0
exec torchrun --standalone --nproc_per_node=1 "$root/train_gpt.py"
