import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

import train_gpt
from conftest import tiny_env

ROOT = Path(__file__).resolve().parents[1]
RUN_SH = ROOT / "run.sh"
SETTINGS = {f.name.upper() for f in fields(train_gpt.Hyperparameters)}
LAUNCHER = {"NPROC", "NNODES", "RDZV_ENDPOINT", "RDZV_ID", "FETCH_DATA", "FETCH_SHARDS", "BPE_DIR", "CUDA_VISIBLE_DEVICES"}
# the tiny model with batches that divide over 1, 2, 3, 4, 8 and 16 GPUs, so that run.sh's check lets them through
ANY_GPUS = dict(TRAIN_SEQ_LEN="128", TRAIN_BATCH_TOKENS="6144", VAL_SEQ_LEN="128", VAL_TOKENS="6144")
# a stand-in for torchrun that records how it was called instead of training
RECORDER = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$CALLS/$(basename "$0").args"
env > "$CALLS/$(basename "$0").env"
"""


def launch(settings: dict, cwd: Path, script: Path = RUN_SH, stubs: Path | None = None, timeout: int = 120):
    # run.sh with the settings replacing any the environment has; stubs/ first on PATH, then this python's bin
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS | LAUNCHER}
    path = [str(stubs)] if stubs else []
    env["PATH"] = os.pathsep.join(path + [str(Path(sys.executable).parent), env.get("PATH", "")])
    return subprocess.run(["bash", str(script)], cwd=cwd, env=env | settings, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def recorder(tmp_path, shared_shards):
    # torchrun records its arguments and environment into calls/; nvidia-smi lists 4 GPUs; the settings are the tiny
    # ones on real shards
    stubs, calls = tmp_path / "stubs", tmp_path / "calls"
    stubs.mkdir()
    calls.mkdir()
    (stubs / "torchrun").write_text(RECORDER)
    (stubs / "nvidia-smi").write_text("#!/usr/bin/env bash\nfor i in 0 1 2 3; do echo \"GPU $i: NVIDIA H100 80GB HBM3 "
                                      "(UUID: GPU-$i)\"; done\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    return dict(stubs=stubs, calls=calls, env=tiny_env(shared_shards, tmp_path, **ANY_GPUS) | dict(CALLS=str(calls)))


def torchrun_args(recorder) -> list[str]:
    return (recorder["calls"] / "torchrun.args").read_text().splitlines()


# -----------------------------------------------------------------------------
# Command line and launch arguments, against stand-ins for torchrun and nvidia-smi


def test_help_exits_0_and_names_the_launcher_variables(tmp_path):
    r = subprocess.run([str(RUN_SH), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("Usage:")
    for name in LAUNCHER - {"CUDA_VISIBLE_DEVICES"}:
        assert name in r.stdout


def test_trainer_help_names_the_check(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), "--help"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "--check" in r.stdout and not (tmp_path / "logs").exists()


def test_an_argument_is_refused(tmp_path):
    r = subprocess.run(["bash", str(RUN_SH), "NUM_EXPERTS=8"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and r.stderr.startswith("run.sh: error: unexpected argument 'NUM_EXPERTS=8'")
    assert "settings go through the environment" in r.stderr


@pytest.mark.parametrize("settings, nproc", [
    ({}, "4"),  # every GPU nvidia-smi lists
    ({"CUDA_VISIBLE_DEVICES": "2,3"}, "2"),  # the visible ones only
    ({"NPROC": "3"}, "3"),
])
def test_one_process_per_gpu_standalone(recorder, tmp_path, settings, nproc):
    r = launch(recorder["env"] | settings, tmp_path, stubs=recorder["stubs"])
    assert r.returncode == 0, r.stderr
    assert torchrun_args(recorder) == ["--standalone", f"--nproc_per_node={nproc}", str(ROOT / "train_gpt.py")]


def recorded_env(recorder) -> dict:
    return dict(line.split("=", 1) for line in (recorder["calls"] / "torchrun.env").read_text().splitlines()
                if "=" in line)


def no_gpu(recorder):
    (recorder["stubs"] / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")


def test_no_gpu_means_one_process(recorder, tmp_path):
    no_gpu(recorder)
    r = launch(recorder["env"], tmp_path, stubs=recorder["stubs"])
    assert r.returncode == 0, r.stderr
    assert "--nproc_per_node=1" in torchrun_args(recorder)
    assert r.stdout.startswith("run.sh: no GPU on this machine: training the tiny CPU configuration")


def test_no_gpu_defaults_to_the_tiny_configuration(recorder, tmp_path, shared_shards):
    no_gpu(recorder)
    given = dict(TRAIN_FILES=str(shared_shards / "syn_train_*.bin"), VAL_FILES=str(shared_shards / "syn_val_*.bin"),
                 NUM_ITERATIONS="3", CALLS=recorder["env"]["CALLS"])
    r = launch(given, tmp_path, stubs=recorder["stubs"])
    assert r.returncode == 0, r.stderr
    env = recorded_env(recorder)
    expected = tiny_env(shared_shards, tmp_path) | dict(NUM_ITERATIONS="3")  # what the caller sets wins
    names = SETTINGS - {"LOG_DIR", "CHECKPOINT_DIR", "RUN_ID"}
    assert {k: v for k, v in env.items() if k in names} == {k: v for k, v in expected.items() if k in names}


def test_no_gpu_keeps_a_setting_given_empty(recorder, tmp_path, shared_shards):
    # NO_ATTN_LAYERS= (no layer without attention) became the tiny default 2 again
    no_gpu(recorder)
    given = dict(TRAIN_FILES=str(shared_shards / "syn_train_*.bin"), VAL_FILES=str(shared_shards / "syn_val_*.bin"),
                 NO_ATTN_LAYERS="", LONG_WINDOW_LAYERS="", CALLS=recorder["env"]["CALLS"])
    r = launch(given, tmp_path, stubs=recorder["stubs"])
    assert r.returncode == 0, r.stderr
    env = recorded_env(recorder)
    assert env["NO_ATTN_LAYERS"] == env["LONG_WINDOW_LAYERS"] == "" and env["NUM_LAYERS"] == "4"


def test_settings_reach_the_trainer_and_launcher_variables_do_not(recorder, tmp_path):
    settings = dict(NUM_EXPERTS="8", TOP_K="2", NPROC="2", NNODES="1", RDZV_ID="x", FETCH_SHARDS="3")
    r = launch(recorder["env"] | settings, tmp_path, stubs=recorder["stubs"])
    assert r.returncode == 0, r.stderr
    env = recorded_env(recorder)
    assert env["NUM_EXPERTS"] == "8" and env["TOP_K"] == "2"
    assert not LAUNCHER & env.keys()
    train_gpt.load_config(env)  # nothing left in it looks like a misspelt setting


def test_several_nodes_meet_through_c10d(recorder, tmp_path):
    r = launch(recorder["env"] | dict(NNODES="2", NPROC="8", RDZV_ENDPOINT="node0:29500"), tmp_path,
               stubs=recorder["stubs"])
    assert r.returncode == 0, r.stderr
    assert torchrun_args(recorder) == ["--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=node0:29500",
                                       "--rdzv_id=moe_speedrun", "--nproc_per_node=8", str(ROOT / "train_gpt.py")]


def test_several_nodes_without_endpoint_is_one_clear_error(recorder, tmp_path):
    r = launch(recorder["env"] | dict(NNODES="2"), tmp_path, stubs=recorder["stubs"])
    assert r.returncode != 0 and not (recorder["calls"] / "torchrun.args").exists()
    assert len(r.stderr.strip().splitlines()) == 1 and "RDZV_ENDPOINT" in r.stderr
    assert r.stderr.startswith("run.sh: error: NNODES=2 needs RDZV_ENDPOINT=host:port"), r.stderr


@pytest.mark.parametrize("settings, message", [
    (dict(NPROC="0"), "NPROC=0 must be a positive integer"),
    (dict(NPROC="two"), "NPROC=two must be a positive integer"),
    (dict(NNODES="-1"), "NNODES=-1 must be a positive integer"),
    (dict(FETCH_DATA="yes"), "FETCH_DATA=yes must be 0, 1 or unset"),
])
def test_a_bad_launcher_setting_is_one_error_line(recorder, tmp_path, settings, message):
    # the project's form for bad input: one line starting "run.sh: error:", exit 2, before torchrun
    r = launch(recorder["env"] | settings, tmp_path, stubs=recorder["stubs"])
    assert r.returncode == 2 and not (recorder["calls"] / "torchrun.args").exists()
    assert r.stderr.strip().splitlines() == [f"run.sh: error: {message}"], r.stderr


@pytest.mark.parametrize("case", ["setting", "batch over the GPUs", "shard"])
def test_a_refusal_is_one_error_line_before_torchrun(recorder, tmp_path, case):
    settings, message = {
        "setting": (dict(NUM_EXPERTS="4", TOP_K="5"), "error: TOP_K=5 must be between 1 and NUM_EXPERTS=4"),
        "batch over the GPUs": (dict(NPROC="5"), "error: TRAIN_BATCH_TOKENS=6144 must be a multiple of TRAIN_SEQ_LEN"),
        "shard": (dict(VAL_FILES=str(tmp_path / "bad.bin")), "bad.bin: bad magic number"),
    }[case]
    (tmp_path / "bad.bin").write_bytes(bytes(2048))
    r = launch(recorder["env"] | settings, tmp_path, stubs=recorder["stubs"])
    assert r.returncode == 2 and not (recorder["calls"] / "torchrun.args").exists()
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr, r.stderr
    assert not (tmp_path / "logs").exists()


# -----------------------------------------------------------------------------
# The FineWeb check


# a stand-in for a data script: records its arguments, then writes two small valid shards where run.sh looks
MAKE_SHARDS = """import os, sys
from pathlib import Path
import numpy as np
Path(os.environ['CALLS'], '{name}.args').write_text(' '.join(sys.argv[1:]))
out = Path(__file__).parent / '{folder}'
out.mkdir()
for name, count in (('{prefix}_val_000000.bin', 8000), ('{prefix}_train_000001.bin', 8000)):
    header = np.zeros(256, dtype='<i4')
    header[:3] = 20240520, 1, count
    (out / name).write_bytes(header.tobytes() + np.arange(count, dtype='<u2').tobytes())
"""


@pytest.fixture
def bare_repo(tmp_path, recorder):
    # run.sh in a repo without shards, whose downloader and tokenizer record their arguments
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    shutil.copy(RUN_SH, repo)
    shutil.copy(ROOT / "train_gpt.py", repo)
    (repo / "data" / "cached_fineweb10B.py").write_text(
        MAKE_SHARDS.format(name="download", folder="fineweb10B", prefix="fineweb"))
    (repo / "data" / "tokenize_text.py").write_text(MAKE_SHARDS.format(name="tokenize", folder="tokens", prefix="tiny"))
    env = {k: v for k, v in recorder["env"].items() if k not in ("TRAIN_FILES", "VAL_FILES")}
    return dict(repo=repo, env=env, cwd=tmp_path)


def test_fetch_data_0_refuses_to_download_and_says_how(bare_repo, recorder):
    r = launch(bare_repo["env"] | dict(FETCH_DATA="0"), bare_repo["cwd"], script=bare_repo["repo"] / "run.sh",
               stubs=recorder["stubs"])
    assert r.returncode == 1 and not (recorder["calls"] / "torchrun.args").exists()
    assert not (recorder["calls"] / "download.args").exists()
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("run.sh: error: no FineWeb shards")
    assert "python3 data/cached_fineweb10B.py 8" in r.stderr and "TRAIN_FILES" in r.stderr


def test_fineweb_check_looks_for_the_trainers_default_globs():
    checked = re.findall(r'have_shards "(data/fineweb[^"]+)"', RUN_SH.read_text())
    defaults = train_gpt.Hyperparameters()
    assert checked == [defaults.train_files, defaults.val_files]


@pytest.mark.parametrize("settings, shards", [({}, "8"), (dict(FETCH_SHARDS="3"), "3")])
def test_missing_fineweb_is_downloaded_then_trained_on(bare_repo, recorder, settings, shards):
    r = launch(bare_repo["env"] | settings, bare_repo["cwd"], script=bare_repo["repo"] / "run.sh",
               stubs=recorder["stubs"])
    assert r.returncode == 0, r.stderr
    assert (recorder["calls"] / "download.args").read_text() == shards
    assert torchrun_args(recorder)[-1] == str(bare_repo["repo"] / "train_gpt.py")
    assert "TRAIN_FILES" not in recorded_env(recorder)  # the trainer's default: the shards just fetched


def test_no_gpu_makes_the_tiny_shards_from_the_records(bare_repo, recorder, tmp_path):
    no_gpu(recorder)
    r = launch(bare_repo["env"] | dict(BPE_DIR="/gpt2"), bare_repo["cwd"], script=bare_repo["repo"] / "run.sh",
               stubs=recorder["stubs"])
    assert r.returncode == 0, r.stderr
    repo = bare_repo["repo"]
    assert (recorder["calls"] / "tokenize.args").read_text().startswith(
        f"{repo}/records --prefix tiny --val-docs 1 --out {repo}/data/tokens --bpe-dir /gpt2 --bpe-hint ")
    env = recorded_env(recorder)
    assert (env["TRAIN_FILES"], env["VAL_FILES"]) == ("data/tokens/tiny_train_*.bin", "data/tokens/tiny_val_*.bin")
    assert "BPE_DIR" not in env


def test_no_gpu_offline_without_bpe_dir_names_bpe_dir(recorder, tmp_path):
    # the tokenizer's own hint, "pass --bpe-dir", is no use to a run.sh user, who cannot pass arguments
    no_gpu(recorder)
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "records").mkdir()
    (repo / "records" / "log.txt").write_text("a log")
    for name in ("run.sh", "train_gpt.py", "data/tokenize_text.py", "data/shards.py"):
        shutil.copy(ROOT / name, repo / name)
    offline = dict(HTTPS_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", NO_PROXY="", no_proxy="",
                   TIKTOKEN_CACHE_DIR=str(tmp_path / "no_cache"), DATA_GYM_CACHE_DIR=str(tmp_path / "no_cache"))
    env = {k: v for k, v in recorder["env"].items() if k not in ("TRAIN_FILES", "VAL_FILES")}
    r = launch(env | offline, tmp_path, script=repo / "run.sh", stubs=recorder["stubs"])
    assert r.returncode == 1 and not (recorder["calls"] / "torchrun.args").exists(), r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("tokenize_text.py: error: could not fetch"), r.stderr
    assert "BPE_DIR=DIR ./run.sh" in r.stderr and "--bpe-dir" not in r.stderr, r.stderr


# -----------------------------------------------------------------------------
# A real run


def line_kinds(lines: list[str]) -> set[str]:
    # what each log line is: a validation or a train step line, else the word before its first colon
    kinds = set()
    for line in lines:
        if line.startswith("step:"):
            kinds.add("val" if " val_loss:" in line else "train")
        elif line.strip() != "...":
            kinds.add(line.split(":")[0])
    return kinds


def test_tiny_run_from_another_directory(shared_shards, tmp_path):
    # the real torchrun, one CPU process over gloo, started from outside the repo
    settings = tiny_env(shared_shards, tmp_path, NUM_ITERATIONS=2, VAL_LOSS_EVERY=0, VAL_TOKENS=1024)
    r = launch(settings | dict(NPROC="1"), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (tmp_path / "logs" / "tiny.txt").read_text()
    assert log.startswith((ROOT / "train_gpt.py").read_text())
    assert '"world_size": 1' in log
    assert re.search(r"^step:2/2 val_loss:\d+\.\d{4} train_time:\d+ms step_avg:\d+\.\d{2}ms$", log, flags=re.M)
    # the README's sample log shows the kinds of line a CPU run writes, no more and no fewer
    body = log.split("=" * 100 + "\n")[2].splitlines()
    sample = re.search(r"```text\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)[1].splitlines()
    assert line_kinds(sample) == line_kinds(body) == {"run", "config", "params", "val", "train"}
    assert [line.split(":")[0] for line in sample[:3]] == [line.split(":")[0] for line in body[:3]]
