import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt
from conftest import launch, rel_err, synthetic_tokens, tiny_env, write_shard

ROOT = Path(__file__).resolve().parents[1]
VAL_LINE = re.compile(r"^step:(\d+)/(\d+) val_loss:(\d+\.\d{4}) train_time:(\d+)ms step_avg:(nan|\d+\.\d{2})ms$")
TRAIN_LINE = re.compile(r"^step:(\d+)/(\d+) train_time:(\d+)ms step_avg:(\d+\.\d{2})ms$")
# a few steps, evaluated at 0, 2 and 4, on 1024 validation tokens (two sequences: one per rank on 2 ranks)
SHORT = dict(NUM_ITERATIONS=4, VAL_LOSS_EVERY=2, VAL_TOKENS=1024)


def val_lines(log: Path) -> dict[int, str]:
    return {int(m[1]): m[3] for m in map(VAL_LINE.match, log.read_text().splitlines()) if m}


# -----------------------------------------------------------------------------
# FP8 lm head

def test_fp8_matmul_op_matches_bf16_reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 256, generator=gen).bfloat16().requires_grad_()  # rms-normed activations
    w = (torch.rand(512, 256, generator=gen) * 0.1 - 0.05).requires_grad_()  # lm head weight
    grad = torch.randn(128, 512, generator=gen).bfloat16() * 1e-4  # cross-entropy gradients are small
    out = torch.ops.moe_speedrun.fp8_mm(x, w, 2.0, 2.0 ** 9, 2.0 ** 19)[0]
    out.backward(grad)
    x_ref, w_ref = x.detach().float().requires_grad_(), w.detach().clone().requires_grad_()
    ref = x_ref @ w_ref.T
    ref.backward(grad.float())
    assert out.shape == ref.shape and rel_err(out, ref) < 0.05
    assert x.grad.dtype == x.dtype and w.grad.dtype == w.dtype
    assert rel_err(x.grad, x_ref.grad) < 0.1
    assert rel_err(w.grad, w_ref.grad) < 0.1


# -----------------------------------------------------------------------------
# failures before and during training

def test_corrupt_shard_stops_main_before_training(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "syn_train_000001.bin", synthetic_tokens(5000, 1))
    bad = write_shard(data / "syn_train_000002.bin", synthetic_tokens(5000, 2))
    raw = bytearray(bad.read_bytes())
    raw[:4] = np.array([123], dtype="<i4").tobytes()  # magic number
    bad.write_bytes(bytes(raw))
    write_shard(data / "syn_val_000000.bin", synthetic_tokens(5000, 3))
    with pytest.raises(train_gpt.DataError, match="syn_train_000002.bin"):
        train_gpt.main(tiny_env(data, tmp_path))
    assert not (tmp_path / "logs").exists()  # no log: training never started


def test_val_shards_must_hold_val_tokens_without_repeating(tmp_path):
    # two 1000-token val shards hold 2000 >= VAL_TOKENS + 1 tokens, but the loader skips each shard's tail that
    # cannot fill a 512-token sequence (+1 target), so only 1024 distinct tokens can be read: a 1536-token
    # validation would wrap around and count the first shard's tokens twice
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "syn_train_000001.bin", synthetic_tokens(5000, 1))
    write_shard(data / "syn_val_000000.bin", synthetic_tokens(1000, 3))
    write_shard(data / "syn_val_000001.bin", synthetic_tokens(1000, 4))
    with pytest.raises(train_gpt.DataError, match="VAL_TOKENS=1536"):
        train_gpt.main(tiny_env(data, tmp_path, VAL_TOKENS=1536, NUM_ITERATIONS=1, VAL_LOSS_EVERY=0))


@pytest.mark.parametrize("phase,poisoned_call,stopped,before", [
    # the only micro-step of the first step (logged as step:1); the run stops at the next validation (step 3) without evaluating
    ("train", 0, "training loss became non-finite at step 1", "step:3/20 train_time:"),
    # the second evaluation, which is logged before the run stops
    ("eval", 1, "validation loss became non-finite at step 2", "step:2/20 val_loss:nan "),
], ids=["train", "eval"])
def test_non_finite_loss_stops_the_run(shared_shards, tmp_path, monkeypatch, phase, poisoned_call, stopped, before):
    forward, calls = train_gpt.GPT.forward, []

    def poisoned(self, *args):
        loss, aux = forward(self, *args)
        if self.training == (phase == "train"):
            calls.append(None)
            if len(calls) - 1 == poisoned_call:
                loss = loss * float("nan")
        return loss, aux

    monkeypatch.setattr(train_gpt.GPT, "forward", poisoned)
    env = tiny_env(shared_shards, tmp_path, TRAIN_BATCH_TOKENS=256, VAL_TOKENS=512,
                   VAL_LOSS_EVERY=3 if phase == "train" else 2)
    with pytest.raises(train_gpt.NonFiniteLoss) as e:
        train_gpt.main(env)
    log = tmp_path / "logs" / "tiny.txt"
    assert stopped in str(e.value) and str(log) in str(e.value)
    lines = log.read_text().splitlines()
    assert lines[-1] == f"stopped: {stopped}" and lines[-2].startswith(before)
    assert list(val_lines(log)) == [0]


POISON_ONE_RANK = """
import os, sys
sys.path.insert(0, {root!r})
import train_gpt
forward, calls = train_gpt.GPT.forward, []

def poisoned(self, *args):
    loss, aux = forward(self, *args)
    if self.training and os.environ["RANK"] == "1":
        calls.append(None)
        if len(calls) == 2:  # the second step (logged as step:2), on rank 1 only: a batch that overflows
            loss = loss * float("nan")
    return loss, aux

train_gpt.GPT.forward = poisoned
try:
    train_gpt.main()
except train_gpt.NonFiniteLoss as e:
    print(f"rank {{os.environ['RANK']}} error: {{e}}", file=sys.stderr)
    sys.exit(2)
"""


def test_run_id_of_an_existing_log_is_refused(shared_shards, tmp_path):
    log = tmp_path / "logs" / "tiny.txt"
    log.parent.mkdir()
    log.write_text("an earlier run\n")
    with pytest.raises(train_gpt.ConfigError, match="RUN_ID=tiny"):
        train_gpt.main(tiny_env(shared_shards, tmp_path))
    assert log.read_text() == "an earlier run\n"


def test_non_finite_loss_on_one_rank_stops_every_rank(shared_shards, tmp_path):
    # the validation at step 2 must stop rank 0 (which writes the log) too, naming the step where it happened
    script = tmp_path / "poisoned.py"
    script.write_text(POISON_ONE_RANK.format(root=str(ROOT)))
    r = launch(script, tiny_env(shared_shards, tmp_path, NUM_ITERATIONS=4, VAL_LOSS_EVERY=2, VAL_TOKENS=1024))
    lines = (tmp_path / "logs" / "tiny.txt").read_text().splitlines()
    assert lines[-1] == "stopped: training loss became non-finite at step 2", r.stderr[-3000:]
    assert "rank 0 error: training loss became non-finite at step 2" in r.stderr


# -----------------------------------------------------------------------------
# short runs: reproducibility, FP8 fallback, gradient accumulation vs ranks

def run_short(data: Path, out: Path, run_id: str, **overrides) -> tuple[dict, Path]:
    # one thread, as each torchrun worker below: the same kernels and sums, so runs can be compared bit for bit
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train_gpt.main(tiny_env(data, out, RUN_ID=run_id, **SHORT, **overrides))
    finally:
        torch.set_num_threads(threads)
    return result, Path(result["log"])


@pytest.fixture(scope="module")
def short_run(shared_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("short")
    result, log = run_short(shared_shards, out, "short", FP8_HEAD=1, SAVE_CHECKPOINT=1)
    return dict(result=result, log=log, ckpt=out / "ckpt" / "short" / "step_000004.pt", data=shared_shards, out=out)


def test_same_seed_is_bit_identical(short_run):
    result, log = run_short(short_run["data"], short_run["out"], "again", FP8_HEAD=1)
    assert result["val_loss"] == short_run["result"]["val_loss"]  # bit for bit, not to 4 decimals
    assert val_lines(log) == val_lines(short_run["log"])


def test_fp8_head_falls_back_to_bf16_on_cpu(short_run):
    assert not train_gpt.has_fp8(torch.device("cpu"))
    result, _ = run_short(short_run["data"], short_run["out"], "no_fp8", FP8_HEAD=0)
    assert result["val_loss"] == short_run["result"]["val_loss"]


def test_two_ranks_match_gradient_accumulation(short_run, tmp_path):
    # 512 tokens per step: 1 process x 2 micro-steps (short_run) vs 2 gloo processes x 1 micro-step
    r = launch(ROOT / "train_gpt.py", tiny_env(short_run["data"], tmp_path, RUN_ID="ddp", FP8_HEAD=1,
                                                 SAVE_CHECKPOINT=1, **SHORT))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    log = tmp_path / "logs" / "ddp.txt"
    assert json.loads(next(l for l in log.read_text().splitlines() if l.startswith("run: "))[5:])["world_size"] == 2
    assert val_lines(log) == val_lines(short_run["log"])
    assert list(val_lines(log)) == [0, 2, 4]
    # the same sums in the same order (g0 + g1 by accumulation or by all_reduce), so the same bits; anything
    # looser would not do: AdamW's tiny epsilon turns rounding noise in near-zero gradients into full-size steps
    one, two = torch.load(short_run["ckpt"])["model"], torch.load(tmp_path / "ckpt" / "ddp" / "step_000004.pt")["model"]
    assert one.keys() == two.keys()
    assert [name for name in one if not torch.equal(one[name], two[name])] == []


# -----------------------------------------------------------------------------
# the tiny end-to-end run, and a resume from its step-10 checkpoint

@pytest.fixture(scope="module")
def full_run(shared_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    env = tiny_env(shared_shards, out, RUN_ID="full", VAL_LOSS_EVERY=1, VAL_TOKENS=512, SAVE_EVERY=10)
    result = train_gpt.main(env)
    return dict(env=env, result=result, log=Path(result["log"]), out=out, data=shared_shards)


def test_tiny_run_learns(full_run):
    losses = {step: float(v) for step, v in val_lines(full_run["log"]).items()}
    assert sorted(losses) == list(range(21))
    assert losses[0] == round(math.log(50304), 4)  # zero-initialized head: uniform over the padded vocabulary
    assert losses[0] > losses[5] > losses[10] > losses[15] > losses[20]
    assert losses[20] < 3.0
    assert abs(full_run["result"]["val_loss"] - losses[20]) <= 5e-5


def test_log_is_a_complete_record(full_run):
    text = full_run["log"].read_text()
    assert text.startswith(train_gpt.CODE)
    lines = text.splitlines()
    run = json.loads(next(l for l in lines if l.startswith("run: "))[5:])
    config = json.loads(next(l for l in lines if l.startswith("config: "))[8:])
    assert run["run_id"] == "full" and run["world_size"] == 1 and run["device"] == "cpu"
    assert config == asdict(train_gpt.load_config(full_run["env"]))
    steps = [l for l in lines if l.startswith("step:")]
    assert [l for l in steps if not (VAL_LINE.match(l) or TRAIN_LINE.match(l))] == []  # no eta: console only
    assert [int(TRAIN_LINE.match(l)[1]) for l in steps if TRAIN_LINE.match(l)] == list(range(1, 21))
    assert [VAL_LINE.match(l)[5] == "nan" for l in steps if VAL_LINE.match(l)] == [True] + [False] * 20
    assert f"checkpoint: {full_run['out'] / 'ckpt' / 'full' / 'step_000010.pt'}" in lines
    assert lines[-1].startswith("step:20/20 val_loss:")  # the CPU has no peak memory to report
    assert not [l for l in lines if l.startswith("peak memory")]


def test_resume_continues_the_run_exactly(full_run):
    out = full_run["out"]
    ckpt = out / "ckpt" / "full" / "step_000010.pt"
    result = train_gpt.main(tiny_env(full_run["data"], out, RUN_ID="resumed", VAL_LOSS_EVERY=1, VAL_TOKENS=512,
                                     RESUME=ckpt))
    resumed, uninterrupted = val_lines(Path(result["log"])), val_lines(full_run["log"])
    # the log says where the run resumed and carries the train time over, so its times are the whole run's
    carried = torch.load(ckpt)["train_ms"]
    lines = Path(result["log"]).read_text().splitlines()
    assert f"resumed from {ckpt} at step 10 train_time:{carried:.0f}ms" in lines
    assert carried > 0 and abs(float(VAL_LINE.match(next(l for l in lines if l.startswith("step:10/")))[4]) - carried) <= 1
    assert list(resumed) == list(range(10, 21))
    assert resumed == {step: uninterrupted[step] for step in resumed}
    assert result["val_loss"] == full_run["result"]["val_loss"]  # bit for bit


@pytest.mark.parametrize("split", ["train", "val"])
def test_token_ids_beyond_the_vocabulary_stop_main_before_training(tmp_path, split):
    # one valid uint16 id >= VOCAB_SIZE in the second train shard (which the 20 steps reach) or in the val shard
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "syn_train_000001.bin", synthetic_tokens(5000, 1))
    bad = synthetic_tokens(6000, 2 if split == "train" else 3)
    bad[4321] = 60000
    write_shard(data / "syn_train_000002.bin", bad if split == "train" else synthetic_tokens(6000, 2))
    write_shard(data / "syn_val_000000.bin", bad if split == "val" else synthetic_tokens(6000, 3))
    with pytest.raises(train_gpt.DataError) as e:
        train_gpt.main(tiny_env(data, tmp_path))
    name = "syn_train_000002.bin" if split == "train" else "syn_val_000000.bin"
    assert name in str(e.value) and "60000" in str(e.value) and "VOCAB_SIZE=50257" in str(e.value)
    assert not (tmp_path / "logs").exists()  # no log: training never started


@pytest.mark.parametrize("val_files", ["", "folder"])
def test_empty_or_folder_val_files_names_val_files(shared_shards, tmp_path, val_files):
    env = tiny_env(shared_shards, tmp_path, VAL_FILES=str(shared_shards) if val_files else "")
    with pytest.raises(train_gpt.DataError, match="VAL_FILES") as e:
        train_gpt.main(env)
    assert "*" in str(e.value)


def test_a_train_shard_smaller_than_one_batch_is_refused_at_the_start(tmp_path):
    # the loader stops on a shard that cannot fill one batch (+1 target) when it reaches it; --check says so first
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "syn_train_000001.bin", synthetic_tokens(5000, 1))
    write_shard(data / "syn_train_000002.bin", synthetic_tokens(512, 2))  # one batch needs 513
    write_shard(data / "syn_val_000000.bin", synthetic_tokens(6000, 3))
    with pytest.raises(train_gpt.DataError) as e:
        train_gpt.main(tiny_env(data, tmp_path, NUM_ITERATIONS="12"), check_only=True)  # 9 batches in shard 1
    assert str(e.value).startswith(f"{data / 'syn_train_000002.bin'}: 512 tokens cannot fill one batch of "
                                   f"TRAIN_BATCH_TOKENS=512")
    train_gpt.main(tiny_env(data, tmp_path, NUM_ITERATIONS="9"), check_only=True)  # never reaches it: allowed


def test_a_val_shard_also_matched_by_train_files_is_refused(shared_shards, tmp_path):
    env = tiny_env(shared_shards, tmp_path, TRAIN_FILES=shared_shards / "syn_*.bin")
    with pytest.raises(train_gpt.DataError) as e:
        train_gpt.main(env, check_only=True)
    val_shard = (shared_shards / "syn_val_000000.bin").resolve()
    assert str(e.value).startswith(f"{val_shard} is matched by both TRAIN_FILES=")


def test_a_checkpoint_that_cannot_be_written_leaves_no_file_under_its_name(shared_shards, tmp_path):
    # a file size limit stands in for a full disk: the ~30 MB checkpoint is cut off at 2 MB, the log is not
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, hard))
    try:
        with pytest.raises(train_gpt.CheckpointError) as e:
            train_gpt.main(tiny_env(shared_shards, tmp_path, NUM_ITERATIONS=4, VAL_LOSS_EVERY=0, SAVE_EVERY=2,
                                    TRAIN_BATCH_TOKENS=256, VAL_TOKENS=512))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    path = tmp_path / "ckpt" / "tiny" / "step_000002.pt"
    assert str(path) in str(e.value)
    assert list(path.parent.iterdir()) == []  # neither the checkpoint's name nor a temporary file
    assert (tmp_path / "logs" / "tiny.txt").read_text().splitlines()[-1].startswith(f"stopped: could not write {path}")


def test_a_checkpoint_folder_that_cannot_be_made_stops_with_the_log_kept(shared_shards, tmp_path):
    # CHECKPOINT_DIR is writable but a file holds the run's folder name: the mkdir fails at the first save
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "tiny").write_text("not a folder\n")
    with pytest.raises(train_gpt.CheckpointError) as e:
        train_gpt.main(tiny_env(shared_shards, tmp_path, NUM_ITERATIONS=2, VAL_LOSS_EVERY=0, SAVE_CHECKPOINT=1,
                                TRAIN_BATCH_TOKENS=256, VAL_TOKENS=512))
    path = tmp_path / "ckpt" / "tiny" / "step_000002.pt"
    assert f"could not write {path}" in str(e.value) and "the log is kept" in str(e.value)
    lines = (tmp_path / "logs" / "tiny.txt").read_text().splitlines()
    assert lines[-2].startswith("step:2/2 val_loss:") and lines[-1].startswith(f"stopped: could not write {path}")


@pytest.mark.parametrize("case,message", [
    ("missing", "no such file"),
    ("truncated", "cannot be read as a checkpoint"),
    ("text", "cannot be read as a checkpoint"),
    ("other torch file", "is not a checkpoint of train_gpt.py"),
    ("at the end", "is at step 10 and NUM_ITERATIONS=10 leaves nothing to train"),
    ("profile past the end", "PROFILE_STEPS=8"),
    ("another architecture", "was trained with a different MLP_HIDDEN=512"),
    ("other value embeddings", "was trained with a different NUM_VALUE_EMBEDS=1"),  # were a load_state_dict traceback
    ("attention elsewhere", "was trained with a different NO_ATTN_LAYERS=2"),
])
def test_resume_is_checked_before_the_model_is_built(full_run, tmp_path, monkeypatch, case, message):
    ckpt = full_run["out"] / "ckpt" / "full" / "step_000010.pt"
    path = tmp_path / "resume.pt"
    overrides = {}
    if case == "truncated":
        path.write_bytes(ckpt.read_bytes()[:len(ckpt.read_bytes()) // 2])
    elif case == "text":
        path.write_text("step 10\n")
    elif case == "other torch file":
        torch.save(dict(state_dict=dict(w=torch.zeros(2))), path)
    elif case == "at the end":
        path, overrides = ckpt, dict(NUM_ITERATIONS=10)
    elif case == "profile past the end":
        path, overrides = ckpt, dict(PROFILE_STEPS=8)  # steps 16..23 of 20
    elif case == "another architecture":
        path, overrides = ckpt, dict(MLP_HIDDEN=256)
    elif case == "other value embeddings":
        path, overrides = ckpt, dict(NUM_VALUE_EMBEDS=2)
    elif case == "attention elsewhere":
        path, overrides = ckpt, dict(NO_ATTN_LAYERS=1)
    monkeypatch.setattr(train_gpt, "GPT", None)  # building the model would fail: the check must come first
    with pytest.raises(train_gpt.ConfigError) as e:
        train_gpt.main(tiny_env(full_run["data"], tmp_path, RESUME=path, **overrides))
    assert f"RESUME={path}" in str(e.value) and message in str(e.value)
    assert not (tmp_path / "logs").exists()


def test_a_second_run_of_one_run_id_does_not_overwrite_its_checkpoints(full_run, tmp_path):
    # RUN_ID=full again with another LOG_DIR: the log check passes, and its checkpoints would replace full's
    out, data = full_run["out"], full_run["data"]
    folder = out / "ckpt" / "full"
    env = tiny_env(data, tmp_path, RUN_ID="full", CHECKPOINT_DIR=out / "ckpt", SAVE_EVERY=10)
    with pytest.raises(train_gpt.ConfigError) as e:
        train_gpt.main(env, check_only=True)
    assert str(e.value) == (f"RUN_ID=full: {folder} already holds checkpoints (step_000010.pt), which this run "
                            f"would overwrite; choose another RUN_ID or move them")
    # a run continuing from its own last checkpoint writes only after it: allowed; from an earlier one it would
    # overwrite the later ones (another run's future): refused
    own = tmp_path / "ckpt" / "mine"
    own.mkdir(parents=True)
    (own / "step_000010.pt").write_bytes((folder / "step_000010.pt").read_bytes())
    mine = tiny_env(data, tmp_path, RUN_ID="mine", SAVE_EVERY=10, RESUME=own / "step_000010.pt")
    train_gpt.main(mine, check_only=True)
    (own / "step_000020.pt").write_bytes(b"")
    with pytest.raises(train_gpt.ConfigError, match=r"already holds checkpoints \(step_000020.pt\)"):
        train_gpt.main(mine, check_only=True)
    train_gpt.main(tiny_env(data, tmp_path, RUN_ID="full", CHECKPOINT_DIR=out / "ckpt"), check_only=True)


def test_resume_of_a_file_that_is_no_checkpoint_says_so_without_torchs_advice(monkeypatch):
    # RESUME=README.md quoted torch.load's "Re-running torch.load with weights_only set to False will likely succeed"
    args = train_gpt.Hyperparameters(resume=str(ROOT / "README.md"))
    with pytest.raises(train_gpt.ConfigError) as e:
        train_gpt.load_checkpoint(args, 1)
    assert "is not a checkpoint file of train_gpt.py" in str(e.value) and "weights_only" not in str(e.value)

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(torch, "load", unreadable)  # an unreadable file keeps its reason
    with pytest.raises(train_gpt.ConfigError, match=r"README.md cannot be read \(Permission denied\)"):
        train_gpt.load_checkpoint(args, 1)


def test_a_refused_resume_leaves_no_log(full_run):
    out = full_run["out"]
    env = tiny_env(full_run["data"], out, RUN_ID="refused", VAL_TOKENS=512, MLP_HIDDEN=256,
                   RESUME=out / "ckpt" / "full" / "step_000010.pt")
    with pytest.raises(train_gpt.ConfigError, match="MLP_HIDDEN"):
        train_gpt.main(env)
    assert not (out / "logs" / "refused.txt").exists()
