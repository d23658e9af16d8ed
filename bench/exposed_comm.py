# Exposed communication in a profiler trace of train_gpt.py (PROFILE_STEPS=N writes <run id>_trace.json): per
# GPU stream set, the time NCCL kernels run while no other kernel runs, against the traced span. Communication
# that runs under compute costs (almost) nothing; what this reports is what the step waits on. One line per NCCL
# kernel (ReduceScatter, AllGather, ...) says which collective it is, then the whole. An xz-compressed trace is
# read as is.
# Usage: python3 bench/exposed_comm.py LOG_DIR/<run id>_trace.json[.xz] [--steps N]
import argparse
import json
import lzma
from collections import defaultdict


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in intervals)


def minus(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    # the parts of the (merged, sorted) intervals a that no interval of b covers
    out, j = [], 0
    for s, e in a:
        while j < len(b) and b[j][1] <= s:
            j += 1
        k, cur = j, s
        while k < len(b) and b[k][0] < e:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            k += 1
        if cur < e:
            out.append((cur, e))
    return out


def kernel_events(events: list[dict]) -> list[dict]:
    # the trace's GPU kernels (complete events of category kernel); ValueError names what makes them unusable
    kernels = [ev for ev in events if ev.get("ph") == "X" and ev.get("cat") == "kernel" and "ts" in ev and "dur" in ev]
    for ev in kernels:
        if not isinstance(ev.get("name"), str) or not all(isinstance(ev[k], (int, float)) for k in ("ts", "dur")):
            raise ValueError(f"a kernel event lacks a name or a numeric ts and dur: {json.dumps(ev)[:200]}")
    if not kernels or max(ev["ts"] + ev["dur"] for ev in kernels) <= min(ev["ts"] for ev in kernels):
        raise ValueError("the trace holds no GPU kernels that take time; profile on a GPU (PROFILE_STEPS=N)")
    return kernels


def exposed(events: list[dict]) -> dict:
    kernels = kernel_events(events)
    comm = union([(ev["ts"], ev["ts"] + ev["dur"]) for ev in kernels if "nccl" in ev["name"].lower()])
    compute = union([(ev["ts"], ev["ts"] + ev["dur"]) for ev in kernels if "nccl" not in ev["name"].lower()])
    start = min(ev["ts"] for ev in kernels)
    end = max(ev["ts"] + ev["dur"] for ev in kernels)
    return dict(span_ms=(end - start) / 1e3, comm_ms=length(comm) / 1e3, compute_ms=length(compute) / 1e3,
                exposed_ms=length(minus(comm, compute)) / 1e3)


def by_kernel(events: list[dict]) -> dict[str, dict]:
    # per NCCL kernel name (its arguments cut off): launches, GPU time and the part no compute kernel covers. Two
    # collectives that run at once each count their own time, so the rows may sum to more than exposed()'s total
    kernels = kernel_events(events)
    compute = union([(ev["ts"], ev["ts"] + ev["dur"]) for ev in kernels if "nccl" not in ev["name"].lower()])
    rows = defaultdict(lambda: dict(count=0, ms=0.0, exposed_ms=0.0))
    for ev in kernels:
        if "nccl" in ev["name"].lower():
            row = rows[ev["name"].split("(")[0]]
            row["count"] += 1
            row["ms"] += ev["dur"] / 1e3
            row["exposed_ms"] += length(minus([(ev["ts"], ev["ts"] + ev["dur"])], compute)) / 1e3
    return dict(rows)


def main():
    ap = argparse.ArgumentParser(description="Exposed NCCL time in a train_gpt.py profiler trace: NCCL kernels "
                                 "running while no other kernel runs")
    ap.add_argument("trace", help="the <run id>_trace.json that PROFILE_STEPS wrote, plain or xz-compressed")
    ap.add_argument("--steps", type=int, default=0, help="steps in the trace (PROFILE_STEPS), for per-step figures")
    opts = ap.parse_args()
    if opts.steps < 0:
        ap.exit(2, f"error: --steps {opts.steps} must be the number of profiled steps (PROFILE_STEPS), or 0\n")
    try:
        with open(opts.trace, "rb") as f:
            compressed = f.read(6) == b"\xfd7zXZ\x00"  # the xz magic, whatever the file's name
        with (lzma.open if compressed else open)(opts.trace, "rt") as f:
            trace = json.load(f)
    except (OSError, ValueError, EOFError, lzma.LZMAError) as e:
        ap.exit(2, f"error: cannot read {opts.trace} as a trace ({e}); give the _trace.json that PROFILE_STEPS wrote\n")
    events = trace.get("traceEvents") if isinstance(trace, dict) else trace
    if not isinstance(events, list) or not all(isinstance(ev, dict) for ev in events):
        ap.exit(2, f"error: {opts.trace} is JSON but not a Chrome trace (no list of events under traceEvents); give "
                   f"the _trace.json that PROFILE_STEPS wrote\n")
    try:
        r, rows = exposed(events), by_kernel(events)
    except ValueError as e:
        ap.exit(2, f"error: {opts.trace}: {e}\n")
    steps = opts.steps or 1
    for name, row in sorted(rows.items(), key=lambda kv: -kv[1]["exposed_ms"]):
        print(f"{name}: {row['count']} launches" + ("; per step" if opts.steps else ",")
              + f" {row['ms'] / steps:.2f} ms, {row['exposed_ms'] / steps:.2f} ms exposed")
    per = f", per step {r['span_ms'] / opts.steps:.2f} ms span, {r['exposed_ms'] / opts.steps:.2f} ms exposed" \
        if opts.steps else ""
    print(f"span {r['span_ms']:.1f} ms, kernels busy {r['compute_ms']:.1f} ms, NCCL {r['comm_ms']:.1f} ms, "
          f"NCCL with no other kernel running {r['exposed_ms']:.1f} ms = {100 * r['exposed_ms'] / r['span_ms']:.2f}% "
          f"of the span{per}")


if __name__ == "__main__":
    main()
