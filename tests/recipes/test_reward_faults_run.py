"""Reward-function faults through `moepost train` (issue 17 drill): a run with functions that
raise on some samples, return NaN or None, and hang at step 2 goes on, with every fault counted
in train_log.jsonl; a function returning the wrong length or strings stops it with one line
naming the function (exit code 2)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from recipe_support import format_rows, read_log, write_jsonl
from test_rl_recipe import rl_config

from moepost.cli import main

FAULTY = """
import time


def flaky(completions, **kwargs):
    if any(set(c) & set("bcdfg") for c in completions):
        raise RuntimeError("cannot judge b, c, d, f or g")
    return [1.0] * len(completions)


def nan_on_even(completions, **kwargs):
    return [float("nan") if len(c) % 2 == 0 else 0.5 for c in completions]


def none_on_hjklm(completions, **kwargs):
    return [None if set(c) & set("hjklm") else 0.25 for c in completions]


def hangs_at_step_2(completions, trainer_state, **kwargs):
    if trainer_state.global_step == 1:
        time.sleep(60)
    return [0.0] * len(completions)


def ok(completions, **kwargs):
    return [float(len(c)) for c in completions]


def short(completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def words(completions, **kwargs):
    return ["good" for c in completions]
"""


def _config(tiny_model: Path, tmp_path: Path, functions: list[dict]) -> Path:
    data = write_jsonl(tmp_path / "d.jsonl", format_rows("gsm8k"))
    cfg = rl_config(tiny_model, data, tmp_path / "run")
    cfg["generation"]["stop"] = list("aeiou0123")  # varied completions, cut before these
    user = tmp_path / "faulty.py"
    user.write_text(FAULTY)
    cfg["reward"] = {
        "functions": [{**f, "name": f"{user}:{f['name']}"} for f in functions],
        "timeout_s": 2,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_faults_are_counted_and_the_run_goes_on(tiny_model: Path, tmp_path: Path) -> None:
    functions = [
        {"name": "flaky", "weight": 0.0},
        {"name": "nan_on_even", "weight": 0.0},
        {"name": "none_on_hjklm", "weight": 0.0},
        {"name": "hangs_at_step_2", "weight": 0.0},
        {"name": "ok"},
    ]
    config = _config(tiny_model, tmp_path, functions)
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "moepost", "train", str(config)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    # The hung call (60 s) is abandoned after 2 s, and its daemon thread does not hold up exit.
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.monotonic() - start < 55
    assert "ran past reward.timeout_s=2" in result.stderr
    log = {r["step"]: r for r in read_log(tmp_path / "run") if "loss" in r}
    rollouts = read_log(tmp_path / "run", "train_rollouts.jsonl")
    assert sorted(log) == [1, 2]
    for step, row in log.items():
        texts = [r["completion"] for r in rollouts if r["step"] == step]
        n = len(texts)
        assert row["reward/flaky_errors"] == sum(bool(set(t) & set("bcdfg")) for t in texts)
        assert row["reward/nan_on_even_nonfinite"] == sum(len(t) % 2 == 0 for t in texts)
        assert row["reward/none_on_hjklm_none"] == sum(bool(set(t) & set("hjklm")) for t in texts)
        assert row["reward/hangs_at_step_2_timeouts"] == (n if step == 2 else 0)
        assert row["reward/ok_errors"] == row["reward/ok_timeouts"] == 0
        assert row["reward/none_frac"] == 0.0  # the faulty ones have weight 0
    for kind in ("flaky_errors", "nan_on_even_nonfinite", "none_on_hjklm_none"):
        assert 0 < log[1][f"reward/{kind}"] + log[2][f"reward/{kind}"] < 16, kind
    assert any(r["reward/hangs_at_step_2"] is None for r in rollouts if r["step"] == 2)
    assert all(r["reward/flaky"] is None for r in rollouts if set(r["completion"]) & set("bcdfg"))


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("short", "reward 'short' returned 7 values for 8 completions"),
        ("words", "reward 'words' returned 'good' (str) for sample 0"),
    ],
)
def test_bad_returns_stop_with_one_line(
    capsys: pytest.CaptureFixture[str], tiny_model: Path, tmp_path: Path, name: str, needle: str
) -> None:
    code = main(["train", str(_config(tiny_model, tmp_path, [{"name": name}]))])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("moepost: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert needle in lines[0], lines[0]
