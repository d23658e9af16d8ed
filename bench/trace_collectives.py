# train_gpt.py with a record of its collectives, to find where ranks part ways. Each rank writes
# <out>/collectives_rank<R>.jsonl, one line per torch.distributed call train_gpt.py makes, written as it is made:
# the call (name, each tensor argument's dtype and shape, the reduce op, src/dst), the thread that made it and the
# seconds since the start. With --stacks-every S, every S seconds each thread's Python stack is appended to
# <out>/stacks_rank<R>.txt (where a stalled rank waits), taken by a Python thread that holds the GIL:
# faulthandler.dump_traceback_later walks the frames without it, and killed rank 0 of a 2-GPU run with SIGSEGV while
# dynamo was tracing (2026-11-30). A thread that holds the GIL in C code delays a dump until it lets go; torch lets go
# in its blocking waits (synchronize, item, NCCL's waits). NCCL hangs where ranks differ in a collective's kind,
# order, dtype or shape; gloo forgives some of these (equal byte counts), so tests/test_distributed.py compares the
# records.
# Usage: [settings] torchrun --nproc_per_node=N bench/trace_collectives.py [--out DIR] [--stacks-every S]
import argparse
import faulthandler
import json
import math
import os
import runpy
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

COLLECTIVES = ("broadcast", "all_reduce", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter", "gather_object",
               "all_gather_object", "broadcast_object_list", "scatter_object_list", "barrier", "send", "recv")


def signature(value):
    # what must agree across ranks: tensors' dtype and shape, the reduce op, the ranks named (src, dst)
    if isinstance(value, torch.Tensor):
        return [str(value.dtype), list(value.shape)]
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return [signature(v) for v in value]
    if isinstance(value, dist.ReduceOp.RedOpType):
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def record_collectives(path: Path, start: float):
    out, lock = open(path, "w"), threading.Lock()

    def recorded(name, fn):
        def call(*args, **kwargs):
            parts = [signature(v) for v in list(args) + [kwargs[k] for k in sorted(kwargs) if k != "async_op"]]
            line = dict(call=[name] + [p for p in parts if p is not None], thread=threading.current_thread().name,
                        s=round(time.perf_counter() - start, 3))
            with lock:  # the backward's thread sends gradients on GPU while the main thread waits
                out.write(json.dumps(line) + "\n")
                out.flush()
            return fn(*args, **kwargs)
        return call

    for name in COLLECTIVES:
        setattr(dist, name, recorded(name, getattr(dist, name)))


def dump_stacks(out, start: float):
    # every other thread's Python stack, read by the interpreter with the GIL held (faulthandler reads it without)
    names = {t.ident: t.name for t in threading.enumerate()}
    frames = sys._current_frames()
    out.write(f"--- {time.perf_counter() - start:.1f} s\n")
    for ident, frame in frames.items():
        if ident != threading.get_ident():
            out.write(f"Thread {names.get(ident, '<no Python thread>')} ({ident}), most recent call last:\n")
            out.write("".join(traceback.format_stack(frame)))
    out.flush()


def start_stack_dumps(seconds: float, path: Path, start: float):
    # dumps to path every `seconds` on a daemon thread; returns the function that stops it after its current dump
    out, stop = open(path, "w"), threading.Event()

    def dump_until_stopped():
        with out:
            while not stop.wait(seconds):
                dump_stacks(out, start)

    thread = threading.Thread(target=dump_until_stopped, name="stack dumps", daemon=True)
    thread.start()

    def stop_dumps():
        stop.set()
        thread.join()
    return stop_dumps


def main():
    parser = argparse.ArgumentParser(description="Run train_gpt.py (settings from the environment, as always) and "
                                     "record each rank's collectives, and optionally its threads' stacks.")
    parser.add_argument("--out", default=".", help="folder of collectives_rank<R>.jsonl and stacks_rank<R>.txt")
    parser.add_argument("--stacks-every", type=float, default=0, metavar="S",
                        help="append every thread's Python stack every S seconds (0 = never), taken by a Python "
                        "thread with the GIL (faulthandler's timed dump segfaulted a rank while dynamo traced); a "
                        "thread holding the GIL in C code delays a dump until it lets go")
    cli = parser.parse_args()
    if not (math.isfinite(cli.stacks_every) and cli.stacks_every >= 0):
        parser.exit(2, f"error: --stacks-every {cli.stacks_every:g} must be a number of seconds, 0 or more (0 = never)\n")
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)
    rank, start = os.environ.get("RANK", "0"), time.perf_counter()
    faulthandler.enable()  # a fatal signal (SIGSEGV, SIGABRT) still prints every thread's stack to stderr as it dies
    record_collectives(out / f"collectives_rank{rank}.jsonl", start)
    stacks = out / f"stacks_rank{rank}.txt"
    stop_dumps = start_stack_dumps(cli.stacks_every, stacks, start) if cli.stacks_every else lambda: None
    script = Path(__file__).resolve().parents[1] / "train_gpt.py"
    sys.argv = [str(script)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        stop_dumps()  # no dump while the interpreter shuts down


if __name__ == "__main__":
    main()
