# train_gpt.py with a record of its collectives, to find where ranks part ways. Each rank writes
# <out>/collectives_rank<R>.jsonl, one line per torch.distributed call train_gpt.py makes, written as it is made:
# the call (name, each tensor argument's dtype and shape, the reduce op, src/dst), the thread that made it and the
# seconds since the start. With --stacks-every S, every S seconds each thread's Python stack is appended to
# <out>/stacks_rank<R>.txt (where a stalled rank waits). NCCL hangs where ranks differ in a collective's kind, order,
# dtype or shape; gloo forgives some of these (equal byte counts), so tests/test_distributed.py compares the records.
# Usage: [settings] torchrun --nproc_per_node=N bench/trace_collectives.py [--out DIR] [--stacks-every S]
import argparse
import faulthandler
import json
import os
import runpy
import sys
import threading
import time
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


def record_collectives(path: Path):
    out, lock, start = open(path, "w"), threading.Lock(), time.perf_counter()

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


def main():
    parser = argparse.ArgumentParser(description="Run train_gpt.py (settings from the environment, as always) and "
                                     "record each rank's collectives, and optionally its threads' stacks.")
    parser.add_argument("--out", default=".", help="folder of collectives_rank<R>.jsonl and stacks_rank<R>.txt")
    parser.add_argument("--stacks-every", type=float, default=0, metavar="S",
                        help="append every thread's Python stack every S seconds (0 = never)")
    cli = parser.parse_args()
    if cli.stacks_every < 0:
        sys.exit(f"error: --stacks-every {cli.stacks_every} must not be negative (0 = never)")
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)
    rank = os.environ.get("RANK", "0")
    record_collectives(out / f"collectives_rank{rank}.jsonl")
    if cli.stacks_every:
        faulthandler.dump_traceback_later(cli.stacks_every, repeat=True, file=open(out / f"stacks_rank{rank}.txt", "w"))
    script = Path(__file__).resolve().parents[1] / "train_gpt.py"
    sys.argv = [str(script)]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
