# The Triton MoE kernels (train_gpt.py, "MoE kernels"), run on the CPU by Triton's interpreter (conftest sets
# TRITON_INTERPRET=1 before train_gpt imports Triton): the expert op against a float64 loop written here, then the
# whole layer against the PyTorch path with the same weights, forward and every gradient.
import math
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, rel_err, tiny_env
import train_gpt as tg

triton = pytest.importorskip("triton")

pytestmark = [pytest.mark.skipif(not tg.TRITON_INTERPRET, reason="needs TRITON_INTERPRET=1, as tests/conftest.py sets"),
              pytest.mark.usefixtures("one_thread")]


def loop_reference(x, w1, w2, gates, experts, act):
    # y[t] = sum_j gates[t, j] * w2[e] act(w1[e] x[t]) with e = experts[t, j], one assignment at a time, float64
    T, k = experts.shape
    x, w1, w2, gates = x.double(), w1.double(), w2.double(), gates.double()
    rows = []
    for t in range(T):
        y = torch.zeros(x.size(1), dtype=torch.float64)
        for j in range(k):
            e = experts[t, j]
            pre = w1[e] @ x[t]
            if act == "relu2":
                h = torch.clamp(pre, min=0) ** 2
            else:
                gate, up = pre[:pre.numel() // 2], pre[pre.numel() // 2:]
                h = gate / (1 + torch.exp(-gate)) * up
            y = y + gates[t, j] * (w2[e] @ h)
        rows.append(y)
    return torch.stack(rows)


def routing(T: int, E: int, k: int, idle: tuple[int, ...], seed: int):
    # random top-k choices with the experts in `idle` never chosen, sorted the way MoE.forward sorts them
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(T, E, generator=g)
    scores[:, list(idle)] = -math.inf
    experts = scores.topk(k, dim=-1).indices
    flat = experts.flatten()
    order = flat.argsort(stable=True)
    offsets = torch.bincount(flat, minlength=E).cumsum(0).to(torch.int32)
    return experts, order, offsets


CASES = [  # T, d, E, k, hidden, act, idle experts: tile-crossing groups, k = E, empty experts first/middle/last
    (37, 32, 4, 2, 48, "relu2", (1,)),
    (29, 48, 3, 3, 32, "swiglu", ()),
    (50, 32, 5, 1, 40, "relu2", (0, 4)),
    (21, 32, 8, 2, 16, "swiglu", (2, 3, 7)),
    (17, 32, 4, 4, 32, "relu2", ()),
    (70, 16, 2, 1, 16, "swiglu", (0,)),
]


@pytest.mark.parametrize("T,d,E,k,hidden,act,idle", CASES)
def test_expert_op_matches_loop(T, d, E, k, hidden, act, idle):
    torch.manual_seed(T)
    h1 = 2 * hidden if act == "swiglu" else hidden
    x = torch.randn(T, d, requires_grad=True)
    w1 = (torch.randn(E, h1, d) / d ** 0.5).requires_grad_()
    w2 = (torch.randn(E, d, hidden) / hidden ** 0.5).requires_grad_()
    gates = torch.rand(T, k, requires_grad=True)
    experts, order, offsets = routing(T, E, k, idle, seed=T)
    y, pre = torch.ops.moe_speedrun.expert_mlp(x, w1, w2, gates.flatten(), order, offsets, k, act)
    want = loop_reference(x, w1, w2, gates, experts, act)
    assert rel_err(y, want) < 1e-6
    dy = torch.randn(T, d)
    got = torch.autograd.grad(y, [x, w1, w2, gates], dy)
    ref = torch.autograd.grad(want, [x, w1, w2, gates], dy.double())
    for name, a, b in zip(["x", "w1", "w2", "gates"], got, ref):
        assert rel_err(a, b) < 1e-6, name
    for e in idle:  # written as exact zeros, not left as whatever the memory held
        assert not got[1][e].any() and not got[2][e].any()


def test_expert_op_is_deterministic():
    T, d, E, k, hidden = 45, 32, 4, 3, 32
    x, w1, w2 = torch.randn(T, d), torch.randn(E, hidden, d), torch.randn(E, d, hidden)
    gates = torch.rand(T * k)
    _, order, offsets = routing(T, E, k, (), seed=0)
    runs = []
    for _ in range(2):
        args = [t.clone().requires_grad_() for t in (x, w1, w2, gates)]
        y, _ = torch.ops.moe_speedrun.expert_mlp(*args[:3], args[3], order, offsets, k, "relu2")
        runs.append([y, *torch.autograd.grad(y, args, torch.ones_like(y))])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_expert_op_registration():
    # schema, fake kernel (what torch.compile traces) and autograd registration, checked by PyTorch itself
    T, d, E, k, hidden = 19, 16, 4, 2, 16
    _, order, offsets = routing(T, E, k, (2,), seed=1)
    args = (torch.randn(T, d, requires_grad=True), torch.randn(E, hidden, d, requires_grad=True),
            torch.randn(E, d, hidden, requires_grad=True), torch.rand(T * k, requires_grad=True), order, offsets, k,
            "relu2")
    torch.library.opcheck(torch.ops.moe_speedrun.expert_mlp.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def make_pair(E: int, K: int, router: str = "softmax", act: str = "relu2", shared: int = 0, **extra):
    # the same layer twice, once on each kernel
    layers = []
    for kernel in ("triton", "torch"):
        torch.manual_seed(0)
        args = tg.Hyperparameters(model_dim=32, expert_hidden=16, num_experts=E, top_k=K, router=router,
                                  expert_act=act, shared_experts=shared, moe_kernel=kernel, **extra)
        layer = tg.MoE(args)
        with torch.no_grad():
            layer.w2.normal_(0, 0.25)  # zero-initialized output projections would hide the experts' gradients
            if layer.shared is not None:
                layer.shared.c_proj.weight.normal_(0, 0.25)
        layers.append(layer)
    cpu = torch.device("cpu")
    assert layers[0].uses_triton(cpu) and not layers[1].uses_triton(cpu)
    return layers


@pytest.mark.parametrize("E,K,router,act,shared,extra", [
    (4, 2, "softmax", "relu2", 0, {}),
    (4, 1, "sigmoid", "swiglu", 1, {}),
    (8, 2, "softmax", "swiglu", 1, {}),
    (4, 4, "soft", "relu2", 0, {}),
    (4, 2, "softmax", "relu2", 1, dict(capacity_factor=0.6)),
    (6, 3, "noisy", "relu2", 0, {}),
])
def test_layer_matches_torch_path(E, K, router, act, shared, extra):
    fast, plain = make_pair(E, K, router, act, shared, **extra)
    x = torch.randn(1, 43, 32)
    outs, grads = [], []
    for layer in (fast, plain):
        xi = x.clone().requires_grad_()
        torch.manual_seed(5)  # the noisy router's draw
        y, aux = layer(xi)
        g = torch.randn_like(y, generator=torch.Generator().manual_seed(6))
        grads.append(torch.autograd.grad((y * g).sum() + aux, [xi, *layer.parameters()], allow_unused=True))
        outs.append(y)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    names = ["x"] + [n for n, _ in fast.named_parameters()]
    for name, a, b in zip(names, *grads):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"gradient of {name}: {m}")


def test_layer_compiles_in_one_graph():
    # torch.compile(fullgraph=True) traces the layer through the op's fake kernel and autograd registration
    fast, _ = make_pair(4, 2, act="swiglu", shared=1)
    x = torch.randn(1, 24, 32, requires_grad=True)
    eager = fast(x)[0]
    compiled = torch.compile(fast, fullgraph=True, dynamic=False, backend="aot_eager")(x)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(eager)
    torch.testing.assert_close(torch.autograd.grad(compiled, x, g)[0], torch.autograd.grad(eager, x, g)[0],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("block_n", [32, 64])
def test_dgate_partials_cover_every_column_block(block_n):
    # the autotuner runs every config on the same buffers: whatever BLOCK_N runs last, each 32-column partial of
    # dgate must be written (here over a NaN-poisoned buffer) and equal the plain sum over its columns
    T, d, E, k, hidden = 33, 32, 3, 2, 96
    torch.manual_seed(3)
    dy, w2, pre = torch.randn(T, d), torch.randn(E, d, hidden), torch.randn(T * k, hidden)
    gates = torch.rand(T * k)
    _, order, offsets = routing(T, E, k, (), seed=3)
    N = T * k
    parts = torch.full((hidden // tg.DGATE_COLS, N), math.nan)
    dpre, hg = torch.empty_like(pre), torch.empty_like(pre)
    grid = ((triton.cdiv(N, 16) + E) * triton.cdiv(hidden, block_n),)
    tg.gather_rows_kernel.fn[grid](dy, w2, dpre, order, offsets, gates, pre, parts, hg, N, hidden, d, hidden, k,
                                   d, d * hidden, hidden, 1, hidden, E=E, E_POW2=4, ACT=1, BACKWARD=True,
                                   PART=tg.DGATE_COLS, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=16)
    expert = torch.searchsorted(offsets, torch.arange(N), right=True)
    dh = torch.einsum("pc,pch->ph", dy[order // k], w2[expert])  # row p of dy @ w2[e]
    want = (torch.relu(pre) ** 2 * dh).view(N, -1, tg.DGATE_COLS).sum(-1).T
    torch.testing.assert_close(parts, want, rtol=1e-5, atol=1e-5)


def test_trainer_runs_the_triton_path(shared_shards, tmp_path):
    # two steps of the tiny CPU run with one MoE layer on each path: the same losses, to fp32 rounding
    losses = {}
    for kernel in ("triton", "torch"):
        env = tiny_env(shared_shards, tmp_path / kernel, NUM_EXPERTS=4, TOP_K=2, EXPERT_HIDDEN=128, MOE_LAYERS="1",
                       NUM_ITERATIONS=2, VAL_LOSS_EVERY=0, TRAIN_BATCH_TOKENS=256, VAL_SEQ_LEN=256, VAL_TOKENS=512,
                       MOE_KERNEL=kernel)
        result = tg.main(env)
        assert f"{kernel} kernels" in Path(result["log"]).read_text()
        losses[kernel] = result["val_loss"]
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-5)


def test_expert_op_takes_non_contiguous_rows():
    # the kernels address rows by stride only: a transposed or strided x must give what its contiguous copy gives
    T, d, E, k, hidden = 26, 32, 4, 2, 32
    _, order, offsets = routing(T, E, k, (), seed=4)
    w1, w2, gates = torch.randn(E, hidden, d), torch.randn(E, d, hidden), torch.rand(T * k)
    for x in (torch.randn(d, T).T, torch.randn(T, 2 * d)[:, ::2]):
        assert not x.is_contiguous()
        got = [t.requires_grad_() for t in (x.clone(), w1.clone(), w2.clone())]
        want = [t.requires_grad_() for t in (x.contiguous(), w1.clone(), w2.clone())]
        y, y_ref = (torch.ops.moe_speedrun.expert_mlp(*a, gates, order, offsets, k, "relu2")[0] for a in (got, want))
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
        dy = torch.randn(T, d)
        for a, b in zip(torch.autograd.grad(y, got, dy), torch.autograd.grad(y_ref, want, dy)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_triton_is_refused_where_it_cannot_run(shared_shards, tmp_path):
    # without a GPU and without the interpreter, MOE_KERNEL=triton would silently run the PyTorch path
    env = tiny_env(shared_shards, tmp_path, NUM_EXPERTS=4, TOP_K=2, EXPERT_HIDDEN=128, MOE_KERNEL="triton")
    names = {f.name.upper() for f in fields(tg.Hyperparameters)}
    env = {k: v for k, v in os.environ.items() if k not in names} | env | dict(TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), "--check"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: MOE_KERNEL=triton needs a GPU"), r.stderr
    assert not (tmp_path / "logs").exists()


# -----------------------------------------------------------------------------
# Muon's Gram kernel (NS_KERNEL=triton): x x^T from the tiles on and above the diagonal, mirrored

@pytest.mark.parametrize("B,M,K", [(1, 16, 16), (3, 37, 50), (2, 70, 9), (4, 33, 100), (1, 5, 3)])
def test_gram_kernel_is_x_times_x_transposed(B, M, K):
    # fp32 (the interpreter's dot is exact fp32 products, fp32 sums): 1e-6 relative; sizes that are not multiples
    # of the interpreter's 16 x 16 tile, one tile, several tile rows (the pair numbering) and a batch
    x = torch.randn(B, M, K, generator=torch.Generator().manual_seed(M))
    out = tg.gram_matrix_op(x)
    assert out.shape == (B, M, M) and out.dtype == torch.float32
    assert rel_err(out, x.double() @ x.double().mT) < 1e-6
    assert torch.equal(out, out.mT)  # the mirrored tiles are the computed ones, bit for bit
    xt = torch.randn(B, K, M, generator=torch.Generator().manual_seed(K)).mT  # a tall X's X^T: strides, no copy
    assert rel_err(tg.gram_matrix_op(xt), xt.double() @ xt.double().mT) < 1e-6


def test_gram_kernel_in_bf16():
    # bf16 in, fp32 accumulation, bf16 out: the output's rounding, 2^-8, and no more
    x = torch.randn(2, 40, 72, generator=torch.Generator().manual_seed(0)).bfloat16()
    out = tg.gram_matrix_op(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, x.double() @ x.double().mT) < 2 ** -8


def symmetric(B: int, M: int, seed: int) -> torch.Tensor:
    y = torch.randn(B, M, M + 3, generator=torch.Generator().manual_seed(seed))
    return (y @ y.mT) / M  # a Gram matrix, as Newton-Schulz's A is: exactly symmetric


@pytest.mark.parametrize("B,M", [(1, 16), (3, 37), (2, 5), (1, 50)])
@pytest.mark.parametrize("scaled", [False, True])
def test_ns_polynomial_kernel_is_a_i_plus_b_a_plus_c_a_squared(B, M, scaled):
    # the epilogue's sum against float64 written here: fp32, 1e-6 relative; sizes off the 16 x 16 tile, a batch, and
    # a per-matrix scale (Newton-Schulz's first step). A wrong coefficient, a missing diagonal or a mirrored tile
    # that is not the sum's would be off by O(1)
    A = symmetric(B, M, M)
    a, b, c = 3.4445, -4.7750, 2.0315
    scale = torch.rand(B, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float32) + 0.5 if scaled else None
    Ad = A.double()
    want = a * torch.eye(M, dtype=torch.float64) + b * Ad + c * Ad @ Ad
    if scaled:
        want = want * scale.double()
    got = tg.ns_polynomial_op(A, a, b, c, scale)
    assert got.shape == A.shape and got.dtype == torch.float32
    assert rel_err(got, want) < 1e-6
    assert torch.equal(got, got.mT)


def test_ns_polynomial_kernel_in_bf16():
    # bf16 in and out, the sum from fp32 in the epilogue: one rounding, 2^-8 relative
    A = symmetric(2, 40, 0).bfloat16()
    Ad = A.double()
    want = (1.875 * torch.eye(40, dtype=torch.float64) - 1.25 * Ad + 0.375 * Ad @ Ad)
    got = tg.ns_polynomial_op(A, 1.875, -1.25, 0.375)
    assert got.dtype == torch.bfloat16 and rel_err(got, want) < 2 ** -8


@pytest.mark.parametrize("method", ["quintic", "polar_express", "gram"])
def test_orthogonalize_with_the_gram_kernel_is_as_close_to_float64_as_torch(method, monkeypatch):
    # the same iteration with the kernel's products (A^2 as A A^T, the polynomial summed from its fp32 tile), against
    # the float64 iteration written here with the same coefficients from the same bf16 input. PyTorch's path rounds
    # A^2 to bf16 before the sum and is 3.2% off after five steps; the kernel's skips that rounding (1.2-2.0%
    # measured). A wrong tile, a missing mirror or a wrong coefficient is off by O(1)
    g = torch.randn(3, 60, 24, generator=torch.Generator().manual_seed(1))  # n / m = 2.5: gram takes its iteration
    for shape_g in (g, g.mT):
        x = shape_g.bfloat16().double()
        x = x / x.norm(dim=(-2, -1), keepdim=True)
        if x.size(-2) > x.size(-1):
            x = x.mT
        for a, b, c in tg.ns_coefficients("polar_express" if method == "gram" else method, 5):
            A = x @ x.mT
            x = a * x + (b * A + c * A @ A) @ x
        want = x.mT if shape_g.size(-2) > shape_g.size(-1) else x
        torch_err = rel_err(tg.orthogonalize(shape_g, 5, method, "torch"), want)
        with monkeypatch.context() as patch:
            patch.setattr(tg, "gram_matrix", None)  # the kernel's path must not fall back to PyTorch's products
            got = tg.orthogonalize(shape_g, 5, method, "triton")
        assert rel_err(got, want) <= 1.1 * torch_err < 0.04


def test_gram_method_with_the_kernel_iterates_on_the_gram_matrix_from_n_over_m_2():
    # with half-price Gram products newton_schulz costs s (3 m^2 n + m^3): the Gram iteration undercuts it for n / m > 2
    g = torch.randn(2, 24, 42, generator=torch.Generator().manual_seed(0))  # 1.75: the Gram iteration with PyTorch's
    assert torch.equal(tg.orthogonalize(g, 5, "gram", "triton"), tg.orthogonalize(g, 5, "polar_express", "triton"))
    assert not torch.equal(tg.orthogonalize(g, 5, "gram", "torch"), tg.orthogonalize(g, 5, "polar_express", "torch"))


def test_ns_kernel_triton_is_refused_where_it_cannot_run(shared_shards, tmp_path):
    env = tiny_env(shared_shards, tmp_path, NS_KERNEL="triton")
    names = {f.name.upper() for f in fields(tg.Hyperparameters)}
    env = {k: v for k, v in os.environ.items() if k not in names} | env | dict(TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), "--check"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: NS_KERNEL=triton needs a GPU"), r.stderr
