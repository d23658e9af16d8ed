# MoE layer microbenchmark (shared/BENCHMARK.md): one MLP layer, forward + backward, T = 49,152 tokens, d = 768,
# bf16, compiled. Prints time / dense for each variant, checks the MoE against a per-expert loop reference, and
# with --profile the top kernels of one MoE forward + backward. --against OTHER/train_gpt.py times another version
# of the trainer's layer in the same process, interleaved round by round, so an A/B is not lost in run-to-run noise.
# --gemms times the layer's grouped GEMMs alone, each operand layout its backward could use, beside dense products
# of the same size. --kernels picks the MOE_KERNEL paths timed side by side (the Triton one is checked against the
# PyTorch one, forward and every gradient); --kernel-table times each Triton launch alone against measured ceilings.
import argparse
import importlib.util
import sys
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg


def load_trainer(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_moe(moe, x: torch.Tensor) -> torch.Tensor:
    # per-expert loop over the same routing, fp32
    logits, probs, experts, gates = moe.route(x)
    y = torch.zeros_like(x, dtype=torch.float32)
    for e in range(moe.E):
        tok, slot = (experts == e).nonzero(as_tuple=True)
        h = moe.act(x[tok].float() @ moe.w1[e].float().T)
        y.index_add_(0, tok, (h @ moe.w2[e].float().T) * gates[tok, slot, None])
    return y + moe.shared(x.float()) if moe.shared is not None else y


def timed(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def time_gemms(T: int, d: int, E: int, k: int, hidden: int, iters: int):
    # the six products of one MoE layer (E experts, top-k, tokens spread evenly), in eager mode
    bf = dict(device="cuda", dtype=torch.bfloat16)
    rows = T * k
    offs = torch.arange(1, E + 1, device="cuda", dtype=torch.int32) * (rows // E)
    xp, dpre = torch.randn(rows, d, **bf), torch.randn(rows, hidden, **bf)
    w = torch.randn(E, hidden, d, **bf)
    w_rows = w.mT.contiguous()  # [E, d, h]
    dpre_t, xp_cols = dpre.T.contiguous(), xp.T.contiguous().T  # K-major operands of the weight gradient
    dense_w = torch.randn(d, k * hidden, **bf)
    gmm = torch._grouped_mm
    flop = 2 * rows * d * hidden
    cases = {
        "forward x @ w.mT (w [E,h,d]: B column-major)": lambda: gmm(xp, w.mT, offs=offs),
        "forward x @ w (w [E,d,h]: B row-major)": lambda: gmm(xp, w_rows, offs=offs),
        "dx dpre @ w (B row-major)": lambda: gmm(dpre, w, offs=offs),
        "dw dpre.T @ x (autograd's choice: A column-major, B row-major)": lambda: gmm(dpre.T, xp, offs=offs),
        "dw x.T @ dpre (the transpose)": lambda: gmm(xp.T, dpre, offs=offs),
        "dw K-major operands, copies made beforehand": lambda: gmm(dpre_t, xp_cols, offs=offs),
        "dw K-major operands, copies included": lambda: gmm(dpre.T.contiguous(), xp.T.contiguous().T, offs=offs),
        "dense mm [T*k, d] @ [d, h]": lambda: xp @ w[0].T,
        "dense mm [T, d] @ [d, k*h] (the dense MLP's)": lambda: xp[:T] @ dense_w,
        "dense dw [h, T*k] @ [T*k, d]": lambda: dpre.T @ xp,
        "bmm [E, T*k/E, d] @ [E, d, h]": lambda: torch.bmm(xp.view(E, -1, d), w.mT),
    }
    print(f"grouped GEMMs of E{E} top-{k}, T {T}, d {d}, hidden {hidden}: {flop / 1e9:.0f} GFLOP each")
    for name, fn in cases.items():
        t = timed(fn, iters)
        print(f"  {name}: {t * 1e3:.0f} us, {flop / t / 1e9:.0f} TFLOP/s")


def ceilings() -> tuple[float, float]:
    # this GPU's bf16 matmul rate (TFLOP/s) and copy bandwidth (GB/s, bytes read + written), measured here
    a, b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16), torch.randn(8192, 8192, device="cuda",
                                                                                   dtype=torch.bfloat16)
    src = torch.randn(2 ** 30 // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    mm = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    copy = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * 8192 ** 3 / mm / 1e9, 2 * 2 ** 30 / copy / 1e6


def kernel_table(T: int, d: int, E: int, K: int, width: int, act: str, peak: tuple[float, float]):
    # each launch of the Triton expert op alone (routing drawn at random, so T*K/E rows per expert on average);
    # bytes are the fewest each must move: every operand row read once per assignment, every output written once
    bf = dict(device="cuda", dtype=torch.bfloat16)
    N, H, H1 = T * K, width, width * (2 if act == "swiglu" else 1)
    experts = torch.rand(T, E, device="cuda").topk(K, dim=-1).indices.flatten()
    order = experts.argsort(stable=True)
    offsets = torch.bincount(experts, minlength=E).cumsum(0).to(torch.int32)
    x, dy = torch.randn(T, d, **bf), torch.randn(T, d, **bf)
    w1, w2 = torch.randn(E, H1, d, **bf) * d ** -0.5, torch.randn(E, d, H, **bf) * H ** -0.5
    gates = torch.rand(N, device="cuda")
    pre = tg.up_projection(x, w1, order, offsets, K)
    dpre, _, hg = tg.down_projection_backward(dy, w2, gates, order, offsets, pre, K, act)
    rows = x.new_empty(N, d)
    wb1, wb2 = 2 * E * H1 * d, 2 * E * d * H
    cases = [
        ("up projection (gather x)", lambda: tg.up_projection(x, w1, order, offsets, K), N * d * H1,
         2 * N * d + wb1 + 2 * N * H1),
        ("down projection (act, gate, scatter)", lambda: tg.down_projection(pre, w2, gates, order, offsets, act),
         N * H * d, 2 * N * H1 + wb2 + 2 * N * d),
        ("sum over k", lambda: tg.sum_over_k(rows, K), 0, 2 * N * d + 2 * T * d),
        ("down backward (gather dy; dpre, dgate, hg)",
         lambda: tg.down_projection_backward(dy, w2, gates, order, offsets, pre, K, act), N * d * H,
         2 * N * d + wb2 + 4 * N * H1 + 2 * N * H + 4 * N * H // tg.DGATE_COLS),
        ("w2 gradient (gather dy)", lambda: tg.weight_grad(dy, hg, order, offsets, K, True, like=w2), N * d * H,
         2 * N * d + 2 * N * H + wb2),
        ("w1 gradient (gather x)", lambda: tg.weight_grad(dpre, x, order, offsets, K, False, like=w1), N * H1 * d,
         2 * N * H1 + 2 * N * d + wb1),
        ("up backward (scatter dx rows)", lambda: tg.up_projection_backward(dpre, w1, order, offsets), N * H1 * d,
         2 * N * H1 + wb1 + 2 * N * d),
        ("sum over k (dx)", lambda: tg.sum_over_k(rows, K), 0, 2 * N * d + 2 * T * d),
    ]
    dense_w = torch.randn(3072, d, **bf)
    cases.append(("dense reference: x @ w.T, [T, 768] x [768, 3072] (cuBLAS)", lambda: x @ dense_w.T, T * d * 3072,
                  2 * T * d + 2 * 3072 * d + 2 * T * 3072))
    print(f"Triton launches of E{E} top-{K} hidden {width} {act}, T {T}: ceilings {peak[0]:.0f} TFLOP/s, "
          f"{peak[1]:.0f} GB/s")
    total = 0.0
    for name, fn, macs, nbytes in cases:
        t = triton.testing.do_bench(fn, return_mode="median")
        total += t if not name.startswith("dense") else 0
        tflops, gbs = 2 * macs / t / 1e9, nbytes / t / 1e6
        print(f"  {name:<60} {t * 1e3:7.1f} us {tflops:6.0f} TFLOP/s ({100 * tflops / peak[0]:3.0f}%) "
              f"{gbs:6.0f} GB/s ({100 * gbs / peak[1]:3.0f}%)")
    print(f"  expert op total (forward + backward launches): {total * 1e3:.0f} us")


def parse_config(cfg: str, act: str = "relu2") -> tuple[int, int, int, int]:
    # EXPERTSxTOPK, or EXPERTSxTOPK+SHARED with shared experts; the width is this trainer's iso-FLOP default,
    # passed explicitly so that an --against version builds the same layer
    routed, _, shared_text = cfg.partition("+")
    E, K = map(int, routed.split("x"))
    shared = int(shared_text or 0)
    if not 1 <= K <= E or shared < 0:
        raise ValueError(cfg)
    return E, K, shared, tg.expert_hidden(tg.Hyperparameters(num_experts=E, top_k=K, shared_experts=shared,
                                                             expert_act=act))


def make_step(layer, x, g):
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)

    def step():
        out = compiled(x)
        y = out[0] if isinstance(out, tuple) else out
        y.backward(g)
        x.grad = None  # else every iteration adds an eager accumulation of x's gradient to both variants
        for p in layer.parameters():
            p.grad = None
    return step


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number, at least 1")
    return int(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=positive, default=49152)
    ap.add_argument("--configs", default="8x2,32x4", help="comma-separated EXPERTSxTOPK[+SHARED], e.g. 8x2,8x1+1")
    ap.add_argument("--iters", type=positive, default=30, help="timed iterations per round (the median is kept)")
    ap.add_argument("--rounds", type=positive, default=1, help="rounds over all variants; each prints its ratios")
    ap.add_argument("--against", help="path of another train_gpt.py whose MoE layer is timed alongside")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--gemms", action="store_true", help="time the grouped GEMMs alone and exit")
    ap.add_argument("--kernels", default="triton,torch", help="MOE_KERNEL paths of this trainer to time")
    ap.add_argument("--kernel-table", action="store_true", help="time each Triton launch alone and exit")
    ap.add_argument("--act", default="relu2", choices=["relu2", "swiglu"], help="expert activation")
    opts = ap.parse_args()
    try:
        for cfg in opts.configs.split(","):
            parse_config(cfg, opts.act)
    except ValueError:
        ap.error(f"argument --configs: {opts.configs!r} must be comma-separated EXPERTSxTOPK[+SHARED] with "
                 f"TOPK at most EXPERTS, e.g. 8x2,8x1+1")
    if opts.against and not Path(opts.against).is_file():
        ap.exit(2, f"error: --against {opts.against}: no such file; give the path of another train_gpt.py\n")
    if not torch.cuda.is_available():
        ap.exit(2, "error: bench/moe_layer.py times CUDA events: run it on a GPU\n")
    tg.pick_device(0)
    if opts.gemms:
        for cfg in opts.configs.split(","):
            E, K, _, width = parse_config(cfg)
            time_gemms(opts.tokens, 768, E, K, width, opts.iters)
        return
    if opts.kernel_table:
        peak = ceilings()
        for cfg in opts.configs.split(","):
            E, K, _, width = parse_config(cfg, opts.act)
            kernel_table(opts.tokens, 768, E, K, width, opts.act, peak)
        return
    torch.manual_seed(0)
    T, d = opts.tokens, 768
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    dense = tg.MLP(d, 3072).cuda()
    torch.nn.init.normal_(dense.c_proj.weight, std=0.02)
    steps = {"dense": make_step(dense, x, g)}
    trainers = {"this": tg} | ({"against": load_trainer(opts.against, "train_gpt_against")} if opts.against else {})
    for cfg in opts.configs.split(","):
        E, K, shared, width = parse_config(cfg, opts.act)
        variants = [("this", tg, kernel) for kernel in opts.kernels.split(",")]
        variants += [("against", load_trainer(opts.against, "train_gpt_against"), None)] if opts.against else []
        for name, module, kernel in variants:
            args = module.Hyperparameters(num_experts=E, top_k=K, shared_experts=shared, model_dim=d, mlp_hidden=3072,
                                          expert_hidden=width, expert_act=opts.act,
                                          **({"moe_kernel": kernel} if kernel else {}))
            torch.manual_seed(0)
            moe = module.MoE(args).cuda()
            torch.nn.init.normal_(moe.w2, std=0.02)
            if moe.shared is not None:
                torch.nn.init.normal_(moe.shared.c_proj.weight, std=0.02)
            with torch.no_grad():
                ref = reference_moe(moe, x)
                out = moe(x)[0].float()
            err = ((out - ref).norm() / ref.norm()).item()
            label = f"{name} {cfg}" + (f" {kernel}" if kernel else "")
            print(f"{label}: E{E} top-{K} +{shared} shared, hidden {module.expert_hidden(args)} {opts.act}, "
                  f"rel err vs loop reference {err:.1e}")
            if kernel:
                names = ["x"] + [n for n, _ in moe.named_parameters()]
                got = torch.autograd.grad(moe(x)[0], [x, *moe.parameters()], g, allow_unused=True)
                want = torch.autograd.grad(reference_moe(moe, x), [x, *moe.parameters()], g.float(), allow_unused=True)
                print(f"{label}: gradient rel err vs the fp32 loop reference: " + ", ".join(
                    f"{n} {((a.float() - b).norm() / b.norm()).item():.1e}"
                    for n, a, b in zip(names, got, want) if a is not None))
            steps[label] = make_step(moe, x, g)
    results = {key: [] for key in steps}
    for r in range(opts.rounds):
        times = {key: timed(step, opts.iters) for key, step in steps.items()}
        for key, t in times.items():
            results[key].append(t / times["dense"])
        print(f"round {r + 1}: " + ", ".join(f"{key} {t:.3f} ms ({t / times['dense']:.2f}x)" for key, t in times.items()),
              flush=True)
    for key, ratios in results.items():
        if key != "dense":
            print(f"{key}: median {sorted(ratios)[len(ratios) // 2]:.3f}x dense over {opts.rounds} rounds "
                  f"(min {min(ratios):.3f}x, max {max(ratios):.3f}x)")
    if opts.profile:
        for key, step in steps.items():
            if key == "dense" or key.startswith("this "):
                step()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        step()
                    torch.cuda.synchronize()
                print(f"{key}: kernels of 5 forward + backward passes")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90))


if __name__ == "__main__":
    main()
