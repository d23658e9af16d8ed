#!/usr/bin/env bash
# The fewest-steps search of shared/BENCHMARK.md: mini runs of one configuration at several step counts, plus dense
# reference runs, one run per GPU at once, then `logger.py fewest` on their logs. See bench/fewest_steps.sh --help.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: [SETTING=value ...] bench/fewest_steps.sh [options] STEPS... SETTING=value...

Runs bench/mini.sh at each step count STEPS (its NUM_ITERATIONS; the schedules scale with it) with the settings
given as arguments (the configuration under test), and --dense runs of the dense model at --dense-steps with none
of them. Every GPU found (CUDA_VISIBLE_DEVICES, else nvidia-smi -L) takes one run at a time from a queue: seed 0
of every step count first, longest first. Logs go to --out as <run id>.txt (console output: <run id>.out); a
run whose complete log is already there is skipped, so rerunning with more --runs adds seeds. Then prints
`logger.py fewest` of the folder and writes its markdown to DIR/fewest.md.
Settings in the environment go to every run, dense included (TRAIN_SHARDS, VAL_LOSS_EVERY: see bench/mini.sh).

  bench/fewest_steps.sh --runs 3 640 680 720 NUM_EXPERTS=32 TOP_K=4 SHARED_EXPERTS=1 MOE_LAYERS=1,2,3

Options:
  --runs N          runs (SEED=0..N-1) per step count (default 1)
  --dense N         dense reference runs (SEED=0..N-1; default 3, the fewest the target needs; 0 = none)
  --dense-steps N   the dense runs' NUM_ITERATIONS (default 800, the mini's)
  --out DIR         folder of the logs (default logs/fewest_<UTC date and time>)
  --data DIR        the wikiblogs shards, passed to bench/mini.sh (default: its own, data/wikiblogs)
  --dry-run         check each configuration's settings and shards, print the GPUs and the queue, run nothing
  -h, --help        this text

Exit status: 2 for bad input (before any run), 1 when a run failed, else that of logger.py (2: it refused the logs).
MINI_SH replaces bench/mini.sh as the command of each run (the tests' stand-in).
EOF
}

fail() { echo "fewest_steps.sh: error: $*" >&2; exit 2; }
is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

root=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
mini=${MINI_SH:-$root/bench/mini.sh}
runs=1 dense=3 dense_steps=800 out="" data="" dry_run=0 steps=() settings=()
while [[ $# -gt 0 ]]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --runs|--dense|--dense-steps|--out|--data)
            [[ $# -ge 2 ]] || fail "$1 needs a value (see --help)"
            case $1 in
                --runs) is_count "$2" || fail "--runs $2 must be a positive integer"; runs=$2 ;;
                --dense) [[ $2 =~ ^[0-9]+$ ]] || fail "--dense $2 must be a number of runs (0 = none)"; dense=$2 ;;
                --dense-steps) is_count "$2" || fail "--dense-steps $2 must be a positive integer"; dense_steps=$2 ;;
                --out) out=$2 ;;
                --data) [[ -d $2 ]] || fail "--data $2 is not a folder; pass the folder of the wikiblogs shards"
                        data=$(cd "$2" && pwd) ;;
            esac
            shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        [A-Z]*=*)
            [[ $1 =~ ^[A-Z][A-Z0-9_]*= ]] || fail "setting '$1' is not NAME=value with an upper-case NAME"
            settings+=("$1"); shift ;;
        *)
            is_count "$1" || fail "'$1' is neither a step count, a SETTING=value nor an option (see --help)"
            steps+=("$1"); shift ;;
    esac
done
[[ ${#steps[@]} -gt 0 ]] || fail "no step counts given; e.g. bench/fewest_steps.sh 640 680 720 NUM_EXPERTS=32 TOP_K=4"
for name in NUM_ITERATIONS SEED RUN_ID LOG_DIR; do  # set per run by this script
    [[ -z ${!name:-} ]] || fail "$name=${!name} is in the environment, but this script sets it per run; unset it"
    for setting in "${settings[@]}"; do
        [[ $setting != "$name="* ]] || fail "$setting: this script sets $name per run; leave it out"
    done
done
[[ ${NUM_EXPERTS:-0} == 0 ]] || fail "NUM_EXPERTS=$NUM_EXPERTS is in the environment, where the dense runs get it" \
                                     "too; pass it as an argument (NUM_EXPERTS=$NUM_EXPERTS after the step counts)"

if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -ra gpus <<<"$CUDA_VISIBLE_DEVICES"
else
    mapfile -t gpus < <(nvidia-smi -L 2>/dev/null | sed -n 's/^GPU \([0-9]*\):.*/\1/p')
fi
[[ ${#gpus[@]} -gt 0 || $dry_run == 1 ]] || fail "no GPU found (CUDA_VISIBLE_DEVICES is unset and nvidia-smi -L" \
                                                  "lists none); the runs need GPUs (--dry-run shows the queue)"
out=$(realpath -m "${out:-logs/fewest_$(date -u +%Y%m%d_%H%M%S)}")
[[ $dry_run == 1 ]] || mkdir -p "$out" 2>/dev/null || fail "--out $out cannot be created; pass a writable folder"

# the queue: one line per run, "run_id steps seed kind"; seed 0 of everything first, then the longest first
queue=()
for ((seed = 0; seed < (runs > dense ? runs : dense); seed++)); do
    [[ $seed -lt $dense ]] && queue+=("dense_${dense_steps}_s$seed $dense_steps $seed dense")
    if [[ $seed -lt $runs ]]; then
        for s in $(printf '%s\n' "${steps[@]}" | sort -rnu); do
            queue+=("moe_${s}_s$seed $s $seed moe")
        done
    fi
done
todo=()
for entry in "${queue[@]}"; do
    read -r name _ <<<"$entry"
    if [[ -f $out/$name.txt ]]; then
        grep -q '^peak memory' "$out/$name.txt" || fail "$out/$name.txt is the log of an unfinished run; move it" \
                                                        "away to run it again, or pick another --out"
        echo "fewest_steps.sh: $name is done already ($out/$name.txt); skipped"
    else
        todo+=("$entry")
    fi
done

run_env() {  # sets the caller's env_cmd to the environment of a run of $1 steps, seed $2, kind $3 (dense or moe)
    env_cmd=(env -u MINI_SH NUM_ITERATIONS="$1" SEED="$2" LOG_DIR="$out")
    [[ $3 == dense ]] || env_cmd+=("${settings[@]}")
}

# one check per configuration, also on --dry-run, before any GPU work: a bad setting is one error line naming the
# configuration, not one failed run per GPU
checks=("$(printf '%s\n' "${steps[@]}" | sort -rn | head -1) 0 moe")
[[ $dense == 0 ]] || checks+=("$dense_steps 0 dense")
for check in "${checks[@]}"; do
    read -r n seed kind <<<"$check"
    run_env "$n" "$seed" "$kind"
    [[ $kind == dense ]] && config="the environment's only" || config=${settings[*]:-none}
    "${env_cmd[@]}" "$mini" --check ${data:+"$data"} >/dev/null \
        || fail "the $kind runs' settings ($config) are refused (above); fix them and run again"
done

echo "fewest_steps.sh: ${#todo[@]} runs on GPUs ${gpus[*]:-none}, logs in $out; settings under test: ${settings[*]:-none}"
if [[ $dry_run == 1 ]]; then
    printf '%s\n' "${todo[@]}"
    exit 0
fi

state=$(mktemp -d)
trap 'rm -rf "$state"' EXIT
echo 0 >"$state/next"
: >"$state/failed"

worker() {  # takes the next run of the queue whenever its GPU $1 is free
    local gpu=$1 i name n seed kind env_cmd
    while true; do
        i=$(flock "$state/lock" bash -c 'read -r i <"$1"; echo $((i + 1)) >"$1"; echo "$i"' _ "$state/next")
        [[ $i -lt ${#todo[@]} ]] || return 0
        read -r name n seed kind <<<"${todo[$i]}"
        run_env "$n" "$seed" "$kind"
        echo "fewest_steps.sh: GPU $gpu: $name starts"
        if "${env_cmd[@]}" CUDA_VISIBLE_DEVICES="$gpu" RUN_ID="$name" "$mini" ${data:+"$data"} >"$out/$name.out" 2>&1; then
            echo "fewest_steps.sh: GPU $gpu: $name done"
        else
            echo "fewest_steps.sh: GPU $gpu: $name failed (exit $?), see $out/$name.out" >&2
            echo "$name" >>"$state/failed"
        fi
    done
}

declare -A worker_gpu
for gpu in "${gpus[@]}"; do
    worker "$gpu" &
    worker_gpu[$!]=$gpu
done
for pid in "${!worker_gpu[@]}"; do
    wait "$pid" || echo "(the queue of GPU ${worker_gpu[$pid]} stopped early)" >>"$state/failed"
done

status=0
python3 "$root/logger.py" fewest "$out" || status=$?
python3 "$root/logger.py" fewest --md "$out" >"$out/fewest.md" 2>/dev/null || rm -f "$out/fewest.md"
if [[ -s $state/failed ]]; then
    echo "fewest_steps.sh: failed runs (left out above): $(tr '\n' ' ' <"$state/failed")" >&2
    exit 1
fi
exit $status
