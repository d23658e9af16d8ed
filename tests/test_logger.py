import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "logs"
sys.path.insert(0, str(ROOT))
import logger  # noqa: E402

ACCS = [3.2806, 3.2771, 3.2829, 3.2813, 3.2789, 3.2774, 3.2798, 3.2759, 3.2794, 3.2775]
BAR = "=" * 100


def write_log(path: Path, val: list[tuple[int, float, float]], num_iterations: int, config: dict | None = None,
              complete: bool = True, device: str = "cpu") -> Path:
    # a log in train_gpt.py's format; val holds (step, train_time_ms, val_loss); complete adds the peak memory line
    config = {"num_iterations": num_iterations, "train_batch_tokens": 49152, "num_experts": 0, "top_k": 2,
              "router": "softmax", "seed": 0, **(config or {})}
    run = {"run_id": path.stem, "date": "2026-11-22T08:15:02", "world_size": 1, "device": device,
           "code_sha": "0123456789ab"}
    lines = ["print('source')", BAR, "Running Python 3.11.7", "Running PyTorch 2.13.0+cpu compiled for CUDA None",
             "nvidia-smi: not available", BAR, f"run: {json.dumps(run)}", f"config: {json.dumps(config)}"]
    for step, time_ms, loss in val:
        lines.append(f"step:{step}/{num_iterations} val_loss:{loss:.4f} train_time:{time_ms:.0f}ms "
                     f"step_avg:{time_ms / step if step else math.nan:.2f}ms")
    if complete:
        lines.append("peak memory allocated: 100 MiB reserved: 120 MiB")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_final_losses(folder: Path, name: str, losses: list[float], time_ms: float = 90000.0,
                       config: dict | None = None) -> list[Path]:
    # run i takes time_ms + 100 i: real timings vary, and identical ones leave Welch's test undefined
    return [write_log(folder / f"{name}_seed{i}.txt",
                      [(0, 0, 10.8258), (400, time_ms / 2, 4.2), (800, time_ms + 100 * i, loss)], 800,
                      {"seed": i, **(config or {})})
            for i, loss in enumerate(losses)]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = logger.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def table_row(markdown: str, cell: str, column: int = 0) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > column and cells[column] == cell:
            return cells
    raise AssertionError(f"no row with {cell!r} in column {column} of:\n{markdown}")


def check_trainer_log(path: Path) -> logger.Run:
    # what logger.py relies on in a log written by train_gpt.py; the CPU run test below feeds it a fresh one
    run = logger.parse_log(path)
    lines = path.read_text().splitlines()
    source = "\n".join(lines[:lines.index(BAR)])
    assert run.run_id == path.stem
    assert run.code_sha == hashlib.sha256(source.encode()).hexdigest()[:12], "code_sha must hash the embedded source"
    assert run.config is not None and run.gpus >= 1 and run.tokens_per_step == run.config["train_batch_tokens"]
    assert run.complete, "a finished run must end with a val line at num_iterations and the peak memory line"
    assert run.val[0].step == 0 and run.val[-1].step == run.num_iterations
    assert [p.step for p in run.val] == sorted(p.step for p in run.val)
    assert all(a.time_ms <= b.time_ms for a, b in zip(run.val, run.val[1:]))
    assert all(math.isfinite(p.loss) for p in run.val)
    if run.config["num_experts"]:
        assert set(run.moe) == {p.step for p in run.val}, "every val line is followed by its moe lines"
        assert all({"load_max", "load_min"} <= set(stats) for layers in run.moe.values() for stats in layers.values())
        k = run.config["top_k"]
        assert all(0 < stats["gate_min"] <= 1 / k + 1e-4 for layers in run.moe.values() for stats in layers.values())
    for command in (["summary"], ["summary", "--md"], ["compare", "--md", "--target", "99"]):
        assert logger.main([*command, str(path)]) == 0
    return run


# -----------------------------------------------------------------------------
# Parsing

def test_parses_every_field_of_a_train_gpt_log():
    path = FIXTURES / "moe_e8k2.txt"
    run = logger.parse_log(path)
    text = path.read_text()
    assert run.run_id == "6f1c2d9e-moe-e8k2" and run.date == "2026-11-22T08:15:02" and run.gpus == 1
    assert run.code_sha == hashlib.sha256(text[:text.index("\n" + BAR)].encode()).hexdigest()[:12]
    assert (run.config["num_experts"], run.config["top_k"], run.config["router"]) == (8, 2, "softmax")
    assert run.tokens_per_step == 49152
    # the step line quoted in the embedded source is code, not a result
    assert [(p.step, p.time_ms, p.loss) for p in run.val] == [
        (0, 0, 10.8258), (100, 10947, 4.6549), (200, 21990, 4.3112), (300, 33080, 4.1420), (400, 44150, 4.0505)]
    assert (run.last_step, run.num_iterations, run.train_time_ms, run.step_avg_ms) == (400, 400, 44150, 110.38)
    assert sorted(run.moe) == [100, 200, 300, 400] and sorted(run.moe[400]) == [0, 1]
    assert run.moe[400][0] == {"load_max": 1.53, "load_min": 0.402, "entropy": 1.9, "aux": 0.0123, "zloss": 0.0012,
                               "dropped": 0.0, "gate_min": 0.312}
    assert run.peak_mib == 30822 and run.complete


def test_a_run_that_died_mid_line_is_read_up_to_its_last_whole_line():
    run = logger.parse_log(FIXTURES / "moe_e8k2_died.txt")
    assert not run.complete and run.peak_mib is None
    assert (run.last_step, run.train_time_ms, run.final_loss) == (250, 27625, 4.3112)


def test_a_gpu_run_without_the_peak_memory_line_is_incomplete(tmp_path):
    run = logger.parse_log(write_log(tmp_path / "r.txt", [(0, 0, 10.8), (800, 9e4, 3.3)], 800, complete=False,
                                     device="NVIDIA H100 80GB HBM3"))
    assert run.val[-1].step == run.num_iterations and not run.complete


def test_a_cpu_run_ends_at_its_final_validation(tmp_path):
    # the trainer writes no peak memory line on the CPU
    done = logger.parse_log(write_log(tmp_path / "a.txt", [(0, 0, 10.8), (800, 9e4, 3.3)], 800, complete=False))
    died = logger.parse_log(write_log(tmp_path / "b.txt", [(0, 0, 10.8), (400, 4e4, 3.9)], 800, complete=False))
    assert done.complete and not died.complete


def test_plain_modded_nanogpt_log():
    run = logger.parse_log(FIXTURES / "modded_nanogpt.txt")
    assert (run.run_id, run.config, run.tokens_per_step) == ("modded_nanogpt", None, None)
    assert run.gpus == 8, "counted from the nvidia-smi block"
    assert run.date == "2024-11-16T01:23:45", "taken from the nvidia-smi block"
    assert (run.num_iterations, run.final_loss, run.train_time_ms, run.peak_mib) == (1770, 3.2784, 203512, 22135)
    assert run.complete and not run.moe


def test_folders_and_globs_expand_to_their_logs(tmp_path):
    write_log(tmp_path / "a" / "x.txt", [(0, 0, 10.0)], 10)
    write_log(tmp_path / "a" / "deep" / "y.txt", [(0, 0, 10.0)], 10)
    (tmp_path / "a" / "notes.md").write_text("not a log")
    assert [p.name for p in logger.expand([str(tmp_path / "a")])] == ["y.txt", "x.txt"]
    assert [p.name for p in logger.expand([str(tmp_path / "a" / "*.txt"), str(tmp_path / "a" / "x.txt")])] == ["x.txt"]


# -----------------------------------------------------------------------------
# summary

def test_summary_has_one_row_per_run_with_the_key_figures(capsys):
    code, out, _ = run_cli(capsys, "summary", FIXTURES)
    header, rule, *rows = out.splitlines()
    assert code == 0 and header.split()[:3] == ["run", "date", "code"] and set(rule) == {"-", " "} and len(rows) == 3
    code, md, _ = run_cli(capsys, "summary", "--md", FIXTURES)
    header, rule, *rows = md.splitlines()
    assert rule.count("|") == header.count("|") and all(row.count("|") == header.count("|") for row in rows)
    columns = [c.strip() for c in header.strip("|").split("|")]
    moe = dict(zip(columns, table_row(md, "6f1c2d9e-moe-e8k2")))
    assert moe["code"] == logger.parse_log(FIXTURES / "moe_e8k2.txt").code_sha
    assert [moe[c] for c in ("experts", "top_k", "router", "gpus")] == ["8", "2", "softmax", "1"]
    assert moe["tokens/step"] == "49,152"
    assert [moe[c] for c in ("steps", "val loss", "train time [s]")] == ["400/400", "4.0505", "44.1"]
    assert moe["step avg [ms]"] == "110.38"
    assert moe["tok/s/gpu"] == f"{49152 / 0.11038:,.0f}"
    assert (moe["peak mem [MiB]"], moe["load max/min"], moe["status"]) == ("30822", "1.53/0.40", "complete")
    assert moe["gate min"] == "0.312", "the smaller of the two layers' gate_min at step 400"
    died = dict(zip(columns, table_row(md, "81aa07c3-moe-e8k2-died")))
    assert (died["steps"], died["status"], died["peak mem [MiB]"]) == ("250/400", "incomplete", "-")
    assert died["gate min"] == "-", "logs from before gate_min have none"
    modded = dict(zip(columns, table_row(md, "modded_nanogpt")))
    assert [modded[c] for c in ("tokens/step", "experts", "gpus", "date")] == ["-", "-", "8", "2024-11-16 01:23"]


def test_summary_shows_a_layers_nan_as_nan(tmp_path, capsys):
    # layer 1 logged NaN at the last validation: min and max skipped it, and the row showed layer 0's 0.312
    text = (FIXTURES / "moe_e8k2.txt").read_text()
    line = next(line for line in text.splitlines() if line.startswith("moe step:400 layer:1 "))
    nan = line.replace("load_max:1.102", "load_max:nan").replace("gate_min:0.4210", "gate_min:nan")
    (tmp_path / "moe.txt").write_text(text.replace(line, nan))
    code, md, _ = run_cli(capsys, "summary", "--md", tmp_path)
    header = md.splitlines()[0]
    row = dict(zip([c.strip() for c in header.strip("|").split("|")], table_row(md, "6f1c2d9e-moe-e8k2")))
    assert code == 0 and (row["load max/min"], row["gate min"]) == ("nan/0.40", "nan"), row


@pytest.mark.parametrize("command", ["compare", "summary"])
def test_a_reader_that_leaves_early_is_no_error(command):
    # logger.py compare logs | head -2 printed a BrokenPipeError traceback; here the reader is gone before any output
    read, write = os.pipe()
    os.close(read)
    r = subprocess.run([sys.executable, str(ROOT / "logger.py"), command, str(FIXTURES)], stdout=write,
                       stderr=subprocess.PIPE, text=True, timeout=60)
    os.close(write)
    assert r.returncode == 1 and r.stderr == "", r.stderr


def test_summary_of_dense_runs_has_no_expert_columns(tmp_path, capsys):
    dense = write_log(tmp_path / "dense.txt", [(0, 0, 10.8), (10, 900, 6.0)], 10)
    moe = write_log(tmp_path / "moe.txt", [(0, 0, 10.8), (10, 900, 5.9)], 10, {"num_experts": 8, "top_k": 1})
    _, md, _ = run_cli(capsys, "summary", "--md", dense)
    assert md.splitlines()[0].strip("| ").split(" | ") == [
        "run", "date", "code", "gpus", "tokens/step", "steps", "val loss", "train time [s]", "step avg [ms]",
        "tok/s/gpu", "peak mem [MiB]", "status"]
    _, md, _ = run_cli(capsys, "summary", "--md", dense, moe)
    columns = md.splitlines()[0].strip("| ").split(" | ")
    rows = {name: dict(zip(columns, table_row(md, name))) for name in ("dense", "moe")}
    assert [rows["dense"][c] for c in ("experts", "top_k", "router")] == ["0", "-", "-"]
    assert [rows["moe"][c] for c in ("experts", "top_k", "router")] == ["8", "1", "softmax"]


# -----------------------------------------------------------------------------
# compare: statistics and time to target

def test_one_sided_p_value_matches_scipy(tmp_path, capsys):
    expected = stats.ttest_1samp(ACCS, 3.28, alternative="less").pvalue
    assert expected == pytest.approx(0.105089, abs=1e-6)  # what the speedrun's README snippet prints for these
    assert logger.p_below(ACCS, 3.28) == pytest.approx(expected, rel=1e-12)
    write_final_losses(tmp_path, "run", ACCS)
    code, out, _ = run_cli(capsys, "compare", "--md", "--target", "3.28", tmp_path)
    row = table_row(out, "same config")
    assert code == 0 and row[1] == "10"
    assert row[2] == f"{statistics.mean(ACCS):.4f} ± {statistics.stdev(ACCS):.4f}"
    assert row[4] == f"{expected:.4f}"


def test_welch_p_value_matches_the_formula(tmp_path, capsys):
    base, new = [3.2806, 3.2771, 3.2829, 3.2813, 3.2789], [3.2750, 3.2761, 3.2744, 3.2770, 3.2755]
    va, vb = statistics.variance(base) / len(base), statistics.variance(new) / len(new)
    t = (statistics.mean(new) - statistics.mean(base)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(base) - 1) + vb ** 2 / (len(new) - 1))  # Welch-Satterthwaite
    expected = 2 * stats.t.sf(abs(t), df)
    assert expected == pytest.approx(0.0070087, abs=1e-7)
    assert logger.welch_p(new, base) == pytest.approx(expected, rel=1e-9)
    write_final_losses(tmp_path, "base", base, time_ms=90000)
    write_final_losses(tmp_path, "new", new, time_ms=88000)
    code, out, _ = run_cli(capsys, "compare", "--md", "--pattern", r"(base|new)_seed", tmp_path)
    assert code == 0
    assert table_row(out, "base")[-2:] == ["baseline", "baseline"]
    assert table_row(out, "new")[-2] == f"{expected:.4f}"


def test_groups_by_config_ignore_the_seed_and_are_named_by_what_differs(tmp_path, capsys):
    for seed in range(2):
        write_log(tmp_path / f"dense{seed}.txt", [(0, 0, 10.8), (800, 9e4 + seed, 3.30 + seed / 100)], 800,
                  {"seed": seed})
        write_log(tmp_path / f"moe{seed}.txt", [(0, 0, 10.8), (800, 8e4 + seed, 3.28 + seed / 100)], 800,
                  {"seed": seed, "num_experts": 8})
    code, out, _ = run_cli(capsys, "compare", "--md", tmp_path)
    assert code == 0
    assert table_row(out, "num_experts=0")[1:3] == ["2", "3.3050 ± 0.0071"]
    assert table_row(out, "num_experts=8")[1:3] == ["2", "3.2850 ± 0.0071"]
    code, out, _ = run_cli(capsys, "compare", "--md", "--split", "seed", tmp_path)
    assert table_row(out, "num_experts=0 seed=0")[1] == "1"
    # --ignore adds to the keys that never split groups: the seeds stay merged (it used to replace them)
    code, out, _ = run_cli(capsys, "compare", "--md", "--ignore", "num_experts", tmp_path)
    rows = [line for line in out.splitlines() if line.startswith("| ") and "±" in line]
    assert len(rows) == 1 and rows[0].split("|")[2].strip() == "4"


def test_runs_differing_only_in_run_id_and_paths_share_a_group(tmp_path, capsys):
    for i in range(2):
        write_log(tmp_path / f"r{i}.txt", [(0, 0, 10.8), (800, 9e4, 3.30 + i / 100)], 800,
                  {"run_id": f"r{i}", "log_dir": f"logs{i}", "checkpoint_dir": f"ck{i}"})
    code, out, _ = run_cli(capsys, "compare", "--md", tmp_path)
    assert code == 0
    assert table_row(out, "same config")[1:3] == ["2", "3.3050 ± 0.0071"]


def test_incomplete_runs_are_listed_but_left_out_of_the_statistics(capsys):
    code, out, _ = run_cli(capsys, "compare", "--md", "--by", "folder", FIXTURES)
    assert code == 0
    assert table_row(out, FIXTURES.as_posix())[1] == "2 (+1 incomplete)"
    assert table_row(out, "81aa07c3-moe-e8k2-died", column=1)[2:4] == ["incomplete", "250/400"]


def test_time_to_target_interpolates_the_first_crossing(tmp_path):
    run = logger.parse_log(write_log(tmp_path / "r.txt", [(0, 0, 10.0), (100, 10000, 3.4), (200, 20000, 3.6),
                                                           (300, 30000, 3.0)], 300))
    fraction = (10.0 - 3.5) / (10.0 - 3.4)
    assert logger.time_to_target(run, 3.5) == pytest.approx((10000 * fraction, 100 * fraction))
    assert logger.time_to_target(run, 3.4) == (10000, 100)
    assert logger.time_to_target(run, 3.2) == pytest.approx((20000 + 10000 * 2 / 3, 200 + 100 * 2 / 3))
    assert logger.time_to_target(run, 2.9) is None


def test_compare_prints_time_and_step_to_target_per_run(tmp_path, capsys):
    write_log(tmp_path / "fast.txt", [(0, 0, 10.0), (100, 10000, 4.0), (200, 20000, 3.0)], 200)
    write_log(tmp_path / "never.txt", [(0, 0, 10.0), (100, 10000, 4.0), (200, 20000, 3.6)], 200)
    code, out, _ = run_cli(capsys, "compare", "--md", "--by", "code", "--target", "3.5", tmp_path)
    assert code == 0
    assert table_row(out, "code 0123456789ab")[5:7] == ["1/2", "15.00"]
    assert table_row(out, "fast", column=1)[-2:] == ["15.00", "150.0"]
    assert table_row(out, "never", column=1)[2:] == ["complete", "200/200", "3.6000", "20.00", "-", "-"]


# -----------------------------------------------------------------------------
# fewest: the fewest steps to dense's loss

DENSE = [4.0550, 4.0570, 4.0530]
MOE = {"num_experts": 32, "top_k": 4, "shared_experts": 1}


def write_step_runs(folder: Path, name: str, steps: int, losses: list[float], ms_per_step: float,
                    config: dict | None = None) -> list[Path]:
    # runs of NUM_ITERATIONS=steps; run i ends at steps x ms_per_step + 50 i ms (timings vary, as real ones do)
    return [write_log(folder / f"{name}_{steps}_seed{i}.txt",
                      [(0, 0, 10.8258), (steps // 2, steps * ms_per_step / 2, 4.3),
                       (steps, steps * ms_per_step + 50 * i, loss)], steps, {"seed": i, **(config or {})})
            for i, loss in enumerate(losses)]


def one_sided_welch(a: list[float], b: list[float]) -> float:
    # P(T <= t) for Welch's t of mean(a) - mean(b) with the Welch-Satterthwaite degrees of freedom
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.mean(a) - statistics.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return stats.t.cdf(t, df)


def md_section(markdown: str, title: str) -> str:
    # from the '### title...' heading to the next heading
    start = markdown.index(f"### {title}")
    end = markdown.find("\n### ", start)
    return markdown[start:end if end >= 0 else len(markdown)]


def fewest_logs(folder: Path) -> Path:
    # dense: 3 runs of 800 steps at 90 ms; MoE E32 at 110 ms a step: 640 and 660 (by 0.001) miss; 680 reaches by one
    # run (a lead);
    # 690 reaches by the mean of 3 but not significantly; 695 significantly but with 2 runs; 700 is the record
    write_step_runs(folder, "dense", 800, DENSE, 90)
    for steps, losses in [(640, [4.079, 4.081, 4.080]), (660, [4.0560]), (680, [4.053]), (690, [4.040, 4.066, 4.055]),
                          (695, [4.0460, 4.0470]), (700, [4.047, 4.049, 4.046]), (760, [4.040, 4.042, 4.041])]:
        write_step_runs(folder, "moe", steps, losses, 110, MOE)
    return folder


def test_one_sided_welch_p_value_matches_the_formula():
    moe = [4.047, 4.049, 4.046]
    expected = one_sided_welch(moe, DENSE)
    assert expected == pytest.approx(0.0037186, abs=1e-7)
    assert logger.welch_p(moe, DENSE, "less") == pytest.approx(expected, rel=1e-9)
    assert logger.welch_p(DENSE, moe, "less") == pytest.approx(1 - expected, rel=1e-9)


def test_fewest_finds_the_record_and_the_lead(tmp_path, capsys):
    code, out, err = run_cli(capsys, "fewest", "--md", fewest_logs(tmp_path))
    assert code == 0, err
    target, dense_s = statistics.mean(DENSE), statistics.mean(800 * 0.09 + 0.05 * i for i in range(3))
    assert f"target: {target:.4f}, the mean final val loss of 3 dense runs of 800 steps" in out
    rows = {steps: table_row(out, str(steps)) for steps in (640, 660, 680, 690, 695, 700, 760)}
    moe_700 = [4.047, 4.049, 4.046]
    time_700 = statistics.mean(700 * 0.11 + 0.05 * i for i in range(3))
    assert rows[700][1:] == ["3", f"{statistics.mean(moe_700):.4f} ± {statistics.stdev(moe_700):.4f}",
                             f"{one_sided_welch(moe_700, DENSE):.4f}", "yes", "77.05 ± 0.05", "0.875",
                             f"{time_700 / dense_s:.3f}"]
    assert rows[640][4] == rows[660][4] == "no" and rows[680][1:5] == ["1", "4.0530", "-", "yes"]
    assert float(rows[690][3]) > 0.05 and rows[690][4] == "yes", "reached by the mean, not significantly"
    assert float(rows[695][3]) < 0.05 and rows[695][1] == "2", "significant, but with 2 runs"
    assert (f"fewest steps to {target:.4f}: **700** (3 runs, p = {one_sided_welch(moe_700, DENSE):.4f}): "
            f"0.875x dense's steps, {time_700 / dense_s:.3f}x its train time.") in out
    assert (f"fewest steps whose mean reaches it: 680 (1 run, a lead): 0.850x dense's steps, "
            f"{680 * 0.11 / dense_s:.3f}x its train time.") in out
    assert "### MoE E32 top-4 + 1 shared" in out


def test_fewest_split_by_seed_splits_the_candidates_not_the_target(tmp_path, capsys):
    # the dense runs of bench/fewest_steps.sh have seeds 0..2: --split seed refused them as runs of two configs
    code, out, err = run_cli(capsys, "fewest", "--md", "--split", "seed", fewest_logs(tmp_path))
    assert code == 0, err
    assert f"target: {statistics.mean(DENSE):.4f}, the mean final val loss of 3 dense runs" in out
    assert "seed=0" in out and "seed=2" in out  # the MoE runs are grouped by seed
    assert table_row(out, "700")[1] == "1"


@pytest.mark.parametrize("command, flag, key, hint", [("fewest", "--split", "sead", "did you mean seed?"),
                                                      ("compare", "--ignore", "bogus_knob", "the keys are those")])
def test_a_key_no_run_has_is_refused(tmp_path, capsys, command, flag, key, hint):
    # a misspelt --split printed the unsplit groups and exited 0
    code, out, err = run_cli(capsys, command, flag, key, fewest_logs(tmp_path))
    assert code == 2 and out == ""
    assert err.startswith(f"logger.py: error: {flag} {key} is not a config key of these runs") and hint in err


def test_fewest_groups_configs_and_leaves_incomplete_runs_out(tmp_path, capsys):
    write_step_runs(tmp_path, "dense", 800, DENSE, 90)
    write_step_runs(tmp_path, "e8", 700, [4.070, 4.072, 4.071], 100, {"num_experts": 8, "top_k": 1})
    write_step_runs(tmp_path, "e32", 700, [4.047, 4.049, 4.046], 110, MOE)
    write_log(tmp_path / "e32_700_died.txt", [(0, 0, 10.8), (350, 38500, 4.3)], 700, {"seed": 9, **MOE},
              complete=False)
    write_resumed_log(tmp_path / "e32_700_resumed.txt", 350, None, [(350, 0, 4.3), (700, 38000, 4.0)], 700)
    resumed = tmp_path / "e32_700_resumed.txt"
    resumed.write_text(resumed.read_text().replace('"num_experts": 0, "top_k": 2',
                                                   '"num_experts": 32, "top_k": 4, "shared_experts": 1'))
    code, out, err = run_cli(capsys, "fewest", "--md", tmp_path)
    assert code == 0, err
    e8, e32 = (md_section(out, title) for title in ("MoE E8 top-1 (", "MoE E32 top-4 + 1 shared ("))
    assert table_row(e8, "700")[1:3] == ["3", "4.0710 ± 0.0010"] and table_row(e8, "700")[4] == "no"
    assert float(table_row(e8, "700")[3]) > 0.99
    assert "no step count reaches 4.0550 with >= 3 runs and p < 0.05" in e8
    assert table_row(e32, "700")[1:3] == ["3 (+1 incomplete, +1 partial)", "4.0473 ± 0.0015"]
    assert "fewest steps to 4.0550: **700**" in e32


def test_fewest_takes_the_reference_it_is_given(tmp_path, capsys):
    # the reference may be any runs, an MoE too; a dense run outside it is a candidate like any other
    write_step_runs(tmp_path / "ref", "e8", 800, DENSE, 100, {"num_experts": 8, "top_k": 1})
    write_step_runs(tmp_path / "runs", "dense", 700, [4.050, 4.052, 4.051], 90)
    code, out, err = run_cli(capsys, "fewest", "--md", "--reference", tmp_path / "ref", tmp_path)
    assert code == 0, err
    assert "3 dense runs of 800 steps" in out and "### dense" in out
    assert table_row(out, "700")[1:2] + table_row(out, "700")[4:5] == ["3", "yes"]


@pytest.mark.parametrize("dense, other, message", [
    (DENSE[:2], None, "the target needs the final val loss of >= 3 complete dense runs, found 2"),
    (DENSE[:2], ("short", 700, {}), "the dense runs have different lengths (NUM_ITERATIONS 800 in"),
    (DENSE[:2], ("other", 800, {"val_tokens": 262144}), "differ (val_tokens None vs 262144)"),
    (DENSE, ("wide", 700, {**MOE, "train_batch_tokens": 98304}),
     "runs another benchmark than the dense runs (train_batch_tokens 98304 vs 49152)"),
])
def test_fewest_refuses_a_target_it_cannot_trust(tmp_path, capsys, dense, other, message):
    write_step_runs(tmp_path, "dense", 800, dense, 90)
    write_step_runs(tmp_path, "moe", 700, [4.05], 110, MOE)
    if other:
        write_step_runs(tmp_path, other[0], other[1], [4.06], 90, other[2])
    code, out, err = run_cli(capsys, "fewest", tmp_path)
    assert code == 2 and out == "" and err.startswith("logger.py: error: ") and message in err, err


def test_fewest_target_is_the_mean_of_the_complete_dense_runs(tmp_path, capsys):
    # skewed dense losses (mean 4.0570, median 4.0510) and a dense run that died early, which must not count
    dense = [4.050, 4.051, 4.070]
    write_step_runs(tmp_path, "dense", 800, dense, 90)
    write_log(tmp_path / "dense_800_died.txt", [(0, 0, 10.8), (400, 36000, 4.0)], 800, {"seed": 9}, complete=False)
    write_step_runs(tmp_path, "moe", 700, [4.054, 4.055, 4.056], 110, MOE)
    code, out, err = run_cli(capsys, "fewest", "--md", tmp_path)
    assert code == 0, err
    assert f"target: {statistics.mean(dense):.4f}, the mean final val loss of 3 dense runs of 800 steps" in out
    assert table_row(out, "700")[4] == "yes"  # 4.0550 is below the mean, above the median


def test_fewest_without_candidates_says_what_to_pass(tmp_path, capsys):
    write_step_runs(tmp_path, "dense", 800, DENSE, 90)
    code, out, err = run_cli(capsys, "fewest", tmp_path)
    assert code == 2 and out == "" and "no runs to set against the dense ones: pass the MoE logs" in err


# -----------------------------------------------------------------------------
# plot

def test_plots_are_valid_pngs(tmp_path, capsys):
    import matplotlib.image
    code, out, _ = run_cli(capsys, "plot", "--target", "4.1", "--out-dir", tmp_path, FIXTURES)
    assert code == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["expert_load_6f1c2d9e-moe-e8k2.png", "expert_load_81aa07c3-moe-e8k2-died.png",
                     "val_loss_vs_step.png", "val_loss_vs_time.png"]
    for path in tmp_path.iterdir():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 400 and width > 600
        assert str(path) in out


@pytest.mark.parametrize("out_dir", ["/proc/x/plots", "file"])
def test_plot_names_an_out_dir_it_cannot_make(tmp_path, capsys, out_dir):
    # a traceback before (FileNotFoundError, or FileExistsError when a file is given as the folder)
    (tmp_path / "file").write_text("not a folder")
    out_dir = tmp_path / out_dir
    code, out, err = run_cli(capsys, "plot", "--out-dir", out_dir, FIXTURES)
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith(f"logger.py: error: --out-dir {out_dir}: cannot create it"), err


def test_points_beyond_the_view_are_marked_and_steps_are_whole(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [logger.parse_log(write_log(tmp_path / "r.txt", [(0, 0, 10.83), (5, 500, 6.1), (10, 1000, 5.2)], 10))]
    fig, ax = plt.subplots()
    logger.draw_val_loss(ax, runs, "step", None)
    fig.canvas.draw()
    low, high = ax.get_ylim()
    assert low < 5.2 and 6.1 < high < 10.83, "the view starts after step 0"
    arrows = [line for line in ax.get_lines() if line.get_marker() == "^"]
    assert [(list(a.get_xdata()), list(a.get_ydata())) for a in arrows] == [([0], [high])]
    assert [text.get_text() for text in ax.texts] == ["10.83"]
    ticks = [t for t in ax.get_xticks() if 0 <= t <= 10]
    assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks), ticks
    plt.close(fig)


# -----------------------------------------------------------------------------
# records

RECORD_README = "# MoE 8 experts, top-2\n\nSwap the MLP for 8 experts, top-2.\n\n## Why\nBecause.\n"


def make_records(root: Path) -> Path:
    records = root / "records"
    baseline = records / "8xH100_FineWeb" / "2024-11-16_Baseline"
    baseline.mkdir(parents=True)
    shutil.copy(FIXTURES / "modded_nanogpt.txt", baseline)
    (baseline / "README.md").write_text("# Baseline\n")
    moe = records / "1xH100_wikiblogs_mini" / "2026-11-22_MoE8Top2"
    write_final_losses(moe, "run", [4.02, 4.04], time_ms=60000, config={"num_experts": 8, "top_k": 2})
    shutil.copy(FIXTURES / "moe_e8k2_died.txt", moe)
    (moe / "README.md").write_text(RECORD_README)
    (moe / "statistics.md").write_text("made by logger.py compare --md\n")
    return records


def test_records_table_is_written_between_the_markers(tmp_path, capsys):
    records = make_records(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"# Project\n\n## Records\n{logger.RECORDS_START}\nstale\n{logger.RECORDS_END}\n\n## Tests\n")
    code, _, err = run_cli(capsys, "records", "--dir", records, "--write", readme)
    assert code == 0 and "moe_e8k2_died.txt is an incomplete run" in err
    text = readme.read_text()
    assert text.startswith(f"# Project\n\n## Records\n{logger.RECORDS_START}\n| track | hardware | model | time |")
    assert text.endswith(f"\n{logger.RECORDS_END}\n\n## Tests\n") and "stale" not in text
    # the died run is left out of the means: 1.001 min is the mean of the two complete runs, 60.0 s and 60.1 s
    assert table_row(text, "Swap the MLP for 8 experts, top-2.", column=5) == [
        "wikiblogs_mini", "1xH100", "MoE E8 top-2", "1.001 min", "4.0300", "Swap the MLP for 8 experts, top-2.",
        "2026-11-22", "[MoE8Top2](records/1xH100_wikiblogs_mini/2026-11-22_MoE8Top2/)"]
    assert table_row(text, "Baseline", column=5) == [
        "FineWeb", "8xH100", "dense", f"{203512 / 60000:.3f} min", "3.2784", "Baseline", "2024-11-16",
        "[Baseline](records/8xH100_FineWeb/2024-11-16_Baseline/)"]
    assert run_cli(capsys, "records", "--dir", records, "--write", readme)[0] == 0
    assert readme.read_text() == text, "regenerating is idempotent"
    code, out, _ = run_cli(capsys, "records", "--dir", records)
    assert out.strip() == text[text.index("| track"):text.index(logger.RECORDS_END)].strip()


def test_a_fewest_steps_record_on_the_h200_tracks(tmp_path, capsys):
    # the runs at the claimed step count sit at the top of the folder; the search, dense reference included, in
    # search/: the records table reads the top, fewest the whole folder (records/README.md)
    records = tmp_path / "records"
    for track, name in (("1xH200_wikiblogs_mini", "2026-11-30_MoE32Top4"), ("2xH200_wikiblogs_multi", "2026-11-30_Dense")):
        (records / track / name).mkdir(parents=True)
        (records / track / name / "README.md").write_text(f"# {name}\n\nWhat it bought.\n")
    mini = records / "1xH200_wikiblogs_mini" / "2026-11-30_MoE32Top4"
    write_step_runs(mini, "moe", 700, [4.047, 4.049, 4.046], 110, MOE)
    write_step_runs(mini / "search", "dense", 800, DENSE, 90)
    write_step_runs(mini / "search", "moe", 640, [4.079, 4.081, 4.080], 110, MOE)
    write_step_runs(records / "2xH200_wikiblogs_multi" / "2026-11-30_Dense", "dense", 2030, [3.7, 3.71], 95)
    code, out, err = run_cli(capsys, "records", "--dir", records)
    assert code == 0, err
    time_700 = statistics.mean(700 * 0.11 + 0.05 * i for i in range(3))
    assert table_row(out, "wikiblogs_mini")[:5] == ["wikiblogs_mini", "1xH200", "MoE E32 top-4 + 1 shared",
                                                    f"{time_700 / 60:.3f} min", "4.0473"]
    assert table_row(out, "wikiblogs_multi")[:5] == ["wikiblogs_multi", "2xH200", "dense",
                                                     f"{(2030 * 0.095 + 0.025) / 60:.3f} min", "3.7050"]
    code, out, err = run_cli(capsys, "fewest", "--md", mini)
    assert code == 0 and "fewest steps to 4.0550: **700** (3 runs" in out and table_row(out, "640")[4] == "no"


BASELINE = Path("8xH100_FineWeb") / "2024-11-16_Baseline"


@pytest.mark.parametrize("breakage, message", [
    (lambda records: (records / BASELINE.parent / "baseline").mkdir(), "is not named YYYY-MM-DD_ShortName"),
    (lambda records: (records / BASELINE / "README.md").unlink(), "has no README.md"),
    (lambda records: (records / BASELINE / "README.md").write_text("no title\n"), "has no '# Title' line"),
    (lambda records: (records / BASELINE / "modded_nanogpt.txt").unlink(), "holds no logs"),
    (lambda records: (records.parent / "README.md").write_text("no markers\n"), "lacks the lines"),
])
def test_records_errors_name_the_culprit(tmp_path, capsys, breakage, message):
    records = make_records(tmp_path)
    (tmp_path / "README.md").write_text(f"{logger.RECORDS_START}\n{logger.RECORDS_END}\n")
    breakage(records)
    code, out, err = run_cli(capsys, "records", "--dir", records, "--write", tmp_path / "README.md")
    assert code == 2 and message in err and out == ""


# -----------------------------------------------------------------------------
# Command line: help, errors, lazy imports

@pytest.mark.parametrize("command", ["summary", "compare", "fewest", "plot", "records"])
def test_every_subcommand_has_help(capsys, command):
    with pytest.raises(SystemExit) as exit:
        logger.main([command, "--help"])
    assert exit.value.code == 0 and f"usage: logger.py {command}" in capsys.readouterr().out


def test_a_file_that_is_not_a_training_log_exits_2_naming_it(tmp_path):
    # bad input exits 2, as argparse's usage errors and the other scripts' do
    bad = tmp_path / "notes.txt"
    bad.write_text("step one: buy GPUs\nrun: python train_gpt.py\n")
    command = [sys.executable, str(ROOT / "logger.py"), "summary", str(FIXTURES / "moe_e8k2.txt"), str(bad)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"logger.py: error: {bad} is not a training log: it has no "
                             "'step:N/M ... train_time:...ms' lines; "
                             "pass a log written by train_gpt.py or modded-nanogpt\n")


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\xff\xfe\x00", "is not a training log (it is not text)"),
    (f"code\n{BAR}\nconfig: {{\"num_iterations\": 8\nstep:0/8 val_loss:10.0 train_time:0ms\n".encode(),
     "bad.txt:3: the 'config:' line is not a valid JSON object"),
])
def test_unreadable_logs_give_the_documented_error(tmp_path, capsys, content, message):
    (tmp_path / "bad.txt").write_bytes(content)
    code, out, err = run_cli(capsys, "compare", tmp_path / "bad.txt")
    assert code == 2 and message in err and str(tmp_path / "bad.txt") in err


def test_a_folder_skips_txt_files_that_are_not_logs_and_a_named_one_is_refused(tmp_path, capsys):
    # a logs folder also holds notes: searched, they are skipped with one note line; named, refused as before
    folder = tmp_path / "logs"
    write_log(folder / "run.txt", [(0, 0, 10.8), (10, 1000, 5.2)], 10)
    (folder / "notes.txt").write_text("step one: buy GPUs\n")
    (folder / "deep").mkdir()
    (folder / "deep" / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    code, out, err = run_cli(capsys, "summary", folder)
    assert code == 0 and [line.split()[0] for line in out.splitlines()[2:]] == ["run"], out
    assert err == ("logger.py: note: skipped 2 *.txt file(s) of the folders given that are not training logs "
                   f"(first: {folder / 'deep' / 'image.txt'})\n")
    code, out, err = run_cli(capsys, "summary", folder, folder / "notes.txt")
    assert code == 2 and err.startswith(f"logger.py: error: {folder / 'notes.txt'} is not a training log: "), err
    (folder / "run.txt").unlink()
    code, out, err = run_cli(capsys, "summary", folder)
    assert code == 2 and err.startswith("logger.py: error: the folders given hold no training logs"), err


def test_missing_paths_and_empty_folders_are_errors(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert run_cli(capsys, "summary", missing)[2] == f"logger.py: error: {missing} matches no file; " \
                                                      "check the path or the glob\n"
    assert "holds no logs (*.txt)" in run_cli(capsys, "summary", tmp_path)[2]


def test_scipy_and_matplotlib_are_imported_only_when_needed():
    probe = "import logger, sys; print('scipy' in sys.modules, 'matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


# -----------------------------------------------------------------------------
# The tiny CPU run of train_gpt.py, read back

def write_shard(path: Path, tokens: np.ndarray) -> None:
    header = np.zeros(256, dtype="<i4")
    header[:3] = 20240520, 1, len(tokens)
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())


def test_tiny_cpu_run_of_the_trainer_is_read_back(tmp_path):
    rng = np.random.default_rng(0)
    for name, count in (("train.bin", 4096), ("val.bin", 1024)):
        tokens = rng.integers(0, 1000, count)
        tokens[::100] = 50256  # document boundaries
        write_shard(tmp_path / name, tokens)
    settings = dict(TRAIN_FILES=tmp_path / "train.bin", VAL_FILES=tmp_path / "val.bin", VAL_TOKENS=128, VAL_SEQ_LEN=128,
                    TRAIN_SEQ_LEN=128, TRAIN_BATCH_TOKENS=128, NUM_ITERATIONS=2, VAL_LOSS_EVERY=1, NUM_LAYERS=2,
                    MODEL_DIM=128, NUM_HEADS=2, HEAD_DIM=64, MLP_HIDDEN=256, NUM_VALUE_EMBEDS=1, NO_ATTN_LAYERS="",
                    LONG_WINDOW_LAYERS="0", WINDOW_MAX=128, NUM_EXPERTS=4, TOP_K=2, LOG_DIR=tmp_path / "logs",
                    RUN_ID="tiny-moe")
    env = {**os.environ, **{key: str(value) for key, value in settings.items()}}
    result = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    run = check_trainer_log(tmp_path / "logs" / "tiny-moe.txt")
    assert run.code_sha == hashlib.sha256((ROOT / "train_gpt.py").read_bytes()).hexdigest()[:12]
    assert [p.step for p in run.val] == [0, 1, 2] and sorted(run.moe[2]) == [0, 1]


# -----------------------------------------------------------------------------
# resumed runs and non-finite losses

def write_resumed_log(path: Path, at: int, carried_ms: float | None, val: list[tuple[int, float, float]],
                      num_iterations: int) -> Path:
    # what train_gpt.py writes when RESUME continues a run: the resume line after the config, then the val lines
    # from the resumed step on (whose times include the carried-over train time, when the checkpoint had it)
    write_log(path, val, num_iterations)
    lines = path.read_text().splitlines()
    at_config = next(i for i, line in enumerate(lines) if line.startswith("config: "))
    lines.insert(at_config + 1, f"resumed from ckpt/r/step_{at:06d}.pt at step {at}"
                 + (f" train_time:{carried_ms:.0f}ms" if carried_ms is not None else ""))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_resumed_run_without_its_earlier_time_is_partial_and_left_out_of_compare(tmp_path, capsys):
    # whole runs take 25 s; the old-style resumed log times only its last 6 of 12 steps (18.9 s)
    for seed in range(2):
        write_log(tmp_path / f"whole{seed}.txt", [(0, 0, 10.8), (6, 12000, 4.0), (12, 25000 + 100 * seed, 3.30)], 12)
    resumed = write_resumed_log(tmp_path / "resumed.txt", 6, None, [(6, 0, 4.0), (12, 18900, 3.31)], 12)
    run = logger.parse_log(resumed)
    assert (run.resumed_at, run.carried_ms, run.status, run.complete) == (6, None, "partial", False)
    code, out, _ = run_cli(capsys, "compare", "--md", "--target", "3.5", tmp_path)
    assert code == 0
    assert table_row(out, "same config")[1:4] == ["2 (+1 partial)", "3.3000 ± 0.0000", "25.05 ± 0.07"]
    assert table_row(out, "resumed", column=1)[2] == "partial"
    assert table_row(out, "resumed", column=1)[-2:] == ["-", "-"]  # the crossing's time is not in this log
    code, out, _ = run_cli(capsys, "summary", "--md", resumed)
    assert table_row(out, "resumed")[-1] == "partial"


def test_a_resumed_run_that_carries_its_time_is_a_whole_run(tmp_path, capsys):
    write_log(tmp_path / "whole.txt", [(0, 0, 10.8), (6, 12000, 4.0), (12, 25000, 3.30)], 12)
    resumed = write_resumed_log(tmp_path / "resumed.txt", 6, 12100, [(6, 12100, 4.0), (9, 18000, 3.4),
                                                                     (12, 25400, 3.30)], 12)
    run = logger.parse_log(resumed)
    assert (run.resumed_at, run.carried_ms, run.status, run.train_time_ms) == (6, 12100, "complete", 25400)
    assert logger.time_to_target(run, 3.7) == pytest.approx((12100 + 5900 * 0.5, 7.5))
    assert logger.time_to_target(run, 4.5) is None  # crossed before the resume: not in this log
    code, out, _ = run_cli(capsys, "compare", "--md", tmp_path)
    assert table_row(out, "same config")[1:4] == ["2", "3.3000 ± 0.0000", "25.20 ± 0.28"]


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_plot_draws_a_run_stopped_for_a_non_finite_val_loss(tmp_path, capsys, bad):
    # the trainer logs the non-finite validation, then stops: here at the first one after step 0
    write_log(tmp_path / "logs" / "a_bad.txt", [(0, 0, 10.8), (100, 5000, float(bad))], 200, complete=False)
    write_log(tmp_path / "logs" / "good.txt", [(0, 0, 10.8), (100, 5000, 4.5), (200, 10000, 4.0)], 200)
    code, out, err = run_cli(capsys, "plot", "--target", "4.2", "--out-dir", tmp_path / "plots", tmp_path / "logs")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["val_loss_vs_step.png", "val_loss_vs_time.png"]
