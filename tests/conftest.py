import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

# Triton's interpreter runs the MoE kernels on the CPU (tests/test_kernels.py); it is chosen when Triton is imported
os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    # relative error ||a - b|| / ||b||, in float64 so that it resolves fp32-level differences
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def newton_schulz_fp64(g: torch.Tensor, steps: int) -> torch.Tensor:
    # the textbook quintic iteration in float64: normalize, then X <- aX + (bA + cA^2)X with A = X X^T
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double().mT if g.size(-2) > g.size(-1) else g.double()
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    for _ in range(steps):
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    return x.mT if g.size(-2) > g.size(-1) else x


def write_shard(path: Path, tokens) -> Path:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())
    return path


def synthetic_tokens(n: int, seed: int) -> np.ndarray:
    # learnable text stand-in: documents (EOT first) drawn from 16 phrases shared by every shard
    phrases = np.random.default_rng(0).integers(0, 300, size=(16, 8))
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        out.append(50256)
        for _ in range(rng.integers(4, 40)):
            out.extend(phrases[rng.integers(0, 16)])
    return np.array(out[:n])


def make_shards(d: Path) -> Path:
    # two train shards and a val shard of synthetic documents
    write_shard(d / "syn_train_000001.bin", synthetic_tokens(60_000, 1))
    write_shard(d / "syn_train_000002.bin", synthetic_tokens(60_000, 2))
    write_shard(d / "syn_val_000000.bin", synthetic_tokens(20_000, 3))
    return d


@pytest.fixture
def shards(tmp_path):
    (tmp_path / "data").mkdir()
    return make_shards(tmp_path / "data")


def tiny_env(data: Path, out: Path, **overrides) -> dict:
    # the README's tiny CPU configuration
    env = dict(TRAIN_FILES=str(data / "syn_train_*.bin"), VAL_FILES=str(data / "syn_val_*.bin"),
               NUM_LAYERS="4", MODEL_DIM="128", NUM_HEADS="2", HEAD_DIM="64", MLP_HIDDEN="512",
               NUM_VALUE_EMBEDS="1", NO_ATTN_LAYERS="2", LONG_WINDOW_LAYERS="0,3", WINDOW_MAX="256",
               TRAIN_SEQ_LEN="256", TRAIN_BATCH_TOKENS="512", VAL_SEQ_LEN="512", VAL_TOKENS="2048",
               NUM_ITERATIONS="20", VAL_LOSS_EVERY="10", LOG_DIR=str(out / "logs"),
               CHECKPOINT_DIR=str(out / "ckpt"), RUN_ID="tiny")
    env.update({k: str(v) for k, v in overrides.items()})
    return env


@pytest.fixture(scope="module")
def one_thread():
    # the layer tests are tiny: more threads only contend for the machine's few cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_shards(tmp_path_factory):
    # the same shards as `shards`, written once for the tests that share training runs; treat as read-only
    return make_shards(tmp_path_factory.mktemp("shared_data"))


def launch(script: Path, settings: dict, nproc: int = 2, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    # nproc CPU processes over gloo (torchrun when more than one), one thread each; the settings replace any
    # trainer or launcher variable the environment has
    import train_gpt
    names = {f.name.upper() for f in fields(train_gpt.Hyperparameters)} | train_gpt.LAUNCHER_VARS
    env = {k: v for k, v in os.environ.items() if k not in names} | settings | dict(OMP_NUM_THREADS="1")
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return subprocess.run([sys.executable, *launcher, str(script)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def tiny_gpt_args():
    # a 2-layer, 128-wide MoE model (4 experts, top-2) for tests that build the model in process
    import train_gpt as tg
    return tg.Hyperparameters(num_experts=4, top_k=2, model_dim=128, expert_hidden=128, num_layers=2, num_heads=2,
                              head_dim=64, mlp_hidden=512, no_attn_layers="", long_window_layers="0",
                              num_value_embeds=1, train_seq_len=256, val_seq_len=256, window_max=256)
