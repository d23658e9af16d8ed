import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from conftest import ROOT, launch, newton_schulz_fp64, rel_err, tiny_env, tiny_gpt_args
import train_gpt as tg


pytestmark = pytest.mark.usefixtures("one_thread")


def make_moe(E: int, K: int, router: str = "softmax", act: str = "relu2", shared: int = 0, dim: int = 32,
             hidden: int = 16, seed: int = 0, **extra) -> tg.MoE:
    torch.manual_seed(seed)
    args = tg.Hyperparameters(model_dim=dim, expert_hidden=hidden, num_experts=E, top_k=K, router=router,
                              expert_act=act, shared_experts=shared, moe_kernel="torch", **extra)
    moe = tg.MoE(args)  # the PyTorch path; tests/test_kernels.py holds the Triton one to it
    with torch.no_grad():
        # zero-initialized output projections would make every expert (and the router's gradient) vanish
        moe.w2.normal_(0, hidden ** -0.5)
        if moe.shared is not None:
            moe.shared.c_proj.weight.normal_(0, hidden ** -0.5)
        if moe.router_noise is not None:
            moe.router_noise.normal_(0, dim ** -0.5)
    return moe


def activation(moe: tg.MoE, h: torch.Tensor) -> torch.Tensor:
    # written out here, not taken from the layer: relu(h)^2, or SwiGLU's silu(gate) * up with gate = the first half
    if moe.act is tg.swiglu:
        gate, up = h[..., :h.size(-1) // 2], h[..., h.size(-1) // 2:]
        return gate * torch.sigmoid(gate) * up
    return torch.clamp_min(h, 0) ** 2


def reference(moe: tg.MoE, x: torch.Tensor, noise: torch.Tensor | None = None,
              capacity: int | None = None) -> tuple[torch.Tensor, float]:
    # routing recomputed from the weights in fp32, then one expert at a time over its tokens
    x2 = x.reshape(-1, x.size(-1)).float()
    T, E, K = x2.size(0), moe.E, moe.k
    logits = x2 @ moe.router.T
    if noise is not None:
        logits = logits + noise * F.softplus(x2 @ moe.router_noise.T)
    scores = torch.sigmoid(logits) if moe.kind == "sigmoid" else logits.softmax(-1)
    top = (scores + moe.bias).detach().argsort(dim=-1, descending=True)[:, :K]  # the bias only selects
    chosen = torch.zeros(T, E, dtype=torch.bool).scatter_(1, top, True)
    if K == 1:
        gates = scores * chosen
    elif moe.kind == "sigmoid":
        gates = scores * chosen / (scores * chosen).sum(-1, keepdim=True)
    else:
        gates = logits.masked_fill(~chosen, -math.inf).softmax(-1)
    kept = chosen if capacity is None else chosen & (chosen.cumsum(0) <= capacity)  # first come, first served
    y = torch.zeros_like(x2)
    for e in range(E):
        rows = kept[:, e].nonzero().squeeze(1)
        h = activation(moe, x2[rows] @ moe.w1[e].T)
        y = y.index_add(0, rows, gates[rows, e, None] * (h @ moe.w2[e].T))
    if moe.shared is not None:
        y = y + activation(moe, x2 @ moe.shared.c_fc.weight.T) @ moe.shared.c_proj.weight.T
    return y.view(x.shape), 1 - kept.sum().item() / (T * K)


def assert_same_layer(moe: tg.MoE, x: torch.Tensor, seed: int | None = None, capacity: int | None = None):
    # forward values and the gradient of x and of every parameter, against autograd through the reference
    x = x.clone().requires_grad_(True)
    if seed is not None:
        torch.manual_seed(seed)
    y, _ = moe(x)
    noise = None
    if moe.router_noise is not None and moe.training:
        torch.manual_seed(seed)
        noise = torch.randn(x.numel() // x.size(-1), moe.E)  # the draw route() makes
    y_ref, _ = reference(moe, x, noise, capacity)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)  # a real upstream gradient: a stride-0 one trips _grouped_mm's backward
    inputs = [x, *moe.parameters()]
    got = torch.autograd.grad(y, inputs, g, allow_unused=True)
    want = torch.autograd.grad(y_ref, inputs, g, allow_unused=True)
    names = ["x"] + [n for n, _ in moe.named_parameters()]
    for name, a, b in zip(names, got, want):
        assert (a is None) == (b is None), f"{name}: gradient {a} vs reference {b}"
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"gradient of {name}: {m}")
    return got


# -----------------------------------------------------------------------------
# The layer against a per-expert loop

ROUTED = [(E, K, r) for E, K in [(4, 1), (4, 2), (8, 2), (4, 4)] for r in ("softmax", "sigmoid", "noisy")]


@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("act", ["relu2", "swiglu"])
@pytest.mark.parametrize("E,K,router", ROUTED + [(4, 4, "soft")])
def test_layer_matches_per_expert_loop(E, K, router, act, shared):
    moe = make_moe(E, K, router, act, shared, dim=32, hidden=16)
    x = torch.randn(1, 24, 32)
    assert_same_layer(moe, x, seed=1)
    if router == "noisy":
        moe.eval()
        assert_same_layer(moe, x)


def test_noisy_router_adds_noise_only_in_training():
    moe = make_moe(4, 2, "noisy")
    x = torch.randn(1, 16, 32)
    with torch.no_grad():
        a, b = moe(x)[0], moe(x)[0]
        assert not torch.allclose(a, b), "training calls of the noisy router should differ"
        assert (moe.route(x.view(16, 32))[0] != F.linear(x.view(16, 32), moe.router)).all()
        moe.eval()
        torch.testing.assert_close(moe(x)[0], moe(x)[0], rtol=0, atol=0)
        torch.testing.assert_close(moe.route(x.view(16, 32))[0], F.linear(x.view(16, 32), moe.router))


@pytest.mark.parametrize("bias", [[-1e9, 0, 0, 0], [0, 0, -1e9, 0], [0, 0, 0, -1e9], [-1e9, 0, -1e9, -1e9]],
                         ids=["first", "middle", "last", "all-but-one"])
def test_expert_without_tokens(bias):
    moe = make_moe(4, 1 if bias.count(0) == 1 else 2)
    moe.bias.copy_(torch.tensor(bias))
    x = torch.randn(1, 24, 32)
    idle = [e for e, b in enumerate(bias) if b]
    assert not torch.isin(moe.route(x.view(24, 32))[2], torch.tensor(idle)).any()
    grads = dict(zip(["x"] + [n for n, _ in moe.named_parameters()], assert_same_layer(moe, x)))
    for e in idle:
        # exactly zero, not stale memory of an empty group
        assert torch.equal(grads["w1"][e], torch.zeros_like(grads["w1"][e]))
        assert torch.equal(grads["w2"][e], torch.zeros_like(grads["w2"][e]))
    assert grads["w1"].abs().sum() > 0 and grads["w2"].abs().sum() > 0


def skewed(moe: tg.MoE, x: torch.Tensor) -> torch.Tensor:
    # tokens share a direction that expert 0's router row points at, so most of them prefer expert 0
    # (mildly: saturated scores would flip every token at once when the bias overtakes them)
    u = torch.randn(x.size(-1))
    u = u / u.norm()
    with torch.no_grad():
        moe.router[0] += 1.5 * u
    return x + u


# capacity = ceil(cf * T * K / E) with E = 4, worked out by hand: 0.5*30/4 = 3.75 -> 4, 1.1*30*2/4 = 16.5 -> 17,
# 0.3*34*2/4 = 5.1 -> 6, and 1.1*100*2/4 = 55 exactly (56 in floating point, where 1.1 is 1.1000000000000000888)
@pytest.mark.parametrize("cf,T,K,capacity", [(0.5, 32, 1, 4), (1.0, 32, 2, 16), (0.5, 30, 1, 4), (1.1, 30, 1, 9),
                                             (1.1, 30, 2, 17), (0.3, 34, 2, 6), (1.1, 100, 2, 55)])
def test_capacity_keeps_first_tokens(cf, T, K, capacity):
    E = 4
    assert tg.expert_capacity(cf, T, K, E) == capacity
    moe = make_moe(E, K, capacity_factor=cf)
    x = skewed(moe, torch.randn(1, T, 32))
    _, dropped = reference(moe, x, capacity=capacity)
    assert dropped > 0, "the case should overflow an expert"
    assert_same_layer(moe, x, capacity=capacity)
    moe.eval()
    moe.reset_stats()
    with torch.no_grad():
        moe(x)
    calls, reported = moe.stats[[0, 4]].tolist()
    assert calls == 1
    assert reported == pytest.approx(dropped, abs=1e-6)


def test_capacity_is_exact_for_decimal_factors():
    # every factor 0.01..3.00 as typed: ceil(c/100 * T * K / E) in integers; the float formula misses 1.1 at
    # (100, 2, 4) and many more
    for c in range(1, 301):
        for T, K, E in [(100, 2, 4), (30, 1, 4), (64, 2, 8), (10, 1, 1), (127, 2, 3)]:
            assert tg.expert_capacity(c / 100, T, K, E) == -(-(c * T * K) // (100 * E)), (c / 100, T, K, E)


# -----------------------------------------------------------------------------
# Balancing: Switch loss, z-loss, auxiliary-loss-free bias

def numpy_losses(logits: np.ndarray, K: int, sigmoid: bool) -> tuple[float, float, float, float]:
    # Switch loss E * sum_i f_i P_i, z-loss mean(logsumexp^2), the mean entropy of the router's distribution, and
    # the mean over tokens of the smallest gate
    T, E = logits.shape
    p = 1 / (1 + np.exp(-logits)) if sigmoid else np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    top = np.argsort(-p, axis=1)[:, :K]
    f = np.bincount(top.ravel(), minlength=E) / (T * K)
    probs = p / p.sum(1, keepdims=True)
    lse = np.log(np.exp(logits).sum(1))
    chosen = np.take_along_axis(p, top, 1)
    # one expert: its score; several: sigmoid scores normalized, or a softmax over the chosen logits (same thing)
    gates = chosen if K == 1 else chosen / chosen.sum(1, keepdims=True)
    return (E * (f * probs.mean(0)).sum(), (lse ** 2).mean(), -(probs * np.log(probs)).sum(1).mean(),
            gates.min(1).mean())


def moe_with_logits(logits: list[list[float]], K: int, router: str, **extra) -> tuple[tg.MoE, torch.Tensor]:
    # x[t] is the t-th unit vector, so the router's column t holds token t's logits
    T, E = len(logits), len(logits[0])
    moe = make_moe(E, K, router, dim=32, **extra)
    with torch.no_grad():
        moe.router.zero_()
        moe.router[:, :T] = torch.tensor(logits).T
    return moe, torch.eye(T, 32)[None]


@pytest.mark.parametrize("router,K", [("softmax", 1), ("softmax", 2), ("sigmoid", 1), ("sigmoid", 2)])
def test_balancing_losses_by_hand(router, K):
    logits = [[2.0, 0.0, -1.0], [0.0, 1.5, 0.5], [1.0, -0.5, 0.2], [-1.0, 0.3, 2.5]]
    switch, z, entropy, gate_min = numpy_losses(np.array(logits), K, router == "sigmoid")
    moe, x = moe_with_logits(logits, K, router, aux_loss_coef=0.01, z_loss_coef=0.001)
    _, aux = moe(x)
    assert aux.item() == pytest.approx(0.01 * switch + 0.001 * z, rel=1e-5)
    moe.eval()
    moe.reset_stats()
    with torch.no_grad():
        _, aux_eval = moe(x)
    calls, got_entropy, got_switch, got_z, dropped, got_gate_min = moe.stats.tolist()
    assert (calls, dropped) == (1, 0)
    assert (got_switch, got_z, got_entropy, got_gate_min) == pytest.approx((switch, z, entropy, gate_min), rel=1e-5)
    assert 0 < gate_min <= 1 / K
    assert aux_eval.item() == pytest.approx(0.01 * switch + 0.001 * z, rel=1e-5)


def test_balancing_losses_uniform_router():
    # zero logits: P_i = 1/E whatever the selection, so the Switch loss is exactly 1 and z = log(E)^2
    moe, x = moe_with_logits([[0.0] * 4] * 4, 2, "softmax", aux_loss_coef=1.0, z_loss_coef=1.0)
    moe.eval()
    with torch.no_grad():
        _, aux = moe(x)
    assert moe.stats[2].item() == pytest.approx(1.0, rel=1e-6)
    assert moe.stats[3].item() == pytest.approx(math.log(4) ** 2, rel=1e-6)
    assert aux.item() == pytest.approx(1 + math.log(4) ** 2, rel=1e-6)


def test_aux_losses_off_in_training_cost_nothing():
    moe, x = moe_with_logits([[2.0, 0.0, -1.0], [0.0, 1.5, 0.5]], 1, "softmax")
    _, aux = moe(x)
    assert aux.item() == 0
    assert moe.stats.sum().item() == 0, "training calls should not accumulate statistics"


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_switch_loss_gradient_reaches_router(router):
    moe, x = moe_with_logits([[2.0, 0.0, -1.0], [0.0, 1.5, 0.5], [1.0, -0.5, 0.2]], 1, router, aux_loss_coef=1.0)
    _, aux = moe(x)
    (grad,) = torch.autograd.grad(aux, moe.router)
    logits = x[0] @ moe.router.T
    scores = torch.sigmoid(logits) if router == "sigmoid" else logits.softmax(-1)
    probs = scores / scores.sum(-1, keepdim=True)
    f = torch.bincount(scores.argmax(-1), minlength=3).float() / 3
    (want,) = torch.autograd.grad(3 * (f * probs.mean(0)).sum(), moe.router)
    torch.testing.assert_close(grad, want)


@pytest.mark.parametrize("router,K", [("softmax", 1), ("softmax", 2), ("sigmoid", 2)])
def test_router_bias_balances_load(router, K):
    T, E = 64, 4
    moe = make_moe(E, K, router)
    x = skewed(moe, torch.randn(1, T, 32))
    loads, balance, bias0 = [], [], []
    with torch.no_grad():
        for _ in range(60):
            moe(x)
            loads.append(moe.load.clone())
            assert loads[-1].sum() == T * K
            balance.append((loads[-1].max() / loads[-1].mean()).item())
            tg.update_router_bias([moe], 0.01, 1)
            assert torch.equal(moe.load, torch.zeros(E)), "the load should restart after each update"
            bias0.append(moe.bias[0].item())
    assert balance[0] > 1.4 and loads[0].argmax() == 0, "the case should start skewed towards expert 0"
    assert bias0[0] == pytest.approx(-0.01) and bias0[-1] < -0.1, "the overloaded expert's bias should fall"
    assert max(balance[-10:]) <= 1.25 < balance[0]
    # the bias has moved the selection, yet the gates are still the unbiased scores'
    scores = moe.route(x.view(T, 32))[1]
    assert not torch.equal(moe.route(x.view(T, 32))[2].sort(-1).values, scores.topk(K).indices.sort(-1).values)
    assert_same_layer(moe, x)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_top1_router_still_learns(router):
    # top-1 gates are the router's score, not a softmax over one logit (which is 1 and has no gradient)
    moe = make_moe(4, 1, router)
    x = torch.randn(1, 32, 32)
    y, _ = moe(x)
    (grad,) = torch.autograd.grad(y, moe.router, torch.randn_like(y))
    assert grad.norm() > 1e-3 * moe.router.norm()
    assert (grad.abs().sum(1) > 0).all(), "every expert that got tokens should teach its router row"


# -----------------------------------------------------------------------------
# Router matmul and top-k selection

def test_router_logits_of_bf16_input_are_fp32_exact():
    # bf16 activations, fp32 router: the split-weight products must match fp64 to fp32-like precision, forward and
    # both gradients, where a plain bf16 product is off by ~1e-3
    torch.manual_seed(0)
    x = torch.randn(4096, 64).bfloat16().requires_grad_(True)
    w = (torch.randn(8, 64) * 0.1).requires_grad_(True)
    g = torch.randn(4096, 8)
    out = tg.router_logits(x, w)
    dx, dw = torch.autograd.grad(out, (x, w), g)
    x64, w64, g64 = x.detach().double(), w.detach().double(), g.double()
    assert out.dtype == torch.float32 and dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    assert rel_err(out, x64 @ w64.T) < 2e-5
    assert rel_err(x.detach() @ w.detach().bfloat16().T, x64 @ w64.T) > 1e-3  # what the split avoids
    assert rel_err(dw, g64.T @ x64) < 2e-5
    assert rel_err(dx, (g64 @ w64).bfloat16()) < 5e-4  # as good as rounding the exact gradient to bf16


def test_router_logits_of_fp32_input_are_plain_linear():
    x, w = torch.randn(16, 32, dtype=torch.float64).float(), torch.randn(4, 32)
    torch.testing.assert_close(tg.router_logits(x, w), x @ w.T)


@pytest.mark.parametrize("E,K", [(4, 1), (8, 2), (8, 8), (32, 4)])
def test_top_indices_are_the_k_largest(E, K):
    torch.manual_seed(E + K)
    scores = torch.randn(1000, E)  # continuous: no ties
    got = tg.top_indices(scores, K)
    assert got.shape == (1000, K) and got.dtype == torch.int64
    torch.testing.assert_close(got.sort(-1).values, scores.topk(K, dim=-1).indices.sort(-1).values, rtol=0, atol=0)


def test_top_indices_skip_a_masked_expert():
    # the bias balancing can push an expert to -1e9: it is picked only when K leaves no other choice
    scores = torch.rand(100, 4)
    scores[:, 2] -= 1e9
    assert not (tg.top_indices(scores, 3) == 2).any()
    assert (tg.top_indices(scores, 4).sort(-1).values == torch.arange(4)).all()


# -----------------------------------------------------------------------------
# Muon on stacked experts

def test_orthogonalize_is_per_expert():
    torch.manual_seed(0)
    for m, n in [(64, 32), (32, 64)]:
        G = torch.randn(4, m, n)
        stacked = tg.orthogonalize(G, 5).float()
        looped = torch.stack([newton_schulz_fp64(g, 5) for g in G])
        assert rel_err(stacked, looped) < 0.04  # bf16 Newton-Schulz against fp64 (test_muon)
        merged = newton_schulz_fp64(G.reshape(4 * m, n), 5).view(4, m, n)
        assert (stacked - merged).abs().max() > 0.2, "a stack should not be orthogonalized as one matrix"
        sv = torch.linalg.svdvals(stacked)
        assert sv.min() > 0.5 and sv.max() < 1.5, "every expert's matrix should come out near-orthogonal"


@pytest.mark.parametrize("m,n", [(64, 16), (16, 64)])
def test_muon_lr_scale_uses_expert_shape(m, n):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, m, n))
    before = p.detach().clone()
    p.grad = torch.randn(4, m, n)
    opt = tg.Muon([p], lr=0.1, momentum=0.0, ns_steps=5)
    opt.step()
    # sqrt(max(1, m / n)) of one expert, not of the [4m, n] stack
    want = 0.1 * max(1, m / n) ** 0.5 * newton_schulz_fp64(p.grad, 5)
    assert rel_err(before - p.detach(), want) < 0.04  # bf16 Newton-Schulz against fp64 (test_muon)
    if m > n:  # the [4m, n] stack's sqrt(4m / n) would be twice as large: rel_err(x, 2x) = 0.5
        assert rel_err(before - p.detach(), want * 2) > 0.4


# -----------------------------------------------------------------------------
# The MoE inside the GPT: compile, training runs

def test_resume_refuses_a_checkpoint_of_another_architecture():
    args = dataclasses.replace(tiny_gpt_args(), shared_experts=1, expert_hidden=0, resume="old.pt")
    model = tg.GPT(args)
    tg.check_checkpoint(dict(args=dataclasses.asdict(args), model=model.state_dict(), world_size=1), args, model, 1)  # its own
    # the same settings, but experts twice as wide (what EXPERT_HIDDEN=0 gave with shared experts before d5f494c)
    wider = tg.GPT(dataclasses.replace(args, expert_hidden=2 * tg.expert_hidden(args)))
    with pytest.raises(tg.ConfigError, match=r"RESUME=old.pt holds blocks\.\d+\.mlp\.w1 of shape \(4, 256, 128\)"):
        tg.check_checkpoint(dict(args=dataclasses.asdict(args), model=wider.state_dict(), world_size=1), args, model, 1)
    with pytest.raises(tg.ConfigError, match="RESUME=old.pt was trained with a different TOP_K=1"):
        tg.check_checkpoint(dict(args=dataclasses.asdict(dataclasses.replace(args, top_k=1)), model=model.state_dict(),
                                 world_size=1), args, model, 1)
    older = {k: v for k, v in dataclasses.asdict(args).items() if k != "num_value_embeds"}  # before it was saved
    with pytest.raises(tg.ConfigError, match="RESUME=old.pt was trained with a different NUM_VALUE_EMBEDS=3"):
        tg.check_checkpoint(dict(args=older, model=model.state_dict(), world_size=1), args, model, 1)  # was KeyError
    fewer = {k: v for k, v in model.state_dict().items() if "value_embeds" not in k}  # same settings, other keys
    with pytest.raises(tg.ConfigError, match=r"RESUME=old.pt lacks this model's value_embeds\.0\.weight; resume with"):
        tg.check_checkpoint(dict(args=dataclasses.asdict(args), model=fewer, world_size=1), args, model, 1)
    more = model.state_dict() | dict(extra=torch.zeros(1))
    with pytest.raises(tg.ConfigError, match="RESUME=old.pt holds extra, which this model lacks"):
        tg.check_checkpoint(dict(args=dataclasses.asdict(args), model=more, world_size=1), args, model, 1)
    with pytest.raises(tg.ConfigError, match="RESUME=old.pt was written by 2 processes and this run has 1"):
        tg.check_checkpoint(dict(args=dataclasses.asdict(args), model=model.state_dict(), world_size=2), args, model, 1)


@pytest.mark.parametrize("matrix_optimizer", ["muon", "adamw"])
def test_every_parameter_has_one_optimizer_group_with_its_learning_rate(matrix_optimizer):
    args = dataclasses.replace(tiny_gpt_args(), router="noisy", shared_experts=1, router_lr=0.0007,
                               matrix_optimizer=matrix_optimizer, adamw_lr=0.0011, expert_lr_mult=1.7)
    model = tg.GPT(args)
    optimizers = tg.build_optimizers(model, args, 0, 1, torch.device("cpu"))
    lr_of = {}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                assert id(p) not in lr_of, "a parameter is in two groups"
                lr_of[id(p)] = (type(opt).__name__, group["lr"])
    assert set(lr_of) == {id(p) for p in model.parameters()}
    matrix = ("Muon", args.muon_lr) if matrix_optimizer == "muon" else ("ShardedAdamW", args.adamw_lr)
    # the routed experts' matrices get EXPERT_LR_MULT x the matrices' learning rate; the shared expert has none
    expert = (matrix[0], matrix[1] * 1.7)
    moe = model.blocks[0].mlp
    assert lr_of[id(moe.router)] == lr_of[id(moe.router_noise)] == ("ShardedAdamW", 0.0007)
    for p in (moe.w1, moe.w2):
        assert lr_of[id(p)] == expert
    for p in (moe.shared.c_fc.weight, moe.shared.c_proj.weight):
        assert lr_of[id(p)] == matrix
    assert lr_of[id(model.lm_head.weight)] == ("ShardedAdamW", args.head_lr)


def test_adamw_first_step_moves_the_routed_experts_by_expert_lr_mult_x_adamw_lr():
    # Adam's first step, bias-corrected, is lr x g / (|g| + eps) = lr x sign(g) per element (eps = 1e-10)
    args = dataclasses.replace(tiny_gpt_args(), shared_experts=1, matrix_optimizer="adamw", adamw_lr=0.003,
                               expert_lr_mult=2.5)
    torch.manual_seed(0)
    model = tg.GPT(args)
    optimizers = tg.build_optimizers(model, args, 0, 1, torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    moe = model.blocks[0].mlp
    watched = dict(expert=moe.w1, shared=moe.shared.c_fc.weight)
    before = {k: p.detach().clone() for k, p in watched.items()}
    optimizers[0].step()
    for name, lr in (("expert", 0.003 * 2.5), ("shared", 0.003)):
        step = (watched[name].detach() - before[name]).abs()
        torch.testing.assert_close(step, torch.full_like(step, lr), rtol=0, atol=1e-6)  # fp32 rounding of w - step


def test_compiles_without_graph_breaks_or_recompiles():
    args = tiny_gpt_args()
    torch.manual_seed(0)
    model = tg.GPT(args)
    # activations in bf16 as on GPU: the fake-tensor kernel of _grouped_mm accepts only bf16
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            m.to(torch.bfloat16)
    moes = [b.mlp for b in model.blocks]

    def batch(seed: int):
        tokens = torch.randint(0, args.vocab_size, (args.train_seq_len + 1,), dtype=torch.int32,
                               generator=torch.Generator().manual_seed(seed))
        return tokens[:-1], tokens[1:].long()

    inputs, targets = batch(0)
    explained = torch._dynamo.explain(model)(inputs, targets, torch.tensor(1, dtype=torch.int32))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    optimizers = tg.build_optimizers(model, args, 0, 1, torch.device("cpu"))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(3):
            inputs, targets = batch(step + 1)
            window = torch.tensor(step + 1, dtype=torch.int32)
            ce, aux = compiled(inputs, targets, window)
            if step == 0:
                torch.testing.assert_close(ce, model(inputs, targets, window)[0])
            (ce + aux).backward()
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            tg.update_router_bias(moes, 0.01, 1)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


MOE_LINE = re.compile(r"^moe step:(\d+) layer:(\d+) ((?:\w+:\S+ ?)+)$")


def moe_lines(log: str) -> dict[tuple[int, int], dict[str, float]]:
    out = {}
    for line in log.splitlines():
        if line.startswith("moe step:"):
            match = MOE_LINE.match(line)
            assert match, f"unparseable line: {line}"
            out[int(match[1]), int(match[2])] = {k: float(v) for k, v in (kv.split(":") for kv in match[3].split())}
    return out


def val_losses(log: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"^step:(\d+)/\d+ val_loss:(\S+)", log, re.M)}


def test_soft_moe_trains(shards, tmp_path):
    # 10 steps rather than the README's 20: soft routing already learns the synthetic phrases by then
    result = tg.main(tiny_env(shards, tmp_path, NUM_EXPERTS=4, TOP_K=4, ROUTER="soft", EXPERT_HIDDEN=128,
                              NUM_ITERATIONS=10, VAL_LOSS_EVERY=5))
    log = Path(result["log"]).read_text()
    losses = val_losses(log)
    assert list(losses) == [0, 5, 10]
    assert losses[0] == pytest.approx(math.log(50257), abs=0.01)
    assert losses[10] < 5 and result["val_loss"] < 5
    reports = moe_lines(log)
    assert set(reports) == {(s, layer) for s in (0, 5, 10) for layer in range(4)}
    for fields in reports.values():
        assert set(fields) == {"load_max", "load_min", "entropy", "aux", "zloss", "dropped", "gate_min"}
        # every token reaches every expert: the load is even, nothing is dropped, and Switch's loss is 1
        assert fields["load_max"] == fields["load_min"] == 1
        assert fields["dropped"] == 0 and fields["aux"] == pytest.approx(1, abs=1e-4)
        assert 0 < fields["entropy"] <= math.log(4) + 1e-3
        assert 0 < fields["gate_min"] <= 1 / 4 + 1e-4


GRADIENT_CHECK = """
import json, os, sys, torch
import torch.distributed as dist
sys.path.insert(0, {root!r})
import train_gpt
forward, finish = train_gpt.GPT.forward, train_gpt.GradientReducer.finish
micro, params = [], []


def recording_forward(self, *args):
    # each micro-step's gradients of its cross-entropy and of its aux loss, from the graph the trainer backpropagates
    ce, aux = forward(self, *args)
    if self.training:
        params[:] = self.parameters()
        grads = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in (ce, aux)]
        micro.append([[torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)] for gs in grads])
    return ce, aux


def checking_finish(self):
    # once the reduction is done, each rank holds the summed gradient of what it owns: every parameter's range
    finish(self)
    n, world = len(micro), dist.get_world_size()
    worst = wrong = 0.0
    owned = 0
    for i, p in enumerate(params):
        ce = sum(step[0][i] for step in micro)
        aux = sum(step[1][i] for step in micro)
        for t in (ce, aux):
            dist.all_reduce(t)
        s, e = self.ranges[id(p)][dist.get_rank()]
        if e == s:
            continue
        owned += e - s
        want = ((ce + aux) / (n * world)).view(-1)[s:e]  # the mean over every micro-step of every rank
        undivided = (ce / (n * world) + aux).view(-1)[s:e]  # what an aux loss left out of the division would give
        got = self.reduced(p)
        if want.norm() > 0:
            worst = max(worst, ((got - want).norm() / want.norm()).item())
            wrong = max(wrong, ((undivided - want).norm() / want.norm()).item())
    total = torch.tensor(owned)
    dist.all_reduce(total)
    print("gradient check: " + json.dumps(dict(micro_steps=n, world_size=world, worst=worst, wrong=wrong,
                                               owned=total.item(), params=sum(p.numel() for p in params))))
    micro.clear()


train_gpt.GPT.forward, train_gpt.GradientReducer.finish = recording_forward, checking_finish
train_gpt.main()
"""


def test_aux_losses_are_averaged_over_micro_steps_and_ranks(shards, tmp_path):
    # 2 ranks x 2 micro-steps, every balancing term on: the gradient the optimizer sees must be the mean of
    # d(ce + aux) over the 4 micro-batches, which fails when the aux loss misses the division by either count
    script = tmp_path / "check.py"
    script.write_text(GRADIENT_CHECK.format(root=str(ROOT)))
    env = tiny_env(shards, tmp_path, NUM_EXPERTS=4, TOP_K=2, EXPERT_HIDDEN=128, ROUTER="noisy", AUX_LOSS_COEF=0.5,
                   Z_LOSS_COEF=0.05, CAPACITY_FACTOR=1.1, TRAIN_BATCH_TOKENS=1024, TRAIN_SEQ_LEN=256,
                   NUM_ITERATIONS=1, VAL_LOSS_EVERY=0, VAL_TOKENS=1024, GRAD_REDUCE="reduce_scatter_fp32")
    proc = launch(script, env, nproc=2, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # found anywhere in the output: the two ranks print at once, and their lines can run together
    checks = [json.loads(found) for found in re.findall(r"gradient check: (\{[^{}]*\})", proc.stdout)]
    assert len(checks) == 2, proc.stdout[-3000:]
    for check in checks:
        assert (check["micro_steps"], check["world_size"]) == (2, 2)
        assert check["worst"] < 1e-5  # the same sums in another order: fp32 rounding
        assert check["owned"] == check["params"]  # the ranks' ranges cover every parameter once
        assert check["wrong"] > 1e-2, "the aux loss should weigh enough for the check to see its scale"


def test_two_processes_match_one(shards, tmp_path):
    def run(nproc: int) -> str:
        env = tiny_env(shards, tmp_path / f"np{nproc}", NUM_EXPERTS=4, TOP_K=2, EXPERT_HIDDEN=128,
                       TRAIN_BATCH_TOKENS=512, TRAIN_SEQ_LEN=256, NUM_ITERATIONS=4, VAL_LOSS_EVERY=2,
                       BIAS_UPDATE_RATE=0.01, SAVE_CHECKPOINT=1, GRAD_REDUCE="reduce_scatter_fp32")
        proc = launch(ROOT / "train_gpt.py", env, nproc, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return (tmp_path / f"np{nproc}" / "logs" / "tiny.txt").read_text()

    two, one = run(2), run(1)
    assert '"world_size": 2' in two and '"world_size": 1' in one
    losses_two, losses_one = val_losses(two), val_losses(one)
    assert list(losses_one) == [0, 2, 4] and list(losses_two) == [0, 2, 4]
    for step in losses_one:
        assert losses_two[step] == pytest.approx(losses_one[step], abs=1e-5), f"step {step}"
    assert losses_one[4] < losses_one[0] - 1
    # the bias update runs on the all-reduced load: the expert loads agree, and they move with the bias
    lines_two, lines_one = moe_lines(two), moe_lines(one)
    assert lines_two.keys() == lines_one.keys()
    for key in lines_one:  # loads are counts: equal; the float statistics agree to their printed precision
        for f in ("load_max", "load_min"):
            assert lines_two[key][f] == lines_one[key][f], (key, f)
        for f in ("entropy", "aux", "zloss", "gate_min"):
            assert lines_two[key][f] == pytest.approx(lines_one[key][f], abs=2e-3), (key, f)
    # the bias moves by +-BIAS_UPDATE_RATE (or 0) per expert and step on the all-reduced (integer) load: after 4
    # steps the biases are the same multiples of 0.01 in both runs, and not all zero
    ckpt = {n: torch.load(tmp_path / f"np{n}" / "ckpt" / "tiny" / "step_000004.pt")["model"] for n in (1, 2)}
    biases = {n: torch.stack([v for k, v in ckpt[n].items() if k.endswith(".mlp.bias")]) for n in (1, 2)}
    assert biases[1].shape == (4, 4) and torch.equal(biases[1], biases[2])
    steps = biases[1] / 0.01
    assert (steps - steps.round()).abs().max() < 1e-4 and steps.abs().max() <= 4 and steps.abs().sum() > 0


# -----------------------------------------------------------------------------
# Configuration errors

@pytest.mark.parametrize("env,names", [
    (dict(NUM_EXPERTS="4", TOP_K="5"), ["TOP_K=5", "NUM_EXPERTS=4"]),
    (dict(NUM_EXPERTS="4", TOP_K="0"), ["TOP_K=0"]),
    (dict(NUM_EXPERTS="4", EXPERT_HIDDEN="100"), ["EXPERT_HIDDEN=100", "128"]),
    (dict(NUM_EXPERTS="4", ROUTER="bogus"), ["ROUTER='bogus'", "softmax"]),
    (dict(NUM_EXPERTS="4", EXPERT_ACT="bogus"), ["EXPERT_ACT='bogus'", "swiglu"]),
    (dict(NUM_EXPERTS="4", TOP_K="2", ROUTER="soft"), ["ROUTER=soft", "TOP_K"]),
    (dict(NUM_EXPERTS="4", MOE_LAYERS="1,12"), ["MOE_LAYERS='1,12'", "NUM_LAYERS=12"]),
    (dict(NUM_EXPERTS="4", MOE_LAYERS="a"), ["MOE_LAYERS='a'"]),
    (dict(NUM_EXPERTS="4", CAPACITY_FACTOR="-1"), ["CAPACITY_FACTOR"]),
    (dict(NUM_EXPERTS="4", CAPACITY_FACTOR="inf"), ["CAPACITY_FACTOR=inf", "finite"]),
    (dict(NUM_EXPERTS="4", CAPACITY_FACTOR="nan"), ["CAPACITY_FACTOR=nan", "finite"]),
    (dict(NUM_EXPERTS="4", MOE_KERNEL="cuda"), ["MOE_KERNEL='cuda'", "triton or torch"]),
    (dict(MOE_KERNEL="bogus"), ["MOE_KERNEL='bogus'"]),  # a dense run too: a value that does not parse stops it
    (dict(ROUTER="bogus"), ["ROUTER='bogus'"]),
    (dict(NUM_EXPERTS="4", EXPERT_INIT_SCALE="0"), ["EXPERT_INIT_SCALE=0.0", "positive"]),
])
def test_config_errors_name_the_setting(env, names):
    with pytest.raises(tg.ConfigError) as err:
        tg.load_config(env)
    for name in names:
        assert name in str(err.value)


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_expert_init_scale_multiplies_the_std_of_w1(scale):
    # record 21's init: uniform with std 0.5 / sqrt(fan_in); 4 x 128 x 128 draws resolve the std to ~0.2%
    dim = 128
    torch.manual_seed(0)
    moe = tg.MoE(tg.Hyperparameters(model_dim=dim, expert_hidden=128, num_experts=4, top_k=2,
                                    expert_init_scale=scale))
    w1 = moe.w1.detach().double()
    assert w1.std().item() == pytest.approx(scale * 0.5 / dim ** 0.5, rel=0.01)
    assert w1.abs().max().item() <= scale * 3 ** 0.5 * 0.5 / dim ** 0.5 * (1 + 1e-6)
    torch.manual_seed(0)
    plain = tg.MoE(tg.Hyperparameters(model_dim=dim, expert_hidden=128, num_experts=4, top_k=2))
    assert torch.equal(moe.w1, plain.w1 * scale), "the same draws, only scaled"
    assert torch.equal(moe.router, plain.router) and not moe.w2.any(), "the router and w2 keep their init"


@pytest.mark.parametrize("env,hidden", [
    (dict(TOP_K="2"), 1536),
    (dict(TOP_K="1", SHARED_EXPERTS="1"), 1536),  # the shared expert takes its share of the dense MLP's FLOPs
    (dict(TOP_K="2", SHARED_EXPERTS="2"), 768),
    (dict(TOP_K="2", EXPERT_ACT="swiglu"), 1024),  # three matrices instead of two
    (dict(TOP_K="8", ROUTER="soft"), 384),  # every token through every expert
    (dict(TOP_K="2", EXPERT_HIDDEN="640"), 640),
])
def test_default_expert_width_is_iso_flop(env, hidden):
    args = tg.load_config(dict(NUM_EXPERTS="8", **env))
    assert tg.expert_hidden(args) == hidden


def test_valid_moe_config_loads():
    args = tg.load_config(dict(NUM_EXPERTS="8", TOP_K="2", ROUTER="sigmoid", EXPERT_ACT="swiglu", MOE_LAYERS="1,3"))
    assert (args.num_experts, args.top_k, args.router, args.expert_act) == (8, 2, "sigmoid", "swiglu")
    assert tg.expert_hidden(args) % 128 == 0
