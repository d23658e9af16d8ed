# Muon's step alone, on the hidden matrices of the model the environment configures (read as train_gpt.py reads it,
# e.g. NUM_EXPERTS=8 MOE_LAYERS=1,...,11): median time of the compiled step on random gradients, with --against
# OTHER/train_gpt.py that version's Muon on the same matrices, interleaved round by round, and with --profile the
# top kernels of this version's step.
import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg
from moe_layer import load_trainer, timed


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iters", type=int, default=20, help="timed steps per round (the median is kept)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--against", help="path of another train_gpt.py whose Muon is timed alongside")
    ap.add_argument("--profile", action="store_true")
    opts = ap.parse_args()
    args = tg.load_config(dict(os.environ))
    device = tg.pick_device(0)
    torch.manual_seed(args.seed)
    model = tg.GPT(args).to(device)
    muon, = [o for o in tg.build_optimizers(model, args, 0, 1, device) if isinstance(o, tg.Muon)]
    params = [p for group in muon.param_groups for p in group["params"]]
    print(f"{len(params)} matrices, {sum(p.numel() for p in params) / 1e6:.1f}M parameters, "
          f"{len(muon.param_groups)} shape groups, {args.ns_steps} Newton-Schulz steps")
    optimizers = {"this": muon}
    if opts.against:
        other = load_trainer(opts.against, "train_gpt_against")
        copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
        optimizers["against"] = other.Muon(copies, lr=args.muon_lr, momentum=args.muon_momentum,
                                           ns_steps=args.ns_steps, compiled=True)
    for opt in optimizers.values():
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.randn_like(p) * 1e-3
        for _ in range(3):  # compile
            opt.step()
    results = {name: [] for name in optimizers}
    for r in range(opts.rounds):
        times = {name: timed(opt.step, opts.iters) for name, opt in optimizers.items()}
        for name, t in times.items():
            results[name].append(t)
        print(f"round {r + 1}: " + ", ".join(f"{name} {t:.2f} ms" for name, t in times.items()), flush=True)
    for name, ts in results.items():
        print(f"{name}: median {sorted(ts)[len(ts) // 2]:.2f} ms a step over {opts.rounds} rounds "
              f"(min {min(ts):.2f}, max {max(ts):.2f})")
    if opts.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                muon.step()
            torch.cuda.synchronize()
        print("kernels of 3 steps")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))


if __name__ == "__main__":
    main()
