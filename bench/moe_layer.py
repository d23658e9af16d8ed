# MoE layer microbenchmark (shared/BENCHMARK.md): one MLP layer, forward + backward, T = 49,152 tokens, d = 768,
# bf16, compiled. Prints time / dense for each variant, checks the MoE against a per-expert loop reference, and
# with --profile the top kernels of one MoE forward + backward.
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg


def reference_moe(moe: tg.MoE, x: torch.Tensor) -> torch.Tensor:
    # per-expert loop over the same routing, fp32
    logits, probs, experts, gates = moe.route(x)
    y = torch.zeros_like(x, dtype=torch.float32)
    for e in range(moe.E):
        tok, slot = (experts == e).nonzero(as_tuple=True)
        h = moe.act(x[tok].float() @ moe.w1[e].float().T)
        y.index_add_(0, tok, (h @ moe.w2[e].float().T) * gates[tok, slot, None])
    return y


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


def make_step(layer, x, g):
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)

    def step():
        out = compiled(x)
        y = out[0] if isinstance(out, tuple) else out
        y.backward(g)
        for p in layer.parameters():
            p.grad = None
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=49152)
    ap.add_argument("--configs", default="8x2,32x4", help="comma-separated EXPERTSxTOPK")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--profile", action="store_true")
    opts = ap.parse_args()
    tg.pick_device(0)
    torch.manual_seed(0)
    T, d = opts.tokens, 768
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    dense = tg.MLP(d, 3072).cuda()
    torch.nn.init.normal_(dense.c_proj.weight, std=0.02)
    t_dense = timed(make_step(dense, x, g), opts.iters)
    print(f"dense ReLU^2 MLP (hidden 3072): {t_dense:.3f} ms fwd+bwd")
    for cfg in opts.configs.split(","):
        E, K = map(int, cfg.split("x"))
        args = tg.Hyperparameters(num_experts=E, top_k=K, model_dim=d, mlp_hidden=3072)
        moe = tg.MoE(args).cuda()
        torch.nn.init.normal_(moe.w2, std=0.02)
        with torch.no_grad():
            ref = reference_moe(moe, x)
            out = moe(x)[0].float()
        err = ((out - ref).norm() / ref.norm()).item()
        t = timed(make_step(moe, x, g), opts.iters)
        print(f"E{E} top-{K} hidden {tg.expert_hidden(args)}: {t:.3f} ms fwd+bwd = {t / t_dense:.2f}x dense "
              f"(rel err vs loop reference {err:.1e})")
        if opts.profile:
            step = make_step(moe, x, g)
            step()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
