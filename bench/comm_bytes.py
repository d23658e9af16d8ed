# Bytes each rank sends per optimizer step with GRAD_REDUCE=reduce_scatter (or _fp32), counted from the buckets
# train_gpt.py builds for the model the environment configures (on meta tensors: nothing is allocated), against a ring
# all-reduce of every gradient. Ring collectives, n ranks: a reduce-scatter of n segments of w elements sends (n - 1) w
# elements from each rank, an all_gather of w-element pieces the same, an all-reduce of S elements 2 (n - 1) / n S.
# Each bucket is reduce-scattered and all_gathered (in bf16, or fp32) with the same segments, as wide as the
# rank with the most in the bucket; shard_owners levels the ranks, so only what S / n leaves over pads.
# GRAD_REDUCE=all_reduce sends the all-reduce of the gradients as stored plus Muon's all_gather.
# Usage: [settings] python3 bench/comm_bytes.py [--world-sizes 2,4,8] [--device cuda|cpu]
import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg


def comm_bytes(args: tg.Hyperparameters, world_size: int, device_type: str = "cuda") -> dict[str, float]:
    # per rank and optimizer step: reduce_scatter (the gradient buckets), all_gather (the same buckets back),
    # all_reduce (every gradient as stored) and muon_gather (Muon's all_gather): train_gpt.py's GRAD_REDUCE=all_reduce,
    # and all_reduce_bf16 for comparison. device_type sets the embeddings' dtype as train() does
    n = world_size
    with torch.device("meta"):
        model = tg.GPT(args)
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            m.to(torch.bfloat16 if device_type == "cuda" else torch.float32)
    optimizers = tg.build_optimizers(model, args, 0, n, torch.device("meta"))
    ranges = {k: v for opt in optimizers for k, v in opt.ranges.items()}
    dtype = tg.GRAD_REDUCE_DTYPES[args.grad_reduce]
    reducer = tg.GradientReducer(tg.optimizer_order(optimizers), ranges, 0, n, dtype, args.bucket_mb << 20)
    _, *muon = tg.build_optimizers(model, dataclasses.replace(args, grad_reduce="all_reduce"), 0, n,
                                   torch.device("meta"))
    params = list(model.parameters())
    return dict(
        reduce_scatter=sum((n - 1) * out.numel() * dtype.itemsize for out in reducer.outputs),
        all_gather=sum((n - 1) * send.numel() * dtype.itemsize for send in reducer.sends),
        muon_gather=sum((n - 1) * width * g["matrix"][0] * g["matrix"][1] * torch.bfloat16.itemsize
                        for opt in muon for g, (width, _) in zip(opt.param_groups, opt.plans)),
        all_reduce=2 * (n - 1) / n * sum(p.numel() * p.element_size() for p in params),
        all_reduce_bf16=2 * (n - 1) / n * sum(p.numel() * torch.bfloat16.itemsize for p in params))


def main():
    ap = argparse.ArgumentParser(description="Bytes each rank sends per step with GRAD_REDUCE=reduce_scatter, against "
                                 "an all-reduce (the model from the environment's settings, as train_gpt.py reads them)")
    ap.add_argument("--world-sizes", default="2,4,8", help="comma-separated numbers of ranks (default 2,4,8)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="whose dtypes: cuda (bf16 embeddings, the default) or cpu (fp32)")
    opts = ap.parse_args()
    try:
        sizes = [int(w) for w in opts.world_sizes.split(",")]
        assert all(w >= 2 for w in sizes)
    except (ValueError, AssertionError):
        ap.exit(2, f"error: --world-sizes {opts.world_sizes} must be numbers of ranks, 2 or more, e.g. 2,4,8\n")
    env = dict(os.environ)
    env.setdefault("GRAD_REDUCE", "reduce_scatter")
    try:
        args = tg.load_config(env)  # validates
        if args.grad_reduce not in tg.GRAD_REDUCE_DTYPES:
            raise tg.ConfigError(f"GRAD_REDUCE={args.grad_reduce} does not shard; use reduce_scatter or "
                                 f"reduce_scatter_fp32")
    except tg.ConfigError as e:
        ap.exit(2, f"error: {e}\n")
    print(f"GRAD_REDUCE={args.grad_reduce} BUCKET_MB={args.bucket_mb}, MB each rank sends per step:")
    for n in sizes:
        b = comm_bytes(args, n, opts.device)
        total = b["reduce_scatter"] + b["all_gather"]
        print(f"{n} ranks: reduce-scatter {b['reduce_scatter'] / 1e6:.0f}, all_gather {b['all_gather'] / 1e6:.0f}: "
              f"{total / 1e6:.0f} = {total / b['all_reduce_bf16']:.4f}x an all-reduce in bf16 "
              f"({b['all_reduce_bf16'] / 1e6:.0f}); GRAD_REDUCE=all_reduce sends "
              f"{(b['all_reduce'] + b['muon_gather']) / 1e6:.0f} (as stored, + Muon's all_gather)")


if __name__ == "__main__":
    main()
