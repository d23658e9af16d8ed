import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from conftest import tiny_env
from train_gpt import GPT, ConfigError, Hyperparameters, load_config, validate

ROOT = Path(__file__).resolve().parents[1]

# the launcher's environment as torchrun sets it (torch.distributed.elastic), plus everyday shell variables
TORCHRUN_ENV = dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", GROUP_RANK="0", ROLE_RANK="1",
                    ROLE_WORLD_SIZE="2", GROUP_WORLD_SIZE="1", ROLE_NAME="default", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT="29500", TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_MAX_RESTARTS="0",
                    TORCHELASTIC_RUN_ID="none", TORCHELASTIC_USE_AGENT_STORE="False",
                    TORCH_NCCL_ASYNC_ERROR_HANDLING="1", TORCHELASTIC_ERROR_FILE="/tmp/err.json",
                    OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="0,1", PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True",
                    HOME="/root", PATH="/usr/bin", PWD="/work", USER="root", SHELL="/bin/bash", LANG="C.UTF-8")


def test_overrides_parse_into_field_types():
    args = load_config(dict(NUM_ITERATIONS="123", COOLDOWN_FRAC="0.25", MUON_LR="1e-2", FP8_HEAD="0", COMPILE="true",
                            SAVE_CHECKPOINT="yes", RUN_ID="my run", NO_ATTN_LAYERS="1,5"))
    assert args.num_iterations == 123 and type(args.num_iterations) is int
    assert args.cooldown_frac == 0.25 and type(args.cooldown_frac) is float
    assert args.muon_lr == 0.01 and type(args.muon_lr) is float
    assert args.fp8_head is False and args.compile is True and args.save_checkpoint is True
    assert args.run_id == "my run" and args.no_attn_layers == "1,5"


def test_defaults_without_overrides():
    assert load_config({}) == Hyperparameters()


@pytest.mark.parametrize("key,value", [("NUM_ITERATIONS", "abc"), ("NUM_ITERATIONS", "1.5"), ("MUON_LR", "fast"),
                                       ("FP8_HEAD", "maybe"), ("COMPILE", "2")])
def test_invalid_value_names_the_variable(key, value):
    with pytest.raises(ConfigError) as e:
        load_config({key: value})
    assert f"{key}={value!r}" in str(e.value)


@pytest.mark.parametrize("typo,field", [("NUM_ITERATION", "NUM_ITERATIONS"), ("TOPK", "TOP_K"),
                                        ("MUON_MOMENTUMS", "MUON_MOMENTUM"), ("VAL_LOSS_EVRY", "VAL_LOSS_EVERY")])
def test_misspelling_names_the_closest_setting(typo, field):
    with pytest.raises(ConfigError) as e:
        load_config({typo: "1"})
    assert typo in str(e.value) and f"did you mean {field}?" in str(e.value)


def test_launcher_and_shell_variables_are_not_flagged():
    assert load_config(TORCHRUN_ENV) == Hyperparameters()


def test_negative_value_is_rejected():
    with pytest.raises(ConfigError, match="SAVE_EVERY=-1"):
        load_config(dict(SAVE_EVERY="-1"))


@pytest.mark.parametrize("env,world_size,needle", [
    (dict(TRAIN_SEQ_LEN="1000"), 1, "TRAIN_SEQ_LEN=1000"),
    (dict(VAL_SEQ_LEN="200"), 1, "VAL_SEQ_LEN=200"),
    (dict(TRAIN_SEQ_LEN="1024", TRAIN_BATCH_TOKENS="3000"), 1, "TRAIN_BATCH_TOKENS=3000"),
    (dict(TRAIN_SEQ_LEN="1024", TRAIN_BATCH_TOKENS="3072"), 2, "TRAIN_BATCH_TOKENS=3072"),  # fine on 1 GPU, not 2
    (dict(VAL_SEQ_LEN="1024", VAL_TOKENS="3072"), 2, "VAL_TOKENS=3072"),
    (dict(NS_STEPS="0"), 1, "NS_STEPS"),
    (dict(NUM_LAYERS="12", NO_ATTN_LAYERS="12"), 1, "NO_ATTN_LAYERS='12'"),
    (dict(NUM_LAYERS="12", NO_ATTN_LAYERS="3,x"), 1, "NO_ATTN_LAYERS='3,x'"),
    (dict(NUM_LAYERS="6", NO_ATTN_LAYERS="", LONG_WINDOW_LAYERS="0,6"), 1, "LONG_WINDOW_LAYERS='0,6'"),
    (dict(NUM_LAYERS="12", NUM_VALUE_EMBEDS="7"), 1, "NUM_VALUE_EMBEDS=7"),
    (dict(WINDOW_MAX="1000"), 1, "WINDOW_MAX=1000"),
    (dict(NUM_ITERATIONS="0"), 1, "NUM_ITERATIONS"),
    (dict(MATRIX_OPTIMIZER="sgd"), 1, "MATRIX_OPTIMIZER='sgd'"),
    (dict(NS_METHOD="newton"), 1, "NS_METHOD='newton': use quintic, polar_express or gram"),
    (dict(NS_KERNEL="cuda"), 1, "NS_KERNEL='cuda': use torch or triton"),
])
def test_impossible_config_is_rejected(env, world_size, needle):
    with pytest.raises(ConfigError) as e:
        validate(load_config(env), world_size) if world_size > 1 else load_config(env)
    assert needle in str(e.value)


@pytest.mark.parametrize("run_id", ["../escape", "a/b", "/tmp/x", "..", "."])
def test_run_id_that_leaves_log_dir_is_refused(run_id):
    # the log is LOG_DIR/<RUN_ID>.txt, the checkpoints CHECKPOINT_DIR/<RUN_ID>/: RUN_ID=../escape wrote beside LOG_DIR
    with pytest.raises(ConfigError, match=f"RUN_ID={run_id!r} names a file in LOG_DIR"):
        load_config(dict(RUN_ID=run_id))
    load_config(dict(RUN_ID=run_id.replace("/", "_").replace(".", "x")))


def test_limits_themselves_are_allowed():
    load_config(dict(COOLDOWN_FRAC="0", MUON_MOMENTUM="0", MUON_MOMENTUM_START="0"))
    load_config(dict(COOLDOWN_FRAC="1", MUON_MOMENTUM="0.999", MUON_MOMENTUM_START="0.999"))
    env = dict(NUM_LAYERS="6", NUM_VALUE_EMBEDS="3", NO_ATTN_LAYERS="0,5", LONG_WINDOW_LAYERS="1,4",
               TRAIN_SEQ_LEN="1024", TRAIN_BATCH_TOKENS="4096", VAL_SEQ_LEN="1024", VAL_TOKENS="4096")
    validate(load_config(env), world_size=4)


def test_cli_misspelling_exits_2_with_one_error_line():
    env = {k: v for k, v in os.environ.items() if k not in {f.name.upper() for f in fields(Hyperparameters)}}
    env["NUM_ITERATION"] = "5"
    r = subprocess.run([sys.executable, "train_gpt.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "NUM_ITERATION" in lines[0], r.stderr
    assert "NUM_ITERATIONS" in lines[0]
    assert r.stdout == ""


@pytest.mark.parametrize("key,field", [("num_experts", "NUM_EXPERTS"), ("Num_Iterations", "NUM_ITERATIONS"),
                                       ("NUM_ITERS", "NUM_ITERATIONS"), ("LOG_DIRECTORY", "LOG_DIR"),
                                       ("NUM_EXP", "NUM_EXPERTS"), ("AUX_LOSS", "AUX_LOSS_COEF"),
                                       ("EXPERT_LR", "EXPERT_LR_MULT"), ("CAPACITY_FAC", "CAPACITY_FACTOR"),
                                       ("VAL_EVERY", "VAL_LOSS_EVERY"), ("RESUME_FROM", "RESUME"),
                                       ("no_attn", "NO_ATTN_LAYERS")])
def test_lowercase_and_abbreviated_settings_are_refused_with_the_right_name(key, field):
    with pytest.raises(ConfigError) as e:
        load_config({key: "3"})
    assert key in str(e.value) and f"did you mean {field}?" in str(e.value)


def test_unrelated_variables_that_share_a_word_are_not_flagged():
    env = dict(LOG_LEVEL="debug", RUN_NAME="x", COMPUTE="1", SAVE_PATH="/tmp", http_proxy="", no_proxy="", S="1",
               NO_COLOR="1", MODEL_NAME="gpt2", NUM_GPUS="8", TORCH_HOME="/t", NCCL_DEBUG="INFO", PYTHONPATH=".",
               TRITON_CACHE_DIR="/t", TORCHINDUCTOR_CACHE_DIR="/t", Z="1", EXPERT="1",  # EXPERT: which of four?
               MODEL="gpt2", LOG="1", RUN="1", PROFILE="dev", WINDOW="1", CAPACITY="1")  # one word: another tool's
    assert load_config(env) == Hyperparameters()


@pytest.mark.parametrize("env,needle", [
    # the value embeddings are [vocab, MODEL_DIM] tables added to the attention's [NUM_HEADS x HEAD_DIM] values
    (dict(MODEL_DIM="256", NUM_HEADS="2", HEAD_DIM="64"), "MODEL_DIM=256 must equal NUM_HEADS x HEAD_DIM = 2 x 64"),
    (dict(VAL_TOKENS="0"), "VAL_TOKENS=0 must be positive"),
    (dict(TRAIN_BATCH_TOKENS="0"), "TRAIN_BATCH_TOKENS=0 must be positive"),
    (dict(PROFILE_STEPS="5", NUM_ITERATIONS="7"), "PROFILE_STEPS=5"),
    (dict(COOLDOWN_FRAC="1.5"), "COOLDOWN_FRAC=1.5 is a fraction of training: use 0 to 1"),
    (dict(MUON_MOMENTUM="1.0"), "MUON_MOMENTUM=1.0 must be below 1"),
    (dict(MUON_MOMENTUM_START="1.2"), "MUON_MOMENTUM_START=1.2 must be below 1"),
    (dict(MLP_HIDDEN="0"), "MLP_HIDDEN=0 must be at least 1"),  # ZeroDivisionError in Muon's first step
    (dict(MODEL_DIM="0", NUM_VALUE_EMBEDS="0"), "MODEL_DIM=0 must be at least 1"),
    (dict(MODEL_DIM="0"), "MODEL_DIM=0 must be at least 1"),
])
def test_settings_that_would_crash_later_are_refused(env, needle):
    with pytest.raises(ConfigError) as e:
        load_config(env)
    assert needle in str(e.value)


@pytest.mark.parametrize("env", [dict(NUM_VALUE_EMBEDS="0", NO_ATTN_LAYERS=""), dict(NUM_VALUE_EMBEDS="1", NO_ATTN_LAYERS="0,3")])
def test_attention_width_may_differ_where_no_value_embedding_meets_attention(env):
    # the residual width and the attention width are separate matrices' sizes: only the value embeddings tie
    # them, so these configs load and the model runs
    args = load_config(dict(MODEL_DIM="256", NUM_HEADS="2", HEAD_DIM="64", NUM_LAYERS="4", LONG_WINDOW_LAYERS="0",
                            TRAIN_SEQ_LEN="128", VAL_SEQ_LEN="128", **env))
    torch.manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (129,), dtype=torch.int32)
    loss, _ = GPT(args)(tokens[:-1], tokens[1:].long(), torch.tensor(1, dtype=torch.int32))
    assert torch.isfinite(loss)


def test_profile_steps_that_fit_are_allowed():
    load_config(dict(PROFILE_STEPS="2", NUM_ITERATIONS="7"))  # steps 6 and 7 traced: the last two


@pytest.mark.parametrize("knob, value", [("NS_METHOD", "gram"), ("NS_KERNEL", "triton"), ("NS_STEPS", "3")])
def test_newton_schulz_knobs_are_refused_with_adamw(knob, value):
    with pytest.raises(ConfigError, match=f"{knob}={value} sets Muon's orthogonalization, unused with "
                                          "MATRIX_OPTIMIZER=adamw; unset it or use MATRIX_OPTIMIZER=muon"):
        load_config({"MATRIX_OPTIMIZER": "adamw", knob: value})
    load_config({"MATRIX_OPTIMIZER": "muon", knob: value})
    load_config({"MATRIX_OPTIMIZER": "adamw", "NS_STEPS": "5", "NUM_EXPERTS": "8", "EXPERT_LR_MULT": "0.5"})  # the default; AdamW's own


@pytest.mark.parametrize("knob, value", [("TOP_K", "4"), ("SHARED_EXPERTS", "1"), ("MOE_LAYERS", "1,2"),
                                         ("EXPERT_LR_MULT", "2.0"), ("ROUTER", "sigmoid"), ("Z_LOSS_COEF", "0.001")])
def test_expert_knobs_are_refused_for_a_dense_model(knob, value):
    # NUM_EXPERTS=0 (the default) builds dense MLPs: TOP_K=4 without NUM_EXPERTS used to train dense in silence
    with pytest.raises(ConfigError, match=f"{knob}={value} sets the experts, but NUM_EXPERTS=0 builds a dense model; "
                                          f"set NUM_EXPERTS \\(e.g. 32\\) or unset {knob}"):
        load_config({knob: value})
    load_config({"NUM_EXPERTS": "8", knob: value})


def test_every_expert_knob_is_a_setting():
    from train_gpt import MOE_SETTINGS
    assert MOE_SETTINGS <= set(Hyperparameters.__dataclass_fields__)


def test_an_expert_knob_set_to_its_default_is_refused_too():
    # TOP_K=2 is the default: checked by value, it slipped through where TOP_K=4 was refused
    with pytest.raises(ConfigError, match="TOP_K=2 sets the experts, but NUM_EXPERTS=0"):
        load_config({"TOP_K": "2"})
    with pytest.raises(ConfigError, match="ROUTER=softmax sets the experts"):
        load_config({"NUM_EXPERTS": "0", "ROUTER": "softmax"})


def test_cli_refuses_a_newton_schulz_knob_with_adamw_in_one_line():
    env = {k: v for k, v in os.environ.items() if k not in {f.name.upper() for f in fields(Hyperparameters)}}
    r = subprocess.run([sys.executable, "train_gpt.py", "--check"], cwd=ROOT, capture_output=True, text=True,
                       env=env | dict(MATRIX_OPTIMIZER="adamw", NS_METHOD="polar_express"), timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: NS_METHOD=polar_express") and \
        len(r.stderr.splitlines()) == 1, r.stderr


@pytest.mark.parametrize("knob,extra", [("LOG_DIR", {}), ("CHECKPOINT_DIR", dict(SAVE_EVERY="5")),
                                        ("CHECKPOINT_DIR", dict(SAVE_CHECKPOINT="1"))])
def test_cli_check_refuses_a_folder_that_cannot_be_made(shards, tmp_path, knob, extra):
    # /proc takes no new folders: before, the log's failed at the start with a traceback and the checkpoint's only
    # at the end of training
    env = {k: v for k, v in os.environ.items() if k not in {f.name.upper() for f in fields(Hyperparameters)}}
    r = subprocess.run([sys.executable, "train_gpt.py", "--check"], cwd=ROOT, capture_output=True, text=True,
                       env=env | tiny_env(shards, tmp_path, **{knob: "/proc/x"}, **extra), timeout=120)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"error: {knob}=/proc/x: cannot create or write /proc/x"), r.stderr


def test_folders_are_checked_only_when_used_and_the_check_leaves_nothing(shards, tmp_path):
    import train_gpt
    train_gpt.main(tiny_env(shards, tmp_path, CHECKPOINT_DIR="/proc/x"), check_only=True)  # no checkpoint is saved
    train_gpt.main(tiny_env(shards, tmp_path, LOG_DIR=tmp_path / "a" / "logs", SAVE_CHECKPOINT=1,
                            CHECKPOINT_DIR=tmp_path / "b" / "ckpt"), check_only=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("launcher,needle", [(dict(WORLD_SIZE="abc"), "WORLD_SIZE='abc' is not an integer >= 1"),
                                             (dict(WORLD_SIZE="0"), "WORLD_SIZE='0' is not an integer >= 1"),
                                             (dict(LOCAL_RANK="x"), "LOCAL_RANK='x' is not an integer >= 0"),
                                             (dict(RANK="2", WORLD_SIZE="2"), "RANK=2 is not below WORLD_SIZE=2")])
def test_cli_refuses_a_bad_launcher_variable_in_one_line(launcher, needle):
    # before, WORLD_SIZE=abc gave a ValueError traceback and WORLD_SIZE=0 a ZeroDivisionError
    env = {k: v for k, v in os.environ.items() if k not in {f.name.upper() for f in fields(Hyperparameters)}
           and k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE"}}
    r = subprocess.run([sys.executable, "train_gpt.py", "--check"], cwd=ROOT, capture_output=True, text=True,
                       env=env | launcher, timeout=120)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"error: {needle}"), r.stderr
