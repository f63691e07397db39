"""Helpers for the reliability drills: tiny SFT / RL run configs, runs in a subprocess through
the fault-hook driver (so that tests can signal and kill them), and log comparisons."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from recipe_support import format_rows, read_log, write_jsonl

FAULT_DRIVER = str(Path(__file__).parent / "fault_driver.py")


def drill_config(stage: str, model: Path, tmp_path: Path, out: Path, **train: Any) -> Path:
    """A 4-step run writing checkpoint-2 and checkpoint-4 (keep 1); returns the YAML path."""
    common: dict[str, Any] = {
        "model": {"policy_name_or_path": str(model)},
        "optim": {"learning_rate": 3e-3, "lr_scheduler": "cosine", "warmup_steps": 1},
        "logging": {"output_dir": str(out), "keep_last_checkpoints": 1, "write_report": False},
        "misc": {"device": "cpu", "num_threads": 1},
    }
    if stage == "sft":
        data = write_jsonl(tmp_path / "sft.jsonl", format_rows("alpaca", n=16))
        cfg = {
            "stage": "sft",
            "data": {"train_file": str(data), "max_seq_length": 64},
            "train": {"max_steps": 4, "batch_size": 2, "micro_batch_size": 2, "seed": 1},
        }
    else:
        data = write_jsonl(tmp_path / "rl.jsonl", format_rows("gsm8k", n=8))
        cfg = {
            "stage": "rl",
            "data": {"train_file": str(data)},
            "generation": {"num_samples_per_prompt": 2, "max_new_tokens": 6},
            "rl": {"algorithm": "grpo", "kl_coef": 0.0},
            "reward": {"functions": [{"name": "format", "pattern": "[0-9]"}]},
            "train": {"max_steps": 4, "prompts_per_step": 2, "micro_batch_size": 4, "seed": 3},
        }
    cfg.update(common)
    cfg["train"].update({"save_every": 2, **train})
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`moepost ARGS` in a subprocess with the fault hooks of `env` installed."""
    return subprocess.run(
        [sys.executable, FAULT_DRIVER, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def launch(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `moepost ARGS` without waiting (output to `log`, read with `output`)."""
    with log.open("w") as f:
        return subprocess.Popen(
            [sys.executable, FAULT_DRIVER, *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before the awaited point")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.02)


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "train_log.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    return [int(r["step"]) for r in (read_log(run_dir) if lines else []) if "loss" in r]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_log(run_dir) if "loss" in r]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """One row per step and the losses of the uninterrupted run."""
    assert logged_steps(run_dir) == logged_steps(reference)
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-6, abs=1e-7)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
