import re
import shlex
from dataclasses import fields
from pathlib import Path

import pytest

import logger
import train_gpt
from conftest import tiny_env

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
KNOB_HEADER = "| knob | default | meaning |"


def section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def readme_default(value) -> str:
    # the README's rule: Python's repr, strings unquoted, the empty string as ""
    if isinstance(value, str):
        return value if value else '""'
    return repr(value)


def knob_rows(text: str) -> list[tuple[str, str]]:
    lines = text.splitlines()
    start = lines.index(KNOB_HEADER)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        assert len(cells) == 3, f"knob table row has {len(cells)} cells, not 3: {line}"
        rows.append((cells[0].strip("`"), cells[1].removeprefix("`").removesuffix("`")))
    return rows


def knob_table_problems(text: str) -> list[str]:
    expected = [(f.name.upper(), readme_default(f.default)) for f in fields(train_gpt.Hyperparameters)]
    rows = knob_rows(text)
    names, documented = [name for name, _ in expected], [name for name, _ in rows]
    problems = [f"{name} is missing from the README's knob table" for name in names if name not in documented]
    problems += [f"{name} is in the README's knob table but not in Hyperparameters"
                 for name in documented if name not in names]
    common = [name for name in documented if name in names]
    order = [name for name in names if name in documented]
    for got, want in zip(common, order):
        if got != want:
            problems.append(f"{got} is out of order in the README's knob table: {want} comes first in Hyperparameters")
            break
    defaults = dict(expected)
    problems += [f"{name} default in the README is {default}, Hyperparameters says {defaults[name]}"
                 for name, default in rows if name in defaults and default != defaults[name]]
    return problems

# -----------------------------------------------------------------------------
# The knob table against Hyperparameters


def test_knob_table_matches_hyperparameters():
    assert knob_table_problems(README) == []


def test_knob_table_is_the_only_table_with_that_header():
    assert README.count(KNOB_HEADER) == 1
    assert KNOB_HEADER in section(README, "Knobs")


def swap_rows(text: str, a: str, b: str) -> str:
    lines = text.splitlines()
    i, j = (next(k for k, line in enumerate(lines) if line.startswith(f"| `{name}` |")) for name in (a, b))
    lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines)


def drop_row(text: str, name: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith(f"| `{name}` |"))


SPOILED = {  # a broken table, and the knob its first problem must name
    "missing": (lambda t: drop_row(t, "TOP_K"), "TOP_K is missing"),
    "extra": (lambda t: t.replace("| `SEED` |", "| `NUM_EXPERT` | `0` | typo |\n| `SEED` |"), "NUM_EXPERT is in"),
    "reordered": (lambda t: swap_rows(t, "MUON_LR", "NS_STEPS"), "NS_STEPS is out of order"),
    "wrong default": (lambda t: t.replace("| `NUM_ITERATIONS` | `1770` |", "| `NUM_ITERATIONS` | `1700` |"),
                      "NUM_ITERATIONS default in the README is 1700"),
    "quoted string": (lambda t: t.replace("| `ROUTER` | `softmax` |", "| `ROUTER` | `'softmax'` |"),
                      "ROUTER default"),
    "empty string": (lambda t: t.replace('| `RUN_ID` | `""` |', "| `RUN_ID` | `` |"), "RUN_ID default"),
}


@pytest.mark.parametrize("case", SPOILED)
def test_knob_check_names_the_knob_of_a_broken_table(case):
    spoil, message = SPOILED[case]
    broken = spoil(README)
    assert broken != README, "the spoiler did not find its row"
    problems = knob_table_problems(broken)
    assert problems and message in problems[0], problems

# -----------------------------------------------------------------------------
# Commands the README gives


def code_lines(text: str) -> list[str]:
    blocks = re.findall(r"```(?:bash|text)?\n(.*?)```", text, flags=re.S)
    return [line for block in blocks for line in block.splitlines()]


def commands(lines: list[str]) -> list[str]:
    # the command of each line of the README's code blocks, without its comment
    return [line.split("#")[0].strip() for line in code_lines("\n".join(lines)) if line.split("#")[0].strip()]


def test_front_page_gives_the_test_and_main_commands():
    front = commands(README.splitlines()[:80])
    assert "tests/run" in front and "./run.sh" in front, front


def test_test_command_is_what_ci_runs():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == ["tests/run"]
    assert (ROOT / "tests" / "run").stat().st_mode & 0o111, "tests/run must be executable"


def test_readme_stays_a_front_page():
    assert len(README) < 15_000, "move narratives to records/README.md or bench/results/README.md"


def test_tiny_cpu_command_uses_the_tests_tiny_settings():
    command = next(line for line in code_lines(section(README, "Running")) if line.endswith("python3 train_gpt.py"))
    words = shlex.split(command)
    assert words[-2:] == ["python3", "train_gpt.py"]
    settings = dict(word.split("=", 1) for word in words[:-2])
    # the tests' output and data paths are theirs; every other setting must be the same
    paths = {"TRAIN_FILES", "VAL_FILES", "LOG_DIR", "CHECKPOINT_DIR", "RUN_ID"}
    expected = {k: v for k, v in tiny_env(Path("d"), Path("o")).items() if k not in paths}
    assert {k: v for k, v in settings.items() if k not in paths} == expected
    assert train_gpt.load_config(settings).num_layers == 4


def test_records_table_is_regenerated():
    start, end = README.index(logger.RECORDS_START), README.index(logger.RECORDS_END)
    current = README[start + len(logger.RECORDS_START):end].strip()
    assert current == logger.records_tables(ROOT / "records", ROOT).strip(), \
        "run `python3 logger.py records --write README.md`"
