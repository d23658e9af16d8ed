#!/usr/bin/env python3
"""Compare timed training logs the way speedrunners do, and keep the records tables current.

Reads the logs train_gpt.py writes (logs/<run_id>.txt) and plain modded-nanogpt logs:

    python logger.py summary logs/
    python logger.py compare --target 3.28 records/8xH100_FineWeb/2026-11-22_MoE8/
    python logger.py fewest --md logs/fewest/
    python logger.py plot --target 3.28 --out-dir plots logs/a.txt logs/b.txt
    python logger.py records --write README.md
"""
import argparse
import difflib
import glob
import hashlib
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

# -----------------------------------------------------------------------------
# Parsing one log

SEPARATOR = re.compile(r"^={20,}\s*$")
STEP_LINE = re.compile(r"^step:(\d+)/(\d+)\s+(.*)$")
MOE_LINE = re.compile(r"^moe\s+(.*)$")
JSON_LINE = re.compile(r"^(run|config):\s+(\{.*)$")
PEAK_LINE = re.compile(r"^peak memory (?:allocated|consumption):\s+(\d+) MiB")
# a run continued from a checkpoint; train_time is what the checkpoint carried over (absent in older logs)
RESUME_LINE = re.compile(r"^resumed from .+ at step (\d+)(?: train_time:(\d+(?:\.\d*)?)ms)?\s*$")
FIELD = re.compile(r"(\w+):(\S+)")
# config keys that name or place a run without changing what it computes: they never split groups
RUN_KEYS = "seed,run_id,log_dir,checkpoint_dir,save_every,save_checkpoint,resume,profile_steps"
# nvidia-smi prints the date ("Sat Nov 16 01:23:45 2024") and one row per GPU ("|   0  NVIDIA H100 ...")
SMI_DATE = re.compile(r"^\w{3} \w{3} +\d{1,2} \d\d:\d\d:\d\d \d{4}\s*$")
SMI_GPU = re.compile(r"^\|\s+(\d+)\s+NVIDIA ")


class LogError(Exception):
    pass


class NotALog(LogError):
    # a file that is no training log at all (not text, no step lines): skipped in a folder, refused when named
    pass


@dataclass
class ValPoint:
    step: int
    time_ms: float
    loss: float


@dataclass
class Run:
    path: Path
    run_id: str
    date: str | None
    code_sha: str | None
    config: dict | None
    gpus: int | None
    device: str | None
    num_iterations: int | None
    last_step: int
    train_time_ms: float
    step_avg_ms: float
    val: list[ValPoint]
    moe: dict[int, dict[int, dict[str, float]]]  # step -> layer -> {"load_max": ..., ...}
    peak_mib: int | None
    resumed_at: int | None = None  # the step a RESUME continued from
    carried_ms: float | None = None  # the train time before it, when the log records it

    @property
    def partial(self) -> bool:
        # resumed without the earlier train time: its times cover only the steps after the resume
        return self.resumed_at is not None and self.carried_ms is None

    @property
    def complete(self) -> bool:
        # a GPU run's last line is its peak memory; a CPU run has none, so its final validation ends it
        ended = self.peak_mib is not None or self.device == "cpu"
        return bool(self.val) and self.val[-1].step == self.num_iterations and ended and not self.partial

    @property
    def status(self) -> str:
        return "partial" if self.partial else "complete" if self.complete else "incomplete"

    @property
    def has_experts(self) -> bool:
        return bool((self.config or {}).get("num_experts"))

    @property
    def final_loss(self) -> float | None:
        return self.val[-1].loss if self.val else None

    @property
    def tokens_per_step(self) -> int | None:
        return (self.config or {}).get("train_batch_tokens")


def milliseconds(text: str) -> float | None:
    # a value without its "ms" suffix was cut off by a crash mid-line
    if not text.endswith("ms"):
        return None
    try:
        return float(text[:-2])
    except ValueError:
        return None


def parse_log(path: Path) -> Run:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise NotALog(f"{path} is not a training log (it is not text); pass a log written by train_gpt.py")
    except OSError as error:
        raise LogError(f"cannot read {path} ({error.strerror}); check the path")
    separator = next((i for i, line in enumerate(lines) if SEPARATOR.match(line)), None)
    # the log holds print(code) then print("=" * 100), so joining the lines before the bar gives the code back
    source = "\n".join(lines[:separator]) if separator is not None else ""
    first_body_line = separator + 1 if separator is not None else 0

    info, config, val, moe = {}, None, [], {}
    last_step, train_time_ms, step_avg_ms, total_steps = None, math.nan, math.nan, None
    peak_mib, smi_date, smi_gpus = None, None, set()
    resumed_at, carried_ms = None, None
    for number, line in enumerate(lines[first_body_line:], start=first_body_line + 1):
        if match := STEP_LINE.match(line):
            fields = dict(FIELD.findall(match[3]))
            time_ms = milliseconds(fields.get("train_time", ""))
            if time_ms is None:
                continue
            step, total_steps = int(match[1]), int(match[2])
            last_step, train_time_ms = step, time_ms
            step_avg = milliseconds(fields.get("step_avg", ""))
            step_avg_ms = math.nan if step_avg is None else step_avg
            if "val_loss" in fields:
                try:
                    val.append(ValPoint(step, time_ms, float(fields["val_loss"])))
                except ValueError:
                    continue
        elif match := MOE_LINE.match(line):
            fields = dict(FIELD.findall(match[1]))
            try:
                step, layer = int(fields.pop("step")), int(fields.pop("layer"))
                moe.setdefault(step, {})[layer] = {key: float(value) for key, value in fields.items()}
            except (KeyError, ValueError):
                continue
        elif match := JSON_LINE.match(line):
            try:
                value = json.loads(match[2])
            except json.JSONDecodeError as error:
                raise LogError(f"{path}:{number}: the '{match[1]}:' line is not a valid JSON object ({error.msg}); "
                               "repair or delete that line")
            if match[1] == "run":
                info = value
            else:
                config = value
        elif match := PEAK_LINE.match(line):
            peak_mib = int(match[1])
        elif match := RESUME_LINE.match(line):
            resumed_at, carried_ms = int(match[1]), float(match[2]) if match[2] else None
        elif SMI_DATE.match(line):
            try:
                smi_date = datetime.strptime(line.strip(), "%a %b %d %H:%M:%S %Y").isoformat()
            except ValueError:
                continue
        elif match := SMI_GPU.match(line):
            smi_gpus.add(match[1])

    if last_step is None and not info:
        raise NotALog(f"{path} is not a training log: it has no 'step:N/M ... train_time:...ms' lines; "
                       "pass a log written by train_gpt.py or modded-nanogpt")
    if not math.isfinite(step_avg_ms) and last_step:
        step_avg_ms = train_time_ms / last_step
    return Run(
        path=path,
        run_id=info.get("run_id") or path.stem,
        date=info.get("date") or smi_date,
        code_sha=info.get("code_sha") or (hashlib.sha256(source.encode()).hexdigest()[:12] if source else None),
        config=config,
        gpus=info.get("world_size") or len(smi_gpus) or None,
        device=info.get("device"),
        num_iterations=(config or {}).get("num_iterations") or total_steps,
        last_step=last_step or 0,
        train_time_ms=train_time_ms,
        step_avg_ms=step_avg_ms,
        val=val,
        moe=moe,
        peak_mib=peak_mib,
        resumed_at=resumed_at,
        carried_ms=carried_ms,
    )


def expand(patterns: list[str]) -> list[Path]:
    paths = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(path.rglob("*.txt"))
            if not found:
                raise LogError(f"folder {path} holds no logs (*.txt); "
                               "pass the folder train_gpt.py writes them to (logs/)")
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(name) for name in glob.glob(pattern, recursive=True) if os.path.isfile(name))
            if not found:
                raise LogError(f"{pattern} matches no file; check the path or the glob")
        paths += [p for p in found if p not in paths]
    return paths


def note(message: str) -> None:
    print(f"logger.py: note: {message}", file=sys.stderr)


def load_runs(patterns: list[str]) -> list[Run]:
    # a folder is searched for every *.txt, notes and READMEs included: those are skipped, a file named is refused
    named = set(expand([pattern for pattern in patterns if not Path(pattern).is_dir()]))
    runs, skipped = [], []
    for path in expand(patterns):
        try:
            runs.append(parse_log(path))
        except NotALog:
            if path in named:
                raise
            skipped.append(path)
    if skipped and not runs:
        raise LogError(f"the folders given hold no training logs, only other *.txt files such as {skipped[0]}; "
                       "pass the folder train_gpt.py writes them to (logs/)")
    if skipped:
        note(f"skipped {len(skipped)} *.txt file(s) of the folders given that are not training logs "
             f"(first: {skipped[0]})")
    return runs


# -----------------------------------------------------------------------------
# Tables

def fmt(value, spec: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def fmt_p(p: float | None) -> str:
    if p is None or not math.isfinite(p):
        return "-"
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def fmt_mean_std(values: list[float], spec: str) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def render(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    else:
        widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                 for row in [header, ["-" * width for width in widths], *rows]]
    return "\n".join(lines)


def heading(title: str, markdown: bool) -> str:
    return f"### {title}" if markdown else f"{title}\n{'=' * len(title)}"


# -----------------------------------------------------------------------------
# summary

def final_layers(run: Run) -> list[dict[str, float]]:
    # the per-layer MoE statistics of the last validation (none for a dense run)
    return list(run.moe[max(run.moe)].values()) if run.moe else []


def nan_aware(pick, values: list[float]) -> float:
    # min and max skip a NaN or return it depending on where it falls; a layer that logged one shows as nan
    return math.nan if any(math.isnan(v) for v in values) else pick(values)


def final_balance(run: Run) -> str:
    layers = final_layers(run)
    if not layers:
        return "-"
    busiest = nan_aware(max, [layer.get("load_max", math.nan) for layer in layers])
    idlest = nan_aware(min, [layer.get("load_min", math.nan) for layer in layers])
    return f"{busiest:.2f}/{idlest:.2f}"


def final_gate_min(run: Run) -> str:
    # the smallest per-layer gate_min at the last validation: near 0 means some layer's top-k acts as top-1
    values = [layer["gate_min"] for layer in final_layers(run) if "gate_min" in layer]
    return f"{nan_aware(min, values):.3f}" if values else "-"


MOE_COLUMNS = ("experts", "top_k", "router", "load max/min", "gate min")


def summary_table(runs: list[Run], markdown: bool) -> str:
    header = ["run", "date", "code", "experts", "top_k", "router", "gpus", "tokens/step", "steps", "val loss",
              "train time [s]", "step avg [ms]", "tok/s/gpu", "peak mem [MiB]", "load max/min", "gate min", "status"]
    rows = []
    for run in runs:
        config = run.config or {}
        tokens_per_gpu_s = None
        if run.tokens_per_step and run.gpus and run.step_avg_ms > 0:
            tokens_per_gpu_s = run.tokens_per_step / (run.step_avg_ms / 1000) / run.gpus
        rows.append([
            run.run_id,
            run.date[:16].replace("T", " ") if run.date else "-",
            run.code_sha or "-",
            fmt(config.get("num_experts")),
            fmt(config.get("top_k")) if run.has_experts else "-",  # a dense run has no router: its top_k means nothing
            fmt(config.get("router")) if run.has_experts else "-",
            fmt(run.gpus),
            fmt(run.tokens_per_step, ","),
            f"{run.last_step}/{fmt(run.num_iterations)}",
            fmt(run.final_loss, ".4f"),
            fmt(run.train_time_ms / 1000, ".1f"),
            fmt(run.step_avg_ms, ".2f"),
            fmt(tokens_per_gpu_s, ",.0f"),
            fmt(run.peak_mib),
            final_balance(run),
            final_gate_min(run),
            run.status,
        ])
    if not any(run.has_experts for run in runs):
        keep = [i for i, name in enumerate(header) if name not in MOE_COLUMNS]
        header, rows = [header[i] for i in keep], [[row[i] for i in keep] for row in rows]
    return render(header, rows, markdown)


# -----------------------------------------------------------------------------
# compare

def time_to_target(run: Run, target: float) -> tuple[float, float] | None:
    # linear interpolation between the two val points that bracket the first crossing: (train time ms, step);
    # a partial run's times leave out the train time before its resume, so it has none
    if run.partial:
        return None
    for i, point in enumerate(run.val):
        if point.loss <= target:
            if i == 0:
                # a resumed log starts where the run resumed: the crossing came before it, at a time not logged here
                return (point.time_ms, point.step) if run.resumed_at is None else None
            before = run.val[i - 1]
            fraction = (before.loss - target) / (before.loss - point.loss)
            return (before.time_ms + fraction * (point.time_ms - before.time_ms),
                    before.step + fraction * (point.step - before.step))
    return None


def p_below(losses: list[float], target: float) -> float | None:
    from scipy import stats
    if len(losses) < 2:
        return None
    return float(stats.ttest_1samp(losses, target, alternative="less").pvalue)


def welch_p(a: list[float], b: list[float], alternative: str = "two-sided") -> float | None:
    # Welch's t-test of mean(a) against mean(b); alternative "less": that mean(a) is below mean(b)
    from scipy import stats
    if len(a) < 2 or len(b) < 2:
        return None
    return float(stats.ttest_ind(a, b, equal_var=False, alternative=alternative).pvalue)


def runs_cell(runs: list[Run]) -> str:
    # the complete runs, which the statistics use, then the others by status: "3 (+1 incomplete)"
    left_out = [run.status for run in runs if not run.complete]
    counts = ", ".join(f"+{left_out.count(status)} {status}" for status in sorted(set(left_out)))
    complete = sum(run.complete for run in runs)
    return f"{complete} ({counts})" if left_out else str(complete)


def ignored_keys(ignore: str, split: str, runs: list[Run]) -> set[str]:
    # the config keys that do not split groups: RUN_KEYS and --ignore's, less --split's (comma-separated lists).
    # A key no run's config has is refused: a misspelt --split seemed to split and did nothing
    known = set().union(*((run.config or {}).keys() for run in runs))
    for flag, text in (("--ignore", ignore), ("--split", split)):
        unknown = sorted(key_list(text) - known)
        if unknown and known:
            close = difflib.get_close_matches(unknown[0].lower(), sorted(known), n=1)
            raise LogError(f"{flag} {unknown[0]} is not a config key of these runs"
                           + (f"; did you mean {close[0]}?" if close else "; the keys are those of a log's config line"))
    return (key_list(RUN_KEYS) | key_list(ignore)) - key_list(split)


def key_list(text: str) -> set[str]:
    # the keys of a comma-separated list (--ignore, --split, RUN_KEYS)
    return {key.strip() for key in text.split(",") if key.strip()}


def group_runs(runs: list[Run], by: str, pattern: str | None, ignore: set[str]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    if pattern is not None:
        try:
            regex = re.compile(pattern)
        except re.error as error:
            raise LogError(f"--pattern {pattern!r} is not a valid regular expression ({error}); fix it")
        for run in runs:
            match = regex.search(run.path.as_posix())
            if match is None:
                note(f"{run.path} does not match --pattern {pattern!r}; left out")
                continue
            groups.setdefault(next((group for group in match.groups() if group is not None), match[0]), []).append(run)
        if not groups:
            raise LogError(f"no log path matches --pattern {pattern!r}; check the pattern against the paths")
        return groups
    if by == "folder":
        for run in runs:
            groups.setdefault(run.path.parent.as_posix(), []).append(run)
        return groups
    if by == "code":
        for run in runs:
            groups.setdefault(f"code {run.code_sha or '-'}", []).append(run)
        return groups
    # by config: runs whose configs agree except on the ignored keys (seed, run id, paths) share a group,
    # and a group is named by the keys on which the groups differ
    reduced = [{k: v for k, v in run.config.items() if k not in ignore} if run.config is not None else None
               for run in runs]
    configs = [c for c in reduced if c is not None]
    differing = sorted(key for key in {k for c in configs for k in c}
                       if len({json.dumps(c.get(key), sort_keys=True) for c in configs}) > 1)
    for run, config in zip(runs, reduced):
        if config is None:
            label = f"code {run.code_sha or '-'}"
        else:
            label = " ".join(f"{key}={json.dumps(config.get(key))}" for key in differing) or "same config"
        groups.setdefault(label, []).append(run)
    return groups


def compare_report(groups: dict[str, list[Run]], target: float | None, markdown: bool) -> str:
    baseline = next(iter(groups))
    complete = {label: [run for run in runs if run.complete] for label, runs in groups.items()}
    losses = {label: [run.final_loss for run in runs] for label, runs in complete.items()}
    times = {label: [run.train_time_ms / 1000 for run in runs] for label, runs in complete.items()}

    header = ["group", "runs", "val loss", "train time [s]"]
    if target is not None:
        header += [f"p(loss < {target})", f"reached {target}", f"time to {target} [s]"]
    if len(groups) > 1:
        header += ["Welch p loss", "Welch p time"]
    rows = []
    for label, runs in complete.items():
        row = [label, runs_cell(groups[label]),
               fmt_mean_std(losses[label], ".4f"), fmt_mean_std(times[label], ".2f")]
        if target is not None:
            reached = [hit[0] / 1000 for hit in (time_to_target(run, target) for run in runs) if hit]
            row += [fmt_p(p_below(losses[label], target)), f"{len(reached)}/{len(runs)}", fmt_mean_std(reached, ".2f")]
        if len(groups) > 1:
            if label == baseline:
                row += ["baseline", "baseline"]
            else:
                row += [fmt_p(welch_p(losses[label], losses[baseline])), fmt_p(welch_p(times[label], times[baseline]))]
        rows.append(row)

    notes = ["Mean ± sample std over the complete runs of each group."]
    if target is not None:
        notes.append(f"p(loss < {target}): one-sided t-test that the group's mean final val loss is below {target}; "
                     f"time to {target}: train time at which val loss first reaches it, "
                     "interpolated between val points.")
    if len(groups) > 1:
        notes.append(f"Welch p: two-sided Welch t-test of the group against the baseline ({baseline}).")
    if any(not run.complete for runs in groups.values() for run in runs):
        notes.append("Incomplete runs are listed below but left out of the statistics.")
    if any(run.partial for runs in groups.values() for run in runs):
        notes.append("Partial runs were resumed from a checkpoint whose train time their log does not record: "
                     "their times cover only the steps after the resume.")

    run_header = ["group", "run", "status", "steps", "val loss", "train time [s]"]
    if target is not None:
        run_header += [f"time to {target} [s]", f"step to {target}"]
    run_rows = []
    for label, runs in groups.items():
        for run in runs:
            row = [label, run.run_id, run.status,
                   f"{run.last_step}/{fmt(run.num_iterations)}", fmt(run.final_loss, ".4f"),
                   fmt(run.train_time_ms / 1000, ".2f")]
            if target is not None:
                hit = time_to_target(run, target)
                row += [fmt(hit[0] / 1000, ".2f"), fmt(hit[1], ".1f")] if hit else ["-", "-"]
            run_rows.append(row)

    return "\n\n".join([heading("Groups", markdown), render(header, rows, markdown), "\n".join(f"- {n}" for n in notes),
                        heading("Runs", markdown), render(run_header, run_rows, markdown)])


# -----------------------------------------------------------------------------
# fewest: the fewest steps to dense's loss (shared/BENCHMARK.md, "The fewest-steps method")

MIN_REFERENCE_RUNS = 3  # the target is the mean of at least this many dense runs
RECORD_RUNS, RECORD_P = 3, 0.05  # a record: this many runs at its step count, one-sided p below this
# what makes two runs the same benchmark: the data (shard names, not their folder), the batch, the validation, the GPUs
BENCHMARK_KEYS = ("train_files", "val_files", "train_seq_len", "train_batch_tokens", "val_seq_len", "val_tokens")


def benchmark(run: Run) -> dict:
    config = run.config or {}
    bench = {key: config.get(key) for key in BENCHMARK_KEYS}
    for key in ("train_files", "val_files"):
        bench[key] = os.path.basename(bench[key]) if bench[key] else None
    return bench | {"gpus": run.gpus, "device": run.device}


def differences(a: dict, b: dict) -> str:
    return ", ".join(f"{key} {a.get(key)!r} vs {b.get(key)!r}" for key in sorted(set(a) | set(b))
                     if a.get(key) != b.get(key))


def check_reference(reference: list[Run], ignore: set[str]) -> list[Run]:
    # the complete dense runs that set the target, refused unless they are >= 3 runs of one length and one config
    complete = [run for run in reference if run.complete]
    for run in reference:
        if not run.complete:
            note(f"{run.path} is {'a partial' if run.partial else 'an incomplete'} reference run; left out of the target")
    if len(complete) < MIN_REFERENCE_RUNS:
        raise LogError(f"the target needs the final val loss of >= {MIN_REFERENCE_RUNS} complete dense runs, found "
                       f"{len(complete)}; add dense runs of the same benchmark (bench/fewest_steps.sh --dense 3) "
                       "or name them with --reference")
    lengths = sorted({run.num_iterations for run in complete})
    if len(lengths) > 1:
        raise LogError("the dense runs have different lengths (NUM_ITERATIONS " + ", ".join(
            f"{run.num_iterations} in {run.path}" for run in complete) + "); the target is the mean of runs of "
            "one length: pass only those with --reference")
    first = complete[0]
    settings = {k: v for k, v in (first.config or {}).items() if k not in ignore} | benchmark(first)
    for run in complete[1:]:
        other = {k: v for k, v in (run.config or {}).items() if k not in ignore} | benchmark(run)
        if other != settings:
            raise LogError(f"the dense runs {first.path} and {run.path} differ ({differences(settings, other)}); "
                           "the target is the mean of runs of one configuration: pass only those with --reference")
    return complete


@dataclass
class StepCount:
    steps: int
    runs: list[Run]  # every run of this NUM_ITERATIONS, complete or not
    losses: list[float]  # final val loss of the complete ones
    times: list[float]  # their train time, s
    p: float | None  # one-sided Welch t-test that their mean loss is below the dense runs'

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.losses) if self.losses else None

    @property
    def time(self) -> float | None:
        return statistics.mean(self.times) if self.times else None


def step_counts(runs: list[Run], dense_losses: list[float]) -> list[StepCount]:
    counts = []
    for steps in sorted({run.num_iterations for run in runs}):
        at = [run for run in runs if run.num_iterations == steps]
        losses = [run.final_loss for run in at if run.complete]
        counts.append(StepCount(steps, at, losses, [run.train_time_ms / 1000 for run in at if run.complete],
                                welch_p(losses, dense_losses, "less")))
    return counts


def fewest_step_count(counts: list[StepCount], target: float, record: bool) -> StepCount | None:
    # the fewest steps whose mean reaches the target; a record also needs RECORD_RUNS runs and p < RECORD_P
    for count in counts:
        if record and (len(count.losses) < RECORD_RUNS or count.p is None or not count.p < RECORD_P):
            continue
        if count.losses and count.mean <= target:
            return count
    return None


def step_count_table(counts: list[StepCount], target: float, dense_steps: int, dense_time: float,
                     markdown: bool) -> str:
    header = ["steps", "runs", "val loss", "p(loss < target)", "reached", "train time [s]", "steps / dense",
              "time / dense"]
    rows = [[str(count.steps), runs_cell(count.runs), fmt_mean_std(count.losses, ".4f"), fmt_p(count.p),
             "-" if count.mean is None else "yes" if count.mean <= target else "no",
             fmt_mean_std(count.times, ".2f"), f"{count.steps / dense_steps:.3f}",
             fmt(None if count.time is None else count.time / dense_time, ".3f")] for count in counts]
    return render(header, rows, markdown)


def fewest_verdict(counts: list[StepCount], target: float, dense_steps: int, dense_time: float) -> str:
    record, lead = fewest_step_count(counts, target, record=True), fewest_step_count(counts, target, record=False)
    if record:
        lines = [f"- fewest steps to {target:.4f}: **{record.steps}** ({len(record.losses)} runs, p = "
                 f"{fmt_p(record.p)}): {record.steps / dense_steps:.3f}x dense's steps, "
                 f"{record.time / dense_time:.3f}x its train time."]
    else:
        lines = [f"- no step count reaches {target:.4f} with >= {RECORD_RUNS} runs and p < {RECORD_P}."]
    if lead and lead is not record:
        n = len(lead.losses)
        kind = "a lead" if n < RECORD_RUNS else f"p = {fmt_p(lead.p)}, not significant"
        lines.append(f"- fewest steps whose mean reaches it: {lead.steps} ({n} run{'s' if n > 1 else ''}, {kind}): "
                     f"{lead.steps / dense_steps:.3f}x dense's steps, {lead.time / dense_time:.3f}x its train time.")
    return "\n".join(lines)


def fewest_report(reference: list[Run], candidates: list[Run], ignore: set[str], markdown: bool,
                  split: set[str] = frozenset()) -> str:
    # `split`: keys that split the candidates' groups only; the dense runs that set the target may differ in them
    dense = check_reference(reference, ignore | split)
    dense_losses = [run.final_loss for run in dense]
    target = statistics.mean(dense_losses)
    dense_time = statistics.mean(run.train_time_ms for run in dense) / 1000
    dense_steps = dense[0].num_iterations
    if not candidates:
        raise LogError("no runs to set against the dense ones: pass the MoE logs (without --reference, the logs "
                       "with experts are the candidates and the dense ones the reference)")
    for run in candidates:
        if benchmark(run) != benchmark(dense[0]):
            raise LogError(f"{run.path} runs another benchmark than the dense runs "
                           f"({differences(benchmark(run), benchmark(dense[0]))}); compare runs of one benchmark")

    out = [heading("Fewest steps to dense's loss", markdown), "\n".join([
        f"- target: {target:.4f}, the mean final val loss of {len(dense)} dense runs of {dense_steps} steps "
        f"({fmt_mean_std(dense_losses, '.4f')}), mean train time {dense_time:.2f} s.",
        "- p: one-sided Welch t-test that the mean final val loss at that step count is below the dense runs' mean "
        "(the target's own noise counted).",
        f"- A record needs >= {RECORD_RUNS} runs at its step count and p < {RECORD_P}; "
        "a step count whose mean alone reaches the target is a lead.",
        "- Mean ± sample std over complete runs; incomplete and partial runs are counted in brackets, left out."])]
    # a group is named by its model, then by the settings in which the groups differ
    groups = {model_name(runs[0]) + ("" if label == "same config" else f" ({label})"): runs
              for label, runs in group_runs(candidates, "config", None, ignore | {"num_iterations"}).items()}
    for label, runs in groups.items():
        counts = step_counts(runs, dense_losses)
        out += [heading(label, markdown), step_count_table(counts, target, dense_steps, dense_time, markdown),
                fewest_verdict(counts, target, dense_steps, dense_time)]

    listed = [("dense (target)", run) for run in reference]
    listed += [(label, run) for label, runs in groups.items() for run in sorted(runs, key=lambda r: r.num_iterations)]
    run_rows = [[label, run.run_id, run.status, f"{run.last_step}/{fmt(run.num_iterations)}",
                 fmt(run.final_loss, ".4f"), fmt(run.train_time_ms / 1000, ".2f")] for label, run in listed]
    out += [heading("Runs", markdown),
            render(["group", "run", "status", "steps", "val loss", "train time [s]"], run_rows, markdown)]
    return "\n\n".join(out)


# -----------------------------------------------------------------------------
# plot

def file_name(run_id: str) -> str:
    return re.sub(r"[^\w.-]", "_", run_id)


def draw_val_loss(ax, runs: list[Run], axis: str, target: float | None) -> None:
    # val loss of runs with a val line against axis "time" (train time, s) or "step", on a log scale
    from matplotlib.ticker import MaxNLocator, NullLocator, ScalarFormatter

    label = "train time [s]" if axis == "time" else "step"
    # a run stopped for a non-finite val loss logged it: NaN and inf have no place on the axes
    finite = [[point for point in run.val if math.isfinite(point.loss)] for run in runs]
    # the view starts at the first validation after step 0, so the differences that decide a record stay visible
    later = [point.loss for points in finite for point in points[1:]]
    top = max((points[1].loss for points in finite if len(points) > 1), default=None)
    curves = []
    for run, points in zip(runs, finite):
        xs = [point.time_ms / 1000 if axis == "time" else point.step for point in points]
        line, = ax.plot(xs, [point.loss for point in points], marker=".", linewidth=1.2,
                        label=run.run_id if run.complete else f"{run.run_id} ({run.status})")
        curves.append((xs, points, line.get_color()))
    if target is not None:
        ax.axhline(target, color="black", linestyle="--", linewidth=0.8, label=f"target {target}")
    ax.set_yscale("log")
    if top is not None:
        ax.set_ylim(min(later + ([target] if target is not None else [])) * 0.995, top * 1.02)
    low, high = ax.get_ylim()
    marked = False
    for xs, points, color in curves:  # a point beyond the view sits on its edge as an arrow, its value beside it
        for x, point in zip(xs, points):
            if low <= point.loss <= high:
                continue
            above = point.loss > high
            ax.plot(x, high if above else low, marker="^" if above else "v", color=color, clip_on=False,
                    linestyle="none", label=None if marked else "beyond the view (value written)")
            ax.annotate(f"{point.loss:.2f}", (x, high if above else low), textcoords="offset points",
                        xytext=(6, -12 if above else 4), fontsize="x-small", color=color)
            marked = True
    # plain numbers at even spacing: a narrow loss range holds no power of ten to label
    ax.yaxis.set_major_locator(MaxNLocator(10))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_locator(NullLocator())
    if axis == "step":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(label)
    ax.set_ylabel("val loss (log scale)")
    ax.set_title(f"Validation loss against {label.split(' [')[0]}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def plot_runs(runs: list[Run], out_dir: Path, target: float | None) -> list[Path]:
    plotted = [run for run in runs if run.val]
    if not plotted:
        raise LogError("none of the logs has a val_loss line yet; plot runs that reached their first validation")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LogError(f"--out-dir {out_dir}: cannot create it ({error.strerror or error}); "
                       "give --out-dir a folder you can write to") from None
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    written = []
    for axis, name in (("time", "val_loss_vs_time.png"), ("step", "val_loss_vs_step.png")):
        fig, ax = plt.subplots(figsize=(9, 5.5))
        draw_val_loss(ax, plotted, axis, target)
        fig.tight_layout()
        written.append(out_dir / name)
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    for run in runs:
        if not run.moe:
            continue
        steps = sorted(run.moe)
        layers = sorted({layer for stats in run.moe.values() for layer in stats})
        colors = plt.cm.viridis([i / max(len(layers) - 1, 1) for i in range(len(layers))])
        # two linear panels: an idle expert's load of 0 has no place on a log scale
        fig, (busiest, idlest) = plt.subplots(2, 1, sharex=True, figsize=(9, 7))
        for layer, color in zip(layers, colors):
            at = [step for step in steps if layer in run.moe[step]]
            busiest.plot(at, [run.moe[step][layer].get("load_max", math.nan) for step in at], color=color, marker=".",
                         label=f"layer {layer}")
            idlest.plot(at, [run.moe[step][layer].get("load_min", math.nan) for step in at], color=color, marker=".")
        for ax, what in ((busiest, "busiest"), (idlest, "idlest")):
            ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
            ax.set_ylabel(f"{what} expert: tokens / mean")
            ax.grid(True, alpha=0.3)
        idlest.set_ylim(0, 1.05)
        idlest.xaxis.set_major_locator(MaxNLocator(integer=True))
        idlest.set_xlabel("step")
        busiest.set_title(f"{run.run_id}: expert load per layer (1 = perfect balance)")
        busiest.legend(fontsize="small", ncol=max(1, len(layers) // 6))
        fig.tight_layout()
        written.append(out_dir / f"expert_load_{file_name(run.run_id)}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


# -----------------------------------------------------------------------------
# records

RECORD_FOLDER = re.compile(r"^(\d{4}-\d{2}-\d{2})_(\S+)$")
RECORDS_START, RECORDS_END = "<!-- records:start -->", "<!-- records:end -->"


def record_description(readme: Path) -> str:
    lines = [line.strip() for line in readme.read_text(encoding="utf-8").splitlines()]
    title_at = next((i for i, line in enumerate(lines) if line.startswith("# ")), None)
    if title_at is None:
        raise LogError(f"{readme} has no '# Title' line; start it with one naming the change")
    title = lines[title_at][2:].strip()
    return next((line for line in lines[title_at + 1:] if line and not line.startswith("#")), title)


def model_name(run: Run) -> str:
    config = run.config or {}  # a plain modded-nanogpt log has no config: the dense model
    if not config.get("num_experts"):
        return "dense"
    shared = f" + {config['shared_experts']} shared" if config.get("shared_experts") else ""
    return f"MoE E{config['num_experts']} top-{config.get('top_k')}{shared}"


def records_tables(records_dir: Path, link_base: Path) -> str:
    if not records_dir.is_dir():
        raise LogError(f"records folder {records_dir} does not exist; pass --dir with the folder holding the tracks")
    header = ["track", "hardware", "model", "time", "val loss", "description", "date", "record"]
    rows = []
    for track in sorted(path for path in records_dir.iterdir() if path.is_dir()):
        # track names start with the hardware, e.g. 8xH100_FineWeb (records/README.md)
        hardware = track.name.split("_")[0] if re.match(r"^\d+x", track.name) else "-"
        for folder in sorted(path for path in track.iterdir() if path.is_dir()):
            match = RECORD_FOLDER.match(folder.name)
            if match is None:
                raise LogError(f"{folder} is not named YYYY-MM-DD_ShortName; rename it (see records/README.md)")
            readme = folder / "README.md"
            if not readme.is_file():
                raise LogError(f"{folder} has no README.md; add one saying what changed and why")
            logs = sorted(folder.glob("*.txt"))
            if not logs:
                raise LogError(f"{folder} holds no logs (*.txt); copy the raw logs of the record's runs into it")
            runs = [parse_log(log) for log in logs]
            for run in runs:
                if not run.complete:
                    note(f"{run.path} is {'a partial' if run.partial else 'an incomplete'} run; left out of the record's means")
            complete = [run for run in runs if run.complete]
            time_min = statistics.mean(run.train_time_ms for run in complete) / 60000 if complete else None
            loss = statistics.mean(run.final_loss for run in complete) if complete else None
            link = Path(os.path.relpath(folder, link_base)).as_posix() + "/"
            rows.append([track.name.removeprefix(f"{hardware}_"), hardware, model_name((complete or runs)[0]),
                         f"{time_min:.3f} min" if complete else "-", fmt(loss, ".4f"), record_description(readme),
                         match[1], f"[{match[2]}]({link})"])
    if not rows:
        raise LogError(f"{records_dir} holds no record folders (<track>/YYYY-MM-DD_ShortName/); add one first")
    return render(header, rows, markdown=True)


def write_between_markers(path: Path, content: str) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise LogError(f"cannot read {path} ({error.strerror}); pass the README that holds the records markers")
    start, end = text.find(RECORDS_START), text.find(RECORDS_END)
    if start < 0 or end < start:
        raise LogError(f"{path} lacks the lines '{RECORDS_START}' then '{RECORDS_END}'; "
                       "add them where the records tables go")
    path.write_text(text[:start + len(RECORDS_START)] + "\n" + content + "\n" + text[end:], encoding="utf-8")


# -----------------------------------------------------------------------------
# Command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logger.py",
        description="Summarize, compare and plot training logs of train_gpt.py (and plain modded-nanogpt logs); "
                    "find the fewest steps to dense's loss; regenerate the records tables of the README.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    logs = argparse.ArgumentParser(add_help=False)
    logs.add_argument("paths", nargs="+", metavar="LOG",
                      help="log files, folders (searched recursively for *.txt, skipping those that are not logs) "
                           "or quoted globs")

    summary = commands.add_parser(
        "summary", parents=[logs], help="one row per run: config, final val loss, timing, memory, expert balance",
        description="Print one row per run: run id, date, source hash, key config, steps, final val loss, "
                    "train time, mean step time, tokens/s per GPU, peak memory, "
                    "final expert load (max/min over layers) and the smallest per-layer gate_min "
                    "(near 0: top-k acting as top-1).")
    summary.add_argument("--md", action="store_true", help="print a markdown table instead of plain text")

    compare = commands.add_parser(
        "compare", parents=[logs], help="group runs; mean ± std, t-tests, time to reach a target loss",
        description="Group runs and print mean ± std of final val loss and train time, the one-sided t-test "
                    "p-value that the mean loss is below --target, Welch's t-test of each group against the first "
                    "(the baseline, in the order the logs are given), and per run the interpolated train time and "
                    "step at which val loss first reaches --target. Incomplete runs are left out of the statistics.")
    compare.add_argument("--by", choices=["config", "code", "folder"], default="config",
                         help="group by config (all keys except --ignore), by source hash, or by folder "
                              "(default: config)")
    compare.add_argument("--pattern", metavar="REGEX",
                         help="group by what REGEX matches in each log path (its first group if it has one); "
                              "overrides --by, e.g. 'logs/(\\w+)_seed'")
    compare.add_argument("--ignore", default="", metavar="KEYS",
                         help=f"comma-separated config keys that do not split groups with --by config, besides "
                              f"{RUN_KEYS}")
    compare.add_argument("--split", default="", metavar="KEYS",
                         help="comma-separated keys of those that do split groups, e.g. seed")
    compare.add_argument("--target", type=float, metavar="LOSS", help="target val loss, e.g. 3.28")
    compare.add_argument("--md", action="store_true", help="print markdown (as in a record's statistics.md)")

    fewest = commands.add_parser(
        "fewest", parents=[logs], help="the fewest steps at which an MoE reaches dense's mean final val loss",
        description="The fewest-steps method of shared/BENCHMARK.md: the target is the mean final val loss of >= 3 "
                    "dense runs of one length (the reference: the logs without experts, or --reference); the other "
                    "logs, grouped by config except NUM_ITERATIONS and --ignore, get one row per step count: runs, "
                    "mean ± std final val loss, the one-sided Welch t-test p-value that their mean is below the "
                    "dense runs' mean, whether the mean reaches it, the train time, and both as ratios to dense's. "
                    "Then the fewest step count with >= 3 runs and p < 0.05 (a record), and the fewest whose mean "
                    "alone reaches the target (a lead). Incomplete and partial runs are left out.")
    fewest.add_argument("--reference", action="append", metavar="LOG",
                        help="the runs that set the target: a file, folder or quoted glob, repeatable; default: the "
                             "logs without experts")
    fewest.add_argument("--ignore", default="", metavar="KEYS",
                        help=f"comma-separated config keys that do not split groups, besides num_iterations and "
                             f"{RUN_KEYS}")
    fewest.add_argument("--split", default="", metavar="KEYS", help="comma-separated keys of those that do split "
                                                                     "groups, e.g. seed")
    fewest.add_argument("--md", action="store_true", help="print markdown (as in a record's statistics.md)")

    plot = commands.add_parser(
        "plot", parents=[logs], help="PNG figures of val loss and expert load",
        description="Write val_loss_vs_time.png and val_loss_vs_step.png for the runs given, and "
                    "expert_load_<run_id>.png (per-layer busiest and idlest expert over training) for each MoE run.")
    plot.add_argument("--out-dir", type=Path, default=Path("plots"), metavar="DIR",
                      help="folder for the PNGs (default: plots)")
    plot.add_argument("--target", type=float, metavar="LOSS", help="draw the target val loss as a dashed line")

    records = commands.add_parser(
        "records", help="markdown records table, printed or written into the README",
        description="Scan DIR/<track>/YYYY-MM-DD_ShortName/ and print one markdown table of the records: track, "
                    "hardware (the track name's first part), dense or MoE, mean train time and mean final val loss "
                    "of the record's complete logs, description from its README, date, link.")
    records.add_argument("--dir", type=Path, default=Path("records"), help="the records folder (default: records)")
    records.add_argument("--write", type=Path, metavar="README",
                         help=f"replace the text between '{RECORDS_START}' and '{RECORDS_END}' in README "
                              "instead of printing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "records":
            tables = records_tables(args.dir, args.write.parent if args.write else args.dir.parent)
            if args.write:
                write_between_markers(args.write, tables)
                print(f"wrote the records tables into {args.write}")
            else:
                print(tables)
            sys.stdout.flush()
            return 0
        runs = load_runs(args.paths)
        if args.command == "summary":
            print(summary_table(runs, args.md))
        elif args.command == "compare":
            ignore = ignored_keys(args.ignore, args.split, runs)
            print(compare_report(group_runs(runs, args.by, args.pattern, ignore), args.target, args.md))
        elif args.command == "fewest":
            if args.reference:
                reference = load_runs(args.reference)
                named = {run.path.resolve() for run in reference}
                candidates = [run for run in runs if run.path.resolve() not in named]
            else:
                reference = [run for run in runs if not run.has_experts]
                candidates = [run for run in runs if run.has_experts]
            ignore = ignored_keys(args.ignore, args.split, runs + reference)
            print(fewest_report(reference, candidates, ignore, args.md, key_list(args.split)))
        else:
            for path in plot_runs(runs, args.out_dir, args.target):
                print(f"wrote {path}")
        sys.stdout.flush()  # here, not at exit, a reader that left (| head) shows as a BrokenPipeError
    except LogError as error:  # input it cannot use: exit 2, as argparse's usage errors
        print(f"logger.py: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # quietly, as the Python docs advise: devnull takes what is left to flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
