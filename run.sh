#!/usr/bin/env bash
# Launch train_gpt.py with torchrun on every visible GPU of this node (or NPROC of them); settings pass through
# the environment. See ./run.sh --help.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: [SETTING=value ...] ./run.sh

With GPUs: trains train_gpt.py with torchrun on all visible GPUs, by default the record-21 run on FineWeb,
which it downloads first into data/fineweb10B/ when no shards are there (resumable; FETCH_DATA=0 refuses).
Without a GPU: trains the tiny CPU configuration (4 layers, 128 wide, 20 steps) in one process, on shards it
makes from this repo's logs in records/, to show that the machine can run the trainer.
Every field of train_gpt.py's Hyperparameters is set by its upper-case environment variable; the settings
and shards are checked once, in one process, before torchrun starts:

  ./run.sh                                  the 8-GPU record-21 run on FineWeb (dense)
  NUM_EXPERTS=8 TOP_K=2 ./run.sh            the same with 8 experts, top-2
  NPROC=1 NUM_ITERATIONS=100 ./run.sh       one process, 100 steps

Launcher variables (used here, not passed to the trainer):
  NPROC          processes (GPUs) on this node (default: the GPUs in CUDA_VISIBLE_DEVICES, else
                 those nvidia-smi -L lists, else 1)
  NNODES         nodes; above 1, torchrun meets the other nodes through c10d rendezvous
  RDZV_ENDPOINT  host:port of the rendezvous, the same on every node (needed when NNODES > 1)
  RDZV_ID        rendezvous id, the same on every node (default moe_speedrun)
  FETCH_DATA     unset: download FineWeb when its shards are missing; 0: stop instead; 1: always run the
                 downloader first (it keeps valid shards and fetches the missing ones)
  FETCH_SHARDS   train shards to download (default 8)
  BPE_DIR        without a GPU: a folder with GPT-2's vocab.bpe and encoder.json for making the tiny
                 shards offline (default: tiktoken downloads them)

Multi-node: run the same command on every node, e.g. on each of 2 nodes of 4 GPUs
  NNODES=2 NPROC=4 RDZV_ENDPOINT=node0:29500 ./run.sh
EOF
}

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    "") ;;
    *) echo "run.sh: error: unexpected argument '$1'; settings go through the environment (see ./run.sh --help)" >&2; exit 2 ;;
esac

root=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)  # the repo, also through a symlink

is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then  # nvidia-smi lists the GPUs this mask hides too
    IFS=, read -ra visible <<<"$CUDA_VISIBLE_DEVICES"
    gpus=${#visible[@]}
else
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ') || gpus=0
fi
if [[ -n ${NPROC:-} ]]; then
    is_count "$NPROC" || { echo "run.sh: error: NPROC=$NPROC must be a positive integer" >&2; exit 2; }
    nproc=$NPROC
else
    nproc=$(( gpus > 0 ? gpus : 1 ))
fi

nnodes=${NNODES:-1}
is_count "$nnodes" || { echo "run.sh: error: NNODES=$nnodes must be a positive integer" >&2; exit 2; }
if [[ $nnodes -gt 1 ]]; then
    if [[ -z ${RDZV_ENDPOINT:-} ]]; then
        echo "run.sh: error: NNODES=$nnodes needs RDZV_ENDPOINT=host:port (a node all nodes reach; the same on every node)" >&2
        exit 2
    fi
    rendezvous=(--nnodes="$nnodes" --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT"
                --rdzv_id="${RDZV_ID:-moe_speedrun}")
else
    rendezvous=(--standalone)
fi

have_shards() {  # $1: a glob relative to the cwd or the repo, as the trainer resolves it
    compgen -G "$1" >/dev/null || compgen -G "$root/$1" >/dev/null
}

if [[ $gpus -eq 0 ]]; then
    # the README's tiny CPU configuration (tests/conftest.py tiny_env); a setting given in the environment, even empty, wins
    tiny=(NUM_LAYERS=4 MODEL_DIM=128 NUM_HEADS=2 HEAD_DIM=64 MLP_HIDDEN=512 NUM_VALUE_EMBEDS=1 NO_ATTN_LAYERS=2
          LONG_WINDOW_LAYERS=0,3 WINDOW_MAX=256 TRAIN_SEQ_LEN=256 TRAIN_BATCH_TOKENS=512 VAL_SEQ_LEN=512
          VAL_TOKENS=2048 NUM_ITERATIONS=20 VAL_LOSS_EVERY=10)
    for setting in "${tiny[@]}"; do
        name=${setting%%=*}
        [[ -n ${!name+set} ]] || export "$setting"
    done
    echo "run.sh: no GPU on this machine: training the tiny CPU configuration (4 layers, 128 wide, 20 steps) to" \
         "show that it runs the trainer; the speedrun itself needs GPUs"
    if [[ -z ${TRAIN_FILES:-} && -z ${VAL_FILES:-} ]]; then
        export TRAIN_FILES="data/tokens/tiny_train_*.bin" VAL_FILES="data/tokens/tiny_val_*.bin"
        if ! have_shards "$TRAIN_FILES" || ! have_shards "$VAL_FILES"; then
            echo "run.sh: making the tiny shards from the logs in records/ (one log for validation)"
            # offline, the tokenizer's hint names run.sh's BPE_DIR rather than its own --bpe-dir
            hint="offline, set BPE_DIR to a folder holding GPT-2's vocab.bpe and encoder.json: BPE_DIR=DIR ./run.sh"
            python3 "$root/data/tokenize_text.py" "$root/records" --prefix tiny --val-docs 1 \
                --out "$root/data/tokens" ${BPE_DIR:+--bpe-dir "$BPE_DIR"} --bpe-hint "$hint" || exit
        fi
    fi
else
    [[ ${FETCH_DATA:-} =~ ^[01]?$ ]] || { echo "run.sh: error: FETCH_DATA=$FETCH_DATA must be 0, 1 or unset" >&2; exit 2; }
    # the trainer's default data (a test keeps these globs equal to Hyperparameters') is FineWeb in data/fineweb10B
    missing=0
    [[ -n ${TRAIN_FILES:-} ]] || have_shards "data/fineweb10B/fineweb_train_*.bin" || missing=1
    [[ -n ${VAL_FILES:-} ]] || have_shards "data/fineweb10B/fineweb_val_*.bin" || missing=1
    if [[ $missing == 1 ]]; then
        if [[ ${FETCH_DATA:-} == 0 ]]; then
            echo "run.sh: error: no FineWeb shards in $root/data/fineweb10B and FETCH_DATA=0; get them with" \
                 "'python3 data/cached_fineweb10B.py 8', or set TRAIN_FILES and VAL_FILES to your own shards" >&2
            exit 1
        fi
        echo "run.sh: no FineWeb shards in $root/data/fineweb10B: downloading the val shard and" \
             "${FETCH_SHARDS:-8} train shards (FETCH_DATA=0 stops instead)"
        python3 "$root/data/cached_fineweb10B.py" "${FETCH_SHARDS:-8}"
    elif [[ ${FETCH_DATA:-} == 1 ]]; then
        python3 "$root/data/cached_fineweb10B.py" "${FETCH_SHARDS:-8}"
    fi
fi

unset NPROC NNODES RDZV_ENDPOINT RDZV_ID FETCH_DATA FETCH_SHARDS BPE_DIR
# one process checks the settings and shards for the whole job, so a refusal is one error line, not one per rank
# followed by torchrun's report
WORLD_SIZE=$(( nproc * nnodes )) python3 "$root/train_gpt.py" --check || exit
exec torchrun "${rendezvous[@]}" --nproc_per_node="$nproc" "$root/train_gpt.py"
