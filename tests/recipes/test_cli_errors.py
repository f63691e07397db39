"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from recipe_support import format_rows, write_jsonl
from test_rl_recipe import rl_config
from test_sft_recipe import sft_config

from moepost.cli import main


def _run(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def _write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("moepost: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(params=["sft", "rl"])
def stage_config(request: pytest.FixtureRequest, tiny_model: Path, tmp_path: Path) -> dict:
    data = write_jsonl(tmp_path / "d.jsonl", format_rows("gsm8k"))
    builder = sft_config if request.param == "sft" else rl_config
    return builder(tiny_model, data, tmp_path / "run")


def test_unknown_key(
    capsys: pytest.CaptureFixture[str], stage_config: dict, tmp_path: Path
) -> None:
    stage_config["optim"]["learnig_rate"] = 1e-4
    code, err = _run(capsys, ["train", str(_write(tmp_path, stage_config))])
    _assert_one_line(code, err, "optim.learnig_rate", "section 'optim'", "learning_rate")
    assert not (tmp_path / "run").exists()


def test_wrong_type(capsys: pytest.CaptureFixture[str], stage_config: dict, tmp_path: Path) -> None:
    stage_config["train"]["max_steps"] = "many"
    code, err = _run(capsys, ["train", str(_write(tmp_path, stage_config))])
    _assert_one_line(code, err, "train.max_steps", "expected int")


def test_missing_data_file(
    capsys: pytest.CaptureFixture[str], stage_config: dict, tmp_path: Path
) -> None:
    stage_config["data"]["train_file"] = str(tmp_path / "nope.jsonl")
    code, err = _run(capsys, ["train", str(_write(tmp_path, stage_config))])
    _assert_one_line(code, err, "data.train_file", "nope.jsonl")


def test_malformed_jsonl_names_line(
    capsys: pytest.CaptureFixture[str], stage_config: dict, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    rows = [json.dumps(r) for r in format_rows("gsm8k", n=4)]
    rows.insert(2, '{"question": "What is 1+1?", "answer": ')
    bad.write_text("\n".join(rows) + "\n")
    stage_config["data"]["train_file"] = str(bad)
    code, err = _run(capsys, ["train", str(_write(tmp_path, stage_config))])
    _assert_one_line(code, err, "bad.jsonl", "line 3")


def test_row_missing_field(
    capsys: pytest.CaptureFixture[str], stage_config: dict, tmp_path: Path
) -> None:
    rows = format_rows("alpaca", n=8)
    del rows[1]["instruction"]
    stage_config["data"]["train_file"] = str(write_jsonl(tmp_path / "a.jsonl", rows))
    stage_config["data"]["format"] = "alpaca"
    code, err = _run(capsys, ["train", str(_write(tmp_path, stage_config))])
    _assert_one_line(code, err, "row 2", "'instruction'")


def test_model_path_missing(
    capsys: pytest.CaptureFixture[str], stage_config: dict, tmp_path: Path
) -> None:
    stage_config["model"]["policy_name_or_path"] = str(tmp_path / "no_model")
    code, err = _run(capsys, ["train", str(_write(tmp_path, stage_config))])
    _assert_one_line(code, err, "model.policy_name_or_path", "no_model")


def test_rl_unknown_reward_and_group_of_one(
    capsys: pytest.CaptureFixture[str], tiny_model: Path, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", format_rows("gsm8k"))
    cfg = rl_config(tiny_model, data, tmp_path / "run")
    cfg["reward"]["functions"] = [{"name": "gsm8k_exact"}]
    code, err = _run(capsys, ["train", str(_write(tmp_path, cfg))])
    _assert_one_line(code, err, "gsm8k_exact", "gsm8k", "math_verify")
    cfg = rl_config(tiny_model, data, tmp_path / "run")
    code, err = _run(
        capsys,
        ["train", str(_write(tmp_path, cfg)), "generation.num_samples_per_prompt=1"],
    )
    _assert_one_line(code, err, "num_samples_per_prompt = 1", "at least 2 samples")


def test_real_process_exit_code_and_stderr(tiny_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", format_rows("gsm8k"))
    cfg = sft_config(tiny_model, data, tmp_path / "run")
    cfg["data"]["train_file"] = str(tmp_path / "missing.jsonl")
    result = subprocess.run(
        [sys.executable, "-m", "moepost", "train", str(_write(tmp_path, cfg))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("moepost: error: data.train_file")
