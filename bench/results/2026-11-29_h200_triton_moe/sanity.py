# fail fast on the GPU: the Triton expert op (bf16) against a float32 per-expert loop, forward and gradients
import sys, time
import torch
sys.path.insert(0, ".")
import train_gpt as tg
torch.manual_seed(0)
ok = True
for T, E, k, H, act, idle in [(4099, 8, 2, 384, "relu2", (3,)), (3000, 4, 4, 256, "swiglu", ()), (2048, 16, 1, 512, "relu2", (0, 15))]:
    d = 768
    H1 = 2 * H if act == "swiglu" else H
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w1 = (torch.randn(E, H1, d, device="cuda") * d ** -0.5).bfloat16().requires_grad_()
    w2 = (torch.randn(E, d, H, device="cuda") * H ** -0.5).bfloat16().requires_grad_()
    gates = torch.rand(T, k, device="cuda", requires_grad=True)
    s = torch.randn(T, E, device="cuda"); s[:, list(idle)] = -1e9
    experts = s.topk(k, -1).indices
    flat = experts.flatten(); order = flat.argsort(stable=True)
    offsets = torch.bincount(flat, minlength=E).cumsum(0).to(torch.int32)
    t0 = time.time()
    y, pre = torch.ops.moe_speedrun.expert_mlp(x, w1, w2, gates.flatten(), order, offsets, k, act)
    dy = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    got = torch.autograd.grad(y, [x, w1, w2, gates], dy)
    torch.cuda.synchronize(); t1 = time.time()
    xr, w1r, w2r, gr = [t.detach().float().requires_grad_() for t in (x, w1, w2, gates)]
    yr = torch.zeros(T, d, device="cuda")
    for e in range(E):
        tok, slot = (experts == e).nonzero(as_tuple=True)
        p = xr[tok] @ w1r[e].T
        h = torch.relu(p) ** 2 if act == "relu2" else torch.nn.functional.silu(p[:, :H]) * p[:, H:]
        yr = yr.index_add(0, tok, gr[tok, slot, None] * (h @ w2r[e].T))
    want = torch.autograd.grad(yr, [xr, w1r, w2r, gr], dy.float())
    errs = [((a.float() - b).norm() / b.norm()).item() for a, b in zip([y, *got], [yr, *want])]
    bad = [e for e in errs if not e < 2e-2]
    ok &= not bad
    print(f"T{T} E{E} k{k} H{H} {act}: rel err y/dx/dw1/dw2/dgates " + " ".join(f"{e:.1e}" for e in errs),
          f"(first call with autotune {t1 - t0:.1f}s)", flush=True)
sys.exit(0 if ok else 1)
