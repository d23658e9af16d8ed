#!/usr/bin/env bash
# Launch train_gpt.py with torchrun on every visible GPU of this node (or NPROC of them); settings pass through
# the environment. See ./run.sh --help.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: [SETTING=value ...] ./run.sh

Runs train_gpt.py with torchrun on all visible GPUs (1 process on a machine without one). Every
field of train_gpt.py's Hyperparameters is set by its upper-case environment variable:

  ./run.sh                                  the 8-GPU record-21 run on FineWeb (dense)
  NUM_EXPERTS=8 TOP_K=2 ./run.sh            the same with 8 experts, top-2
  NPROC=1 NUM_ITERATIONS=100 ./run.sh       one process, 100 steps

Launcher variables (used here, not passed to the trainer):
  NPROC          processes (GPUs) on this node (default: the GPUs in CUDA_VISIBLE_DEVICES, else
                 those nvidia-smi -L lists, else 1)
  NNODES         nodes; above 1, torchrun meets the other nodes through c10d rendezvous
  RDZV_ENDPOINT  host:port of the rendezvous, the same on every node (needed when NNODES > 1)
  RDZV_ID        rendezvous id, the same on every node (default moe_speedrun)
  FETCH_DATA     1: download the FineWeb shards first (python3 data/cached_fineweb10B.py)
  FETCH_SHARDS   train shards FETCH_DATA downloads (default 8)

Multi-node: run the same command on every node, e.g. on each of 2 nodes of 4 GPUs
  NNODES=2 NPROC=4 RDZV_ENDPOINT=node0:29500 ./run.sh
EOF
}

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    "") ;;
    *) echo "run.sh: unexpected argument '$1'; settings go through the environment (see ./run.sh --help)" >&2; exit 2 ;;
esac

root=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)  # the repo, also through a symlink

is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

if [[ -n ${NPROC:-} ]]; then
    is_count "$NPROC" || { echo "run.sh: NPROC=$NPROC must be a positive integer" >&2; exit 2; }
    nproc=$NPROC
elif [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then  # nvidia-smi lists the GPUs this mask hides too
    IFS=, read -ra visible <<<"$CUDA_VISIBLE_DEVICES"
    nproc=${#visible[@]}
elif gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ') && [[ $gpus -gt 0 ]]; then
    nproc=$gpus
else
    nproc=1
fi

nnodes=${NNODES:-1}
is_count "$nnodes" || { echo "run.sh: NNODES=$nnodes must be a positive integer" >&2; exit 2; }
if [[ $nnodes -gt 1 ]]; then
    if [[ -z ${RDZV_ENDPOINT:-} ]]; then
        echo "run.sh: NNODES=$nnodes needs RDZV_ENDPOINT=host:port (a node all nodes reach; the same on every node)" >&2
        exit 2
    fi
    rendezvous=(--nnodes="$nnodes" --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT"
                --rdzv_id="${RDZV_ID:-moe_speedrun}")
else
    rendezvous=(--standalone)
fi

# the trainer's default data (TRAIN_FILES/VAL_FILES unset; a test keeps these globs equal to Hyperparameters')
# is FineWeb in data/fineweb10B, relative to the cwd or else the repo
if [[ ${FETCH_DATA:-0} == 1 ]]; then
    python3 "$root/data/cached_fineweb10B.py" "${FETCH_SHARDS:-8}"
fi
have_default() {  # $1: the trainer's default glob, relative to the cwd or the repo
    compgen -G "$1" >/dev/null || compgen -G "$root/$1" >/dev/null
}
if { [[ -z ${TRAIN_FILES:-} ]] && ! have_default "data/fineweb10B/fineweb_train_*.bin"; } ||
   { [[ -z ${VAL_FILES:-} ]] && ! have_default "data/fineweb10B/fineweb_val_*.bin"; }; then
    echo "run.sh: no FineWeb shards in $root/data/fineweb10B; get them with 'python data/cached_fineweb10B.py 8'" \
         "(or run 'FETCH_DATA=1 ./run.sh' to fetch them now), or set TRAIN_FILES and VAL_FILES to your own shards" >&2
    exit 1
fi

unset NPROC NNODES RDZV_ENDPOINT RDZV_ID FETCH_DATA FETCH_SHARDS
exec torchrun "${rendezvous[@]}" --nproc_per_node="$nproc" "$root/train_gpt.py"
