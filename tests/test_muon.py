import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import rel_err
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


def newton_schulz_fp64(g: torch.Tensor, steps: int) -> torch.Tensor:
    # the textbook quintic iteration in float64: normalize, then X <- aX + (bA + cA^2)X with A = X X^T
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double().mT if g.size(-2) > g.size(-1) else g.double()
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    for _ in range(steps):
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    return x.mT if g.size(-2) > g.size(-1) else x


@pytest.mark.parametrize("shape", [(4, 96, 48), (4, 48, 96), (2, 64, 64), (80, 40)])
@pytest.mark.parametrize("steps", [1, 5])
def test_orthogonalize_is_the_quintic_iteration(shape, steps):
    # the bf16 version (Gram over the short side, normalization folded into the first product) against fp64
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(steps)) * 10 ** torch.randint(-3, 3, ()).item()
    out = orthogonalize(g, steps)
    assert out.shape == g.shape and out.dtype == torch.bfloat16
    assert rel_err(out, newton_schulz_fp64(g, steps)) < 0.04  # bf16 rounding; a wrong term is off by far more


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
    per_matrix = torch.stack([orthogonalize(x, 5).float() for x in grads])
    concatenated = orthogonalize(grads.reshape(96, 16), 5).float().view(3, 32, 16)
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
    assert rel_err(p.detach(), -0.02 * scale * orthogonalize(g, 5)) < 0.1


def test_nesterov_momentum():
    torch.manual_seed(0)
    g1, g2 = torch.randn(2, 16, 24)
    p = torch.nn.Parameter(torch.zeros(16, 24))
    opt = Muon([p], lr=1.0, momentum=0.9, ns_steps=5)
    p.grad = g1.clone()
    opt.step()
    p.grad = g2.clone()
    opt.step()
    buf1 = 0.1 * g1
    buf2 = 0.9 * buf1 + 0.1 * g2
    expected = -orthogonalize(0.1 * g1 + 0.9 * buf1, 5).float() - orthogonalize(0.1 * g2 + 0.9 * buf2, 5).float()
    assert rel_err(p.detach(), expected) < 0.02
    assert rel_err(p.detach(), -orthogonalize(g1, 5) - orthogonalize(g2, 5)) > 0.1  # the buffer matters


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
