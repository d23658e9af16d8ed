#!/usr/bin/env bash
# The multi-GPU benchmark of shared/BENCHMARK.md beside the mini: the record-21 recipe through run.sh on NPROC GPUs
# (default: all found), 49,152 tokens per GPU per step (no accumulation), wikiblogs train shards 1-5, validation on the
# first 4,194,304 val tokens. Default NUM_ITERATIONS: two passes over the shards (2 GPUs: 2030, 4: 1010, 8: 500).
# Usage: [NPROC=4] [NUM_EXPERTS=8 ...] bench/multi.sh [DATA_DIR]. Other settings pass through the environment, but
# TRAIN_SEQ_LEN, TRAIN_BATCH_TOKENS, TRAIN_FILES and VAL_FILES are the benchmark's own (set, they are refused).
set -euo pipefail
case "${1:-}" in
    -h|--help) sed -n '2,6s/^# \{0,1\}//p' "$0"; exit 0 ;;
esac
fail() { echo "multi.sh: error: $*" >&2; exit 2; }
for fixed in TRAIN_SEQ_LEN TRAIN_BATCH_TOKENS TRAIN_FILES VAL_FILES; do  # the benchmark's own: refused, not dropped
    [[ -z ${!fixed+set} ]] || fail "$fixed is set by the benchmark (49,152 tokens per GPU a step, the wikiblogs" \
                                   "shards of DATA_DIR); unset it, or run ./run.sh for other sizes or data"
done
[[ $# -le 1 ]] || fail "one DATA_DIR at most, got: $*; settings go in the environment"
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$root/data/wikiblogs}
[[ -d $dir ]] || fail "data folder $dir does not exist; pass DATA_DIR or stage the corpus" \
                      "(../shared/tools/stage_data.sh ../shared/data data/wikiblogs)"
data=$(cd "$dir" && pwd)
if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then  # as run.sh counts them
    IFS=, read -ra visible <<<"$CUDA_VISIBLE_DEVICES"
    gpus=${#visible[@]}
else
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ') || gpus=0
fi
[[ $gpus -gt 0 ]] || fail "no GPU found (CUDA_VISIBLE_DEVICES, nvidia-smi -L); the benchmark runs one process per GPU"
nproc=${NPROC:-$gpus}
[[ $nproc =~ ^[1-9][0-9]*$ ]] || fail "NPROC=$nproc must be a positive integer"
shopt -s nullglob
shards=("$data"/wikiblogs_train_00000[1-5].bin)
shopt -u nullglob
[[ ${#shards[@]} == 5 ]] || fail "$data holds ${#shards[@]} of the train shards wikiblogs_train_000001.bin ..." \
                                 "000005.bin; the benchmark needs all 5 (stage them as for the mini)"
batch=$((49152 * nproc))
if [[ -z ${NUM_ITERATIONS:-} ]]; then
    # two passes: a shard holds (tokens - 1) // batch batches (its third header int32 counts the tokens)
    batches=0
    for shard in "${shards[@]}"; do
        batches=$((batches + ($(od -An -t d4 -j 8 -N 4 "$shard") - 1) / batch))
    done
    NUM_ITERATIONS=$((2 * batches))
fi
export TRAIN_FILES="$data/wikiblogs_train_00000[1-5].bin" VAL_FILES="$data/wikiblogs_val_000000.bin"
export NUM_ITERATIONS VAL_TOKENS=${VAL_TOKENS:-4194304} TRAIN_SEQ_LEN=49152 TRAIN_BATCH_TOKENS=$batch NPROC=$nproc
exec "$root/run.sh"
