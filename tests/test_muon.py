import os
import subprocess
import sys
from pathlib import Path

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

def muon_steps(rank: int, world_size: int) -> dict:
    # 3 + 1 + 5 matrices in three shape groups: no group divides evenly over 2 ranks
    gen = torch.Generator().manual_seed(0)
    shapes = {"qkv": (3, 32, 16), "single": (16, 48), "experts": (5, 24, 24)}
    params = {k: torch.nn.Parameter(torch.randn(*s, generator=gen) * 0.1) for k, s in shapes.items()}
    opt = Muon(params.values(), lr=0.05, momentum=0.9, ns_steps=5, rank=rank, world_size=world_size)
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
torch.save(muon_steps(rank, 2), f"{out}/rank{{rank}}.pt")
dist.destroy_process_group()
"""


def test_two_ranks_over_gloo_match_one_process(tmp_path):
    code = WORKER.format(root=str(ROOT), tests=str(ROOT / "tests"), store=tmp_path / "store", out=tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    single = muon_steps(0, 1)
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
