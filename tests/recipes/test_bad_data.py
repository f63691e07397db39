"""Bad-data drills, in memory and streamed, SFT and RL: one line naming the file and the line
(exit 2, no traceback, nothing but resolved_config.yaml written), or a counted skip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from recipe_support import format_rows, read_log, write_jsonl
from test_rl_recipe import rl_config
from test_sft_recipe import _cli, sft_config

from moepost.cli import main

STAGES = [("sft", False), ("sft", True), ("rl", False), ("rl", True)]
IDS = ["sft", "sft-stream", "rl", "rl-stream"]


def _config(stage: str, streaming: bool, model: Path, data: Path, out: Path) -> dict:
    if stage == "sft":
        cfg = sft_config(model, data, out, train={"max_steps": 1})
    else:
        cfg = rl_config(model, data, out, train={"max_steps": 1})
        cfg["data"]["test_size"] = 0
    cfg["data"].update({"streaming": streaming, "shuffle": False})
    return cfg


def _train(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, cfg: dict, *overrides: str
) -> tuple[int, str, str]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["train", str(path), *overrides])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_fault(code: int, err: str, run: Path, *needles: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("moepost: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    # Nothing of a run is written: no log, no checkpoint, only the resolved config.
    assert sorted(p.name for p in run.iterdir()) == ["resolved_config.yaml"]


def _lines(stage: str, n: int = 6) -> list[str]:
    return [json.dumps(r) for r in format_rows("alpaca" if stage == "sft" else "gsm8k", n=n)]


@pytest.mark.parametrize(("stage", "streaming"), STAGES, ids=IDS)
def test_empty_file(
    capsys: pytest.CaptureFixture[str],
    tiny_model: Path,
    tmp_path: Path,
    stage: str,
    streaming: bool,
) -> None:
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    cfg = _config(stage, streaming, tiny_model, data, tmp_path / "run")
    code, _, err = _train(capsys, tmp_path, cfg)
    _assert_fault(code, err, tmp_path / "run", f"data.train_file: {data}", "empty")


@pytest.mark.parametrize(("stage", "streaming"), STAGES, ids=IDS)
def test_invalid_json_line_in_the_middle(
    capsys: pytest.CaptureFixture[str],
    tiny_model: Path,
    tmp_path: Path,
    stage: str,
    streaming: bool,
) -> None:
    lines = _lines(stage)
    lines.insert(3, '{"question": "What is 1+1?", "answer": ')
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    code, _, err = _train(
        capsys, tmp_path, _config(stage, streaming, tiny_model, data, tmp_path / "run")
    )
    _assert_fault(code, err, tmp_path / "run", f"data.train_file: {data} line 4: not valid JSON")


@pytest.mark.parametrize(("stage", "streaming"), STAGES, ids=IDS)
def test_non_utf8_bytes(
    capsys: pytest.CaptureFixture[str],
    tiny_model: Path,
    tmp_path: Path,
    stage: str,
    streaming: bool,
) -> None:
    raw = [line.encode() for line in _lines(stage)]
    raw[1] = raw[1].replace(b"What", b"Wh\xe4t")  # Latin-1, not UTF-8 (a row step 1 reads)
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b"\n".join(raw) + b"\n")
    code, _, err = _train(
        capsys, tmp_path, _config(stage, streaming, tiny_model, data, tmp_path / "run")
    )
    _assert_fault(
        code, err, tmp_path / "run", f"data.train_file: {data} line 2: not UTF-8", "byte 0xe4"
    )


@pytest.mark.parametrize(("stage", "streaming"), STAGES, ids=IDS)
def test_missing_column_names_it_and_the_format(
    capsys: pytest.CaptureFixture[str],
    tiny_model: Path,
    tmp_path: Path,
    stage: str,
    streaming: bool,
) -> None:
    rows = format_rows("gsm8k", n=6)
    del rows[1]["question"]
    data = write_jsonl(tmp_path / "cols.jsonl", rows)
    cfg = _config(stage, streaming, tiny_model, data, tmp_path / "run")
    cfg["data"]["format"] = "gsm8k"
    code, _, err = _train(capsys, tmp_path, cfg)
    _assert_fault(
        code,
        err,
        tmp_path / "run",
        "data.train_file: row 2: missing field 'question' required by format 'gsm8k'",
        "expected {'question': ..., 'answer': '... #### N'}",
        f"(in {data})",
    )


def _counts(run: Path) -> dict[str, Any]:
    return {k: v for k, v in read_log(run)[-1].items() if k.startswith("data/")}


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "stream"])
def test_sft_long_rows_are_truncated_and_untrainable_rows_skipped(
    capsys: pytest.CaptureFixture[str], tiny_model: Path, tmp_path: Path, streaming: bool
) -> None:
    rows = format_rows("alpaca", n=8)
    rows[0]["output"] += " ok" * 60  # over max_seq_length=64: cut, its first tokens still train
    rows[1]["output"] = ""  # no assistant text: skipped
    rows[2]["instruction"] = "x " * 80  # the prompt alone fills 64 tokens: nothing left to learn
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    run = tmp_path / "run"
    code, out, err = _train(capsys, tmp_path, _config("sft", streaming, tiny_model, data, run))
    assert code == 0, err
    if streaming:  # step 1 read rows 1-6 to find its 4 examples
        assert _counts(run) == {
            "data/num_truncated": 2.0,
            "data/num_dropped_no_target": 2.0,
            "data/num_changed_by_template": 0.0,
        }
    else:
        assert "data: 6 train / 0 eval examples, 2 truncated to data.max_seq_length=64, " in out
        assert "2 skipped (no assistant token to learn)" in out
    for row in rows:
        row["output"] = ""
    write_jsonl(data, rows)
    rerun = _config("sft", streaming, tiny_model, data, tmp_path / "run_empty")  # a fresh run dir
    code, _, err = _train(capsys, tmp_path, rerun)
    needle = "no row gives a training example" if streaming else "no training example has an"
    assert code == 2 and "Traceback" not in err and needle in err and str(data) in err, err


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "stream"])
def test_rl_prompts_over_the_limit_are_skipped_and_counted(
    capsys: pytest.CaptureFixture[str], tiny_model: Path, tmp_path: Path, streaming: bool
) -> None:
    rows = format_rows("gsm8k", n=6)
    rows[0]["question"] = "x " * 60
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    run = tmp_path / "run"
    cfg = _config("rl", streaming, tiny_model, data, run)
    cfg["data"]["max_prompt_length"] = 40
    code, out, err = _train(capsys, tmp_path, cfg)
    assert code == 0, err
    if streaming:
        assert _counts(run) == {
            "data/num_dropped_too_long": 1.0,
            "data/num_changed_by_template": 0.0,
        }
    else:
        assert "data: 5 train / 0 eval prompts, 1 skipped (longer than" in out
    code, _, err = _train(
        capsys, tmp_path, cfg, "data.max_prompt_length=5", f"logging.output_dir={tmp_path / 'r2'}"
    )
    needle = "no row gives a training example" if streaming else "every training prompt of"
    assert code == 2 and "Traceback" not in err and needle in err and str(data) in err, err


def test_real_process_streamed_bad_line(tiny_model: Path, tmp_path: Path) -> None:
    """In a real process nothing but the one line reaches stderr: datasets' own log record of
    the parse failure is dropped, no traceback."""
    lines = _lines("sft")
    lines.insert(3, "{not json")
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_config("sft", True, tiny_model, data, tmp_path / "run")))
    result = _cli(["train", str(path)])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "Failed to" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"moepost: error: data.train_file: {data} line 4: not valid JSON "
        "(Expecting property name enclosed in double quotes)"
    )
