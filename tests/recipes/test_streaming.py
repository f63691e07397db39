"""data.streaming end to end: a file over the in-memory cap trains as a stream, a stream in
file order gives the in-memory run's losses, and a killed streamed run resumes the exact data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from recipe_support import format_rows, make_config, read_log, train_losses, write_jsonl
from test_rl_recipe import rl_config
from test_sft_recipe import _cli, sft_config

from moepost.errors import UserError
from moepost.recipes.rl import run_rl
from moepost.recipes.sft import run_sft


def _config(stage: str, model: Path, data: Path, out: Path, **data_keys: Any) -> dict:
    if stage == "sft":
        cfg = sft_config(model, data, out, train={"max_steps": 4})
    else:  # 5 prompts, 2 per step: the third step starts the second pass
        cfg = rl_config(model, data, out, train={"max_steps": 3})
        cfg["data"]["test_size"] = 0
    cfg["data"].update(data_keys)
    return cfg


def _run(stage: str, cfg: dict) -> None:
    (run_sft if stage == "sft" else run_rl)(make_config(cfg))


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_stream_over_the_cap_equals_in_memory_run(
    tiny_model: Path, tmp_path: Path, stage: str
) -> None:
    rows = format_rows("alpaca" if stage == "sft" else "gsm8k", n=10 if stage == "sft" else 5)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cap = data.stat().st_size // 4  # the file is four times the cap
    with pytest.raises(UserError, match=r"over data.max_in_memory_bytes=\d+; set data.streaming"):
        _run(stage, _config(stage, tiny_model, data, tmp_path / "refused", max_in_memory_bytes=cap))
    _run(stage, _config(stage, tiny_model, data, tmp_path / "mem", shuffle=False))
    streamed = _config(stage, tiny_model, data, tmp_path / "stream", shuffle=False, streaming=True)
    streamed["data"]["max_in_memory_bytes"] = cap
    _run(stage, streamed)
    mem, stream = read_log(tmp_path / "mem"), read_log(tmp_path / "stream")
    assert len(stream) == len(mem) == (4 if stage == "sft" else 3)
    assert train_losses(tmp_path / "stream") == pytest.approx(
        train_losses(tmp_path / "mem"), rel=1e-6, abs=1e-7
    )
    if stage == "rl":  # the same prompts in the same order: the same rewards
        assert [r["reward/mean"] for r in stream] == [r["reward/mean"] for r in mem]
        assert stream[-1]["data/num_dropped_too_long"] == 0
    else:  # 10 rows, 4 per step: step 3 starts the second pass
        assert [r["epoch"] for r in stream] == [0, 0, 1, 1]
        assert stream[-1]["data/num_truncated"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_streamed_resume_after_kill_continues_the_exact_data(
    tiny_model: Path, tmp_path: Path, stage: str
) -> None:
    """Shuffle buffer on, two passes over the file, killed after step 3 (checkpoint at 2):
    the resumed run's losses equal the uninterrupted run's."""
    rows = format_rows("alpaca" if stage == "sft" else "gsm8k", n=7)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    paths = {}
    for name in ("straight", "killed"):
        cfg = _config(stage, tiny_model, data, tmp_path / name, streaming=True)
        cfg["data"]["shuffle_buffer_size"] = 3
        cfg["train"].update({"max_steps": 5 if stage == "sft" else 4, "save_every": 2})
        cfg["logging"]["keep_last_checkpoints"] = 1
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg))
    assert _cli(["train", str(paths["straight"])]).returncode == 0
    killed = _cli(["train", str(paths["killed"])], env={"MOEPOST_CRASH_AFTER_STEP": "3"})
    assert killed.returncode == 17, killed.stderr[-2000:]
    resumed = _cli(["train", str(paths["killed"]), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "checkpoint-2" in resumed.stdout
    straight, again = train_losses(tmp_path / "straight"), train_losses(tmp_path / "killed")
    assert len(again) == len(straight) == (5 if stage == "sft" else 4)
    assert again == pytest.approx(straight, rel=1e-6, abs=1e-7)
    if stage == "rl":
        rewards = [[r["reward/mean"] for r in read_log(tmp_path / n)] for n in paths]
        assert rewards[0] == rewards[1]


def test_streaming_config_errors(tiny_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", format_rows("alpaca"))
    cfg = _config("sft", tiny_model, data, tmp_path / "r", streaming=True)
    cfg["train"]["max_steps"] = 0
    with pytest.raises(UserError, match=r"^train.max_steps: required with data.streaming"):
        make_config(cfg)
    cfg = _config("sft", tiny_model, data, tmp_path / "r", streaming=True, test_size=2)
    with pytest.raises(UserError, match=r"^data.test_size = 2.0: cannot hold rows out of a stream"):
        make_config(cfg)
    cfg = _config("sft", tiny_model, data, tmp_path / "r", streaming=True, packing=True)
    with pytest.raises(UserError, match=r"^data.packing: SFT packing of a stream"):
        make_config(cfg)
    cfg = _config("sft", tiny_model, data, tmp_path / "r", max_in_memory_bytes=0)
    with pytest.raises(UserError, match=r"^data.max_in_memory_bytes = 0"):
        make_config(cfg)


def test_rl_eval_only_of_a_stream_needs_an_eval_source(tiny_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", format_rows("gsm8k", n=4))
    cfg = make_config(_config("rl", tiny_model, data, tmp_path / "r", streaming=True))
    with pytest.raises(UserError, match=r"^--eval-only with data.streaming: true needs data.eval"):
        run_rl(cfg, eval_only=True)
