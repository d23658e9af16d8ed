# Muon's step alone, on the hidden matrices of the model the environment configures (read as train_gpt.py reads it,
# e.g. NUM_EXPERTS=32 TOP_K=4 SHARED_EXPERTS=1 MOE_LAYERS=1,...,11): for every NS_METHOD x NS_KERNEL (--variants), the
# median time of the compiled step on the same random gradients, interleaved round by round in one process, with the
# Newton-Schulz FLOPs of the step and the TFLOP/s they make of its time. --against OTHER/train_gpt.py adds that
# version's Muon on the same matrices; --accuracy each variant's error against float64 on a few matrices of every
# shape; --flops the FLOP counts alone (meta tensors, no device work); --profile the top kernels of the first variant.
# On a CPU (no GPU, or --device cpu) nothing is compiled and the triton variants need TRITON_INTERPRET=1: give it a
# small model, e.g. NUM_LAYERS=2 MODEL_DIM=128 NUM_HEADS=1 HEAD_DIM=128 MLP_HIDDEN=512 NUM_VALUE_EMBEDS=1
# NO_ATTN_LAYERS= LONG_WINDOW_LAYERS=0.
import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg
from moe_layer import load_trainer, timed

METHODS, KERNELS = ("quintic", "polar_express", "gram"), ("torch", "triton")


@register_flop_formula(torch.ops.moe_speedrun.gram_matrix)
def gram_matrix_flops(x_shape, *args, **kwargs) -> int:
    # what the product needs: the upper triangle with its diagonal, 2k flops an entry (the kernel's diagonal tiles
    # compute their lower halves too: at most one tile's worth more a row of tiles)
    B, M, K = x_shape
    return B * M * (M + 1) * K


@register_flop_formula(torch.ops.moe_speedrun.ns_polynomial)
def ns_polynomial_flops(a_shape, *args, **kwargs) -> int:
    # its A A^T, counted as gram_matrix's (the epilogue's sum is not a matmul)
    return gram_matrix_flops(a_shape)


def shape_counts(muon: tg.Muon) -> list[tuple[int, int, int]]:
    # (matrices, m, n) of each shape group
    out = []
    for group in muon.param_groups:
        m, n = group["matrix"]
        out.append((sum(p.numel() // (m * n) for p in group["params"]), m, n))
    return out


def ns_flops(shapes: list[tuple[int, int, int]], steps: int, method: str, kernel: str) -> int:
    # the orthogonalization's matmul FLOPs over all matrices, counted by running it on meta tensors
    with FlopCounterMode(display=False) as counter:
        for count, m, n in shapes:
            tg.orthogonalize(torch.empty(count, m, n, device="meta"), steps, method, kernel)
    return counter.get_total_flops()


def traffic_bytes(params: list[torch.Tensor]) -> int:
    # the bytes Muon's step must move outside Newton-Schulz, one rank owning every matrix: the gradient read and the
    # parameter read and written (their dtype), the fp32 momentum read and written, the bf16 Newton-Schulz input
    # written and the bf16 update read (memory-bound: momentum_stack, then the update's add)
    return sum(p.numel() * (3 * p.element_size() + 2 * 4 + 2 * 2) for p in params)


def device_peaks(device: torch.device) -> tuple[float, float]:
    # (bytes/s of a device-to-device copy, counting bytes read and written; bf16 FLOP/s of an 8192^3 matmul):
    # the roofs on this GPU for the floors main prints, medians of 10
    x = torch.empty(2 ** 28, dtype=torch.float32, device=device)  # 1 GiB
    y = torch.empty_like(x)
    copy = timed(lambda: y.copy_(x), 10) / 1e3
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn_like(a)
    mm = timed(lambda: a @ b, 10) / 1e3
    return 2 * x.numel() * 4 / copy, 2 * 8192 ** 3 / mm


def step_ms(opt, iters: int, device: torch.device) -> float:
    if device.type == "cuda":
        return timed(opt.step, iters)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        opt.step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def accuracy(shapes: list[tuple[int, int, int]], steps: int, variants: list[str], device: torch.device):
    # relative error against the float64 iteration with the same coefficients, and the singular values' range, on
    # 4 random gradient-like matrices (singular values decaying from 1 to 1e-4) of each shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    for _, m, n in shapes:
        k = min(m, n)
        u = torch.linalg.qr(torch.randn(4, m, k, generator=gen, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(4, n, k, generator=gen, dtype=torch.float64)).Q
        g = (u * torch.logspace(0, -4, k, dtype=torch.float64)) @ v.mT
        x = g.bfloat16().double()
        x = x / x.norm(dim=(-2, -1), keepdim=True)
        cells, wanted = [], {}
        for variant in variants:
            method, kernel = variant.split("/")
            if method not in wanted:
                wanted[method] = tg.newton_schulz(x, tg.ns_coefficients(method, steps), tg.gram_matrix)
            want = wanted[method]
            got = tg.orthogonalize(g.float().to(device), steps, method, kernel).double().cpu()
            s = torch.linalg.svdvals(got)
            cells.append(f"{variant} {((got - want).norm() / want.norm()).item():.4f} [{s.min():.2f}, {s.max():.2f}]")
        print(f"{m}x{n}: " + ", ".join(cells), flush=True)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number, at least 1")
    return int(text)


def main():
    ap = argparse.ArgumentParser(description="Time Muon's step alone on the hidden matrices of the model the "
                                 "environment configures (as train_gpt.py reads it), for every NS_METHOD x NS_KERNEL")
    ap.add_argument("--iters", type=positive, default=20, help="timed steps per round (the median is kept)")
    ap.add_argument("--rounds", type=positive, default=3,
                    help="rounds, each timing every variant in turn (the median over rounds is printed)")
    ap.add_argument("--variants", default="", help="comma-separated METHOD/KERNEL, e.g. quintic/torch,gram/triton "
                                                   "(default: every method, with triton where it runs)")
    ap.add_argument("--against", help="path of another train_gpt.py whose Muon is timed alongside")
    ap.add_argument("--device", choices=("cuda", "cpu"), help="default: the GPU if there is one")
    ap.add_argument("--flops", action="store_true", help="print the FLOP counts and exit")
    ap.add_argument("--accuracy", action="store_true", help="print each variant's error against float64 and exit")
    ap.add_argument("--profile", action="store_true", help="print the top GPU kernels of 3 steps of the first variant "
                                                          "(and of its autotuned twin with --autotune)")
    ap.add_argument("--autotune", action="store_true",
                    help="time each variant a second way too: its Newton-Schulz compiled with mode=max-autotune-no-cudagraphs "
                         "(Triton GEMM templates, elementwise work fused into their epilogues), named VARIANT+autotune")
    opts = ap.parse_args()
    try:
        args = tg.load_config(dict(os.environ))
    except tg.ConfigError as e:
        ap.exit(2, f"error: {e}\n")
    if opts.against and not Path(opts.against).is_file():
        ap.exit(2, f"error: --against {opts.against}: no such file; give the path of another train_gpt.py\n")
    if opts.device == "cuda" and not torch.cuda.is_available():
        ap.exit(2, "error: --device cuda: no GPU is visible; use --device cpu\n")
    device = torch.device("cpu") if opts.device == "cpu" else tg.pick_device(0)
    if opts.profile and device.type != "cuda":
        ap.exit(2, "error: --profile lists GPU kernels and this runs on the CPU; leave --profile out\n")
    if opts.autotune and device.type != "cuda":
        ap.exit(2, "error: --autotune tunes GPU kernels and this runs on the CPU; leave --autotune out\n")
    kernels = KERNELS if tg.triton_runs_on(device) else KERNELS[:1]
    variants = opts.variants.split(",") if opts.variants else [f"{m}/{k}" for k in kernels for m in METHODS]
    bad = [v for v in variants if v.count("/") != 1 or v.split("/")[0] not in METHODS or v.split("/")[1] not in KERNELS]
    if bad:
        ap.error(f"--variants {bad[0]!r}: use METHOD/KERNEL with METHOD in {', '.join(METHODS)}, KERNEL torch or triton")
    if any(v.endswith("/triton") for v in variants) and not tg.triton_runs_on(device) and not opts.flops:
        ap.error("the triton variants need a GPU, or TRITON_INTERPRET=1 on the CPU")
    torch.manual_seed(args.seed)
    model = tg.GPT(args).to(device)
    if device.type == "cpu":
        args = dataclasses.replace(args, compile=False)
    def muon(method: str, kernel: str) -> tg.Muon:
        varied = dataclasses.replace(args, ns_method=method, ns_kernel=kernel)
        opt, = [o for o in tg.build_optimizers(model, varied, 0, 1, device) if isinstance(o, tg.Muon)]
        return opt

    optimizers = {variant: muon(*variant.split("/")) for variant in variants}
    for variant in variants if opts.autotune else []:
        method, kernel = variant.split("/")
        opt = optimizers[f"{variant}+autotune"] = muon(method, kernel)

        def autotuned(G, steps, method=method, kernel=kernel):  # a frame of its own: its own compiled graphs
            return tg.orthogonalize(G, steps, method, kernel)
        opt.orthogonalize = torch.compile(autotuned, dynamic=False, mode="max-autotune-no-cudagraphs")
    first = optimizers[variants[0]]
    params = [p for group in first.param_groups for p in group["params"]]
    shapes = shape_counts(first)
    print(f"{len(params)} parameters, {sum(c for c, _, _ in shapes)} matrices, {sum(p.numel() for p in params) / 1e6:.1f}M "
          f"weights, {args.ns_steps} Newton-Schulz steps; shapes: "
          + ", ".join(f"{c} x {m}x{n}" for c, m, n in shapes))
    flops = {v: ns_flops(shapes, args.ns_steps, *v.split("/")) for v in variants}
    flops |= {f"{v}+autotune": flops[v] for v in variants if opts.autotune}
    for v in variants:
        print(f"{v}: {flops[v] / 1e9:.1f} GFLOP a step ({flops[v] / flops[variants[0]]:.2f}x {variants[0]})")
    traffic = traffic_bytes(params)
    print(f"momentum and update traffic: {traffic / 1e9:.2f} GB a step "
          f"({traffic / sum(p.numel() for p in params):.0f} bytes a weight of dtype {params[0].dtype})")
    if opts.flops:
        return
    if opts.accuracy:
        accuracy(shapes, args.ns_steps, variants, device)
        return
    if opts.against:
        other = load_trainer(opts.against, "train_gpt_against")
        copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
        optimizers["against"] = other.Muon(copies, lr=args.muon_lr, momentum=args.muon_momentum,
                                           ns_steps=args.ns_steps, compiled=device.type == "cuda")
    for opt in optimizers.values():
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.randn_like(p) * 1e-3
        for _ in range(3):  # compile
            opt.step()
    results = {name: [] for name in optimizers}
    for r in range(opts.rounds):
        times = {name: step_ms(opt, opts.iters, device) for name, opt in optimizers.items()}
        for name, t in times.items():
            results[name].append(t)
        print(f"round {r + 1}: " + ", ".join(f"{name} {t:.2f} ms" for name, t in times.items()), flush=True)
    for name, ts in results.items():
        median = statistics.median(ts)
        rate = f", {flops[name] / median / 1e9:.3g} TFLOP/s of Newton-Schulz FLOPs" if name in flops else ""
        print(f"{name}: median {median:.2f} ms a step over {opts.rounds} rounds (min {min(ts):.2f}, max {max(ts):.2f})"
              + rate)
    if device.type == "cuda":
        # the floors: no step of these FLOPs and bytes runs faster on this GPU than its two roofs allow
        bandwidth, matmul = device_peaks(device)
        memory = traffic / bandwidth * 1e3
        print(f"roofs on this GPU: copy {bandwidth / 1e12:.2f} TB/s (read + write), bf16 8192^3 matmul "
              f"{matmul / 1e12:.0f} TFLOP/s; traffic floor {memory:.2f} ms")
        for v in variants:
            compute = flops[v] / matmul * 1e3
            print(f"{v}: floor {memory + compute:.2f} ms = {memory:.2f} traffic + {compute:.2f} Newton-Schulz at the "
                  f"matmul roof; measured {statistics.median(results[v]):.2f} ms")
    for name in [variants[0]] + [f"{variants[0]}+autotune"] * opts.autotune if opts.profile else []:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                optimizers[name].step()
            torch.cuda.synchronize()
        print(f"kernels of 3 steps of {name}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))


if __name__ == "__main__":
    main()
