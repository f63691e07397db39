"""Helpers for end-to-end recipe tests: small datasets per format, configs, golden losses."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from moepost.config.load import load_config
from moepost.config.schema import Config

GOLDEN_DIR = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("MOEPOST_UPDATE_GOLDEN") == "1"


def _problems(n: int, seed: int) -> list[tuple[str, str, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        out.append((f"What is {a}+{b}?", f"{a}+{b}={a + b}\n#### {a + b}", a + b))
    return out


def format_rows(fmt: str, n: int = 12, seed: int = 0) -> list[dict[str, Any]]:
    rows = []
    for q, a, _ in _problems(n, seed):
        rows.append(
            {
                "messages": {
                    "messages": [
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": a},
                    ]
                },
                "alpaca": {"instruction": q, "input": "", "output": a},
                "sharegpt": {
                    "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
                },
                "prompt_completion": {"prompt": q, "completion": a},
                "text": {"text": f"{q} {a}"},
                "gsm8k": {"question": q, "answer": a},
            }[fmt]
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_config(data: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """A config from a dict, through the same strict loader a file goes through."""
    import tempfile

    import yaml

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(data, f)
    try:
        return load_config(f.name, overrides or [])
    finally:
        os.unlink(f.name)


def read_log(run_dir: Path, name: str = "train_log.jsonl") -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_log(run_dir) if "loss" in r]


def check_golden(name: str, values: dict[str, list[float]]) -> None:
    """Compare per-step losses with the stored golden file (MOEPOST_UPDATE_GOLDEN=1 rewrites)."""
    path = GOLDEN_DIR / f"{name}.json"
    if UPDATE_GOLDEN:
        GOLDEN_DIR.mkdir(exist_ok=True)
        stored = json.loads(path.read_text()) if path.exists() else {}
        stored.update(values)
        path.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        return
    stored = json.loads(path.read_text())
    for key, losses in values.items():
        assert key in stored, f"no golden losses for {key} in {path}"
        assert losses == pytest.approx(stored[key], rel=2e-4, abs=2e-5), key


def rollout_tensors(prompts: list[list[int]], completions: list[list[int]]) -> Any:
    """`StepTensors` of hand-written rollout rows (zero advantages and rollout log-probs)."""
    from types import SimpleNamespace

    import torch

    from moepost.recipes.step_tensors import tensors_for_step

    width = max(1, max(len(c) for c in completions))
    batch = SimpleNamespace(
        prompt_ids=prompts, completion_ids=completions, logprobs=torch.zeros(len(prompts), width)
    )
    return tensors_for_step(batch, torch.zeros(len(prompts)), 0, torch.device("cpu"))
