import os
import sys
import json
import math
import time
import uuid
import copy
import glob
import difflib
import hashlib
import datetime
import subprocess
from fractions import Fraction
from functools import partial
from pathlib import Path
from dataclasses import dataclass, fields, asdict

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import numpy as np
import torch
from torch import Tensor, nn
import torch.nn.functional as F
import torch.distributed as dist
from torch.nn.attention.flex_attention import BlockMask, flex_attention
try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: MoE layers take the PyTorch path
    triton = None

REPO = Path(__file__).resolve().parent
CODE = Path(__file__).read_text()

# -----------------------------------------------------------------------------
# Hyperparameters: every field can be overridden by the environment variable of the same name in upper case

@dataclass
class Hyperparameters:
    # data
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"  # glob; relative paths try the cwd, then the repo
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"
    val_tokens: int = 10_485_760  # first tokens of the val shards used for every validation
    train_seq_len: int = 48 * 1024  # tokens per GPU per micro-step
    train_batch_tokens: int = 8 * 48 * 1024  # tokens per optimizer step over all GPUs (accumulation fills the gap)
    val_seq_len: int = 4 * 64 * 1024
    # schedule
    num_iterations: int = 1770
    cooldown_frac: float = 0.4  # linear decay to 0.1x over this last fraction of training
    val_loss_every: int = 125  # 0 = only at the end
    window_max: int = 1792  # attention window (tokens) reached at the end of the window warmup
    # architecture
    vocab_size: int = 50257
    num_layers: int = 12
    model_dim: int = 768
    num_heads: int = 6
    head_dim: int = 128
    mlp_hidden: int = 3072  # dense MLP hidden width
    num_value_embeds: int = 3  # tables used by the first and (again) the last layers
    no_attn_layers: str = "7"  # comma-separated layer indices without attention
    long_window_layers: str = "0,4,7,11"  # the rest get half the window
    fp8_head: bool = True  # FP8 lm head in training on Hopper (bf16 elsewhere and at evaluation)
    # optimizers
    matrix_optimizer: str = "muon"  # muon | adamw: what trains the hidden matrices (experts included)
    muon_lr: float = 0.05
    muon_momentum: float = 0.95
    muon_momentum_start: float = 0.85
    muon_momentum_warmup: int = 300  # steps from muon_momentum_start to muon_momentum
    ns_steps: int = 5  # Newton-Schulz iterations
    ns_method: str = "quintic"  # quintic (Jordan's) | polar_express (a minimax quintic per step) | gram (+ Gram iteration)
    ns_kernel: str = "torch"  # torch | triton (X X^T, A^2 by a kernel computing half of each; a I + b A + c A^2 fused)
    expert_lr_mult: float = 1.0  # learning rate of the routed experts' matrices, times muon_lr (or adamw_lr)
    adamw_lr: float = 0.003  # matrices, when matrix_optimizer=adamw
    adamw_weight_decay: float = 0.0
    head_lr: float = 0.008
    embed_lr: float = 0.6
    scalar_lr: float = 0.04
    # mixture of experts
    num_experts: int = 0  # 0 = dense MLP everywhere
    top_k: int = 2
    moe_layers: str = ""  # comma-separated layer indices; empty = every layer
    expert_hidden: int = 0  # 0 = iso-FLOP with the dense MLP: mlp_hidden / (top_k + shared_experts), x2/3 for swiglu
    expert_act: str = "relu2"  # relu2 | swiglu
    shared_experts: int = 0  # always-on experts of width expert_hidden, added to the routed ones
    expert_init_scale: float = 1.0  # multiplies the std of the routed experts' w1 at init (w2 starts at 0)
    router: str = "softmax"  # softmax (Mixtral) | sigmoid (DeepSeek) | noisy (noisy top-k) | soft (dense gating)
    router_lr: float = 0.001  # 0.005 saturates the routers over a 2000-step run (README, Results)
    aux_loss_coef: float = 0.0  # Switch load-balancing loss E * sum_i f_i P_i
    z_loss_coef: float = 0.0  # router z-loss mean(logsumexp(logits)^2)
    bias_update_rate: float = 0.001  # auxiliary-loss-free balancing: bias step per optimizer step (0 = off)
    capacity_factor: float = 0.0  # 0 = dropless; else tokens past ceil(cf * T * k / E) per expert are dropped
    moe_kernel: str = "torch"  # torch (permuted copies + torch._grouped_mm) | triton (gather/scatter grouped GEMMs)
    # several GPUs
    # all_reduce: each gradient all-reduced in the dtype it is stored in, every rank steps every Adam parameter
    # (Muon's matrices are split over the ranks either way) | reduce_scatter: bf16 buckets reduce-scattered, each
    # element stepped by its owner (ZeRO-1), the results all_gathered in bf16 | reduce_scatter_fp32: both ways in
    # fp32 (exact as all_reduce). reduce_scatter sends a bf16 all-reduce's bytes (bench/comm_bytes.py: every
    # bucket's segments equal), 0.5x to 0.6x all_reduce's. On 2 H200s it exposed less communication than all_reduce
    # (before the equal segments); its bf16 loss parity is not measured yet (bench/results)
    grad_reduce: str = "all_reduce"
    bucket_mb: int = 256  # MiB of parameters (counted as fp32) per reduce-scatter and all_gather bucket
    # run
    seed: int = 0
    compile: bool = True  # torch.compile the model on GPU (the CPU always runs eager)
    warmup_steps: int = 10  # untimed compile/kernel warmup steps, after which all state is restored
    log_dir: str = "logs"
    run_id: str = ""  # empty = a fresh uuid
    checkpoint_dir: str = "checkpoints"  # checkpoints go to <checkpoint_dir>/<run id>/step_<N, 6 digits>.pt
    save_every: int = 0  # checkpoint every N steps (0 = off)
    save_checkpoint: bool = False  # checkpoint at the end
    resume: str = ""  # path of a checkpoint to continue from
    profile_steps: int = 0  # trace this many steps with the PyTorch profiler (after 5 untraced ones)

# the fields between num_experts and moe_kernel, and expert_lr_mult: used only where NUM_EXPERTS > 0
MOE_SETTINGS = {"top_k", "moe_layers", "expert_hidden", "expert_act", "shared_experts", "expert_init_scale", "router",
                "router_lr", "aux_loss_coef", "z_loss_coef", "bias_update_rate", "capacity_factor", "moe_kernel",
                "expert_lr_mult"}

GRAD_REDUCE_DTYPES = dict(reduce_scatter=torch.bfloat16, reduce_scatter_fp32=torch.float32)

class ConfigError(ValueError):
    pass

# environment variables set by torchrun and friends, never mistaken for misspelt settings
LAUNCHER_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "NPROC", "NNODES", "NODE_RANK"}

def parse_value(name: str, raw: str, kind: type):
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={raw!r} is not a boolean; use 1 or 0")
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a{'n' if kind is int else ''} {kind.__name__}; "
                          f"e.g. {name}={kind(Hyperparameters.__dataclass_fields__[name.lower()].default)}") from None

def word_cut(word: str, part: str) -> bool:
    # WORD stands for the setting's word PART: the whole word, or its first 3 or more letters
    return word == part or len(word) >= 3 and part.startswith(word)

def setting_meant_by(key: str, names: list[str]) -> str | None:
    # a setting in the wrong case, misspelt, abbreviated word by word (NUM_ITERS), cut short or missing a word
    # (AUX_LOSS, VAL_EVERY: the one setting whose words from its first take the key's words in order), or with words
    # added (RESUME_FROM); an unrelated variable that merely shares a word with a setting (LOG_LEVEL, RUN_NAME) is left
    # alone
    upper = key.upper()
    close = difflib.get_close_matches(upper, names, n=1, cutoff=0.85)
    if close:
        return close[0]
    words = upper.split("_")
    abbreviated = next((name for name in names if len(words) > 1 and len(name.split("_")) == len(words)
                        and all(len(w) >= 3 and part.startswith(w[:3]) for w, part in zip(words, name.split("_")))), None)
    if abbreviated or len(words) < 2:  # one word alone (MODEL, LOG, RUN) is too often another tool's variable
        return abbreviated
    near = []
    for name in names:
        first, *rest = parts = name.split("_")
        rest = iter(rest)  # consumed in order: each word matches a later part than the one before
        if words[:len(parts)] == parts or word_cut(words[0], first) and all(
                any(word_cut(w, part) for part in rest) for w in words[1:]):
            near.append(name)
    return near[0] if len(near) == 1 else None

def load_config(env: dict) -> Hyperparameters:
    by_env = {f.name.upper(): f for f in fields(Hyperparameters)}
    values = {}
    for key, raw in env.items():
        if key in by_env:
            values[by_env[key].name] = parse_value(key, raw, by_env[key].type)
        elif key not in LAUNCHER_VARS and (meant := setting_meant_by(key, list(by_env))):
            raise ConfigError(f"environment variable {key} is not a setting; did you mean {meant}?")
    args = Hyperparameters(**values)
    validate(args)
    # the mixture-of-experts knobs shape layers a dense model has none of: one set, even to its default, does nothing
    moe_set = sorted(by_env[k].name for k in env if k in by_env and by_env[k].name in MOE_SETTINGS)
    if moe_set and not args.num_experts:
        name = moe_set[0].upper()
        raise ConfigError(f"{name}={env[name]} sets the experts, but NUM_EXPERTS=0 builds a dense model; set "
                          f"NUM_EXPERTS (e.g. 32) or unset {name}")
    return args

def layer_list(name: str, text: str, num_layers: int) -> list[int]:
    try:
        layers = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise ConfigError(f"{name.upper()}={text!r} must be comma-separated layer indices, e.g. 0,4,11") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"{name.upper()}={text!r} names layer {bad[0]} but NUM_LAYERS={num_layers}; "
                          f"use indices 0..{num_layers - 1}")
    return layers

def expert_hidden(args: Hyperparameters) -> int:
    if args.expert_hidden:
        return args.expert_hidden
    # every token goes through k routed experts and the shared ones: together they match the dense MLP's FLOPs
    k = (args.num_experts if args.router == "soft" else args.top_k) + args.shared_experts
    width = args.mlp_hidden / k * (2 / 3 if args.expert_act == "swiglu" else 1)
    return max(128, round(width / 128) * 128)

def validate(args: Hyperparameters, world_size: int = 1):
    def need(cond: bool, msg: str):
        if not cond:
            raise ConfigError(msg)
    for f in fields(args):
        if f.type in (int, float):
            value = getattr(args, f.name)
            need(math.isfinite(value), f"{f.name.upper()}={value} must be a finite number")
            need(value >= 0, f"{f.name.upper()}={value} must not be negative")
    need(args.num_iterations >= 1, "NUM_ITERATIONS must be at least 1")
    need(args.train_seq_len % 128 == 0 and args.train_seq_len > 0,
         f"TRAIN_SEQ_LEN={args.train_seq_len} must be a positive multiple of 128 (the attention block size)")
    need(args.val_seq_len % 128 == 0 and args.val_seq_len > 0,
         f"VAL_SEQ_LEN={args.val_seq_len} must be a positive multiple of 128 (the attention block size)")
    need(args.train_batch_tokens > 0, f"TRAIN_BATCH_TOKENS={args.train_batch_tokens} must be positive: the tokens "
         f"of one optimizer step, a multiple of TRAIN_SEQ_LEN x GPUs = {args.train_seq_len} x {world_size}")
    need(args.train_batch_tokens % (args.train_seq_len * world_size) == 0,
         f"TRAIN_BATCH_TOKENS={args.train_batch_tokens} must be a multiple of TRAIN_SEQ_LEN x GPUs = "
         f"{args.train_seq_len} x {world_size}")
    need(args.val_tokens > 0, f"VAL_TOKENS={args.val_tokens} must be positive: the tokens of every validation, "
         f"a multiple of VAL_SEQ_LEN x GPUs = {args.val_seq_len} x {world_size}")
    need(args.val_tokens % (args.val_seq_len * world_size) == 0,
         f"VAL_TOKENS={args.val_tokens} must be a multiple of VAL_SEQ_LEN x GPUs = {args.val_seq_len} x {world_size}")
    need(args.window_max % 128 == 0 and args.window_max > 0, f"WINDOW_MAX={args.window_max} must be a positive multiple of 128")
    need(args.num_heads >= 1 and args.head_dim % 8 == 0 and args.head_dim > 0,
         f"NUM_HEADS={args.num_heads} x HEAD_DIM={args.head_dim}: need at least one head and HEAD_DIM a multiple of 8")
    need(args.num_layers >= 1, "NUM_LAYERS must be at least 1")
    for name in ("model_dim", "mlp_hidden"):  # a zero width builds empty matrices, which Muon divides by
        need(getattr(args, name) >= 1, f"{name.upper()}={getattr(args, name)} must be at least 1 (a layer's width)")
    need(args.ns_steps >= 1, f"NS_STEPS={args.ns_steps}: Muon needs at least 1 Newton-Schulz iteration")
    need(2 * args.num_value_embeds <= args.num_layers,
         f"NUM_VALUE_EMBEDS={args.num_value_embeds} tables are used twice each, which needs NUM_LAYERS >= "
         f"{2 * args.num_value_embeds}, not {args.num_layers}")
    need("/" not in args.run_id and os.sep not in args.run_id and args.run_id not in (".", ".."),
         f"RUN_ID={args.run_id!r} names a file in LOG_DIR and a folder in CHECKPOINT_DIR: use a plain name, "
         f"without {os.sep} and not . or ..")
    need(args.vocab_size > 50256, f"VOCAB_SIZE={args.vocab_size} must cover the GPT-2 end-of-text token 50256")
    for name in ("no_attn_layers", "long_window_layers", "moe_layers"):
        layer_list(name, getattr(args, name), args.num_layers)
    # the residual (MODEL_DIM) and attention (NUM_HEADS x HEAD_DIM) widths are free, except where a value
    # embedding, a [vocab, MODEL_DIM] table, is added to an attention layer's values
    n, L = args.num_value_embeds, args.num_layers
    no_attn = set(layer_list("no_attn_layers", args.no_attn_layers, L))
    mixed = [i for i in range(L) if (i < n or i >= L - n) and i not in no_attn]
    need(args.model_dim == args.num_heads * args.head_dim or not mixed,
         f"MODEL_DIM={args.model_dim} must equal NUM_HEADS x HEAD_DIM = {args.num_heads} x {args.head_dim} = "
         f"{args.num_heads * args.head_dim}: layer {mixed[0] if mixed else 0} adds a value embedding of width "
         f"MODEL_DIM to its attention values; change one of them (or set NUM_VALUE_EMBEDS=0)")
    need(args.profile_steps == 0 or 5 + args.profile_steps <= args.num_iterations,
         f"PROFILE_STEPS={args.profile_steps} traces the steps after the first 5, but NUM_ITERATIONS="
         f"{args.num_iterations} leaves only {max(args.num_iterations - 5, 0)}; lower PROFILE_STEPS or train longer")
    need(args.cooldown_frac <= 1, f"COOLDOWN_FRAC={args.cooldown_frac} is a fraction of training: use 0 to 1")
    for name in ("muon_momentum", "muon_momentum_start"):  # at 1 the momentum never forgets a gradient
        need(getattr(args, name) < 1, f"{name.upper()}={getattr(args, name)} must be below 1, e.g. 0.95")
    need(args.matrix_optimizer in ("muon", "adamw"), f"MATRIX_OPTIMIZER={args.matrix_optimizer!r}: use muon or adamw")
    need(args.ns_method in ("quintic", "polar_express", "gram"),
         f"NS_METHOD={args.ns_method!r}: use quintic, polar_express or gram")
    need(args.ns_kernel in ("torch", "triton"), f"NS_KERNEL={args.ns_kernel!r}: use torch or triton")
    if args.matrix_optimizer == "adamw":
        # the Newton-Schulz knobs shape Muon's orthogonalization, which AdamW has none of: a set one would do nothing
        for f in fields(args):
            if f.name.startswith("ns_") and getattr(args, f.name) != f.default:
                raise ConfigError(f"{f.name.upper()}={getattr(args, f.name)} sets Muon's orthogonalization, unused with "
                                  f"MATRIX_OPTIMIZER=adamw; unset it or use MATRIX_OPTIMIZER=muon")
    need(args.model_dim % 128 == 0 or args.num_experts == 0,
         f"MODEL_DIM={args.model_dim} must be a multiple of 128 with experts (grouped GEMM alignment)")
    need(args.router in ("softmax", "sigmoid", "noisy", "soft"),
         f"ROUTER={args.router!r} is not a router; use softmax, sigmoid, noisy or soft")
    need(args.expert_act in ("relu2", "swiglu"), f"EXPERT_ACT={args.expert_act!r}: use relu2 or swiglu")
    need(args.moe_kernel in ("triton", "torch"), f"MOE_KERNEL={args.moe_kernel!r}: use triton or torch")
    need(args.grad_reduce in GRAD_REDUCE_DTYPES or args.grad_reduce == "all_reduce",
         f"GRAD_REDUCE={args.grad_reduce!r}: use all_reduce, reduce_scatter or reduce_scatter_fp32")
    need(args.bucket_mb >= 1, f"BUCKET_MB={args.bucket_mb} must be at least 1 (MiB of parameters per bucket)")
    need(args.expert_init_scale > 0, f"EXPERT_INIT_SCALE={args.expert_init_scale}: at 0 the experts start at zero "
         "and get no gradient (w2 starts at 0 too); use a positive multiplier, 1 = record 21's init")
    if args.num_experts:
        need(1 <= args.top_k <= args.num_experts,
             f"TOP_K={args.top_k} must be between 1 and NUM_EXPERTS={args.num_experts}")
        need(args.router != "soft" or args.top_k == args.num_experts,
             f"ROUTER=soft sends every token to every expert: set TOP_K=NUM_EXPERTS={args.num_experts}")
        need(expert_hidden(args) % 128 == 0, f"EXPERT_HIDDEN={args.expert_hidden} must be a multiple of 128")
        need(args.capacity_factor == 0 or args.capacity_factor * args.top_k / args.num_experts > 0,
             "CAPACITY_FACTOR must be 0 (dropless) or positive")

# -----------------------------------------------------------------------------
# FP8 matmul for the lm head: e4m3 forward, e5m2 gradients, per-tensor scales (record 21 scales)

def on_device(fn):
    # compiled on GPU, where inductor fuses the scaling and casts into single passes; eager elsewhere
    compiled = torch.compile(fn)
    return lambda *args: (compiled if args[0].is_cuda else fn)(*args)

@torch.library.custom_op("moe_speedrun::fp8_mm", mutates_args=())
def fp8_mm(x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float) -> tuple[Tensor, Tensor, Tensor]:
    return fp8_mm_impl(x, w, x_s, w_s)

@on_device
def fp8_mm_impl(x: Tensor, w: Tensor, x_s: float, w_s: float) -> tuple[Tensor, Tensor, Tensor]:
    x_f8 = x.mul(x_s).to(torch.float8_e4m3fn)
    w_f8 = w.mul(w_s).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(x_f8, w_f8.T, out_dtype=torch.bfloat16, use_fast_accum=True,
                           scale_a=x.new_tensor(1 / x_s, dtype=torch.float32),
                           scale_b=x.new_tensor(1 / w_s, dtype=torch.float32))
    return out, x_f8, w_f8

@fp8_mm.register_fake
def _(x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float):
    return x @ w.T.to(x.dtype), x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)

@torch.library.custom_op("moe_speedrun::fp8_mm_backward", mutates_args=())
def fp8_mm_backward(g: Tensor, x_f8: Tensor, w_f8: Tensor, x_s: float, w_s: float, grad_s: float) -> tuple[Tensor, Tensor]:
    return fp8_mm_backward_impl(g, x_f8, w_f8, x_s, w_s, grad_s)

@on_device
def fp8_mm_backward_impl(g: Tensor, x_f8: Tensor, w_f8: Tensor, x_s: float, w_s: float, grad_s: float):
    g_f8 = g.mul(grad_s).to(torch.float8_e5m2)
    one = g.new_tensor(1.0, dtype=torch.float32)
    # _scaled_mm wants the second operand column-major
    grad_x = torch._scaled_mm(g_f8, w_f8.T.contiguous().T, out_dtype=torch.bfloat16,
                              scale_a=one / grad_s, scale_b=one / w_s)
    grad_w = torch._scaled_mm(x_f8.T.contiguous(), g_f8.T.contiguous().T, out_dtype=torch.float32,
                              scale_a=one / x_s, scale_b=one / grad_s).T
    return grad_x, grad_w

@fp8_mm_backward.register_fake
def _(g: Tensor, x_f8: Tensor, w_f8: Tensor, x_s: float, w_s: float, grad_s: float):
    return x_f8.to(torch.bfloat16), w_f8.to(torch.float32).T.contiguous().T

def _fp8_mm_setup(ctx, inputs, output):
    *_, x_s, w_s, grad_s = inputs
    ctx.save_for_backward(output[1], output[2])
    ctx.scales = (x_s, w_s, grad_s)

def _fp8_mm_grad(ctx, grad_out, *_):
    x_f8, w_f8 = ctx.saved_tensors
    grad_x, grad_w = torch.ops.moe_speedrun.fp8_mm_backward(grad_out.contiguous(), x_f8, w_f8, *ctx.scales)
    return grad_x, grad_w, None, None, None

fp8_mm.register_autograd(_fp8_mm_grad, setup_context=_fp8_mm_setup)

def has_fp8(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)

# -----------------------------------------------------------------------------
# Muon: momentum, then Newton-Schulz orthogonalization of each matrix, batched over matrices of one shape

# Newton-Schulz steps: step k maps each singular value s of X (normalized by ||X||_F) to a s + b s^3 + c s^5
JORDAN = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic, the same every step (NS_METHOD=quintic)
# Polar Express (Amsel, Persson, Musco, Gower 2025): step k's quintic is the minimax fit to 1 over the band the steps
# before it leave, starting from singular values in [1e-3, 1]; bench/polar_express.py derives them and prints each band
POLAR_EXPRESS = [
    (8.287212018145624, -23.595886519098826, 17.300387312530926),  # band [0.008287, 1.991713]
    (4.107059111542194, -2.9478499167379044, 0.544843108292659),  # band [0.034034, 1.965966]
    (3.9486908534823013, -2.9089021159629698, 0.5518191394370207),  # band [0.134276, 1.865724]
    (3.3184196573705997, -2.4884880243148735, 0.5100489401237199),  # band [0.439583, 1.560417]
    (2.30065201995482, -1.6689039845747544, 0.4188073119525692),  # band [0.876441, 1.123559]
    (1.891301407787395, -1.267995827194581, 0.3768040894852455),  # band [0.998815, 1.001185]
    (1.8750014808325688, -1.2500016453581995, 0.3750001645265548),  # band [1.000000, 1.000000]
    (1.875, -1.25, 0.375),  # the limit, repeated for any later step
]
PE_SAFETY = 1.01  # the paper's bf16 safety factor: every Polar Express step but the last applies p(x / 1.01)
GRAM_RESTART = 3  # NS_METHOD=gram recomputes A from X every 3 steps: the Gram recurrence drifts (2 and 3 measured alike)

def ns_coefficients(method: str, steps: int) -> list[tuple[float, float, float]]:
    # (a, b, c) of each of the `steps` steps for NS_METHOD=method
    if method == "quintic":
        return [JORDAN] * steps
    chosen = [POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)] for i in range(steps)]
    s = PE_SAFETY
    return [(a / s, b / s ** 3, c / s ** 5) for a, b, c in chosen[:-1]] + chosen[-1:]

def gram_scale(A: Tensor) -> Tensor:
    # 1 / ||X||_F from X's Gram matrix A [B, m, m] (its trace), [B, 1, 1], fp32 (fp64 for fp64 A)
    trace = A.diagonal(dim1=-2, dim2=-1).to(torch.promote_types(A.dtype, torch.float32)).sum(-1, keepdim=True)
    return (1 / (trace.sqrt() + 1e-7)).unsqueeze(-1)

def newton_schulz(X: Tensor, coefficients: list, gram, poly=None) -> Tensor:
    # X [B, m, n] in the dtype it computes in (bf16 in training), one odd quintic step per (a, b, c); gram(Y) = Y Y^T,
    # poly(A, a, b, c, scale) = scale (a I + b A + c A^2) as ns_polynomial_op computes it (None: gram's product).
    # The Gram matrix is taken over the shorter side and a tall X is multiplied from the right: nothing is transposed.
    # Per step 4 m^2 n + 2 m^3 flops (m the short side), or 3 m^2 n + m^3 when gram computes half of each product.
    tall = X.size(-2) > X.size(-1)
    A = gram(X.mT if tall else X)
    # ||X||_F^2 is the trace of the Gram matrix: X is normalized through A and the first B, never in a pass of its own
    scale = gram_scale(A)
    A = (A * scale ** 2).to(X.dtype)
    eye = torch.eye(A.size(-1), device=A.device, dtype=torch.promote_types(A.dtype, torch.float32))
    for i, (a, b, c) in enumerate(coefficients):
        if i:
            A = gram(X.mT if tall else X)
        # a X + (b A + c A^2) X = (a I + b A + c A^2) X: the a X term rides on the small Gram-sized matrix, so X
        # goes through one plain product (baddbmm's a X cost a copy of X and a read of it in every iteration)
        if poly is None:
            B = ((a * eye + b * A + c * gram(A)) * (scale if i == 0 else 1)).to(X.dtype)
        else:
            B = poly(A, a, b, c, scale if i == 0 else None)
        X = X @ B if tall else B @ X
    return X

def gram_newton_schulz(X: Tensor, coefficients: list, gram) -> Tensor:
    # newton_schulz's steps carried out on the m x m Gram matrix A (m the short side) instead of on X, for X [B, m, n]
    # with ||X||_F <= 1 in the dtype it computes in: with P = p(A), A <- P A P and Q <- P Q (Q P for a tall X, the
    # order of X's own products: 1.3x closer for 3072 x 768), and X is multiplied by Q once at the end. Every
    # GRAM_RESTART steps X <- Q X and A is
    # recomputed from it: the recurrence drifts. Idea: Dao, Zhang, Amsel, Chen 2026, "Gram Newton-Schulz".
    # Flops, s steps with r restarts: (4 + 4r) m^2 n + (2s + 6(s - 1 - r)) m^3; s = 5, r = 1: 8 m^2 n + 28 m^3
    # against newton_schulz's 20 m^2 n + 10 m^3. With the kernel: (3 + 3r) m^2 n + (s + 6(s - 1 - r)) m^3 against
    # s (3 m^2 n + m^3). bench/muon_step.py counts them on the model's matrices
    tall = X.size(-2) > X.size(-1)
    eye = torch.eye(min(X.shape[-2:]), device=X.device, dtype=torch.promote_types(X.dtype, torch.float32))
    Q = None
    for i, (a, b, c) in enumerate(coefficients):
        if i % GRAM_RESTART == 0:
            if Q is not None:
                X, Q = (X @ Q if tall else Q @ X), None
            A = gram(X.mT if tall else X)
        P = (a * eye + b * A + c * gram(A)).to(X.dtype)
        if i + 1 < len(coefficients) and (i + 1) % GRAM_RESTART:
            A = P @ A @ P  # A P^2 in exact arithmetic; measured closer to the X iteration than A @ gram(P)
        Q = P if Q is None else Q @ P if tall else P @ Q
    return X @ Q if tall else Q @ X

def orthogonalize(G: Tensor, steps: int, method: str = "quintic", kernel: str = "torch") -> Tensor:
    # G [..., m, n] -> bf16 [..., m, n], each trailing matrix on its own taken close to its polar factor U V^T by
    # `steps` odd quintics of its singular values. method: NS_METHOD, kernel: NS_KERNEL (Hyperparameters)
    X = G.bfloat16().reshape(-1, *G.shape[-2:])
    gram = gram_matrix_op if kernel == "triton" else gram_matrix
    coefficients = ns_coefficients(method, steps)
    m, n = sorted(G.shape[-2:])
    # the Gram iteration needs fewer flops only where n / m > 1.5, or 2 where the kernel halves the Gram products
    # (the counts above, any step count); other shapes take newton_schulz with the same coefficients
    if method != "gram" or n <= (2 if kernel == "triton" else 1.5) * m:
        return newton_schulz(X, coefficients, gram, ns_polynomial_op if kernel == "triton" else None).reshape(G.shape)
    # fp16, 3 more mantissa bits than bf16 at the same speed (as Dao et al. chose): in bf16 the recurrence left some
    # singular values 30x too large, in fp16 its error is a fifth of bf16 newton_schulz's (measured on 640 x 768 and
    # 3072 x 768 matrices). X is normalized first, as fp16's range cannot hold 1 / ||X||_F in Q
    X = (X / (torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=torch.float32) + 1e-7)).half()
    return gram_newton_schulz(X, coefficients, gram).bfloat16().reshape(G.shape)

def momentum_stack(grads: list[Tensor], bufs: list[Tensor], momentum: Tensor) -> Tensor:
    # Nesterov momentum, then the updates cast to bf16 and stacked for Newton-Schulz (which reads bf16 anyway):
    # compiled, one pass over grads and buffers instead of lerp, lerp, cat and cast. Gradients reduced in bf16 are
    # widened to the fp32 buffers' dtype.
    m, n = grads[0].shape[-2:]
    grads = [g.to(buf.dtype) for g, buf in zip(grads, bufs)]
    for g, buf in zip(grads, bufs):
        buf.lerp_(g, 1 - momentum)
    return torch.cat([g.lerp(buf, momentum).bfloat16().view(-1, m, n) for g, buf in zip(grads, bufs)])

def grad_or_zeros(p: Tensor) -> Tensor:
    # a parameter the forward did not use has no gradient: it counts as zero, so every rank sends and steps alike
    return p.grad if p.grad is not None else torch.zeros_like(p)

def matrix_shape(p: Tensor, halved: set) -> tuple[int, int]:
    # (m, n) of the matrices stacked in p [..., rows, n]; a p in `halved` (ids: SwiGLU's [gate; up]) holds two per row
    return p.size(-2) // (2 if id(p) in halved else 1), p.size(-1)

def split_stack(total: int, cost: float, load: list[float]) -> list[int]:
    # how many of a group's `total` matrices each rank owns: shares differ by at most one, and the larger shares go
    # to the ranks with the least work so far (`load`, updated in place), so the ranks end balanced by FLOPs
    world_size = len(load)
    extra = set(sorted(range(world_size), key=lambda r: (load[r], r))[:total % world_size])
    shares = [total // world_size + (r in extra) for r in range(world_size)]
    for r in range(world_size):
        load[r] += shares[r] * cost
    return shares

class Muon(torch.optim.Optimizer):
    # params with ndim >= 2 are stacks of matrices (qkv: 3, experts: E); one group per matrix shape, the params with
    # a learning-rate multiplier (`lr_mults`: the routed experts') in groups of their own. A param in `halves` stacks two matrices along its rows (SwiGLU's
    # [gate; up]): each half is orthogonalized and scaled as its own matrix, as QKV's three are.
    # Each matrix has one owner rank: a group's stack is cut into contiguous shares, one per rank (split_stack), or
    # given `ranges` (shard_owners: GRAD_REDUCE=reduce_scatter) each param's. The owner keeps the momentum and
    # orthogonalizes; the updates are all_gathered (async: the gather of one group runs under the next group's
    # Newton-Schulz; with `ranges`, by step's reducer) and every rank applies them. `ranges[id(p)][r]` is the flat
    # range of p that rank r owns. The momentum reaches the compiled part as a device tensor, so its warmup causes
    # no recompilation.
    def __init__(self, params, lr: float, momentum: float, ns_steps: int, rank: int = 0, world_size: int = 1,
                 compiled: bool = False, halves=(), lr_mults: dict | None = None, orthogonalize=orthogonalize,
                 ranges: dict | None = None):
        params, halved, lr_mults = list(params), {id(p) for p in halves}, lr_mults or {}

        def key(p: Tensor) -> tuple[int, int, bool]:
            return *matrix_shape(p, halved), id(p) in lr_mults

        # a param with a multiplier is in a group of its own whatever the value, so a checkpoint resumes with any
        groups = [dict(params=[p for p in params if key(p) == k], matrix=k[:2],
                       lr=lr * (lr_mults[id(next(p for p in params if key(p) == k))] if k[2] else 1))
                  for k in sorted(set(map(key, params)))]
        super().__init__(groups, dict(lr=lr, momentum=momentum, ns_steps=ns_steps))
        self.rank, self.world_size = rank, world_size
        compile = (lambda f: torch.compile(f, dynamic=False)) if compiled else (lambda f: f)
        if compiled:
            # one graph per group's stack shape: past dynamo's default of 8 a function falls back to eager silently
            # (seen in bench/muon_step.py, whose variants share one compiled frame)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.orthogonalize, self.momentum_stack = compile(orthogonalize), compile(momentum_stack)
        self.momentum = torch.zeros(len(groups), device=params[0].device)
        if ranges is not None:  # GRAD_REDUCE=reduce_scatter: shard_owners' ranges; the reducer carries the updates
            self.ranges, self.plans = {id(p): ranges[id(p)] for p in params}, None
            for group in self.param_groups:  # what this rank owns, so a checkpoint of another layout is refused
                group["ranges"] = [list(self.owned(p)) for p in group["params"]]
            return
        # per group: the widest share and where each rank's rows land; kept out of param_groups, which
        # load_state_dict replaces with the checkpoint's (whose tensors would be copies, not views of the params)
        self.ranges, self.plans, load = {}, [], [0.0] * world_size
        for group in self.param_groups:
            m, n = group["matrix"]
            counts = [p.numel() // (m * n) for p in group["params"]]
            shares = split_stack(sum(counts), m * n * min(m, n), load)
            bounds = [sum(shares[:r]) for r in range(world_size + 1)]  # rank r owns stack rows bounds[r]:bounds[r+1]
            # where each rank's rows land: (rank, first row in its share, param's matrices i0:i1 as a view)
            targets, first = [], 0
            for p, count in zip(group["params"], counts):
                spans = [(r, max(bounds[r], first), min(bounds[r + 1], first + count)) for r in range(world_size)]
                self.ranges[id(p)] = [((a - first) * m * n, (b - first) * m * n) if a < b else (0, 0) for r, a, b in spans]
                targets += [(r, a - bounds[r], p.detach().view(-1, m, n)[a - first:b - first])
                            for r, a, b in spans if a < b]
                first += count
            self.plans.append((max(shares), targets))

    def owned(self, p: Tensor) -> tuple[int, int]:
        return self.ranges[id(p)][self.rank]

    @torch.no_grad()
    def step(self, reducer=None):
        # with a reducer (GRAD_REDUCE=reduce_scatter) the summed gradient of what this rank owns is reducer.reduced(p)
        # and the updates go to reducer.result(p), whose all_gather starts once every group of its bucket is done;
        # without, a matrix without a gradient (unused in the forward) steps on a zero one, so every rank's share
        # stays put, and each group's updates are all_gathered here
        reduced = reducer.reduced if reducer else (lambda p: grad_or_zeros(p).view(-1)[slice(*self.owned(p))])
        pending = []
        for g, (group, momentum) in enumerate(zip(self.param_groups, self.momentum)):
            m, n = group["matrix"]
            momentum.fill_(group["momentum"])
            mine = [p for p in group["params"] if self.owned(p)[1] > self.owned(p)[0]]
            for p in mine:
                if "momentum_buffer" not in self.state[p]:  # only the owned matrices, in fp32
                    self.state[p]["momentum_buffer"] = torch.zeros(
                        (self.owned(p)[1] - self.owned(p)[0]) // (m * n), m, n, device=p.device)
            stacked = (self.momentum_stack([reduced(p).view(-1, m, n) for p in mine],
                                           [self.state[p]["momentum_buffer"] for p in mine], momentum)
                       if mine else torch.empty(0, m, n, dtype=torch.bfloat16, device=momentum.device))
            scale = -group["lr"] * max(1, m / n) ** 0.5  # per-matrix shape, so experts scale as their own matrices
            if reducer:
                if mine:
                    local = self.orthogonalize(stacked, group["ns_steps"]).reshape(-1)
                    torch._foreach_copy_([reducer.result(p) for p in mine],
                                         list(local.split([reducer.result(p).numel() for p in mine])))
                reducer.done(group["params"], scale)
                continue
            width, targets = self.plans[g]
            if stacked.size(0) < width:  # equal shares for all_gather: the short ones padded with zero matrices
                stacked = torch.cat([stacked, stacked.new_zeros(width - stacked.size(0), m, n)])
            local = self.orthogonalize(stacked, group["ns_steps"])
            if self.world_size > 1:
                gathered = local.new_empty(self.world_size * width, m, n)
                handle = dist.all_gather_into_tensor(gathered, local, async_op=True)
                gathered = gathered.view(self.world_size, width, m, n)
            else:
                gathered, handle = local[None], None
            pending.append((scale, targets, gathered, handle))
        for scale, targets, gathered, handle in pending:
            if handle is not None:
                handle.wait()
            torch._foreach_add_([t for _, _, t in targets],
                                [gathered[r, j:j + t.size(0)] for r, j, t in targets], alpha=scale)

# -----------------------------------------------------------------------------
# Several ranks, GRAD_REDUCE=reduce_scatter: ZeRO-1 (Rajbhandari et al. 2020). Each element has one owner rank, which
# receives its summed gradient (reduce-scatter), steps it and sends the result (all_gather), in the same buckets.
# GRAD_REDUCE=all_reduce, the default, uses Muon's owners only

def shard_owners(params: list[Tensor], matrices: dict, world_size: int) -> dict[int, list[tuple[int, int]]]:
    # ranges[id(p)][r] = (start, end), the flat range of p rank r owns ((0, 0): none). params in gradient order;
    # matrices[id(p)] = (m, n) for Muon's stacks of m x n matrices, whole units: each stack is cut into contiguous
    # shares (split_stack, the FLOPs m n min(m, n) carried over the stacks, so the ranks end within one matrix's FLOPs
    # of even). The rest is Adam's, elementwise, so cut anywhere: it levels the ranks' element counts (water-filling),
    # each Adam parameter split over the ranks in proportion to what each still takes, so every rank's elements run
    # through the whole gradient order. Equal counts are what make every bucket's segments equal (GradientReducer)
    n, load, ranges = world_size, [0.0] * world_size, {}
    held = [0] * n  # elements each rank owns
    for p in params:
        if id(p) in matrices:
            m, k = matrices[id(p)]
            shares = split_stack(p.numel() // (m * k), m * k * min(m, k), load)
            bounds = [sum(shares[:r]) * m * k for r in range(n + 1)]
            ranges[id(p)] = [(bounds[r], bounds[r + 1]) if shares[r] else (0, 0) for r in range(n)]
            held = [h + e - s for h, (s, e) in zip(held, ranges[id(p)])]
    adam = [p for p in params if id(p) not in matrices]
    total = sum(p.numel() for p in adam)
    lo, hi = 0, max(held) + total  # the lowest level L with sum(max(0, L - held)) >= total
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if sum(max(0, mid - h) for h in held) >= total else (mid + 1, hi)
    left = [max(0, lo - h) for h in held]
    for r in reversed(range(n)):  # the excess is fewer than the ranks below the level: one off each, from the last
        if sum(left) > total and left[r]:
            left[r] -= 1
    for p in adam:
        size, rest = p.numel(), sum(left)
        take = [size * left[r] // rest for r in range(n)]
        # largest remainders first: each of those has room, so the ranks' totals end exactly at `left`
        for r in sorted(range(n), key=lambda r: (-(size * left[r] % rest), r))[:size - sum(take)]:
            take[r] += 1
        bounds = [sum(take[:r]) for r in range(n + 1)]
        ranges[id(p)] = [(bounds[r], bounds[r + 1]) if take[r] else (0, 0) for r in range(n)]
        left = [a - b for a, b in zip(left, take)]
    return ranges

class ShardedAdamW(torch.optim.AdamW):
    # AdamW on the flat range of each parameter this rank owns, ranges[id(p)][rank] (views, so the state exp_avg and
    # exp_avg_sq is the owned ranges'; Adam is elementwise, so a range steps exactly as the whole would); without
    # ranges (one rank, GRAD_REDUCE=all_reduce) plain AdamW on whole parameters and their .grad. With ranges, step
    # reads the summed gradient from reducer.reduced(p) and writes to reducer.result(p) what every rank then applies:
    # the new values, or where the results are bf16 (GRAD_REDUCE=reduce_scatter) and the parameter fp32, its step
    # (new - old) rounded to bf16, added by every rank, the owner too (it sets its range back first), so all hold the
    # same fp32 weights. That rounding errs by at most 2^-8 of the step itself (bf16 keeps 8 significant bits), as if
    # the learning rate were off by up to 0.4% per element: far below the 2^-8 of the weight a bf16 weight would lose,
    # and it does not build up as a bias (round to nearest)
    def __init__(self, groups, ranges: dict | None = None, rank: int = 0, **kwargs):
        self.source, self.params = {}, [p for g in groups for p in g["params"]]
        if ranges is not None:  # the checkpoint keeps `ranges`: one of another layout is refused
            groups = [dict(g, params=[self.shard(p, *ranges[id(p)][rank]) for p in g["params"]
                                      if ranges[id(p)][rank][1] > ranges[id(p)][rank][0]],
                           ranges=[list(ranges[id(p)][rank]) for p in g["params"]]) for g in groups]
        super().__init__(groups, **kwargs)
        self.ranges = ranges or {}  # empty without ranges: nothing is split

    def shard(self, p: Tensor, start: int, end: int) -> Tensor:
        view = p.detach().view(-1)[start:end]
        self.source[id(view)] = p
        return view

    @torch.no_grad()
    def step(self, reducer=None):
        if reducer is None:
            return super().step()
        shards = [v for group in self.param_groups for v in group["params"]]
        for v in shards:
            v.grad = reducer.reduced(self.source[id(v)]).to(v.dtype)
        narrow = [v for v in shards if v.element_size() <= reducer.results.element_size()]  # values fit the results
        wide = [v for v in shards if v.element_size() > reducer.results.element_size()]  # its step, rounded
        old = [v.clone() for v in wide]
        super().step()
        if wide:
            torch._foreach_copy_([reducer.result(self.source[id(v)]) for v in wide], torch._foreach_sub(wide, old))
            torch._foreach_copy_(wide, old)
        if narrow:
            torch._foreach_copy_([reducer.result(self.source[id(v)]) for v in narrow], narrow)
        for v in shards:
            v.grad = None
        steps = [p for p in self.params if p.element_size() > reducer.results.element_size()]
        reducer.done(steps, 1.0)  # every rank adds the step
        reducer.done([p for p in self.params if p.element_size() <= reducer.results.element_size()], None)  # copies

class GradientReducer:
    # Gradient reduction for several ranks, overlapped with the backward, and the way back. Rank r's stream is the flat
    # ranges it owns (ranges[id(p)][r], shard_owners), in the order their gradients become final; bucket b is
    # elements [b W, (b + 1) W) of every stream, W = bucket_bytes / (4 world_size) (parameters counted in fp32), so
    # streams of equal length (shard_owners levels them) make every segment equal: no padding. On the last micro-step
    # each bucket's gradients are cast to `dtype`, packed rank by rank and reduce_scattered, asynchronously, as soon
    # as its last gradient is accumulated (post-accumulate-grad hooks; buckets go out in order, the same on every
    # rank). Rank r receives its stream whole, one bucket after the other, so reduced(p) is a view; it waits only for
    # the buckets holding p. The optimizers write their results into result(p) (`dtype`, the same positions) and call
    # done(params, alpha); a bucket whose parameters are all done is all_gathered at once (every rank calls done
    # alike, so the order is the same on every rank), and apply() waits for them and gives each parameter its pieces:
    # p += alpha * piece, or p = piece where alpha is None. So the gather sends what the reduce-scatter receives.
    # The compiled model's backward is one graph whose gradients are all final at its end (DDP's graph splitter,
    # which would cut it, left FlexAttention uncompiled on an H200: the warmup did not finish in 6 minutes), so the
    # buckets go out back to back after it; there the trainer lays them out in the order the optimizers read them
    # (optimizer_order), so Adam steps once its buckets are in and each Muon group once its own are, while the later
    # buckets are still reduced. Eager, where gradients are final layer by layer, it keeps gradient_order: each
    # bucket goes out under the rest of the backward. The idea is PyTorch DDP's buckets (Li et al. 2020) with ZeRO's
    # partitions (Rajbhandari et al. 2020).
    def __init__(self, params: list[Tensor], ranges: dict, rank: int, world_size: int, dtype: torch.dtype,
                 bucket_bytes: int):
        self.ranges = ranges
        streams = [[(p, *ranges[id(p)][r]) for p in params if ranges[id(p)][r][1] > ranges[id(p)][r][0]]
                   for r in range(world_size)]
        longest = max(sum(e - s for _, s, e in stream) for stream in streams)
        self.step = step = max(1, bucket_bytes // (4 * world_size))  # elements of a rank's stream per bucket
        self.widths = [min(step, longest - start) for start in range(0, longest, step)]
        device = params[0].device
        self.received = torch.zeros(longest, dtype=dtype, device=device)  # this rank's stream, summed
        self.results = self.received.new_zeros(longest)  # what it sends back, in the same dtype
        self.outputs = list(self.received.split(self.widths))
        self.sends = list(self.results.split(self.widths))
        self.inputs = [self.received.new_zeros(world_size * w) for w in self.widths]
        # the gather lands in the reduce-scatter's input, free by then: gather(b) waits for bucket b's reduce-scatter,
        # and apply() has consumed the gathered pieces before the next step's launch() packs new gradients there.
        # One buffer of all parameters in `dtype` fewer per GPU (E32 top-4 + 1 shared: 581M, 1.08 GiB in bf16)
        self.gathered = self.inputs
        # per bucket: (param, its flat range, the piece of the bucket's input, of what is gathered, of the param)
        self.packs = [[] for _ in self.widths]
        self.views, members = {}, [{} for _ in self.widths]
        for r, stream in enumerate(streams):
            t = 0  # position in rank r's stream
            for p, s, e in stream:
                if r == rank:
                    self.views[id(p)] = (t, t + e - s)
                while s < e:  # a range split where buckets meet
                    b = t // step
                    k = min(e - s, (b + 1) * step - t)
                    at = r * self.widths[b] + t - b * step
                    self.packs[b].append((p, s, s + k, self.inputs[b][at:at + k], self.gathered[b][at:at + k],
                                          p.detach().view(-1)[s:s + k]))
                    members[b][id(p)] = p
                    s, t = s + k, t + k
        self.members = [list(m.values()) for m in members]
        self.buckets_of = {id(p): [b for b, m in enumerate(members) if id(p) in m] for p in params}
        self.armed, self.handles, self.waiting, self.arrived = False, [], [], []
        self.gathers, self.undone, self.alpha = {}, [], {}  # gathers: bucket -> its all_gather's handle
        for p in params:
            p.register_post_accumulate_grad_hook(self.accumulated)

    def arm(self):
        # the next backward is the last micro-step of this optimizer step
        self.armed, self.handles, self.waiting = True, [], [len(m) for m in self.members]

    def accumulated(self, p: Tensor):
        if self.armed:
            for b in self.buckets_of[id(p)]:
                self.waiting[b] -= 1
            while len(self.handles) < len(self.widths) and self.waiting[len(self.handles)] == 0:
                self.launch(len(self.handles))

    def launch(self, b: int):
        torch._foreach_copy_([piece for _, _, _, piece, _, _ in self.packs[b]],
                             [grad_or_zeros(p).view(-1)[s:e] for p, s, e, *_ in self.packs[b]])
        self.handles.append(dist.reduce_scatter_tensor(self.outputs[b], self.inputs[b], async_op=True))

    def finish(self):
        # after the last backward: send what no hook sent; reduced() waits for each bucket when it is read
        while len(self.handles) < len(self.widths):
            self.launch(len(self.handles))
        self.armed, self.gathers, self.undone = False, {}, [len(m) for m in self.members]
        self.arrived = [False] * len(self.widths)

    def wait_reduced(self, b: int):
        # on a GPU the wait holds back the current stream, not the host
        if not self.arrived[b]:
            self.handles[b].wait()
            self.arrived[b] = True

    def reduced(self, p: Tensor) -> Tensor:
        start, end = self.views[id(p)]
        for b in range(start // self.step, (end - 1) // self.step + 1):  # the buckets its view spans
            self.wait_reduced(b)
        return self.received[start:end]

    def result(self, p: Tensor) -> Tensor:
        return self.results[slice(*self.views[id(p)])]

    def done(self, params: list[Tensor], alpha: float | None):
        # every rank calls it with the same parameters in the same order (whoever owns them)
        for p in params:
            self.alpha[id(p)] = alpha
            for b in self.buckets_of[id(p)]:
                self.undone[b] -= 1
        for b, undone in enumerate(self.undone):
            if undone == 0 and b not in self.gathers:
                self.gather(b)

    def gather(self, b: int):
        self.wait_reduced(b)  # the gather overwrites the reduce-scatter's input (gloo may run the two at once)
        self.gathers[b] = dist.all_gather_into_tensor(self.gathered[b], self.sends[b], async_op=True)

    @torch.no_grad()
    def apply(self):
        for b in range(len(self.widths)):
            if b not in self.gathers:
                self.gather(b)
        adds, copies = {}, ([], [])
        for b, handle in self.gathers.items():
            handle.wait()
            for p, _, _, _, piece, target in self.packs[b]:
                alpha = self.alpha[id(p)]
                dst, src = adds.setdefault(alpha, ([], [])) if alpha is not None else copies
                dst.append(target)
                src.append(piece)
        if copies[0]:
            torch._foreach_copy_(*copies)
        for alpha, (dst, src) in adds.items():
            torch._foreach_add_(dst, src, alpha=alpha)
        self.handles = []  # the next finish() launches every bucket that no hook launched

# -----------------------------------------------------------------------------
# Model components

def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))

def init_matrix(*shape: int) -> Tensor:
    # uniform with std 0.5 / sqrt(fan_in), as record 21
    bound = 3 ** 0.5 * 0.5 * shape[-1] ** -0.5
    return torch.empty(shape).uniform_(-bound, bound)

class CastedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features) if zero_init else init_matrix(out_features, in_features))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.type_as(x))

class Rotary(nn.Module):
    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        # half the frequencies are zero: those dimensions carry no position (record 21)
        freq = (1 / 1024) ** torch.linspace(0, 1, steps=dim // 4)
        freq = torch.cat([freq, freq.new_zeros(dim // 4)])
        theta = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freq)
        self.register_buffer("cos", theta.cos(), persistent=False)
        self.register_buffer("sin", theta.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T, H, D]
        cos, sin = self.cos[None, :x.size(-3), None, :], self.sin[None, :x.size(-3), None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x)

def relu2(h: Tensor) -> Tensor:
    return F.relu(h).square()

def swiglu(h: Tensor) -> Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up

ACTIVATIONS = {"relu2": relu2, "swiglu": swiglu}

class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "relu2"):
        super().__init__()
        self.c_fc = CastedLinear(dim, hidden * (2 if act == "swiglu" else 1))
        self.c_proj = CastedLinear(hidden, dim, zero_init=True)
        self.act = ACTIVATIONS[act]

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x)))

# -----------------------------------------------------------------------------
# Attention: document-causal sliding windows, FlexAttention block sparsity on GPU, a dense mask on CPU

BLOCK = 128
EOT = 50256

def block_masks(docs: Tensor, window_blocks: Tensor) -> tuple[BlockMask, BlockMask]:
    # kv blocks fully inside the query block's document and strictly earlier are "full" (no mask_mod);
    # blocks that touch the document are "partial"; the window keeps the most recent ones (record 21)
    n = docs.numel() // BLOCK
    block = torch.arange(n, dtype=torch.int32, device=docs.device)
    lo, hi = docs.view(n, BLOCK)[:, 0], docs.view(n, BLOCK)[:, -1]
    full = (block[:, None] > block) & (lo[:, None] == hi) & (hi[:, None] == lo)
    partial = (block[:, None] >= block) & (lo[:, None] <= hi) & (hi[:, None] >= lo) & ~full

    def newest_first(mask: Tensor) -> tuple[Tensor, Tensor]:
        order = torch.where(mask, block, -1).sort(dim=-1, descending=True).indices.to(torch.int32)
        return mask.sum(dim=-1, dtype=torch.int32)[None, None], order[None, None].contiguous()

    def document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs[q_idx] == docs[kv_idx])

    partial_num, partial_idx = newest_first(partial)
    full_num, full_idx = newest_first(full)

    def window(w: Tensor) -> BlockMask:
        w = w.clamp_min(1)
        return BlockMask.from_kv_blocks(torch.clamp_max(partial_num, torch.clamp_min(w - full_num, 1)), partial_idx,
                                        torch.clamp_max(full_num, w - 1), full_idx,
                                        BLOCK_SIZE=BLOCK, mask_mod=document_causal)

    return window(window_blocks), window(window_blocks // 2)

def dense_masks(docs: Tensor, window_blocks: Tensor) -> tuple[Tensor, Tensor]:
    # the same visibility as block_masks, spelled out per token pair
    pos = torch.arange(docs.numel(), device=docs.device)
    blk = pos // BLOCK
    visible = (pos[:, None] >= pos) & (docs[:, None] == docs)

    def window(w: Tensor) -> Tensor:
        return visible & (blk[None, :] > blk[:, None] - w.clamp_min(1))

    return window(window_blocks), window(window_blocks // 2)

attention_kernel = flex_attention  # main() swaps in a compiled one when the model itself runs uncompiled on GPU

def attend(q: Tensor, k: Tensor, v: Tensor, mask: BlockMask | Tensor, scale: float) -> Tensor:
    if isinstance(mask, BlockMask):
        return attention_kernel(q, k, v, block_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, max_seq_len: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.qkv_w = nn.Parameter(init_matrix(3, num_heads * head_dim, dim))  # merged QKV, orthogonalized per matrix
        self.lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))  # mix of v and the value embedding
        self.rotary = Rotary(head_dim, max_seq_len)
        self.c_proj = CastedLinear(num_heads * head_dim, dim, zero_init=True)

    def forward(self, x: Tensor, ve: Tensor | None, mask: BlockMask | Tensor) -> Tensor:
        B, T = x.size(0), x.size(1)
        q, k, v = F.linear(x, self.qkv_w.flatten(end_dim=1).type_as(x)).view(B, T, 3 * self.num_heads, self.head_dim).chunk(3, dim=-2)
        q, k = self.rotary(norm(q)), self.rotary(norm(k))
        v = self.lambdas[0] * v + (self.lambdas[1] * ve.view_as(v) if ve is not None else 0)
        y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scale=0.12).transpose(1, 2)
        return self.c_proj(y.contiguous().view(B, T, self.num_heads * self.head_dim))

# -----------------------------------------------------------------------------
# Mixture of experts: route (router + top-k), dispatch (sort assignments by expert), grouped GEMM experts, combine

class PermuteRows(torch.autograd.Function):
    # out[i] = x[index[i] // k]; the backward is a gather through the inverse permutation plus a sum over the
    # k copies of each row, so neither direction needs scatter atomics
    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(index, inverse)
        ctx.k = k
        return x[index // k] if k > 1 else x[index]

    @staticmethod
    def backward(ctx, grad: Tensor):
        index, inverse = ctx.saved_tensors
        g = grad[inverse]
        return (g.view(-1, ctx.k, g.size(-1)).sum(1) if ctx.k > 1 else g), None, None, None

def permute_rows(x: Tensor, index: Tensor, inverse: Tensor, k: int = 1) -> Tensor:
    return PermuteRows.apply(x, index, inverse, k)

def mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    # bf16 operands, fp32 accumulation and result (on CPU, where mm has no out_dtype, the same products in fp32)
    return torch.mm(a, b, out_dtype=torch.float32) if a.is_cuda else torch.mm(a.float(), b.float())

def split_bf16(t: Tensor) -> tuple[Tensor, Tensor]:
    # t ~= hi + lo with both in bf16: 16 significant bits, more than the 11 of TF32
    hi = t.bfloat16()
    return hi, (t - hi.float()).bfloat16()

class RouterLogits(torch.autograd.Function):
    # logits = x @ w.T for bf16 x and fp32 w on bf16 tensor cores with fp32 accumulation: w (and in backward the
    # logits' gradient) split into two bf16 halves, so x is read as it is, never copied to fp32 or saved as fp32
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(x, w)
        E = w.size(0)
        return mm_fp32(x, torch.cat(split_bf16(w)).T).view(-1, 2, E).sum(1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        E = w.size(0)
        g_hi, g_lo = split_bf16(grad)
        w_hi, w_lo = split_bf16(w)
        # dx = g @ w to bf16 precision: hi*hi + lo*hi + hi*lo in one fp32-accumulated product
        dx = torch.mm(torch.cat([g_hi, g_lo, g_hi], 1), torch.cat([w_hi, w_hi, w_lo]))
        dw = mm_fp32(torch.cat([g_hi, g_lo], 1).T, x).view(2, E, -1).sum(0)
        return dx, dw

def router_logits(x: Tensor, w: Tensor) -> Tensor:
    return RouterLogits.apply(x, w) if x.dtype == torch.bfloat16 else F.linear(x.float(), w)

def top_indices(scores: Tensor, k: int) -> Tensor:
    # k argmax passes over the few experts fuse into one small kernel; torch.topk took 0.07 ms a layer on an H100
    picks = []
    for _ in range(k):
        picks.append(scores.argmax(-1, keepdim=True))
        scores = scores.scatter(-1, picks[-1], float("-inf"))
    return torch.cat(picks, -1)

def grouped_mm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    # x: [N, in] rows sorted by expert, w: [E, out, in]; rows offsets[e-1]:offsets[e] go through w[e]
    return torch._grouped_mm(x, w.type_as(x).mT, offs=offsets)

def expert_capacity(capacity_factor: float, tokens: int, k: int, num_experts: int) -> int:
    # ceil(cf * T * k / E) in integers, with cf read as the shortest decimal that gives the float back (what the
    # user typed: 1.1 is 11/10, not 1.1000000000000000888 whose product 55.000000000000004 rounds up to 56)
    cf = Fraction(repr(capacity_factor))
    return -(-(cf.numerator * tokens * k) // (cf.denominator * num_experts))

class MoE(nn.Module):
    def __init__(self, args: Hyperparameters):
        super().__init__()
        dim, E = args.model_dim, args.num_experts
        self.E = E
        self.k = E if args.router == "soft" else args.top_k
        self.kind = args.router
        self.capacity_factor = args.capacity_factor
        self.aux_coef, self.z_coef = args.aux_loss_coef, args.z_loss_coef
        hidden = expert_hidden(args)
        self.act_name, self.act = args.expert_act, ACTIVATIONS[args.expert_act]
        self.kernel = args.moe_kernel
        self.router = nn.Parameter(init_matrix(E, dim))
        self.router_noise = nn.Parameter(torch.zeros(E, dim)) if args.router == "noisy" else None
        self.w1 = nn.Parameter(init_matrix(E, hidden * (2 if args.expert_act == "swiglu" else 1), dim)
                               * args.expert_init_scale)
        self.w2 = nn.Parameter(torch.zeros(E, dim, hidden))
        self.shared = MLP(dim, hidden * args.shared_experts, args.expert_act) if args.shared_experts else None
        self.register_buffer("bias", torch.zeros(E))  # selection-only bias of the auxiliary-loss-free balancing
        self.register_buffer("load", torch.zeros(E))  # assignments per expert since the last reset
        self.register_buffer("stats", torch.zeros(6))  # calls, entropy, switch loss, z-loss, dropped share, gate_min (sums)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        logits = router_logits(x, self.router)  # router math in fp32
        if self.router_noise is not None and self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(F.linear(x.float(), self.router_noise))
        if self.kind == "sigmoid":
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(dim=-1, keepdim=True)
        else:
            scores = probs = logits.softmax(dim=-1)
        experts = top_indices(scores + self.bias, self.k)
        if self.k == 1:
            gates = scores.gather(-1, experts)  # a softmax over one logit would be 1 and teach the router nothing
        elif self.kind == "sigmoid":
            gates = scores.gather(-1, experts)
            gates = gates / gates.sum(dim=-1, keepdim=True)
        else:
            gates = logits.gather(-1, experts).softmax(dim=-1)
        return logits, probs, experts, gates

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        T, E, k = x.size(0), self.E, self.k
        logits, probs, experts, gates = self.route(x)
        flat = experts.flatten()
        # assignments grouped by expert, token order within an expert; one-byte keys make the radix sort one pass
        order = flat.to(torch.uint8 if E <= 256 else torch.int32).argsort(stable=True)
        arange = torch.arange(flat.numel(), device=x.device)
        inverse = torch.empty_like(order).scatter_(0, order, arange)
        counts = flat.new_zeros(E).scatter_add_(0, flat, torch.ones_like(flat))
        offsets = counts.cumsum(0).to(torch.int32)
        dropped = x.new_zeros((), dtype=torch.float32)
        if self.capacity_factor:
            capacity = expert_capacity(self.capacity_factor, T, k, E)
            queue_pos = arange - (offsets - counts)[flat[order]]  # position in its expert's queue
            keep = (queue_pos < capacity)[inverse].view(T, k)
            gates = gates * keep
            dropped = 1 - keep.float().mean()
        if self.uses_triton(x.device):
            y = torch.ops.moe_speedrun.expert_mlp(x, self.w1.type_as(x), self.w2.type_as(x), gates.reshape(-1), order,
                                                  offsets, k, self.act_name)[0]
        else:
            # the gate scales the hidden rows before the second matmul (linear in them): it fuses into the
            # activation, and the combine is a gather and a sum over the k copies, with no [T, k, d] product to
            # store for backward
            gate_rows = permute_rows(gates.reshape(-1, 1), order, inverse)
            h = self.act(grouped_mm(permute_rows(x, order, inverse, k), self.w1, offsets)) * gate_rows
            y = permute_rows(grouped_mm(h.type_as(x), self.w2, offsets), inverse, order).view(T, k, -1).sum(1)
        if self.shared is not None:
            y = y + self.shared(x)
        aux = torch.zeros((), device=x.device)
        if self.aux_coef or not self.training:
            switch = E * (counts.float() / (T * k) * probs.mean(0)).sum()
            aux = aux + self.aux_coef * switch
        if self.z_coef or not self.training:
            z = torch.logsumexp(logits, dim=-1).square().mean()
            aux = aux + self.z_coef * z
        with torch.no_grad():
            self.load.add_(counts.float())
            if not self.training:  # the statistics are reported from validation, so training skips them
                entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean()
                # each token's smallest gate: 1/k when its k experts mix evenly, near 0 when top-k acts as top-1
                gate_min = gates.min(-1).values.mean()
                self.stats.add_(torch.stack([torch.ones_like(z), entropy, switch, z, dropped, gate_min]))
        return y.view(shape), aux

    def uses_triton(self, device: torch.device) -> bool:
        return self.kernel == "triton" and triton_runs_on(device)

    def reset_stats(self):
        self.load.zero_()
        self.stats.zero_()

@torch.no_grad()
def update_router_bias(moes: list[MoE], rate: float, world_size: int):
    # auxiliary-loss-free balancing (DeepSeek-V3): raise the bias of underloaded experts, lower overloaded ones
    loads = torch.stack([m.load for m in moes])
    if world_size > 1:
        dist.all_reduce(loads)
    for m, load in zip(moes, loads):
        m.bias.add_(torch.sign(load.mean() - load), alpha=rate)
        m.load.zero_()

# -----------------------------------------------------------------------------
# MoE kernels (Triton): grouped GEMMs that gather token rows in their loads and scatter results in their stores
#
# The idea is ScatterMoE's scatter2scatter (Tan et al. 2024) and OpenAI's matmul_ogs: the assignments stay in
# token order in memory and only an index, `order`, is sorted by expert, so the [T*k, d] permuted copy of x (and of
# its gradient) never exists. Notation: T tokens, k experts each, N = T*k assignments, a = t*k + j the assignment
# of token t's j-th expert, p a position in expert order with a = order[p]; offsets[e] = end of expert e's rows.
#   forward:  pre[p] = x[a//k] @ w1[e]^T                               gather_rows_kernel (up-projection)
#             out[a] = gate[a] * act(pre[p]) @ w2[e]^T; y = sum_j out  scatter_rows_kernel (down-projection)
#   backward: dh[p] = dy[a//k] @ w2[e]                                 gather_rows_kernel, backward epilogue:
#               dpre[p] = act'(pre[p]) * gate[a] * dh[p], dgate[a] = act(pre[p]) . dh[p], hg[p] = gate[a] act(pre[p])
#             dw2[e] = sum_p dy[a//k]^T hg[p]                          weight_grad_kernel
#             dw1[e] = sum_p dpre[p]^T x[a//k]                         weight_grad_kernel
#             dx_a = dpre[p] @ w1[e]; dx = sum_j dx_a                  scatter_rows_kernel
# Only pre ([N, hidden], or [N, 2 hidden] for SwiGLU) is kept from the forward: the down-projection recomputes the
# activation in its loads (two flops an element) instead of storing a second [N, hidden] tensor; the backward
# writes hg once in the epilogue that computes it anyway, so the w2 gradient's loop reads plain rows. Deterministic:
# every output element is written by one program, and the k contributions of a token are summed by a plain
# reduction over a [T, k, d] buffer (one [N, d] round trip), never by atomics.

ACT_CODES = {"relu2": 1, "swiglu": 2}
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (the tests)

def triton_runs_on(device: torch.device) -> bool:
    # Triton runs on the GPU, and on the CPU only under its interpreter
    return triton is not None and (device.type == "cuda" or TRITON_INTERPRET)
if triton is not None:
    def tile_configs(pairs) -> list:
        # a short autotune list of (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), chosen once per shape and cached on
        # disk (Triton's cache_results), so a later run does not tune again; the interpreter
        # (CPU tests) gets one small tile so partial tiles and several experts per launch are exercised
        if TRITON_INTERPRET:
            return [triton.Config(dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16), num_warps=1, num_stages=1)]
        return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=kk), num_warps=w, num_stages=s)
                for m, n, kk, w, s in pairs]

    ROW_CONFIGS = [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                   (128, 256, 64, 8, 3), (64, 64, 64, 4, 3)]
    GRAD_CONFIGS = [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3),
                    (64, 128, 128, 4, 3), (128, 64, 64, 4, 4)]

    @triton.jit
    def row_tile(offsets_ptr, N_OUT, E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
        # this program's tile of the expert-sorted rows and of the output columns: (expert, rows, row mask, columns,
        # column mask); expert = E for a program past the last tile. Each expert's rows start a new tile, so a grid
        # of (cdiv(N, BLOCK_M) + E) x cdiv(N_OUT, BLOCK_N) programs covers any split; the column tile varies fastest,
        # so the programs that share rows run side by side.
        pid = tl.program_id(0)
        n_tiles = tl.cdiv(N_OUT, BLOCK_N)
        pid_m, pid_n = pid // n_tiles, pid % n_tiles
        idx = tl.arange(0, E_POW2)
        ends = tl.load(offsets_ptr + idx, mask=idx < E, other=0)
        starts = tl.load(offsets_ptr + idx - 1, mask=(idx >= 1) & (idx < E), other=0)
        tiles = tl.where(idx < E, tl.cdiv(ends - starts, BLOCK_M), 0)
        done = tl.cumsum(tiles, 0)
        e = tl.sum((done <= pid_m).to(tl.int32), 0)
        first = tl.sum(tl.where(idx == e, done - tiles, 0), 0)
        start = tl.sum(tl.where(idx == e, starts, 0), 0)
        end = tl.sum(tl.where(idx == e, ends, 0), 0)
        rows = start + (pid_m - first) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        return e, rows, rows < end, cols, cols < N_OUT

    @triton.jit
    def activation(ptrs, mask, H, ACT: tl.constexpr):
        # act(pre) in fp32 for a tile of pointers into pre: relu(pre)^2, or silu(pre[:, c]) * pre[:, H + c] (SwiGLU)
        g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        if ACT == 1:
            r = tl.maximum(g, 0.0)
            return r * r
        else:
            u = tl.load(ptrs + H, mask=mask, other=0.0).to(tl.float32)
            return g * tl.sigmoid(g) * u

    @triton.autotune(configs=tile_configs(ROW_CONFIGS), key=["N", "N_OUT", "K", "E", "ACT", "BACKWARD"],
                     cache_results=True)
    @triton.jit
    def gather_rows_kernel(a_ptr, w_ptr, out_ptr, order_ptr, offsets_ptr, gate_ptr, pre_ptr, dgate_ptr, hg_ptr,
                           N, N_OUT, K, H, TOP_K, stride_a, stride_we, stride_wk, stride_wn, stride_o,
                           E: tl.constexpr, E_POW2: tl.constexpr, ACT: tl.constexpr, BACKWARD: tl.constexpr,
                           PART: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # out[p, n] = sum_c a[order[p] // TOP_K, c] * w[e(p), c, n] (w addressed by strides: w1^T or w2).
        # Forward (up-projection): out = pre. BACKWARD: a = dy, w = w2, and the epilogue turns dh into dpre =
        # act'(pre) * gate * dh, written at columns n (and H + n for SwiGLU's up half), stores this column
        # block's share of dgate = act(pre) . dh, one partial per PART columns in dgate[column // PART, p] (so
        # every config of the autotune list writes every partial), and hg = gate * act(pre) [N, H] for the w2
        # gradient (each element is computed here once anyway). a, w, out: bf16 (fp32 in CPU tests).
        e, rows, row_ok, cols, col_ok = row_tile(offsets_ptr, N_OUT, E, E_POW2, BLOCK_M, BLOCK_N)
        if e >= E:
            return
        assignment = tl.load(order_ptr + rows, mask=row_ok, other=0)
        token = (assignment // TOP_K).to(tl.int64)
        red = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + token[:, None] * stride_a + red[None, :]
        w_ptrs = w_ptr + e.to(tl.int64) * stride_we + red[:, None] * stride_wk + cols[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c in range(0, K, BLOCK_K):
            c_ok = red + c < K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=c_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
        mask = row_ok[:, None] & col_ok[None, :]
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_o + cols[None, :]
        if BACKWARD:
            gate = tl.load(gate_ptr + assignment, mask=row_ok, other=0.0)
            pre_ptrs = pre_ptr + rows.to(tl.int64)[:, None] * stride_o + cols[None, :]
            g = tl.load(pre_ptrs, mask=mask, other=0.0).to(tl.float32)
            if ACT == 1:
                r = tl.maximum(g, 0.0)
                h = r * r
                tl.store(out_ptrs, (acc * gate[:, None] * 2 * r).to(out_ptr.dtype.element_ty), mask=mask)
            else:
                u = tl.load(pre_ptrs + H, mask=mask, other=0.0).to(tl.float32)
                s = tl.sigmoid(g)
                h = g * s * u
                dh = acc * gate[:, None]
                tl.store(out_ptrs, (dh * u * s * (1 + g * (1 - s))).to(out_ptr.dtype.element_ty), mask=mask)
                tl.store(out_ptrs + H, (dh * g * s).to(out_ptr.dtype.element_ty), mask=mask)
            part = tl.sum(tl.reshape(h * acc, (BLOCK_M, BLOCK_N // PART, PART)), 2)
            blocks = tl.program_id(0) % tl.cdiv(N_OUT, BLOCK_N) * (BLOCK_N // PART) + tl.arange(0, BLOCK_N // PART)
            tl.store(dgate_ptr + blocks[None, :] * N + rows[:, None], part,
                     mask=row_ok[:, None] & (blocks < tl.cdiv(N_OUT, PART))[None, :])
            hg_ptrs = hg_ptr + rows.to(tl.int64)[:, None] * H + cols[None, :]
            tl.store(hg_ptrs, (h * gate[:, None]).to(hg_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.autotune(configs=tile_configs(ROW_CONFIGS), key=["N", "N_OUT", "K", "E", "ACT", "HAS_GATE"],
                     cache_results=True)
    @triton.jit
    def scatter_rows_kernel(a_ptr, w_ptr, out_ptr, order_ptr, offsets_ptr, gate_ptr, N, N_OUT, K, H,
                            stride_a, stride_we, stride_wk, stride_wn, stride_o,
                            E: tl.constexpr, E_POW2: tl.constexpr, ACT: tl.constexpr, HAS_GATE: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # out[order[p], n] = gate[order[p]] * sum_c act(a)[p, c] * w[e(p), c, n]: a in expert order, out in
        # assignment order. Down-projection: a = pre, ACT > 0, HAS_GATE. dx: a = dpre, w = w1, ACT = 0.
        e, rows, row_ok, cols, col_ok = row_tile(offsets_ptr, N_OUT, E, E_POW2, BLOCK_M, BLOCK_N)
        if e >= E:
            return
        red = tl.arange(0, BLOCK_K)
        a_rows = a_ptr + rows.to(tl.int64) * stride_a
        w_ptrs = w_ptr + e.to(tl.int64) * stride_we + red[:, None] * stride_wk + cols[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c in range(0, K, BLOCK_K):
            c_ok = red + c < K
            a_mask = row_ok[:, None] & c_ok[None, :]
            if ACT == 0:
                a = tl.load(a_rows[:, None] + (red + c)[None, :], mask=a_mask, other=0.0)
            else:
                a = activation(a_rows[:, None] + (red + c)[None, :], a_mask, H, ACT).to(w_ptr.dtype.element_ty)
            w = tl.load(w_ptrs, mask=c_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc)
            w_ptrs += BLOCK_K * stride_wk
        assignment = tl.load(order_ptr + rows, mask=row_ok, other=0)
        if HAS_GATE:
            acc = acc * tl.load(gate_ptr + assignment, mask=row_ok, other=0.0)[:, None]
        out_ptrs = out_ptr + assignment.to(tl.int64)[:, None] * stride_o + cols[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.autotune(configs=tile_configs(GRAD_CONFIGS), key=["N", "I", "J", "E", "GATHER_L", "GATHER_R"],
                     cache_results=True)
    @triton.jit
    def weight_grad_kernel(l_ptr, r_ptr, out_ptr, order_ptr, offsets_ptr, N, I, J, TOP_K, stride_l, stride_r,
                           stride_oe, stride_oi, E: tl.constexpr, GATHER_L: tl.constexpr, GATHER_R: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # out[e, i, j] = sum over expert e's rows p of L[p, i] * R[p, j], a grouped GEMM over the reduction
        # dimension. GATHER_*: that operand's row p is row order[p] // TOP_K of a token-order tensor. Tiles:
        # BLOCK_M of i, BLOCK_N of j, BLOCK_K rows p a step. The expert is grid axis 1, so the tiles of one expert
        # run side by side and read its rows from L2 rather than each from memory.
        pid = tl.program_id(0)
        e = tl.program_id(1)
        j_tiles = tl.cdiv(J, BLOCK_N)
        i = (pid // j_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        j = (pid % j_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        i_ok, j_ok = i < I, j < J
        start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0)
        end = tl.load(offsets_ptr + e)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for p0 in range(start, end, BLOCK_K):
            p = p0 + tl.arange(0, BLOCK_K)
            p_ok = p < end
            assignment = tl.load(order_ptr + p, mask=p_ok, other=0)
            l_rows = (assignment // TOP_K if GATHER_L else p).to(tl.int64)
            r_rows = (assignment // TOP_K if GATHER_R else p).to(tl.int64)
            l = tl.load(l_ptr + l_rows[:, None] * stride_l + i[None, :], mask=p_ok[:, None] & i_ok[None, :], other=0.0)
            r = tl.load(r_ptr + r_rows[:, None] * stride_r + j[None, :], mask=p_ok[:, None] & j_ok[None, :], other=0.0)
            acc = tl.dot(tl.trans(l), r, acc)
        out_ptrs = out_ptr + e.to(tl.int64) * stride_oe + i.to(tl.int64)[:, None] * stride_oi + j[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=i_ok[:, None] & j_ok[None, :])

    def row_grid(N: int, n_out: int, E: int):
        return lambda meta: ((triton.cdiv(N, meta["BLOCK_M"]) + E) * triton.cdiv(n_out, meta["BLOCK_N"]),)

    def grad_grid(I: int, J: int, E: int):
        return lambda meta: (triton.cdiv(I, meta["BLOCK_M"]) * triton.cdiv(J, meta["BLOCK_N"]), E)

# One function per kernel launch (bench/moe_layer.py times each). Shapes: x, dy [T, d]; w1 [E, h1, d] with h1 = h, or
# 2h for SwiGLU's [gate; up]; w2 [E, d, h]; pre, dpre [N, h1] in expert order; gates [N] fp32 in assignment order;
# order [N] int64 (assignments sorted by expert, stable); offsets [E] int32 (cumulative counts). Float tensors share
# x's dtype (bf16 on GPU) and are contiguous (the kernels take row strides only; the op makes x and dy so); k is
# the top-k.

DGATE_COLS = 32  # dgate partials: one per 32 columns of the hidden layer (every config has BLOCK_N >= 32)

def e_pow2(E: int) -> int:
    return max(2, triton.next_power_of_2(E))

def up_projection(x: Tensor, w1: Tensor, order: Tensor, offsets: Tensor, k: int) -> Tensor:
    # pre[p] = x[order[p] // k] @ w1[e]^T
    E, H1, d = w1.shape
    N = order.numel()
    pre = x.new_empty(N, H1)
    gather_rows_kernel[row_grid(N, H1, E)](x, w1, pre, order, offsets, x, x, x, x, N, H1, d, 0, k, x.stride(0),
                                           w1.stride(0), 1, d, H1, E=E, E_POW2=e_pow2(E), ACT=0, BACKWARD=False,
                                           PART=DGATE_COLS)
    return pre

def down_projection(pre: Tensor, w2: Tensor, gates: Tensor, order: Tensor, offsets: Tensor, act: str) -> Tensor:
    # out[order[p]] = gates[order[p]] * act(pre[p]) @ w2[e]^T, [N, d] in assignment order
    E, d, H = w2.shape
    N = order.numel()
    out = pre.new_empty(N, d)
    scatter_rows_kernel[row_grid(N, d, E)](pre, w2, out, order, offsets, gates, N, d, H, H, pre.stride(0),
                                           w2.stride(0), 1, H, d, E=E, E_POW2=e_pow2(E), ACT=ACT_CODES[act],
                                           HAS_GATE=True)
    return out


def down_projection_backward(dy: Tensor, w2: Tensor, gates: Tensor, order: Tensor, offsets: Tensor, pre: Tensor,
                             k: int, act: str) -> tuple[Tensor, Tensor, Tensor]:
    # dh = dy[order[p] // k] @ w2[e]; returns dpre = act'(pre) * gate * dh (like pre), dgates [N] fp32 and
    # hg = gate * act(pre) [N, h] in expert order
    E, d, H = w2.shape
    N = order.numel()
    dpre, hg = torch.empty_like(pre), pre.new_empty(N, H)
    parts = torch.empty(triton.cdiv(H, DGATE_COLS), N, device=pre.device, dtype=torch.float32)
    gather_rows_kernel[row_grid(N, H, E)](dy, w2, dpre, order, offsets, gates, pre, parts, hg, N, H, d, H, k,
                                          dy.stride(0), w2.stride(0), H, 1, pre.stride(0), E=E, E_POW2=e_pow2(E),
                                          ACT=ACT_CODES[act], BACKWARD=True, PART=DGATE_COLS)
    return dpre, torch.empty_like(gates).index_copy_(0, order, parts.sum(0)), hg

def weight_grad(l: Tensor, r: Tensor, order: Tensor, offsets: Tensor, k: int, gather_l: bool, like: Tensor) -> Tensor:
    # out[e] = sum over expert e's rows p of l[p]^T r[p], shaped and typed like `like` [E, l columns, r columns];
    # the gathered operand is in token order (row order[p] // k), the other in expert order
    E, I, J = like.shape
    out = torch.empty_like(like)
    weight_grad_kernel[grad_grid(I, J, E)](l, r, out, order, offsets, order.numel(), I, J, k, l.stride(0),
                                           r.stride(0), out.stride(0), J, E=E, GATHER_L=gather_l,
                                           GATHER_R=not gather_l)
    return out

def up_projection_backward(dpre: Tensor, w1: Tensor, order: Tensor, offsets: Tensor) -> Tensor:
    # dx rows: out[order[p]] = dpre[p] @ w1[e], [N, d] in assignment order
    E, H1, d = w1.shape
    N = order.numel()
    out = dpre.new_empty(N, d)
    scatter_rows_kernel[row_grid(N, d, E)](dpre, w1, out, order, offsets, dpre, N, d, H1, 0, dpre.stride(0),
                                           w1.stride(0), d, 1, d, E=E, E_POW2=e_pow2(E), ACT=0, HAS_GATE=False)
    return out

def sum_over_k(rows: Tensor, k: int) -> Tensor:
    # [T*k, d] in assignment order -> [T, d]: the k contributions of each token, added in a fixed order
    return rows.view(-1, k, rows.size(-1)).sum(1) if k > 1 else rows

def expert_mlp_forward(x: Tensor, w1: Tensor, w2: Tensor, gates: Tensor, order: Tensor, offsets: Tensor,
                       k: int, act: str) -> tuple[Tensor, Tensor]:
    # y [T, d] = sum over each token's k experts of gate * w2[e] act(w1[e] x), and pre for the backward
    pre = up_projection(x.contiguous(), w1, order, offsets, k)
    return sum_over_k(down_projection(pre, w2, gates, order, offsets, act), k), pre

def expert_mlp_backward(dy: Tensor, x: Tensor, w1: Tensor, w2: Tensor, gates: Tensor, order: Tensor,
                        offsets: Tensor, pre: Tensor, k: int, act: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # gradients of expert_mlp_forward's y with respect to x, w1, w2 and gates
    x, dy = x.contiguous(), dy.contiguous()
    dpre, dgates, hg = down_projection_backward(dy, w2, gates, order, offsets, pre, k, act)
    dw2 = weight_grad(dy, hg, order, offsets, k, gather_l=True, like=w2)
    dw1 = weight_grad(dpre, x, order, offsets, k, gather_l=False, like=w1)
    return sum_over_k(up_projection_backward(dpre, w1, order, offsets), k), dw1, dw2, dgates

@torch.library.custom_op("moe_speedrun::expert_mlp", mutates_args=())
def expert_mlp(x: Tensor, w1: Tensor, w2: Tensor, gates: Tensor, order: Tensor, offsets: Tensor, k: int,
               act: str) -> tuple[Tensor, Tensor]:
    return expert_mlp_forward(x, w1, w2, gates, order, offsets, k, act)

@expert_mlp.register_fake
def _(x: Tensor, w1: Tensor, w2: Tensor, gates: Tensor, order: Tensor, offsets: Tensor, k: int, act: str):
    return torch.empty_like(x), x.new_empty(order.numel(), w1.size(1))

@torch.library.custom_op("moe_speedrun::expert_mlp_backward", mutates_args=())
def expert_mlp_backward_op(dy: Tensor, x: Tensor, w1: Tensor, w2: Tensor, gates: Tensor, order: Tensor,
                           offsets: Tensor, pre: Tensor, k: int, act: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return expert_mlp_backward(dy, x, w1, w2, gates, order, offsets, pre, k, act)

@expert_mlp_backward_op.register_fake
def _(dy: Tensor, x: Tensor, w1: Tensor, w2: Tensor, gates: Tensor, order: Tensor, offsets: Tensor, pre: Tensor,
      k: int, act: str):
    return torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w2), torch.empty_like(gates)

def _expert_mlp_setup(ctx, inputs, output):
    x, w1, w2, gates, order, offsets, k, act = inputs
    ctx.save_for_backward(x, w1, w2, gates, order, offsets, output[1])
    ctx.k, ctx.act = k, act

def _expert_mlp_grad(ctx, dy, _):
    dx, dw1, dw2, dgates = torch.ops.moe_speedrun.expert_mlp_backward(dy, *ctx.saved_tensors, ctx.k, ctx.act)
    return dx, dw1, dw2, dgates, None, None, None, None

expert_mlp.register_autograd(_expert_mlp_grad, setup_context=_expert_mlp_setup)

# Muon's Gram matrices (NS_KERNEL=triton): X X^T is symmetric, so only the tiles on and above the diagonal are
# computed, half the flops of a matmul, and each is stored twice (at (i, j) and transposed at (j, i)). For A^2 with A
# symmetric the same kernel computes A A^T. Any input strides, so a tall X's X^T X reads X.mT without a copy.
if triton is not None:
    # (128, 128, 8, 3) and kin: 2.0 ms off E32's Muon on an H100, where the first five left the kernel at torch's time
    GRAM_CONFIGS = [(128, 64, 8, 3), (128, 64, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3), (128, 32, 4, 4),
                    (128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 4, 3)]

    def gram_configs() -> list:
        # (BLOCK, BLOCK_K, warps, stages); the interpreter gets one small tile, so partial tiles are exercised
        if TRITON_INTERPRET:
            return [triton.Config(dict(BLOCK=16, BLOCK_K=16), num_warps=1, num_stages=1)]
        return [triton.Config(dict(BLOCK=b, BLOCK_K=k), num_warps=w, num_stages=s) for b, k, w, s in GRAM_CONFIGS]

    @triton.autotune(configs=gram_configs(), key=["M", "K", "stride_xm", "POLY"], cache_results=True)
    @triton.jit
    def gram_kernel(x_ptr, out_ptr, scale_ptr, M, K, stride_xb, stride_xm, stride_xk, coef_a, coef_b, coef_c,
                    UPCAST: tl.constexpr, POLY: tl.constexpr, SCALE: tl.constexpr, BLOCK: tl.constexpr,
                    BLOCK_K: tl.constexpr):
        # out[b] = x[b] x[b]^T, fp32 accumulation: program (t, b) computes row block i against row block j for the
        # t-th pair i <= j, pairs counted column by column (j (j + 1) / 2 <= t < (j + 1) (j + 2) / 2, i = t - j (j + 1) / 2).
        # POLY (x the symmetric A, K = M): out[b] = s_b (a I + b A + c A A^T), Newton-Schulz's polynomial formed in
        # the epilogue from the A tile, so the product is never written; s_b = scale_ptr[b] where SCALE
        t = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        j = ((tl.sqrt(8.0 * t + 1.0) - 1.0) * 0.5).to(tl.int32)
        j = tl.where((j + 1) * (j + 2) // 2 <= t, j + 1, j)  # fp32 rounding of the square root, either way
        j = tl.where(j * (j + 1) // 2 > t, j - 1, j)
        i = t - j * (j + 1) // 2
        rows = i * BLOCK + tl.arange(0, BLOCK)
        cols = j * BLOCK + tl.arange(0, BLOCK)
        red = tl.arange(0, BLOCK_K)
        x = x_ptr + b * stride_xb
        a_ptrs = x + rows[:, None] * stride_xm + red[None, :] * stride_xk
        bt_ptrs = x + red[:, None] * stride_xk + cols[None, :] * stride_xm
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            k_ok = red + k < K
            a = tl.load(a_ptrs, mask=(rows < M)[:, None] & k_ok[None, :], other=0.0)
            bt = tl.load(bt_ptrs, mask=k_ok[:, None] & (cols < M)[None, :], other=0.0)
            if UPCAST:
                a, bt = a.to(tl.float32), bt.to(tl.float32)
            acc = tl.dot(a, bt, acc)
            a_ptrs += BLOCK_K * stride_xk
            bt_ptrs += BLOCK_K * stride_xk
        out = out_ptr + b * M * M
        if POLY:  # symmetric too, so the mirrored store below stays right
            a_tile = tl.load(x + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                             mask=(rows < M)[:, None] & (cols < M)[None, :], other=0.0).to(tl.float32)
            acc = coef_c * acc + coef_b * a_tile + tl.where(rows[:, None] == cols[None, :], coef_a, 0.0)
            if SCALE:
                acc = acc * tl.load(scale_ptr + b)
        tile = acc.to(out_ptr.dtype.element_ty)
        tl.store(out + rows[:, None] * M + cols[None, :], tile, mask=(rows < M)[:, None] & (cols < M)[None, :])
        if i != j:
            tl.store(out + cols[:, None] * M + rows[None, :], tl.trans(tile),
                     mask=(cols < M)[:, None] & (rows < M)[None, :])

    def gram_grid(M: int, B: int):
        def grid(meta):
            tiles = triton.cdiv(M, meta["BLOCK"])
            return tiles * (tiles + 1) // 2, B
        return grid

def gram_matrix(x: Tensor) -> Tensor:
    # x x^T, [B, m, k] -> [B, m, m]: the PyTorch path, and the reference of gram_matrix_op
    return x @ x.mT

@torch.library.custom_op("moe_speedrun::gram_matrix", mutates_args=())
def gram_matrix_op(x: Tensor) -> Tensor:
    # x x^T by gram_kernel: x [B, m, k] with any strides, bf16 (fp32 in CPU tests); out [B, m, m] contiguous, x's dtype
    B, M, K = x.shape
    # Triton's interpreter (3.9) mishandles bf16: tl.dot of bf16 operands is wrong and fp32 -> bf16 truncates. Under
    # it the kernel casts the operands to fp32 (the same exact products) and PyTorch rounds the fp32 result
    emulate = TRITON_INTERPRET and x.dtype == torch.bfloat16
    out = x.new_empty(B, M, M, dtype=torch.float32 if emulate else x.dtype)
    gram_kernel[gram_grid(M, B)](x, out, out, M, K, x.stride(0), x.stride(1), x.stride(2), 0.0, 0.0, 0.0,
                                 UPCAST=emulate, POLY=False, SCALE=False)
    return out.bfloat16() if emulate else out

@gram_matrix_op.register_fake
def _(x: Tensor):
    return x.new_empty(x.size(0), x.size(1), x.size(1))

@torch.library.custom_op("moe_speedrun::ns_polynomial", mutates_args=())
def ns_polynomial_op(A: Tensor, a: float, b: float, c: float, scale: Tensor | None = None) -> Tensor:
    # scale (a I + b A + c A^2) in A's dtype, scale [B, 1, 1] fp32 per matrix (1 if None), A [B, m, m] symmetric, bf16
    # (fp32 in CPU tests): gram_kernel's A A^T (half A^2's flops) with the sum formed in its epilogue from fp32, so
    # neither A^2 nor the sum makes a pass over memory of its own (newton_schulz's PyTorch path: both do)
    B, M, _ = A.shape
    emulate = TRITON_INTERPRET and A.dtype == torch.bfloat16
    out = A.new_empty(B, M, M, dtype=torch.float32 if emulate else A.dtype)
    s = scale.reshape(B).float().contiguous() if scale is not None else out
    gram_kernel[gram_grid(M, B)](A, out, s, M, M, A.stride(0), A.stride(1), A.stride(2), a, b, c,
                                 UPCAST=emulate, POLY=True, SCALE=scale is not None)
    return out.bfloat16() if emulate else out

@ns_polynomial_op.register_fake
def _(A: Tensor, a: float, b: float, c: float, scale: Tensor | None = None):
    return torch.empty_like(A)

# -----------------------------------------------------------------------------
# The GPT

def next_multiple(v: int, n: int) -> int:
    return -(-v // n) * n

class Block(nn.Module):
    def __init__(self, args: Hyperparameters, layer: int, attn: bool, moe: bool):
        super().__init__()
        max_seq_len = max(args.train_seq_len, args.val_seq_len)
        self.attn = CausalSelfAttention(args.model_dim, args.num_heads, args.head_dim, max_seq_len) if attn else None
        self.mlp = MoE(args) if moe else MLP(args.model_dim, args.mlp_hidden)
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))  # mix of the residual and x0

    def forward(self, x: Tensor, ve: Tensor | None, x0: Tensor, mask) -> tuple[Tensor, Tensor | float]:
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        if self.attn is not None:
            x = x + self.attn(norm(x), ve, mask)
        if isinstance(self.mlp, MoE):
            y, aux = self.mlp(norm(x))
        else:
            y, aux = self.mlp(norm(x)), 0.0
        return x + y, aux

class GPT(nn.Module):
    def __init__(self, args: Hyperparameters):
        super().__init__()
        L, dim = args.num_layers, args.model_dim
        no_attn = set(layer_list("no_attn_layers", args.no_attn_layers, L))
        moe = set(layer_list("moe_layers", args.moe_layers, L) or range(L)) if args.num_experts else set()
        self.long_window = set(layer_list("long_window_layers", args.long_window_layers, L))
        self.embed = nn.Embedding(args.vocab_size, dim)
        # value embeddings: tables 0..n-1 feed layers 0..n-1 and again the last n layers (U-net pattern)
        self.value_embeds = nn.ModuleList(nn.Embedding(args.vocab_size, dim) for _ in range(args.num_value_embeds))
        self.blocks = nn.ModuleList(Block(args, i, i not in no_attn, i in moe) for i in range(L))
        self.skip_weights = nn.Parameter(torch.ones(L // 2))  # U-net: encoder outputs added back in the decoder
        self.lm_head = CastedLinear(dim, next_multiple(args.vocab_size, 128), zero_init=True)
        self.fp8_head = False  # set by main() on Hopper

    def value_embedding_of(self, layer: int) -> int | None:
        n, L = len(self.value_embeds), len(self.blocks)
        return layer if layer < n else layer - (L - n) if layer >= L - n else None

    def forward(self, input_seq: Tensor, target_seq: Tensor, window_blocks: Tensor) -> tuple[Tensor, Tensor]:
        docs = (input_seq == EOT).cumsum(0)
        long_mask, short_mask = (block_masks if input_seq.is_cuda else dense_masks)(docs, window_blocks)
        ve = [emb(input_seq)[None] for emb in self.value_embeds]
        x = x0 = norm(self.embed(input_seq)[None])
        aux = x.new_zeros((), dtype=torch.float32)
        skips, n_skip, L = [], len(self.skip_weights), len(self.blocks)
        for i, block in enumerate(self.blocks):
            if i >= L - n_skip:
                x = x + self.skip_weights[i - (L - n_skip)] * skips.pop()
            j = self.value_embedding_of(i)
            x, a = block(x, ve[j] if j is not None else None, x0, long_mask if i in self.long_window else short_mask)
            aux = aux + a
            if i < n_skip:
                skips.append(x)
        x = norm(x)
        if self.fp8_head and self.training:
            logits = torch.ops.moe_speedrun.fp8_mm(x.flatten(0, -2), self.lm_head.weight, 2.0, 2.0 ** 9, 2.0 ** 19)[0]
        else:
            logits = self.lm_head(x)
        logits = 30 * torch.sigmoid(logits.float() / 7.5)  # softcap
        return F.cross_entropy(logits.view(-1, logits.size(-1)), target_seq), aux

# -----------------------------------------------------------------------------
# Data: shards of uint16 GPT-2 tokens behind a 256 x int32 header (magic 20240520, version 1, token count)

MAGIC, VERSION, HEADER_BYTES = 20240520, 1, 1024

class DataError(ValueError):
    pass

def check_shard(path: Path) -> int:
    if not path.is_file():
        raise DataError(f"{path}: no such shard")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(f"{path}: {size} bytes is too short for the {HEADER_BYTES}-byte shard header; re-download it")
    header = np.fromfile(path, dtype="<i4", count=3)
    if header[0] != MAGIC:
        raise DataError(f"{path}: bad magic number {header[0]} (expected {MAGIC}); this is not a token shard")
    if header[1] != VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    if size != HEADER_BYTES + 2 * int(header[2]):
        raise DataError(f"{path}: header says {header[2]} tokens ({HEADER_BYTES + 2 * int(header[2])} bytes) but the file "
                        f"has {size} bytes; it is truncated or corrupt, re-download it")
    return int(header[2])

def read_shard(path: Path, pin: bool = False) -> Tensor:
    check_shard(path)
    tokens = torch.from_numpy(np.fromfile(path, dtype="<u2", offset=HEADER_BYTES).astype(np.int32))
    return tokens.pin_memory() if pin else tokens

def check_vocab(path: Path, vocab_size: int):
    # an id >= VOCAB_SIZE would pass the embedding's bounds only as a crash (a device-side assert on GPU)
    if check_shard(path) == 0:
        return
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES)
    if tokens.max() >= vocab_size:
        at = int(np.argmax(tokens >= vocab_size))
        raise DataError(f"{path}: token {at} is id {tokens[at]}, outside VOCAB_SIZE={vocab_size}; tokenize the text "
                        f"with GPT-2's BPE (data/tokenize_text.py) or raise VOCAB_SIZE")

def shards_to_read(files: list[Path], batch_tokens: int, batches: int, file_idx: int = 0, pos: int = 0) -> list[Path]:
    # the shards a DataLoader at (file_idx, pos) reads for `batches` batches: a shard holds (tokens - 1) // batch
    # batches (the +1 is the last target), so the run's start-up checks only what it will read
    read = []
    while batches > 0 and len(read) < len(files):
        read.append(files[file_idx])
        batches -= max(0, (check_shard(files[file_idx]) - 1 - pos) // batch_tokens)
        file_idx, pos = (file_idx + 1) % len(files), 0
    return read

def find_shards(pattern: str, name: str) -> list[Path]:
    roots = [Path.cwd()] if Path(pattern).is_absolute() else [Path.cwd(), REPO]
    if not pattern.strip():
        raise DataError(f"{name} is empty; set it to a glob of shards, e.g. "
                        f"{name}={Hyperparameters.__dataclass_fields__[name.lower()].default}")
    if any((root / pattern).is_dir() for root in roots):
        raise DataError(f"{name}={pattern} is a folder; give a glob of its shards, e.g. {name}={Path(pattern) / '*.bin'}")
    for root in roots:
        files = sorted(Path(p) for p in glob.glob(str(root / pattern)) if not Path(p).is_dir())
        if files:
            for f in files:
                check_shard(f)
            return files
    raise DataError(f"no shards match {name}={pattern}; download FineWeb with `python data/cached_fineweb10B.py 8` "
                    f"or point {name} at your own shards (data/tokenize_text.py makes them)")

class DataLoader:
    # Step s reads the next batch_tokens tokens of the stream (a shard's tail that cannot fill a batch is skipped);
    # they are cut into sequences, and rank r's micro-step j gets sequence j * world_size + r, so every GPU count
    # trains on the same tokens per step.
    def __init__(self, files: list[Path], batch_tokens: int, seq_len: int, rank: int, world_size: int,
                 device: torch.device, log=None):
        self.files, self.batch_tokens, self.seq_len = files, batch_tokens, seq_len
        self.rank, self.world_size, self.device, self.log = rank, world_size, device, log
        self.accum = batch_tokens // (seq_len * world_size)
        self.file_idx, self.pos, self.tokens = 0, 0, None

    def state_dict(self) -> dict:
        return dict(file_idx=self.file_idx, pos=self.pos)

    def load_state_dict(self, state: dict):
        self.file_idx, self.pos, self.tokens = state["file_idx"], state["pos"], None

    def rewind(self):
        if self.file_idx != 0:
            self.tokens = None
        self.file_idx, self.pos = 0, 0

    def next_batch(self) -> list[tuple[Tensor, Tensor]]:
        if self.tokens is None:
            self.tokens = read_shard(self.files[self.file_idx], pin=self.device.type == "cuda")
        if self.pos + self.batch_tokens + 1 > len(self.tokens):
            self.file_idx, self.pos = self.file_idx + 1, 0
            if self.file_idx == len(self.files):
                self.file_idx = 0
                if self.log:
                    self.log("train data exhausted: starting over from the first shard")
            self.tokens = read_shard(self.files[self.file_idx], pin=self.device.type == "cuda")
            if self.batch_tokens + 1 > len(self.tokens):
                raise DataError(f"{self.files[self.file_idx]}: {len(self.tokens)} tokens cannot fill one batch of "
                                f"{self.batch_tokens}; use larger shards or a smaller TRAIN_BATCH_TOKENS")
        batch = []
        for j in range(self.accum):
            start = self.pos + (j * self.world_size + self.rank) * self.seq_len
            buf = self.tokens[start:start + self.seq_len + 1]
            batch.append((buf[:-1].to(self.device, non_blocking=True),
                          buf[1:].to(self.device, dtype=torch.int64, non_blocking=True)))
        self.pos += self.batch_tokens
        return batch

# -----------------------------------------------------------------------------
# Schedules

def lr_factor(step: int, args: Hyperparameters) -> float:
    frac = step / args.num_iterations
    if frac < 1 - args.cooldown_frac:
        return 1.0
    w = (1 - frac) / args.cooldown_frac
    return w + (1 - w) * 0.1

def window_blocks_at(step: int, args: Hyperparameters) -> int:
    # record 21: window_max - 64 tokens times the progress, rounded up to a block, at least one block
    return max(1, math.ceil(step / args.num_iterations * (args.window_max / BLOCK - 0.5)))

def muon_momentum_at(step: int, args: Hyperparameters) -> float:
    frac = min(step / args.muon_momentum_warmup, 1) if args.muon_momentum_warmup else 1
    return (1 - frac) * args.muon_momentum_start + frac * args.muon_momentum

# -----------------------------------------------------------------------------
# Setup helpers

def build_optimizers(model: GPT, args: Hyperparameters, rank: int, world_size: int, device: torch.device):
    named = dict(model.named_parameters())
    router = [p for n, p in named.items() if ".router" in n]
    head = [model.lm_head.weight]
    embed = [p for n, p in named.items() if "embed" in n]
    scalars = [p for n, p in named.items() if p.ndim < 2]
    taken = {id(p) for p in router + head + embed + scalars}
    matrices = [p for p in named.values() if id(p) not in taken]
    adam_groups = [dict(params=head, lr=args.head_lr), dict(params=embed, lr=args.embed_lr),
                   dict(params=scalars, lr=args.scalar_lr)]
    if router:
        adam_groups.append(dict(params=router, lr=args.router_lr))
    optimizers = []
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    experts = {id(w) for m in moes for w in (m.w1, m.w2)}
    if args.matrix_optimizer == "adamw":
        adam_groups.append(dict(params=[p for p in matrices if id(p) not in experts], lr=args.adamw_lr,
                                weight_decay=args.adamw_weight_decay))
        if experts:
            adam_groups.append(dict(params=[p for p in matrices if id(p) in experts],
                                    lr=args.adamw_lr * args.expert_lr_mult, weight_decay=args.adamw_weight_decay))
    # SwiGLU's first matrix is [gate; up]: two matrices to Muon, as QKV is three
    halved = {id(m.w1 if isinstance(m, MoE) else m.c_fc.weight) for m in model.modules()
              if isinstance(m, (MoE, MLP)) and m.act is swiglu}
    units = {id(p): matrix_shape(p, halved) for p in matrices if args.matrix_optimizer == "muon"}
    # GRAD_REDUCE=reduce_scatter: every element has one owner (shard_owners); all_reduce: every rank holds every
    # summed gradient and steps every Adam parameter itself, Muon's matrices split by Muon
    sharded = world_size > 1 and args.grad_reduce in GRAD_REDUCE_DTYPES
    ranges = shard_owners(gradient_order(model), units, world_size) if sharded else None
    if args.matrix_optimizer == "muon":
        optimizers.append(Muon(matrices, lr=args.muon_lr, momentum=args.muon_momentum, ns_steps=args.ns_steps,
                               rank=rank, world_size=world_size, compiled=args.compile and device.type == "cuda",
                               halves=[p for p in matrices if id(p) in halved],
                               lr_mults=dict.fromkeys(experts, args.expert_lr_mult),
                               orthogonalize=partial(orthogonalize, method=args.ns_method, kernel=args.ns_kernel),
                               ranges=ranges))
    # small epsilon: the update does not depend on the gradient's scale (and so not on the world size)
    optimizers.insert(0, ShardedAdamW(adam_groups, ranges, rank, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0,
                                      fused=device.type == "cuda"))
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers

def gradient_order(model: GPT) -> list[Tensor]:
    # roughly the order in which the backward finishes gradients: the head, the blocks from the last, then what the
    # whole depth uses (skip weights, embeddings)
    first = [model.lm_head.weight] + [p for block in reversed(model.blocks) for p in reversed(list(block.parameters()))]
    seen = {id(p) for p in first}
    return first + [p for p in reversed(list(model.parameters())) if id(p) not in seen]

def optimizer_order(optimizers: list) -> list[Tensor]:
    # every parameter once, in the order the optimizers read their summed gradients (ShardedAdamW's, then Muon's
    # groups): GradientReducer's buckets in this order let each optimizer start on the first buckets in
    return [p for opt in optimizers for p in (opt.params if isinstance(opt, ShardedAdamW)
                                               else [q for group in opt.param_groups for q in group["params"]])]

def count_params(model: GPT) -> dict:
    total = sum(p.numel() for p in model.parameters())
    idle = sum((m.E - m.k) / m.E * (m.w1.numel() + m.w2.numel()) for m in model.modules() if isinstance(m, MoE))
    return dict(total=total, active=int(total - idle))

def pick_device(local_rank: int) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    # the fp32 matmul left is the noisy router's noise scale: TF32 runs it on tensor cores
    torch.backends.cuda.matmul.allow_tf32 = True
    return device

def repo_path(path: str) -> Path:
    return Path(path) if Path(path).is_absolute() else REPO / path

def check_writable(name: str, value: str):
    # a folder that cannot be made or written is refused at the start, not when the log or the first checkpoint is
    # written; the folders and the file made to find out are removed, so that a refused run leaves nothing behind
    folder = repo_path(value)
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    probe = folder / f".write_test.{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{name}={value}: cannot create or write {folder} ({e.strerror or e}); "
                          f"set {name} to a folder you can write to") from None
    finally:
        for p in made:
            try:
                p.rmdir()
            except OSError:
                pass

def system_report() -> str:
    lines = [f"Running Python {sys.version}",
             f"Running PyTorch {torch.__version__} compiled for CUDA {torch.version.cuda}"]
    try:
        lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout.rstrip())
    except (OSError, subprocess.SubprocessError):
        lines.append("nvidia-smi: not available")
    return "\n".join(lines)

class Log:
    # rank 0's lines go to logs/<run id>.txt, which start() creates once the start-up checks have passed (a refused
    # run leaves no log); the lines before it wait in memory, those after are appended one by one (nothing is lost
    # when the run dies)
    def __init__(self, path: Path | None):
        self.path, self.pending = path, []

    def start(self):
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.writelines(self.pending)
        self.pending = None
        print(f"logging to {self.path}")

    def __call__(self, msg: str, console: bool = True, file: bool = True):
        if self.path is None:
            return
        if console:
            print(msg, flush=True)
        if file and self.pending is not None:
            self.pending.append(msg + "\n")
        elif file:
            with open(self.path, "a") as f:
                f.write(msg + "\n")

class NonFiniteLoss(RuntimeError):
    pass

class CheckpointError(RuntimeError):
    pass

def moe_report(moes: list[tuple[int, MoE]], step: int) -> list[str]:
    lines = []
    for layer, m in moes:
        load = m.load / m.load.mean()
        calls, entropy, switch, z, dropped, gate_min = (m.stats / m.stats[0].clamp_min(1)).tolist()
        lines.append(f"moe step:{step} layer:{layer} load_max:{load.max().item():.3f} load_min:{load.min().item():.3f} "
                     f"entropy:{entropy:.3f} aux:{switch:.4f} zloss:{z:.4f} dropped:{dropped:.4f} gate_min:{gate_min:.4f}")
    return lines

# -----------------------------------------------------------------------------
# main

def load_optimizer_states(optimizers: list, states: list[dict], source: str, world_size: int = 1,
                          device: torch.device | None = None):
    # the state (moments, momentum buffers) continues; the settings (learning rates, EXPERT_LR_MULT, NS_STEPS) are
    # this run's, not the ones load_state_dict would copy from the checkpoint's groups. Raises ConfigError when the
    # checkpoint's optimizers group the parameters otherwise (written by another version of train_gpt.py) or split
    # them over the ranks otherwise. Each rank checks its own part (GRAD_REDUCE=reduce_scatter's groups hold the
    # ranges this rank owns, shard_owners'): with world_size > 1 the ranks agree first (one all_reduce on `device`),
    # so all of them refuse when one part differs and rank 0 prints the line
    owned = lambda groups: [g.get("ranges") for g in groups]
    layout = lambda groups: [len(g["params"]) for g in groups]
    refused = 0
    if ([len(s["param_groups"]) for s in states] == [len(o.param_groups) for o in optimizers]
            and [owned(s["param_groups"]) for s in states] != [owned(o.param_groups) for o in optimizers]):
        refused = 1
    elif [layout(s["param_groups"]) for s in states] != [layout(o.param_groups) for o in optimizers]:
        refused = 2
    if world_size > 1:
        flag = torch.tensor(float(refused), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        refused = int(flag.item())
    if refused == 1:
        raise ConfigError(f"RESUME={source}: its optimizer state is split over the ranks otherwise than this run's "
                          f"(written with another GRAD_REDUCE, another model or another version of train_gpt.py); "
                          f"resume with the settings and the train_gpt.py in its run's log")
    if refused == 2:
        raise ConfigError(f"RESUME={source}: its optimizers group the parameters differently from this train_gpt.py's "
                          f"(it was written by another version); resume with the version that wrote it")
    for opt, state in zip(optimizers, states):
        settings = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
        opt.load_state_dict(state)
        for group, own in zip(opt.param_groups, settings):
            group.update(own)

def check_settings(ckpt: dict, args: Hyperparameters, world_size: int):
    # a checkpoint resumes only into the architecture it was trained with, and on as many ranks (each rank's
    # optimizer state covers what that rank owns)
    if ckpt["world_size"] != world_size:
        raise ConfigError(f"RESUME={args.resume} was written by {ckpt['world_size']} processes and this run has "
                          f"{world_size}: the optimizer state is split by rank; resume on {ckpt['world_size']} processes")
    was, now = ckpt["args"].get("grad_reduce", "all_reduce"), args.grad_reduce
    if world_size > 1 and (was in GRAD_REDUCE_DTYPES) != (now in GRAD_REDUCE_DTYPES):
        split = ("split element by element (shard_owners)" if was in GRAD_REDUCE_DTYPES
                 else "Muon's split by whole matrices, Adam's whole on each rank")
        raise ConfigError(f"RESUME={args.resume} was trained with GRAD_REDUCE={was}, whose optimizer state is "
                          f"{split}; resume with GRAD_REDUCE={was}")
    arch = ("vocab_size", "num_layers", "model_dim", "num_heads", "head_dim", "mlp_hidden", "num_value_embeds",
            "no_attn_layers", "num_experts", "top_k", "expert_hidden", "expert_act", "shared_experts", "router",
            "moe_layers", "matrix_optimizer")
    default = {f.name: f.default for f in fields(Hyperparameters)}  # a key older checkpoints lack had its default
    was = {f: ckpt["args"].get(f, default[f]) for f in arch}
    changed = [f for f in arch if was[f] != getattr(args, f)]
    if changed:
        raise ConfigError(f"RESUME={args.resume} was trained with a different {changed[0].upper()}="
                          f"{was[changed[0]]}; use the checkpoint's settings")

def check_checkpoint(ckpt: dict, args: Hyperparameters, model: nn.Module, world_size: int):
    # the settings, then the shapes (which also catch a width that a default resolved differently when the
    # checkpoint was written)
    check_settings(ckpt, args, world_size)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(ckpt["model"])), sorted(set(ckpt["model"]) - set(own))
    if missing or unexpected:
        raise ConfigError(f"RESUME={args.resume} " + (f"lacks this model's {missing[0]}" if missing else
                          f"holds {unexpected[0]}, which this model lacks") + "; resume with the settings in its run's "
                          f"log (the layers, value embeddings and experts it was trained with)")
    for name, saved in ckpt["model"].items():  # the same names, checked above
        if saved.shape != own[name].shape:
            raise ConfigError(f"RESUME={args.resume} holds {name} of shape {tuple(saved.shape)} but this model's is "
                              f"{tuple(own[name].shape)}; set the width it was trained with (EXPERT_HIDDEN, MLP_HIDDEN)")

CHECKPOINT_KEYS = ("step", "args", "model", "optimizers", "world_size", "loader", "rng")

def load_checkpoint(args: Hyperparameters, world_size: int) -> dict:
    # read and checked before any model or GPU work; tensors stay on the CPU until load_state_dict copies them
    if not Path(args.resume).is_file():
        raise ConfigError(f"RESUME={args.resume}: no such file; give a checkpoint that SAVE_EVERY or SAVE_CHECKPOINT "
                          f"wrote ({args.checkpoint_dir}/<run id>/step_000100.pt for step 100)")
    try:
        ckpt = torch.load(args.resume, map_location="cpu", weights_only=True)
    except OSError as e:
        raise ConfigError(f"RESUME={args.resume} cannot be read ({e.strerror or e}); give a checkpoint you can "
                          f"read") from None
    except Exception:  # the unpickler raises whatever the bytes trip; torch's text (load with weights_only=False)
        # would mislead: this trainer's checkpoints load with weights_only=True
        raise ConfigError(f"RESUME={args.resume} cannot be read as a checkpoint: it is not a checkpoint file of "
                          f"train_gpt.py, or it is truncated; give one that SAVE_EVERY or SAVE_CHECKPOINT wrote") \
            from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing == ["world_size"]:
        raise ConfigError(f"RESUME={args.resume} was written before checkpoints held each rank's optimizer state "
                          f"and cannot be resumed by this version; resume it with the train_gpt.py in its run's log")
    if missing:
        raise ConfigError(f"RESUME={args.resume} is not a checkpoint of train_gpt.py (it has no '{missing[0]}'); "
                          f"give one that SAVE_EVERY or SAVE_CHECKPOINT wrote")
    if ckpt["step"] >= args.num_iterations:
        raise ConfigError(f"RESUME={args.resume} is at step {ckpt['step']} and NUM_ITERATIONS={args.num_iterations} "
                          f"leaves nothing to train; raise NUM_ITERATIONS above {ckpt['step']} to continue")
    if args.profile_steps and ckpt["step"] + 5 + args.profile_steps > args.num_iterations:
        raise ConfigError(f"RESUME={args.resume} continues from step {ckpt['step']}: PROFILE_STEPS="
                          f"{args.profile_steps} after 5 untraced steps runs past NUM_ITERATIONS={args.num_iterations}; "
                          f"lower PROFILE_STEPS")
    check_settings(ckpt, args, world_size)
    return ckpt

def launcher_int(name: str, default: int, least: int) -> int:
    # RANK, WORLD_SIZE and LOCAL_RANK come from torchrun; set by hand (WORLD_SIZE=0, =abc) they crashed further on
    raw = os.environ.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < least:
        raise ConfigError(f"{name}={raw!r} is not an integer >= {least}; unset {name} for one process, or launch "
                          f"with torchrun (run.sh NPROC=<GPUs>), which sets it")
    return value

def main(env: dict | None = None, check_only: bool = False):
    distributed = "RANK" in os.environ
    world_size = launcher_int("WORLD_SIZE", 1, 1)
    rank = launcher_int("RANK", 0, 0)
    local_rank = launcher_int("LOCAL_RANK", 0, 0)
    if rank >= world_size:
        raise ConfigError(f"RANK={rank} is not below WORLD_SIZE={world_size}; ranks run 0..WORLD_SIZE-1 "
                          f"(launch with torchrun, which sets both)")
    args = load_config(dict(os.environ) if env is None else env)
    validate(args, world_size)
    log_file = repo_path(args.log_dir) / f"{args.run_id}.txt"
    if args.run_id and rank == 0 and log_file.exists():  # one run per log: appending would mix two runs
        raise ConfigError(f"RUN_ID={args.run_id}: {log_file} already exists; choose another RUN_ID or move that log")
    if rank == 0:  # rank 0 writes the log and the checkpoints
        check_writable("LOG_DIR", args.log_dir)
        if args.save_checkpoint or args.save_every:
            check_writable("CHECKPOINT_DIR", args.checkpoint_dir)
            folder = repo_path(args.checkpoint_dir) / args.run_id
            resumed = Path(args.resume).resolve() if args.resume else None
            # those up to the one it resumes from are this run's own past; later ones are another run's future
            own = lambda p: resumed is not None and resumed.parent == folder.resolve() and p.name <= resumed.name
            taken = sorted(p for p in folder.glob("step_*.pt") if not own(p)) if args.run_id else []
            if taken:  # a second run of one RUN_ID (another LOG_DIR) overwrote the first's checkpoints step by step
                raise ConfigError(f"RUN_ID={args.run_id}: {folder} already holds checkpoints ({taken[0].name}), "
                                  f"which this run would overwrite; choose another RUN_ID or move them")
    ckpt = load_checkpoint(args, world_size) if args.resume else None
    device = pick_device(local_rank)
    for knob, used in (("MOE_KERNEL", args.num_experts), ("NS_KERNEL", args.matrix_optimizer == "muon")):
        if used and getattr(args, knob.lower()) == "triton" and not triton_runs_on(device):
            raise ConfigError(f"{knob}=triton needs {'a GPU' if triton else 'Triton installed'} (on the CPU only "
                              f"Triton's interpreter runs it, under TRITON_INTERPRET=1, slowly); use {knob}=torch")
    # data errors surface before any GPU work
    train_files = find_shards(args.train_files, "TRAIN_FILES")
    val_files = find_shards(args.val_files, "VAL_FILES")
    both = sorted({f.resolve() for f in train_files} & {f.resolve() for f in val_files})
    if both:  # training on the validation tokens makes the val loss meaningless
        raise DataError(f"{both[0]} is matched by both TRAIN_FILES={args.train_files} and VAL_FILES={args.val_files}; "
                        f"narrow TRAIN_FILES to leave out the val shards")
    # the loader skips each shard's tail that cannot fill a whole batch (+1 target token): count what it can read
    val_batch = world_size * args.val_seq_len
    val_available = sum((check_shard(f) - 1) // val_batch * val_batch for f in val_files)
    if val_available < args.val_tokens:
        raise DataError(f"VAL_FILES={args.val_files} hold {val_available} usable tokens in batches of VAL_SEQ_LEN x GPUs, "
                        f"fewer than VAL_TOKENS={args.val_tokens}; lower VAL_TOKENS or add val shards")
    loader = ckpt["loader"] if ckpt else dict(file_idx=0, pos=0)
    train_read = shards_to_read(train_files, args.train_batch_tokens,
                                args.num_iterations - (ckpt["step"] if ckpt else 0), loader["file_idx"], loader["pos"])
    for f in train_read:  # the loader stops on such a shard when it reaches it: say so now
        if (tokens := check_shard(f)) < args.train_batch_tokens + 1:
            raise DataError(f"{f}: {tokens} tokens cannot fill one batch of TRAIN_BATCH_TOKENS="
                            f"{args.train_batch_tokens} (+1 target); lower TRAIN_BATCH_TOKENS or leave it out of "
                            f"TRAIN_FILES")
    for f in train_read + shards_to_read(val_files, val_batch, args.val_tokens // val_batch):
        check_vocab(f, args.vocab_size)
    if check_only:
        return None
    if distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    try:
        return train(args, rank, world_size, device, train_files, val_files, ckpt)
    finally:
        if distributed:
            dist.destroy_process_group()

def train(args: Hyperparameters, rank: int, world_size: int, device: torch.device, train_files: list[Path],
          val_files: list[Path], ckpt: dict | None = None) -> dict:
    global attention_kernel
    master = rank == 0
    run_id = args.run_id or str(uuid.uuid4())
    log_dir = repo_path(args.log_dir)
    log = Log(log_dir / f"{run_id}.txt" if master else None)
    log(CODE, console=False)
    log("=" * 100, console=False)
    log(system_report(), console=False)
    log("=" * 100, console=False)
    run_info = dict(run_id=run_id, date=datetime.datetime.now().isoformat(timespec="seconds"), world_size=world_size,
                    device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    code_sha=hashlib.sha256(CODE.encode()).hexdigest()[:12])
    log(f"run: {json.dumps(run_info)}")
    log(f"config: {json.dumps(asdict(args))}")

    torch.manual_seed(args.seed)
    model = GPT(args).to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            m.to(dtype)
    model.fp8_head = args.fp8_head and has_fp8(device)
    if world_size > 1:
        for p in model.parameters():
            dist.broadcast(p.detach(), 0)
    moes = [(i, b.mlp) for i, b in enumerate(model.blocks) if isinstance(b.mlp, MoE)]
    log(f"params: {json.dumps(count_params(model))}")
    if moes:
        log(f"moe: layers {[i for i, _ in moes]}, {args.num_experts} experts of hidden {expert_hidden(args)}, "
            f"top-{moes[0][1].k}, router {args.router}, {args.shared_experts} shared, "
            f"{'triton' if moes[0][1].uses_triton(device) else 'torch'} kernels")
    optimizers = build_optimizers(model, args, rank, world_size, device)
    compiled = args.compile and device.type == "cuda"
    reducer = None
    if world_size > 1 and args.grad_reduce in GRAD_REDUCE_DTYPES:
        ranges = {k: v for opt in optimizers for k, v in opt.ranges.items()}
        order = optimizer_order(optimizers) if compiled else gradient_order(model)  # why: GradientReducer's comment
        reducer = GradientReducer(order, ranges, rank, world_size, GRAD_REDUCE_DTYPES[args.grad_reduce],
                                  args.bucket_mb << 20)
    if device.type == "cuda" and not compiled:
        attention_kernel = torch.compile(flex_attention, dynamic=False)
    step_model = torch.compile(model, fullgraph=True, dynamic=False) if compiled else model

    train_loader = DataLoader(train_files, args.train_batch_tokens, args.train_seq_len, rank, world_size, device, log)
    val_loader = DataLoader(val_files, world_size * args.val_seq_len, args.val_seq_len, rank, world_size, device)
    start_step, carried_ms = 0, 0.0
    if ckpt:
        check_checkpoint(ckpt, args, model, world_size)
        model.load_state_dict(ckpt["model"])
        load_optimizer_states(optimizers, ckpt["optimizers"][rank], args.resume, world_size, device)
        train_loader.load_state_dict(ckpt["loader"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        start_step = ckpt["step"]
        # the train time before the checkpoint carries over, so the log's times are the whole run's (checkpoints
        # written before train_ms was saved leave it out, and the line without train_time says so)
        carried_ms = ckpt.get("train_ms", 0.0)
        log(f"resumed from {args.resume} at step {start_step}"
            + (f" train_time:{carried_ms:.0f}ms" if "train_ms" in ckpt else ""))
    log.start()

    window_cache: dict[int, Tensor] = {}

    def window_tensor(step: int) -> Tensor:
        b = window_blocks_at(step, args)
        if b not in window_cache:
            window_cache[b] = torch.tensor(b, dtype=torch.int32, device=device)
        return window_cache[b]

    def reduce_gradients():
        # after the last micro-step: each rank's ranges (GRAD_REDUCE=reduce_scatter) or every gradient, summed
        if reducer:
            reducer.finish()
        elif world_size > 1:
            for p in model.parameters():
                p.grad = grad_or_zeros(p)  # the same collectives on every rank, whatever each one's forward used
            handles = [dist.all_reduce(p.grad, async_op=True) for p in model.parameters()]
            for h in handles:
                h.wait()

    def optimizer_step(step: int):
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor(step, args)
            if isinstance(opt, Muon):
                for group in opt.param_groups:
                    group["momentum"] = muon_momentum_at(step, args)
            opt.step(reducer)
        if reducer:
            reducer.apply()  # each bucket's all_gather started once its optimizers were done
        model.zero_grad(set_to_none=True)
        if moes and args.bias_update_rate:
            update_router_bias([m for _, m in moes], args.bias_update_rate, world_size)

    def train_step(step: int, batch) -> Tensor:
        window = window_tensor(step)
        total = torch.zeros((), device=device)
        for i, (inputs, targets) in enumerate(batch):
            if reducer and i == len(batch) - 1:
                reducer.arm()
            ce, aux = step_model(inputs, targets, window)
            ((ce + aux) / (len(batch) * world_size)).backward()  # the reduction sums: this makes it the mean
            total += ce.detach()
        reduce_gradients()
        optimizer_step(step)
        return total / len(batch)

    # kernel warmup: compile and autotune on random tokens, then restore every state so no step goes untimed
    t_compile = time.perf_counter()
    if compiled and args.warmup_steps:
        initial = copy.deepcopy(dict(model=model.state_dict(), optimizers=[o.state_dict() for o in optimizers]))
        rng = torch.get_rng_state(), torch.cuda.get_rng_state(device)
        for s in range(args.warmup_steps):
            tokens = torch.randint(0, args.vocab_size, (args.train_seq_len + 1,), device=device, dtype=torch.int32)
            train_step(start_step + s, [(tokens[:-1], tokens[1:].long())] * train_loader.accum)
        model.eval()
        with torch.no_grad():
            tokens = torch.randint(0, args.vocab_size, (args.val_seq_len + 1,), device=device, dtype=torch.int32)
            step_model(tokens[:-1], tokens[1:].long(), window_tensor(start_step))
        model.train()
        model.load_state_dict(initial["model"])
        for opt, state in zip(optimizers, initial["optimizers"]):
            opt.load_state_dict(state)
        torch.set_rng_state(rng[0])
        torch.cuda.set_rng_state(rng[1], device)
        torch.cuda.synchronize(device)
    # each rank compiles on its own, some more slowly (rank 1 finished 10 s after rank 0 on 2 H200s, 2026-11-30): the
    # clock starts when all are done, else the first timed step waits out the slowest compile
    if world_size > 1:
        dist.barrier()
    if compiled and args.warmup_steps:
        log(f"compile_time: {time.perf_counter() - t_compile:.1f}s")
    for _, m in moes:
        m.reset_stats()

    def evaluate(step: int) -> float:
        model.eval()
        val_loader.rewind()
        for _, m in moes:
            m.reset_stats()
        loss = torch.zeros((), device=device)
        with torch.no_grad():
            for _ in range(args.val_tokens // (world_size * args.val_seq_len)):
                (inputs, targets), = val_loader.next_batch()
                loss += step_model(inputs, targets, window_tensor(step))[0]
        loss /= args.val_tokens // (world_size * args.val_seq_len)
        if world_size > 1:
            dist.all_reduce(loss)
            loss /= world_size
            for _, m in moes:
                dist.all_reduce(m.load)
                dist.all_reduce(m.stats)
        model.train()
        return loss.item()

    def save(step: int, train_ms: float):
        # each rank holds the optimizer state of what it owns: rank 0 writes every rank's
        states = [o.state_dict() for o in optimizers]
        if world_size > 1:
            everyone = [None] * world_size if master else None
            dist.gather_object(torch.utils._pytree.tree_map(lambda v: v.cpu() if isinstance(v, Tensor) else v, states),
                               everyone, dst=0)
            states = everyone
        else:
            states = [states]
        if not master:
            return
        path = repo_path(args.checkpoint_dir) / run_id / f"step_{step:06d}.pt"
        rng = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        state = dict(step=step, args=asdict(args), model=model.state_dict(), optimizers=states, world_size=world_size,
                     loader=train_loader.state_dict(), rng=rng, train_ms=train_ms)
        # written whole under a temporary name in the same folder, then renamed: a checkpoint's name never holds
        # a partial file, whatever stops the write (full disk, kill)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            folder = os.open(path.parent, os.O_RDONLY)  # the rename itself reaches the disk
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        except (OSError, RuntimeError) as e:
            if path.parent.is_dir():  # else the folder could not be made, nor the file in it
                tmp.unlink(missing_ok=True)
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
            log(f"stopped: could not write {path} ({reason})")
            raise CheckpointError(f"could not write {path} ({reason}); free disk space (or make CHECKPOINT_DIR "
                                  f"writable) and resume from the last checkpoint"
                                  + (f"; the log is kept at {log.path}" if log.path else "")) from None
        log(f"checkpoint: {path}")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def stop(reason: str):
        log(f"stopped: {reason}")
        raise NonFiniteLoss(f"{reason}" + (f"; the log is kept at {log.path}" if log.path else ""))

    # the first step whose train loss was not finite, numbered as its `step:N/M` line (training step N-1 logs N)
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)
    train_ms, val_loss = carried_ms, float("nan")
    profiler = None
    sync()
    t0 = time.perf_counter()
    for step in range(start_step, args.num_iterations + 1):
        last = step == args.num_iterations
        if last or (args.val_loss_every and step % args.val_loss_every == 0):
            sync()
            train_ms += 1000 * (time.perf_counter() - t0)
            bad = torch.where(first_bad < 0, args.num_iterations + 1, first_bad)
            if world_size > 1:  # the earliest bad step of any rank stops every rank at this same validation
                dist.all_reduce(bad, op=dist.ReduceOp.MIN)
            bad = bad.item()
            if bad <= args.num_iterations:
                stop(f"training loss became non-finite at step {bad}")
            val_loss = evaluate(step)
            done = step - start_step
            log(f"step:{step}/{args.num_iterations} val_loss:{val_loss:.4f} train_time:{train_ms:.0f}ms "
                f"step_avg:{(train_ms - carried_ms) / done if done else float('nan'):.2f}ms")
            for line in moe_report(moes, step) if master else []:
                log(line)
            for _, m in moes:
                m.reset_stats()
            if not math.isfinite(val_loss):
                stop(f"validation loss became non-finite at step {step}")
            sync()
            t0 = time.perf_counter()
        if last:
            break
        if args.profile_steps and step == start_step + 5:
            profiler = torch.profiler.profile(record_shapes=False, with_stack=False)
            profiler.__enter__()
        loss = train_step(step, train_loader.next_batch())
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step + 1, first_bad)
        if profiler is not None and step == start_step + 5 + args.profile_steps - 1:
            sync()
            profiler.__exit__(None, None, None)
            if master:
                profiler.export_chrome_trace(str(log_dir / f"{run_id}_trace.json"))
            profiler = None
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.num_iterations:
            sync()
            t_save = time.perf_counter()
            save(step + 1, train_ms + 1000 * (t_save - t0))
            t0 += time.perf_counter() - t_save
        done = step + 1 - start_step
        approx_ms = train_ms + 1000 * (time.perf_counter() - t0)
        step_avg = (approx_ms - carried_ms) / done
        eta = step_avg * (args.num_iterations - step - 1) / 1000
        line = f"step:{step + 1}/{args.num_iterations} train_time:{approx_ms:.0f}ms step_avg:{step_avg:.2f}ms"
        log(line, console=False)
        log(f"{line} eta:{eta:.0f}s", file=False)
    if args.save_checkpoint:
        save(args.num_iterations, train_ms)
    if device.type == "cuda":  # the CPU has no allocator statistics to report
        log(f"peak memory allocated: {torch.cuda.max_memory_allocated(device) // 2 ** 20} MiB "
            f"reserved: {torch.cuda.max_memory_reserved(device) // 2 ** 20} MiB")
    return dict(val_loss=val_loss, train_ms=train_ms, log=str(log.path) if log.path else None, run_id=run_id)

if __name__ == "__main__":
    import argparse  # the command line is only this block's
    parser = argparse.ArgumentParser(description="Train the GPT of the NanoGPT speedrun, dense or MoE. Every setting "
                                     "comes from the environment (README, Knobs); run it with torchrun or run.sh.")
    parser.add_argument("--check", action="store_true",
                        help="check the settings and the shards, as the start of a run does, then exit (0: all good)")
    cli = parser.parse_args()
    try:
        main(check_only=cli.check)
    except (ConfigError, DataError, NonFiniteLoss, CheckpointError) as e:
        # every rank of a node checks the same settings and shards (CheckpointError: rank 0 only): one line per node;
        # torchrun then adds its own report of the failed processes and exits 1
        local_rank = os.environ.get("LOCAL_RANK", "0").strip()
        if not local_rank.isdigit() or int(local_rank) == 0:  # a LOCAL_RANK that is no number is itself the error
            print(f"error: {e}", file=sys.stderr)
        else:
            # torchrun stops every worker once one has exited: the silent ranks wait, so that rank 0's line is out
            # first (under load a rank 1 that exited at once got rank 0 killed before it printed)
            time.sleep(3)
        sys.exit(2)
