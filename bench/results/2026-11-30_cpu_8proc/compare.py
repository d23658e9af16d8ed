# Issue 19, CPU part: the tiny CPU model (tests/conftest.py's tiny_env) on 8 gloo processes against 1 process with
# the same tokens per step (8 micro-steps), dense and MoE, for each GRAD_REDUCE; prints each run's val losses and how
# far its final parameters are from the 1-process run's (largest absolute difference and the parameter holding it;
# all parameters' difference norm over their norm), as a markdown table. A run already in --out is read, not rerun.
# Usage: python3 bench/results/2026-11-30_cpu_8proc/compare.py [--out DIR] [--steps N]
import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import launch, make_shards, tiny_env  # noqa: E402

MODELS = {"dense": {}, "MoE E4 top-2 + 1 shared": dict(NUM_EXPERTS=4, TOP_K=2, EXPERT_HIDDEN=128, SHARED_EXPERTS=1)}
GRAD_REDUCE = ("all_reduce", "reduce_scatter_fp32", "reduce_scatter")


def run(out: Path, data: Path, nproc: int, steps: int, **settings) -> tuple[list[float], dict]:
    # 2048 tokens a step (8 sequences of 256), validation on 2048 tokens every steps/2 steps, a checkpoint at the end
    checkpoint = out / "ckpt" / "tiny" / f"step_{steps:06d}.pt"
    if not checkpoint.exists():
        run_once(out, data, nproc, steps, **settings)
    log = (out / "logs" / "tiny.txt").read_text()
    losses = [float(line.split("val_loss:")[1].split()[0]) for line in log.splitlines()
              if line.startswith("step:") and "val_loss:" in line]
    return losses, torch.load(checkpoint)["model"]


def run_once(out: Path, data: Path, nproc: int, steps: int, **settings):
    if out.exists():
        shutil.rmtree(out)  # an unfinished run
    out.mkdir(parents=True)
    env = tiny_env(data, out, TRAIN_BATCH_TOKENS=2048, TRAIN_SEQ_LEN=256, VAL_SEQ_LEN=256, VAL_TOKENS=2048,
                   NUM_ITERATIONS=steps, VAL_LOSS_EVERY=steps // 2, SAVE_CHECKPOINT=1, **settings)
    proc = launch(ROOT / "train_gpt.py", env, nproc, cwd=out)
    if proc.returncode:
        sys.exit(f"error: {nproc} process(es), {settings}: exit {proc.returncode}\n{proc.stderr[-2000:]}")


def distance(params: dict, reference: dict) -> str:
    # the largest absolute difference (and where), then ||all differences|| / ||all reference parameters||
    diffs = {k: (params[k].double() - reference[k].double()) for k in reference}
    worst = max(diffs, key=lambda k: diffs[k].abs().max())
    size = sum(v.double().square().sum() for v in reference.values()).sqrt()
    relative = sum(d.square().sum() for d in diffs.values()).sqrt() / size
    return f"{diffs[worst].abs().max().item():.2e} ({worst}) | {relative.item():.1e}"


def main():
    parser = argparse.ArgumentParser(description="8 gloo processes against 1 with accumulation, tiny CPU model")
    parser.add_argument("--out", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (even, at least 2)")
    cli = parser.parse_args()
    if cli.steps < 2 or cli.steps % 2:
        sys.exit(f"error: --steps {cli.steps} must be even and at least 2 (validation at the middle and the end)")
    out = cli.out or Path(tempfile.mkdtemp(prefix="cpu_8proc_"))
    (out / "data").mkdir(parents=True, exist_ok=True)
    data = make_shards(out / "data")
    print("| model | processes | GRAD_REDUCE | val loss (steps 0, N/2, N) | max abs param diff to 1 process | "
          "relative diff |")
    print("|---|---|---|---|---|---|")
    for name, settings in MODELS.items():
        tag = name.split()[0].lower()
        one, reference = run(out / f"{cli.steps}_steps" / f"{tag}_1", data, 1, cli.steps, **settings)
        print(f"| {name} | 1 (8 micro-steps) | - | {', '.join(f'{v:.4f}' for v in one)} | 0 | 0 |", flush=True)
        eight = {}
        for grad_reduce in GRAD_REDUCE:
            losses, eight[grad_reduce] = run(out / f"{cli.steps}_steps" / f"{tag}_8_{grad_reduce}", data, 8,
                                             cli.steps, GRAD_REDUCE=grad_reduce, **settings)
            print(f"| {name} | 8 | {grad_reduce} | {', '.join(f'{v:.4f}' for v in losses)} | "
                  f"{distance(eight[grad_reduce], reference)} |", flush=True)
        # two fp32 runs that differ only in the order of the gradient sums: how far rounding alone carries them apart
        print(f"| {name} | 8 against 8 | reduce_scatter_fp32 against all_reduce | - | "
              f"{distance(eight['reduce_scatter_fp32'], eight['all_reduce'])} |", flush=True)


if __name__ == "__main__":
    main()
