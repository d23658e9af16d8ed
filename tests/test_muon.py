import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt
from conftest import newton_schulz_fp64, rel_err
from train_gpt import Muon, orthogonalize

ROOT = Path(__file__).resolve().parents[1]


def with_singular_values(m: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # G = U diag(s) V^T with s spread over [0.05, 1]; returns G and its polar factor U V^T
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = torch.linspace(1.0, 0.05, k)
    return u @ torch.diag(s) @ v.T, u @ v.T


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() * b.float()).sum().item() / (a.float().norm() * b.float().norm()).item()


@pytest.mark.parametrize("shape", [(4, 96, 48), (4, 48, 96), (2, 64, 64), (80, 40)])
@pytest.mark.parametrize("steps", [1, 5])
def test_orthogonalize_is_the_quintic_iteration(shape, steps):
    # the bf16 version (Gram over the short side, normalization folded into the first product) against fp64
    gen = torch.Generator().manual_seed(steps)
    g = torch.randn(*shape, generator=gen) * 10.0 ** torch.randint(-3, 3, (), generator=gen).item()
    out = orthogonalize(g, steps)
    assert out.shape == g.shape and out.dtype == torch.bfloat16
    # one step: bf16's rounding (2^-8 relative spacing); five: roundoff in the small singular directions grows by
    # up to a = 3.4 a step. test_singular_values_follow_the_quintic checks the coefficients themselves
    assert rel_err(out, newton_schulz_fp64(g.bfloat16(), steps)) < (2 ** -8 if steps == 1 else 0.04)


def test_singular_values_follow_the_quintic():
    # G = U diag(s) V^T of rank 4: Newton-Schulz maps each singular value on its own, s -> p(s / ||s||) with
    # p(x) = a x + b x^3 + c x^5, so U^T X V read off the output must be p(p(s / ||s||)) after two steps. Each
    # is an average over the whole matrix, so bf16 roundoff mostly cancels: 1.5 x 2^-8 (0.6%) is tight enough
    # that a coefficient wrong in its third digit (3.4345, -4.765, 2.0215: 1.7% to 3.2% here) fails
    a, b, c = 3.4445, -4.7750, 2.0315
    gen = torch.Generator().manual_seed(0)
    for m, n in [(96, 48), (48, 96), (64, 64)]:
        u, _ = torch.linalg.qr(torch.randn(m, 4, generator=gen, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(n, 4, generator=gen, dtype=torch.float64))
        g = (u @ torch.diag(torch.tensor([1.0, 0.6, 0.3, 0.1], dtype=torch.float64)) @ v.T).bfloat16().double()
        u, s, vh = torch.linalg.svd(g, full_matrices=False)  # of the bf16 input, which orthogonalize reads
        x = s[:4] / s.norm()
        for _ in range(2):
            x = a * x + b * x ** 3 + c * x ** 5
        got = torch.einsum("mi,mn,in->i", u[:, :4], orthogonalize(g.float(), 2).double(), vh[:4])
        assert ((got - x).abs() / x).max() < 1.5 * 2 ** -8, (m, n, got, x)


def test_batched_equals_one_matrix_at_a_time():
    g = torch.randn(5, 32, 48, generator=torch.Generator().manual_seed(0))
    g[1] *= 100  # matrices of very different scales: each must be normalized on its own
    batched = orthogonalize(g, 5)
    single = torch.stack([orthogonalize(x, 5) for x in g])
    assert batched.shape == g.shape
    for b, one in zip(batched, single):
        assert rel_err(b, one) < 0.005  # a shared normalization over the stack would be off by ~4%


@pytest.mark.parametrize("m,n", [(96, 24), (24, 96), (48, 48)])
def test_result_is_close_to_the_polar_factor(m, n):
    g, polar = with_singular_values(m, n, seed=m + n)
    out = orthogonalize(g, 5).float()
    assert out.shape == (m, n)
    s = torch.linalg.svdvals(out)
    assert s.min() > 0.5 and s.max() < 1.5, s
    assert cosine(out, polar) > 0.95


def test_stacked_parameter_is_orthogonalized_per_matrix():
    # qkv_w [3, m, n]: three matrices, not one [3m, n] matrix
    grads = torch.stack([with_singular_values(32, 16, seed=i)[0] * (i + 1) for i in range(3)])
    p = torch.nn.Parameter(torch.zeros(3, 32, 16))
    p.grad = grads
    Muon([p], lr=0.1, momentum=0.9, ns_steps=5).step()
    update = p.detach() / (-0.1 * 2 ** 0.5)  # per-matrix shape scale sqrt(32 / 16)
    per_matrix = torch.stack([newton_schulz_fp64(x, 5) for x in grads])
    concatenated = newton_schulz_fp64(grads.reshape(96, 16), 5).view(3, 32, 16)
    assert rel_err(update, per_matrix) < 0.1  # bf16 Newton-Schulz moves a few % under input rounding
    assert rel_err(update, concatenated) > 0.5
    for x in update:
        s = torch.linalg.svdvals(x)
        assert s.min() > 0.5 and s.max() < 1.5


@pytest.mark.parametrize("m,n,scale", [(64, 16, 2.0), (16, 64, 1.0), (32, 32, 1.0)])
def test_update_is_lr_times_shape_scale(m, n, scale):
    g, _ = with_singular_values(m, n, seed=7)
    p = torch.nn.Parameter(torch.zeros(m, n))
    p.grad = g * 1e-3  # the update does not depend on the gradient's scale
    Muon([p], lr=0.02, momentum=0.95, ns_steps=5).step()
    top = torch.linalg.matrix_norm(p.detach(), ord=2).item()
    assert 0.02 * scale * 0.8 < top < 0.02 * scale * 1.3
    assert rel_err(p.detach(), -0.02 * scale * newton_schulz_fp64(g, 5)) < 0.1


def test_nesterov_momentum():
    g1, g2 = torch.randn(2, 16, 24, generator=torch.Generator().manual_seed(0))
    p = torch.nn.Parameter(torch.zeros(16, 24))
    opt = Muon([p], lr=1.0, momentum=0.9, ns_steps=5)
    p.grad = g1.clone()
    opt.step()
    p.grad = g2.clone()
    opt.step()
    buf1 = 0.1 * g1
    buf2 = 0.9 * buf1 + 0.1 * g2
    expected = -newton_schulz_fp64(0.1 * g1 + 0.9 * buf1, 5) - newton_schulz_fp64(0.1 * g2 + 0.9 * buf2, 5)
    assert rel_err(p.detach(), expected) < 0.04  # bf16 Newton-Schulz, as test_orthogonalize_is_the_quintic_iteration
    assert rel_err(p.detach(), -newton_schulz_fp64(g1, 5) - newton_schulz_fp64(g2, 5)) > 0.1  # the buffer matters


# -----------------------------------------------------------------------------
# distributed: each rank orthogonalizes a share of the stacked matrices, then all_gather

@pytest.mark.parametrize("method", ["quintic", "polar_express", "gram"])
@pytest.mark.parametrize("shape", [(7, 48, 48), (7, 32, 96), (7, 96, 32)])  # square; wide and tall: gram's own path
def test_a_stack_orthogonalized_in_pieces_equals_it_whole(method, shape):
    # as Muon's ranks do: contiguous shares of a shape group's stack, the short ones padded with zero matrices. Each
    # matrix's result must not depend on which others share its batch (a per-stack normalization, or a coefficient
    # picked by position, would); up to one bf16 unit of the output where a batched product rounds differently
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    g[2] *= 100  # matrices of very different scales
    whole = orthogonalize(g, 5, method).float()
    for cuts in ([0, 3, 7], [0, 1, 4, 7], [0, 4, 7]):
        width = max(b - a for a, b in zip(cuts, cuts[1:]))
        for a, b in zip(cuts, cuts[1:]):
            padded = torch.cat([g[a:b], g.new_zeros(width - (b - a), *shape[1:])])
            piece = orthogonalize(padded, 5, method).float()
            torch.testing.assert_close(piece[:b - a], whole[a:b], rtol=0, atol=2 ** -8 * whole.abs().max().item())
            assert not piece[b - a:].any(), "the padding stays zero"


def muon_steps(rank: int, world_size: int, method: str = "quintic") -> dict:
    # 3 + 1 + 5 matrices in three shape groups: no group divides evenly over 2 ranks
    gen = torch.Generator().manual_seed(0)
    shapes = {"qkv": (3, 32, 16), "single": (16, 48), "experts": (5, 24, 24)}
    params = {k: torch.nn.Parameter(torch.randn(*s, generator=gen) * 0.1) for k, s in shapes.items()}
    opt = Muon(params.values(), lr=0.05, momentum=0.9, ns_steps=5, rank=rank, world_size=world_size,
               orthogonalize=partial(orthogonalize, method=method))
    for _ in range(2):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return {k: p.detach().clone() for k, p in params.items()}


WORKER = """
import sys, torch, torch.distributed as dist
sys.path[:0] = [{root!r}, {tests!r}]
from test_muon import muon_steps
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://{store}", rank=rank, world_size=2)
torch.save(muon_steps(rank, 2, {method!r}), f"{out}/rank{{rank}}.pt")
dist.destroy_process_group()
"""


@pytest.mark.parametrize("method", ["quintic", "polar_express", "gram"])
def test_two_ranks_over_gloo_match_one_process(tmp_path, method):
    code = WORKER.format(root=str(ROOT), tests=str(ROOT / "tests"), store=tmp_path / "store", out=tmp_path,
                         method=method)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    single = muon_steps(0, 1, method)
    for r in range(2):
        result = torch.load(tmp_path / f"rank{r}.pt")
        for name, expected in single.items():
            torch.testing.assert_close(result[name], expected, atol=1e-6, rtol=0, msg=f"rank {r} {name}")


# -----------------------------------------------------------------------------
# SwiGLU: [gate; up] is two matrices, as QKV is three

def test_swiglu_gate_and_up_are_orthogonalized_as_two_matrices():
    # experts' w1 [E, 2h, d] and the shared expert's c_fc [2h, d] hold gate rows then up rows; with the up half's
    # gradient 100x the gate's, one [2h, d] orthogonalization would leave the gate half almost no update (and
    # scale both by sqrt(2h / d))
    args = train_gpt.Hyperparameters(num_experts=2, top_k=1, expert_act="swiglu", shared_experts=1, model_dim=128,
                                     expert_hidden=128, num_layers=2, num_heads=1, head_dim=128, num_value_embeds=1,
                                     no_attn_layers="", long_window_layers="0", train_seq_len=128, val_seq_len=128)
    torch.manual_seed(0)
    model = train_gpt.GPT(args)
    muon = train_gpt.build_optimizers(model, args, 0, 1, torch.device("cpu"))[1]
    moe = model.blocks[0].mlp
    gen = torch.Generator().manual_seed(1)
    for p in (q for group in muon.param_groups for q in group["params"]):
        p.grad = torch.randn(p.shape, generator=gen)
        if p is moe.w1 or p is moe.shared.c_fc.weight:
            p.grad[..., 128:, :] *= 100
    before = {p: p.detach().clone() for p in (moe.w1, moe.shared.c_fc.weight)}
    muon.step()
    for p, w in before.items():
        grads, update = p.grad.view(-1, 128, 128), (p.detach() - w).view(-1, 128, 128)
        # each 128 x 128 half: -lr x its own polar factor, shape scale sqrt(max(1, 128 / 128)) = 1
        want = torch.stack([-args.muon_lr * newton_schulz_fp64(g, args.ns_steps) for g in grads])
        assert rel_err(update, want) < 0.04  # bf16 Newton-Schulz against fp64 (test_orthogonalize_is_the_quintic_iteration)
        top = torch.linalg.matrix_norm(update.double(), ord=2) / args.muon_lr
        assert top.min() > 0.7 and top.max() < 1.25, top  # the quintic's band around 1, for the gate halves too


# -----------------------------------------------------------------------------
# NS_METHOD: Polar Express coefficients, the Gram iteration; NS_KERNEL=triton is in tests/test_kernels.py

LOWER, CUSHION, SAFETY = 1e-3, 0.02407327424182761, 1.01  # the Polar Express paper's l, cushion and safety factor


def quintic_steps(coefficients, x):
    # the composed scalar map s -> p_k(...p_1(s)) that the steps apply to each normalized singular value
    for a, b, c in coefficients:
        x = a * x + b * x ** 3 + c * x ** 5
    return x


def polar_express_as_applied(steps: int) -> list:
    # the table's first `steps` quintics (its last one repeated past its end), each but the last as p(x / 1.01)
    table = train_gpt.POLAR_EXPRESS
    raw = [table[min(i, len(table) - 1)] for i in range(steps)]
    return [(a / SAFETY, b / SAFETY ** 3, c / SAFETY ** 5) for a, b, c in raw[:-1]] + raw[-1:]


def coefficients_of(method: str, steps: int) -> list:
    return [(3.4445, -4.7750, 2.0315)] * steps if method == "quintic" else polar_express_as_applied(steps)


def x_iteration_fp64(g: torch.Tensor, coefficients) -> torch.Tensor:
    # the textbook iteration in float64 with any coefficients: normalize, then X <- aX + (bA + cA^2)X, A = X X^T
    x = g.double().mT if g.size(-2) > g.size(-1) else g.double()
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    for a, b, c in coefficients:
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    return x.mT if g.size(-2) > g.size(-1) else x


def test_polar_express_table_is_what_the_bench_script_derives():
    sys.path.insert(0, str(ROOT / "bench"))
    from polar_express import polar_express
    derived = polar_express(len(train_gpt.POLAR_EXPRESS))
    for got, want in zip(train_gpt.POLAR_EXPRESS, derived, strict=True):
        assert got == pytest.approx(want, rel=1e-9)


def test_each_polar_express_step_is_the_minimax_quintic():
    # equioscillation (Chebyshev): p is the odd quintic closest to a constant over [x0, x3] iff p takes equal values
    # at x0 and at its interior minimum x2, and equal values at its interior maximum x1 and at x3; the cushion fits
    # the early steps on [max(l, cushion u), u], and every step is scaled so its band over [l, u] is centred on 1.
    # Checked on the band each step inherits, for the steps whose band is wide enough to resolve in float64
    lo, hi = LOWER, 1.0
    for k, (a, b, c) in enumerate(train_gpt.POLAR_EXPRESS[:6]):
        x0, x3 = max(lo, CUSHION * hi), hi
        squares = np.roots([5 * c, 3 * b, a])  # p'(x) = a + 3b x^2 + 5c x^4
        x1, x2 = np.sqrt(np.sort(squares.real))
        assert x0 < x1 < x2 < x3, (k, x0, x1, x2, x3)
        p = lambda x: a * x + b * x ** 3 + c * x ** 5
        assert p(x0) == pytest.approx(p(x2), rel=1e-9) and p(x1) == pytest.approx(p(x3), rel=1e-9), k
        values = p(np.linspace(lo, hi, 100_001))
        assert values.min() + values.max() == pytest.approx(2, rel=1e-9), k
        lo, hi = values.min(), values.max()
    # past that the band is below 1e-6 wide: the limit of the minimax quintic, p(1) = 1, p'(1) = p''(1) = 0
    assert train_gpt.POLAR_EXPRESS[-1] == pytest.approx((15 / 8, -10 / 8, 3 / 8), rel=1e-12)


@pytest.mark.parametrize("steps,band", [(5, (0.85, 1.125)), (6, (0.995, 1.002))])
def test_polar_express_maps_the_design_interval_into_a_narrow_band(steps, band):
    # every singular value in [l, 1] (after normalization) ends in `band` (the paper's construction, with its safety
    # factor applied, computed here), and its worst distance from 1 is smaller than Jordan's after as many steps
    x = np.linspace(LOWER, 1, 200_001)
    got = quintic_steps(train_gpt.ns_coefficients("polar_express", steps), x)
    assert band[0] < got.min() and got.max() < band[1]
    assert train_gpt.ns_coefficients("polar_express", steps) == pytest.approx(polar_express_as_applied(steps))
    jordan = quintic_steps(train_gpt.ns_coefficients("quintic", steps), x)
    assert np.abs(got - 1).max() < 0.5 * np.abs(jordan - 1).max()


@pytest.mark.parametrize("method", ["polar_express", "gram"])
@pytest.mark.parametrize("shape", [(4, 96, 48), (4, 48, 96), (2, 64, 64), (80, 40)])
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_new_methods_are_the_iteration_with_their_coefficients(method, shape, steps):
    # bf16 (gram: fp16) against the fp64 iteration of the applied Polar Express quintics. One step: bf16 rounding of
    # the output, 2^-8; two: the first step's slope (a = 8.2) scales the roundoff in the small singular directions,
    # 4 x 2^-8; five: 0.06, the Jordan test's 0.04 with room for the larger early slopes (measured: <= 0.036)
    gen = torch.Generator().manual_seed(steps)
    g = torch.randn(*shape, generator=gen) * 10.0 ** torch.randint(-3, 3, (), generator=gen).item()
    out = orthogonalize(g, steps, method)
    assert out.shape == g.shape and out.dtype == torch.bfloat16
    want = x_iteration_fp64(g.bfloat16(), polar_express_as_applied(steps))
    assert rel_err(out, want) < {1: 2 ** -8, 2: 4 * 2 ** -8, 5: 0.06}[steps]


@pytest.mark.parametrize("shape", [(3, 40, 24), (3, 24, 40), (2, 32, 32)])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 7])
def test_gram_iteration_is_the_x_iteration_in_fp64(shape, steps):
    # the same polynomial steps carried on the Gram matrix, restarts included (every GRAM_RESTART steps)
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    coefficients = polar_express_as_applied(steps)
    x = g / g.norm(dim=(-2, -1), keepdim=True)
    got = train_gpt.gram_newton_schulz(x, coefficients, train_gpt.gram_matrix)
    assert rel_err(got, x_iteration_fp64(g, coefficients)) < 1e-10


@pytest.mark.parametrize("method", ["quintic", "polar_express", "gram"])
@pytest.mark.parametrize("m,n", [(96, 24), (24, 96), (48, 48), (80, 64)])
def test_singular_values_land_in_the_band_the_method_promises(method, m, n):
    # G's singular values spread over [0.05, 1]: after normalization each goes through the composed quintics, so the
    # output's singular values lie in the image of [s_min, s_max] / ||s||, computed here in float64, widened by 0.03
    # for bf16 (the one-step rounding 2^-8, grown by the steps' slopes; measured <= 0.02)
    g, polar = with_singular_values(m, n, seed=m * n)
    s = torch.linalg.svdvals(g.double()).numpy()
    image = quintic_steps(coefficients_of(method, 5), np.linspace(s.min(), s.max(), 100_001) / np.linalg.norm(s))
    got = torch.linalg.svdvals(orthogonalize(g, 5, method).double()).numpy()
    assert image.min() - 0.03 < got.min() and got.max() < image.max() + 0.03, (got.min(), got.max(), image)
    assert cosine(orthogonalize(g, 5, method), polar) > 0.95


@pytest.mark.parametrize("method", ["quintic", "polar_express", "gram"])
def test_zero_matrices_stay_zero(method):
    # Muon pads a stack that does not divide over the ranks with zero matrices: no 0/0 or overflow may turn them NaN
    g = torch.zeros(3, 16, 40)  # n / m = 2.5: the Gram iteration's shapes
    g[1] = torch.randn(16, 40)
    out = orthogonalize(g, 5, method)
    assert torch.isfinite(out).all() and not out[0].any() and not out[2].any() and out[1].any()


@pytest.mark.parametrize("m,n,gram", [(48, 48, False), (40, 48, False), (48, 72, False), (48, 80, True),
                                      (96, 24, True)])
def test_gram_method_iterates_on_the_gram_matrix_only_where_that_saves_flops(m, n, gram):
    # its flops undercut newton_schulz's only for n / m > 1.5 (gram_newton_schulz's counts); elsewhere NS_METHOD=gram
    # is polar_express, bit for bit
    g = torch.randn(2, m, n, generator=torch.Generator().manual_seed(m + n))
    same = torch.equal(orthogonalize(g, 5, "gram"), orthogonalize(g, 5, "polar_express"))
    assert same != gram


@pytest.mark.parametrize("method", ["polar_express", "gram"])
def test_muon_orthogonalizes_with_ns_method(method):
    # build_optimizers hands NS_METHOD to Muon: one step with momentum 0 moves a matrix by -lr x that method's result
    args = train_gpt.Hyperparameters(num_layers=2, model_dim=128, num_heads=1, head_dim=128, mlp_hidden=256,
                                     num_value_embeds=1, no_attn_layers="", long_window_layers="0",
                                     train_seq_len=128, val_seq_len=128, ns_method=method)
    torch.manual_seed(0)
    model = train_gpt.GPT(args)
    muon = train_gpt.build_optimizers(model, args, 0, 1, torch.device("cpu"))[1]
    muon.param_groups[0]["momentum"] = 0.0
    p = muon.param_groups[0]["params"][0]
    m, n = muon.param_groups[0]["matrix"]
    for group in muon.param_groups:
        group["momentum"] = 0.0
        for q in group["params"]:
            q.grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(q.numel()))
    before = p.detach().clone()
    muon.step()
    update = (p.detach() - before) / (-args.muon_lr * max(1, m / n) ** 0.5)
    grads = p.grad.view(-1, m, n)
    assert rel_err(update, orthogonalize(grads, 5, method).float().view_as(p)) < 0.01
    assert rel_err(update, orthogonalize(grads, 5, "quintic").float().view_as(p)) > 0.05


def test_bench_counts_the_flops_the_comments_state():
    # bench/muon_step.py counts each variant's matmul FLOPs on meta tensors; they must be the closed forms in
    # newton_schulz's and gram_newton_schulz's comments (3 matrices of 32 x 80, n / m = 2.5, 5 steps, 1 restart)
    sys.path.insert(0, str(ROOT / "bench"))
    import muon_step
    B, m, n, s = 3, 32, 80, 5
    half = lambda rows, k: rows * (rows + 1) * k  # the kernel's Gram product: the upper triangle and its diagonal
    want = {("quintic", "torch"): B * s * (4 * m * m * n + 2 * m ** 3),
            ("quintic", "triton"): B * s * (half(m, n) + half(m, m) + 2 * m * m * n),
            ("gram", "torch"): B * (8 * m * m * n + 28 * m ** 3),
            ("gram", "triton"): B * (half(m, n) * 2 + 2 * m * m * n * 2 + s * half(m, m) + 6 * 3 * m ** 3)}
    for (method, kernel), flops in want.items():
        assert muon_step.ns_flops([(B, m, n)], s, method, kernel) == flops, (method, kernel)


def test_bench_counts_the_traffic_outside_newton_schulz():
    # per weight: its gradient read, the parameter read and written (its dtype), the fp32 momentum read and written,
    # the bf16 Newton-Schulz input written and the bf16 update read: 24 bytes for fp32 weights, 18 for bf16
    sys.path.insert(0, str(ROOT / "bench"))
    import muon_step
    params = [torch.empty(3, 32, 80), torch.empty(5, 7, dtype=torch.bfloat16)]
    assert muon_step.traffic_bytes(params) == 3 * 32 * 80 * 24 + 5 * 7 * 18
