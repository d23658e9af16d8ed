import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt
from conftest import write_shard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import step_profile  # noqa: E402  (bench/ is no package)

FEWEST = ROOT / "bench" / "fewest_steps.sh"
MULTI = ROOT / "bench" / "multi.sh"
SETTINGS = ("NUM_EXPERTS", "TOP_K", "SHARED_EXPERTS", "NUM_ITERATIONS", "SEED", "RUN_ID", "LOG_DIR",
            "CUDA_VISIBLE_DEVICES", "MINI_SH", "NPROC")

# a stand-in for bench/mini.sh: records when it ran on which GPU with which settings, and writes a log in
# train_gpt.py's format whose final val loss falls with the steps (the MoE reaches 4.055 at 700 steps)
MINI = """#!{python}
import json, os, sys, time
env, calls = os.environ, os.environ["CALLS"]
record = {{k: env.get(k) for k in {settings!r}}} | {{"args": sys.argv[1:], "start": time.monotonic()}}
if sys.argv[1:2] == ["--check"]:
    open(f"{{calls}}/checks.jsonl", "a").write(json.dumps(record) + "\\n")
    sys.exit(2 if env.get("NUM_EXPERTS") == "bad" else 0)
time.sleep(0.25)
steps, seed, experts = int(env["NUM_ITERATIONS"]), int(env["SEED"]), int(env.get("NUM_EXPERTS", "0"))
loss = 4.055 + 0.002 * (seed - 1) + (0.0004 * (700 - steps) - 0.004 if experts else 0)
config = dict(num_iterations=steps, num_experts=experts, top_k=int(env.get("TOP_K", "2")), seed=seed,
              train_batch_tokens=49152, run_id=env["RUN_ID"])
run = dict(run_id=env["RUN_ID"], world_size=1, device="NVIDIA H200")
lines = ["print('source')", "=" * 100, f"run: {{json.dumps(run)}}", f"config: {{json.dumps(config)}}",
         f"step:0/{{steps}} val_loss:10.8258 train_time:0ms step_avg:nanms",
         f"step:{{steps}}/{{steps}} val_loss:{{loss:.4f}} train_time:{{steps * 100}}ms step_avg:100.00ms",
         "peak memory allocated: 100 MiB reserved: 120 MiB"]
failed = env["RUN_ID"] == env.get("FAIL_RUN")
with open(os.path.join(env["LOG_DIR"], env["RUN_ID"] + ".txt"), "w") as f:
    f.write("\\n".join(lines[:-1] if failed else lines) + "\\n")
record["end"] = time.monotonic()
open(f"{{calls}}/runs.jsonl", "a").write(json.dumps(record) + "\\n")
sys.exit(1 if failed else 0)
"""


@pytest.fixture
def stub(tmp_path):
    calls = tmp_path / "calls"
    calls.mkdir()
    mini = tmp_path / "mini.py"
    mini.write_text(MINI.format(python=sys.executable, settings=SETTINGS))
    mini.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return dict(calls=calls, env=env | dict(MINI_SH=str(mini), CALLS=str(calls), CUDA_VISIBLE_DEVICES="3,5"))


def fewest(stub, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(FEWEST), *args], env=stub["env"] | env, capture_output=True, text=True,
                          timeout=120)


def records(stub, name: str) -> list[dict]:
    path = stub["calls"] / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


MOE = ["NUM_EXPERTS=32", "TOP_K=4"]


def test_queue_runs_each_run_once_and_one_at_a_time_per_gpu(stub, tmp_path):
    out = tmp_path / "logs"
    r = fewest(stub, "--runs", "3", "--out", str(out), "640", "700", "760", *MOE)
    assert r.returncode == 0, r.stderr
    runs = records(stub, "runs.jsonl")
    expected = {f"dense_800_s{s}" for s in range(3)} | {f"moe_{n}_s{s}" for n in (640, 700, 760) for s in range(3)}
    assert sorted(run["RUN_ID"] for run in runs) == sorted(expected), "every run once"
    assert {run["CUDA_VISIBLE_DEVICES"] for run in runs} == {"3", "5"}, "one GPU each, only the visible ones"
    for gpu in ("3", "5"):
        spans = sorted((run["start"], run["end"]) for run in runs if run["CUDA_VISIBLE_DEVICES"] == gpu)
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])), f"GPU {gpu} ran two at once"
    starts = sorted(run["start"] for run in runs)
    assert any(other["start"] < run["start"] < other["end"] for run in runs for other in runs), "GPUs run at once"
    for run in runs:
        dense = run["RUN_ID"].startswith("dense")
        assert (run["NUM_EXPERTS"], run["TOP_K"]) == ((None, None) if dense else ("32", "4"))
        assert run["NUM_ITERATIONS"] == run["RUN_ID"].split("_")[1] and run["SEED"] == run["RUN_ID"][-1]
        assert run["LOG_DIR"] == str(out) and run["MINI_SH"] is None
    checks = records(stub, "checks.jsonl")
    assert sorted((c["NUM_EXPERTS"] or "-", c["NUM_ITERATIONS"]) for c in checks) == [("-", "800"), ("32", "760")]
    assert max(c["start"] for c in checks) < starts[0], "the settings are checked before any run"
    assert "fewest steps to 4.0550: **700**" in r.stdout and "0.875x dense's steps" in r.stdout
    assert (out / "fewest.md").read_text().startswith("### Fewest steps to dense's loss")


def test_rerun_skips_finished_runs_and_adds_seeds(stub, tmp_path):
    out = tmp_path / "logs"
    assert fewest(stub, "--out", str(out), "700", *MOE).returncode == 0
    r = fewest(stub, "--runs", "2", "--out", str(out), "700", *MOE)
    assert r.returncode == 0, r.stderr
    assert [run["RUN_ID"] for run in records(stub, "runs.jsonl")][4:] == ["moe_700_s1"]
    assert "dense_800_s0 is done already" in r.stdout


def test_a_failed_run_is_reported_and_the_others_finish(stub, tmp_path):
    r = fewest(stub, "--out", str(tmp_path / "logs"), "640", "700", *MOE, FAIL_RUN="moe_640_s0")
    assert r.returncode == 1
    assert "moe_640_s0 failed (exit 1)" in r.stderr and len(records(stub, "runs.jsonl")) == 5
    assert "640    0 (+1 incomplete)" in r.stdout
    r = fewest(stub, "--out", str(tmp_path / "logs"), "640", *MOE)
    assert r.returncode == 2 and "moe_640_s0.txt is the log of an unfinished run" in r.stderr


@pytest.mark.parametrize("args, env, message", [
    (["64O"], {}, "'64O' is neither a step count"),
    ([], {}, "no step counts given"),
    (["--runs", "0", "700"], {}, "--runs 0 must be a positive integer"),
    (["700", "SEED=3"], {}, "SEED=3: this script sets SEED per run"),
    (["700"], {"NUM_EXPERTS": "8"}, "NUM_EXPERTS=8 is in the environment"),
    (["700"], {"NUM_ITERATIONS": "8"}, "NUM_ITERATIONS=8 is in the environment"),
    (["700", "NUM_EXPERTS=bad"], {}, "the moe runs' settings (NUM_EXPERTS=bad) are refused"),
    (["--dry-run", "700", "NUM_EXPERTS=bad", "TOP_K=4"], {}, "the moe runs' settings (NUM_EXPERTS=bad TOP_K=4)"),
    (["700"], {"CUDA_VISIBLE_DEVICES": ""}, "no GPU found"),
])
def test_bad_input_is_one_error_line_before_any_run(stub, tmp_path, args, env, message):
    smi = tmp_path / "stubs" / "nvidia-smi"  # a machine without GPUs: nvidia-smi -L lists none
    smi.parent.mkdir()
    smi.write_text("#!/usr/bin/env bash\nexit 9\n")
    smi.chmod(0o755)
    env["PATH"] = f"{smi.parent}{os.pathsep}{stub['env']['PATH']}"
    r = fewest(stub, "--out", str(tmp_path / "logs"), *args, **env)
    assert r.returncode == 2 and message in r.stderr and "fewest_steps.sh: error: " in r.stderr, r.stderr
    assert records(stub, "runs.jsonl") == [] and (not any("=bad" in a for a in args) or records(stub, "checks.jsonl"))


def test_help_and_dry_run(stub, tmp_path):
    r = subprocess.run([str(FEWEST), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("Usage:") and "--dense-steps" in r.stdout
    r = fewest(stub, "--dry-run", "--dense", "1", "--runs", "2", "--out", str(tmp_path / "logs"), "640", "700")
    assert r.returncode == 0 and not (tmp_path / "logs").exists()
    assert r.stdout.splitlines()[1:] == ["dense_800_s0 800 0 dense", "moe_700_s0 700 0 moe", "moe_640_s0 640 0 moe",
                                         "moe_700_s1 700 1 moe", "moe_640_s1 640 1 moe"]
    checks = records(stub, "checks.jsonl")  # each configuration's settings are checked, no run started
    assert sorted((c["NUM_EXPERTS"] or "-", c["NUM_ITERATIONS"]) for c in checks) == [("-", "700"), ("-", "800")]
    assert records(stub, "runs.jsonl") == []


# -----------------------------------------------------------------------------
# bench/multi.sh, against stand-ins for torchrun and nvidia-smi

RECORDER = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$CALLS/torchrun.args"
env > "$CALLS/torchrun.env"
"""


@pytest.fixture(scope="module")
def wikiblogs(tmp_path_factory):
    # 5 train shards of 3 x 98,304 tokens: 2 steps each on 2 GPUs, as the last needs one more token for its targets;
    # and a val shard that just holds 4,194,304 + 1
    data = tmp_path_factory.mktemp("wikiblogs")
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        write_shard(data / f"wikiblogs_train_00000{i}.bin", rng.integers(0, 50257, 3 * 98304))
    write_shard(data / "wikiblogs_val_000000.bin", rng.integers(0, 50257, 4194304 + 1))
    return data


def multi(tmp_path, data, **env) -> tuple[subprocess.CompletedProcess, dict]:
    stubs, calls = tmp_path / "stubs", tmp_path / "calls"
    for folder in (stubs, calls):
        folder.mkdir(exist_ok=True)
    (stubs / "torchrun").write_text(RECORDER)
    (stubs / "nvidia-smi").write_text("#!/usr/bin/env bash\nfor i in 0 1; do echo \"GPU $i: NVIDIA H200 (UUID: GPU-$i)\"; done\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    names = {f.name.upper() for f in fields(train_gpt.Hyperparameters)} | set(SETTINGS)
    base = {k: v for k, v in os.environ.items() if k not in names}
    base["PATH"] = os.pathsep.join([str(stubs), str(Path(sys.executable).parent), base.get("PATH", "")])
    r = subprocess.run(["bash", str(MULTI), str(data)], cwd=tmp_path, env=base | {"CALLS": str(calls)} | env,
                       capture_output=True, text=True, timeout=120)
    launched = calls / "torchrun.env"
    return r, dict(line.split("=", 1) for line in launched.read_text().splitlines() if "=" in line) \
        if launched.exists() else {}


@pytest.mark.parametrize("env, nproc, steps", [
    ({}, 2, 2 * 5 * 2),  # every GPU found; two passes of 5 shards x 2 steps
    ({"NPROC": "1"}, 1, 2 * 5 * 5),  # 49,152 tokens a step: 5 steps a shard
    ({"NPROC": "2", "NUM_ITERATIONS": "7"}, 2, 7),
])
def test_multi_runs_49152_tokens_per_gpu_for_two_passes(tmp_path, wikiblogs, env, nproc, steps):
    r, launched = multi(tmp_path, wikiblogs, **env)
    assert r.returncode == 0, r.stderr
    assert f"--nproc_per_node={nproc}" in (tmp_path / "calls" / "torchrun.args").read_text().split()
    assert launched["TRAIN_BATCH_TOKENS"] == str(49152 * nproc) and launched["TRAIN_SEQ_LEN"] == "49152"
    assert launched["NUM_ITERATIONS"] == str(steps) and launched["VAL_TOKENS"] == "4194304"
    assert launched["TRAIN_FILES"] == f"{wikiblogs}/wikiblogs_train_00000[1-5].bin"


def test_multi_names_missing_shards_and_gpus(tmp_path, wikiblogs):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "wikiblogs_train_000001.bin").write_bytes((wikiblogs / "wikiblogs_train_000001.bin").read_bytes())
    r, launched = multi(tmp_path, partial)
    assert r.returncode == 2 and "holds 1 of the train shards" in r.stderr and not launched
    r, launched = multi(tmp_path, wikiblogs, NPROC="two")
    assert r.returncode == 2 and "NPROC=two must be a positive integer" in r.stderr and not launched


@pytest.mark.parametrize("script", ["mini.sh", "multi.sh", "fewest_steps.sh"])
def test_every_bench_script_has_help(script):
    r = subprocess.run([str(ROOT / "bench" / script), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "Usage: " in r.stdout and r.stderr == ""


def test_mini_checks_the_settings_before_torchrun(tmp_path, wikiblogs):
    # a refused setting is one error line and exit 2, as through run.sh, not torchrun's report of a failed process
    stubs, calls = tmp_path / "stubs", tmp_path / "calls"
    for folder in (stubs, calls):
        folder.mkdir()
    (stubs / "torchrun").write_text(RECORDER)
    (stubs / "torchrun").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in {f.name.upper() for f in fields(train_gpt.Hyperparameters)}}
    base["PATH"] = os.pathsep.join([str(stubs), str(Path(sys.executable).parent), base.get("PATH", "")])
    base["CUDA_VISIBLE_DEVICES"] = "0"
    for bad, name in ((dict(NUM_EXPERTS="-1"), "NUM_EXPERTS"), (dict(NUM_EXPERTS="4", TOP_K="5"), "TOP_K")):
        r = subprocess.run(["bash", str(ROOT / "bench" / "mini.sh"), str(wikiblogs)], cwd=tmp_path,
                           env=base | bad | {"CALLS": str(calls)}, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1, r.stderr
        assert name in r.stderr and not (calls / "torchrun.args").exists()
    r = subprocess.run(["bash", str(ROOT / "bench" / "mini.sh"), str(wikiblogs)], cwd=tmp_path,
                       env=base | {"CALLS": str(calls), "VAL_TOKENS": "4194304"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--nproc_per_node=1" in (calls / "torchrun.args").read_text().split(), r.stderr


def test_mini_refuses_to_start_without_a_gpu(tmp_path, wikiblogs):
    # without one, the full run began on the CPU and died allocating 64 GiB; --check still runs
    stubs, calls = tmp_path / "stubs", tmp_path / "calls"
    for folder in (stubs, calls):
        folder.mkdir()
    (stubs / "torchrun").write_text(RECORDER)
    (stubs / "nvidia-smi").write_text("#!/usr/bin/env bash\nexit 9\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    names = {f.name.upper() for f in fields(train_gpt.Hyperparameters)} | {"CUDA_VISIBLE_DEVICES"}
    env = {k: v for k, v in os.environ.items() if k not in names} | {"CALLS": str(calls), "VAL_TOKENS": "4194304"}
    env["PATH"] = os.pathsep.join([str(stubs), str(Path(sys.executable).parent), env.get("PATH", "")])
    r = subprocess.run(["bash", str(ROOT / "bench" / "mini.sh"), str(wikiblogs)], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("mini.sh: error: no GPU found") and \
        len(r.stderr.splitlines()) == 1, r.stderr
    assert not (calls / "torchrun.args").exists()
    r = subprocess.run(["bash", str(ROOT / "bench" / "mini.sh"), "--check", str(wikiblogs)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


FIXED = ("TRAIN_SEQ_LEN", "TRAIN_BATCH_TOKENS", "TRAIN_FILES", "VAL_FILES")


@pytest.mark.parametrize("script", ["mini.sh", "multi.sh"])
@pytest.mark.parametrize("fixed", FIXED)
def test_the_benchmarks_refuse_the_settings_they_fix(tmp_path, wikiblogs, script, fixed):
    # "settings pass through", but not these: each benchmark sets them itself, so a user's value would be dropped
    r, launched = multi(tmp_path, wikiblogs, **{fixed: "1024"}) if script == "multi.sh" else (subprocess.run(
        ["bash", str(ROOT / "bench" / script), "--check", str(wikiblogs)], env=dict(os.environ, **{fixed: "1024"}),
        capture_output=True, text=True, timeout=60), {})
    assert r.returncode == 2 and not launched, r.stderr
    assert r.stderr.startswith(f"{script}: error: {fixed} is set by") and len(r.stderr.splitlines()) == 1, r.stderr


@pytest.mark.parametrize("script", ["mini.sh", "multi.sh"])
def test_the_benchmarks_refuse_a_second_argument(tmp_path, wikiblogs, script):
    r = subprocess.run(["bash", str(ROOT / "bench" / script), str(wikiblogs), "NUM_EXPERTS=8"], capture_output=True,
                       text=True, timeout=60, env={k: v for k, v in os.environ.items() if k not in FIXED})
    assert r.returncode == 2 and "one DATA_DIR at most" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


def test_dry_run_refuses_a_misspelt_setting_through_the_real_check(tmp_path, wikiblogs):
    env = {k: v for k, v in os.environ.items() if k not in {f.name.upper() for f in fields(train_gpt.Hyperparameters)}
           and k not in SETTINGS}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    r = subprocess.run(["bash", str(FEWEST), "--dry-run", "--data", str(wikiblogs), "700", "NUM_EXPERT=8"],
                       env=env | dict(VAL_TOKENS="4194304"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "did you mean NUM_EXPERTS?" in r.stderr, r.stderr
    assert "the moe runs' settings (NUM_EXPERT=8) are refused" in r.stderr and "moe_700_s0" not in r.stdout


def bench_py(script: str, *args: str, **settings) -> subprocess.CompletedProcess:
    # a Python bench script with only these trainer settings in the environment
    env = {k: v for k, v in os.environ.items() if k not in {f.name.upper() for f in fields(train_gpt.Hyperparameters)}}
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, env=env | settings,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", ["step_profile.py", "muon_step.py", "comm_bytes.py"])
def test_a_misspelt_setting_is_one_error_line(script):
    r = bench_py(script, NUM_EXPERT="8")
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr == "error: environment variable NUM_EXPERT is not a setting; did you mean NUM_EXPERTS?\n", r.stderr


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without a GPU")


@pytest.mark.parametrize("script,args,message", [
    ("muon_step.py", ["--iters", "0"], "muon_step.py: error: argument --iters: '0' must be a whole number, at least 1"),
    ("muon_step.py", ["--rounds", "0"], "muon_step.py: error: argument --rounds: '0' must be a whole number, at least 1"),
    ("muon_step.py", ["--against", "/nope.py"],
     "error: --against /nope.py: no such file; give the path of another train_gpt.py"),
    pytest.param("muon_step.py", ["--device", "cuda"], "error: --device cuda: no GPU is visible; use --device cpu",
                 marks=NO_GPU),
    pytest.param("muon_step.py", ["--profile"], "error: --profile lists GPU kernels and this runs on the CPU",
                 marks=NO_GPU),
    pytest.param("step_profile.py", [], "error: bench/step_profile.py times CUDA events: run it on a GPU",
                 marks=NO_GPU),
    ("step_profile.py", ["--steps", "0"], "error: --steps 0: time at least 1 step"),
    ("step_profile.py", ["--save", "bench"], "error: --save bench: a folder; give the path of a file in it"),
    ("moe_layer.py", ["--tokens", "-5"],
     "moe_layer.py: error: argument --tokens: '-5' must be a whole number, at least 1"),
    ("moe_layer.py", ["--configs", "8x2,4x8"], "moe_layer.py: error: argument --configs: '8x2,4x8' must be"),
    ("moe_layer.py", ["--against", "/nope.py"],
     "error: --against /nope.py: no such file; give the path of another train_gpt.py"),
    pytest.param("moe_layer.py", [], "error: bench/moe_layer.py times CUDA events: run it on a GPU", marks=NO_GPU),
    pytest.param("moe_layer.py", ["--gemms"], "error: bench/moe_layer.py times CUDA events: run it on a GPU",
                 marks=NO_GPU),
    ("polar_express.py", ["--lower", "2"], "polar_express.py: error: argument --lower: 2.0 must be above 0 and below 1"),
    ("polar_express.py", ["--lower", "-1"], "polar_express.py: error: argument --lower: -1.0 must be above 0"),
    ("polar_express.py", ["--cushion", "5"], "polar_express.py: error: argument --cushion: 5.0 must be at least 0"),
    ("polar_express.py", ["--steps", "0"], "polar_express.py: error: argument --steps: 0 must be at least 1"),
    ("polar_express.py", ["--cushion", "0.99999"], "error: Remez on ["),  # too narrow a fit for float64
])
def test_bad_arguments_are_refused_before_the_model_is_built(shards, script, args, message):
    r = bench_py(script, *args, TRAIN_FILES=str(shards / "syn_train_*.bin"))
    assert r.returncode == 2 and r.stdout == "" and r.stderr.splitlines()[-1].startswith(message), r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("script,needles", [
    ("muon_step.py", ["Time Muon's step alone", "--rounds ROUNDS", "median over rounds", "top GPU kernels"]),
    ("step_profile.py", ["Where a training step's time goes"]),
])
def test_python_bench_scripts_describe_themselves(script, needles):
    r = bench_py(script, "--help")
    assert r.returncode == 0 and all(n in " ".join(r.stdout.split()) for n in needles), r.stdout


# kernel names as the PyTorch profiler printed them on H100s and H200s (bench/results), and the kind each belongs to
PROFILED_KERNELS = [
    ("_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9xINS_4gemm6kernel1", "GEMM"),
    ("nvjet_sm90_tst_192x192_64x3_1x2_h_bz_coopB_splitK_NTN", "GEMM"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloa...", "GEMM"),
    ("triton_tem_fused_mm_0", "GEMM"),  # a max-autotune GEMM template
    ("triton_tem_fused_flex_attention_backward_transpose_view_15", "attention"),
    ("triton_per_fused_flex_attention_backward_transpose_view_6", "attention"),
    ("triton_poi_fused_floor_divide_index_13", "gather/scatter"),  # the MoE's x[order // k]
    ("triton_poi_fused_index_sum_view_16", "gather/scatter"),  # the combine
    ("void at::native::_scatter_gather_elementwise_kernel<128, 8, at::native::_cuda_scatter_g...", "gather/scatter"),
    ("triton_poi_fused_mul_pow_relu_threshold_backward_1", "elementwise/reduction"),
    ("triton_poi_fused__scaled_mm__to_copy_clone_div_mul_permute_0", "elementwise/reduction"),  # FP8 casts
    ("gram_kernel", "train_gpt.py Triton"),
    ("weight_grad_kernel", "train_gpt.py Triton"),
    ("void at_cuda_detail::cub::detail::radix_sort::DeviceRadixSortOnesweepKernel<at_cuda_det...", "sort"),
    ("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "NCCL"),
    ("Memcpy DtoD (Device -> Device)", "copy/memset"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1ul> >",
     "other"),
]


@pytest.mark.parametrize("name,kind", PROFILED_KERNELS)
def test_step_profile_sorts_kernels_by_kind(name, kind):
    assert step_profile.kernel_kind(name) == kind


def test_step_profile_knows_every_kind_of_inductor_kernel():
    # Inductor names a kernel triton_<its category's first 3 letters>_fused_<ops>_<n> (foreach: for, split_scan: spl)
    from torch._inductor.wrapper_benchmark import _kernel_category_choices
    for category in (*_kernel_category_choices, "unknown"):
        want = "GEMM" if category == "template" else "elementwise/reduction"
        assert step_profile.kernel_kind(f"triton_{category[:3]}_fused_add_mul_0") == want, category
        assert step_profile.kernel_kind(f"triton_{category[:3]}_fused_index_mul_1") == (
            "GEMM" if category == "template" else "gather/scatter"), category


def test_step_profile_knows_every_triton_kernel_of_train_gpt():
    jitted = {name for name in step_profile.OWN_KERNELS if hasattr(train_gpt, name)} if train_gpt.triton else set()
    assert {"gram_kernel", "gather_rows_kernel", "scatter_rows_kernel", "weight_grad_kernel"} <= step_profile.OWN_KERNELS
    assert not train_gpt.triton or jitted == step_profile.OWN_KERNELS


def test_step_profile_counts_gpu_work_once():
    # a user range's annotation on the GPU timeline covers kernels already counted; CPU-side rows have no GPU time
    from types import SimpleNamespace as Event
    from torch.autograd import DeviceType
    events = [Event(key="nvjet_sm90_x", device_type=DeviceType.CUDA, self_device_time_total=30.0),
              Event(key="## forward ##", device_type=DeviceType.CUDA, self_device_time_total=30.0,
                    is_user_annotation=True),
              Event(key="cudaLaunchKernel", device_type=DeviceType.CPU, self_device_time_total=0.0),
              Event(key="aten::mm", device_type=DeviceType.CPU, self_device_time_total=30.0),
              Event(key="Memset (Device)", device_type=DeviceType.CUDA, self_device_time_total=2.0)]
    assert step_profile.kernel_rows(events) == [("nvjet_sm90_x", 30.0), ("Memset (Device)", 2.0)]


def test_step_profile_kind_table_sums_per_step_and_differences():
    rows = [(name, 3000.0 * (i + 1)) for i, (name, _) in enumerate(PROFILED_KERNELS)]  # microseconds over 3 steps
    moe = step_profile.kinds_per_step(rows, 3)
    want = {kind: sum(i + 1 for i, (_, k) in enumerate(PROFILED_KERNELS) if k == kind) for kind in step_profile.KINDS}
    assert {k: round(v, 9) for k, v in moe.items() if k != "total"} == want
    assert moe["total"] == pytest.approx(sum(range(1, len(PROFILED_KERNELS) + 1)))
    dense = step_profile.kinds_per_step([("nvjet_sm90_x", 1500.0)], 3)
    this = {"name": "E32top4+1", "forward+backward": moe, "optimizers": dense,
            "timed": {"forward+backward": 200.0, "optimizers": 1.25}}
    base = {"name": "dense", "forward+backward": dense, "optimizers": dense,
            "timed": {"forward+backward": 10.0, "optimizers": 0.75}}
    lines = step_profile.kind_table(this, base)
    assert len({len(line) for line in lines}) == 1, lines  # the header's columns over the numbers'
    assert lines[0].split() == ["kernel", "kind", "(ms", "per", "step)", "E32top4+1", "forward+backward", "E32top4+1",
                                "optimizers", "dense", "forward+backward", "dense", "optimizers", "step", "difference"]
    gemm = lines[1 + step_profile.KINDS.index("GEMM")].split()
    assert gemm[0] == "GEMM" and [float(c) for c in gemm[1:]] == [want["GEMM"], 0.5, 0.5, 0.5, want["GEMM"] - 0.5]
    timed = lines[-1].split()
    assert timed[:3] == ["timed", "(CUDA", "events)"] and [float(c) for c in timed[3:]] == [200, 1.25, 10, 0.75, 190.5]
    assert len(step_profile.kind_table(this)[1].split()) == 3  # alone: no columns of another run


def test_step_profile_against_refuses_what_save_did_not_write(tmp_path, shards):
    for text, message in [("{not json", "Expecting property name"), ('{"forward+backward": {}}', "not a bench/")]:
        (tmp_path / "f.json").write_text(text)
        r = bench_py("step_profile.py", "--against", str(tmp_path / "f.json"),
                     TRAIN_FILES=str(shards / "syn_train_*.bin"))
        assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr
        assert r.stderr.startswith(f"error: --against {tmp_path / 'f.json'}") and message in r.stderr, r.stderr
    r = bench_py("step_profile.py", "--save", str(tmp_path / "no" / "f.json"), TRAIN_FILES=str(shards / "syn_train_*.bin"))
    assert r.returncode == 2 and "error: --save" in r.stderr and "folder does not exist" in r.stderr, r.stderr
    r = bench_py("step_profile.py", "--save", str(tmp_path / "f.json"), "--kernels", "0",
                 TRAIN_FILES=str(shards / "syn_train_*.bin"))
    assert r.returncode == 2 and "leave --kernels above 0" in r.stderr, r.stderr


def test_step_profile_against_refuses_now_what_the_table_could_not_print_later(tmp_path):
    # the --against file goes into kind_table only after the GPU run: a file without the name, a kind's total or a
    # number where the table wants one must be refused before, and what --save writes must be taken
    kinds = dict.fromkeys(step_profile.KINDS, 0.5) | {"total": 4.5}
    saved = {"name": "dense", "forward+backward": kinds, "optimizers": kinds,
             "timed": {"forward+backward": 10.0, "optimizers": 1.0}}
    path = tmp_path / "dense.json"
    path.write_text(json.dumps(saved, indent=1))
    assert step_profile.load_kinds(str(path)) == saved
    broken = [{k: v for k, v in saved.items() if k != "name"},
              saved | {"optimizers": {k: v for k, v in kinds.items() if k != "total"}},
              saved | {"forward+backward": kinds | {"GEMM": "1.5"}},
              saved | {"timed": {"forward+backward": None, "optimizers": 1.0}},
              [saved]]
    for bad in broken:
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="not a bench/step_profile.py --save file"):
            step_profile.load_kinds(str(path))
