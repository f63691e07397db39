"""Micro-batches by row count or by token budget (`train.micro_batch_tokens`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moepost.config.load import load_config
from moepost.errors import UserError
from moepost.recipes.common import micro_batch_groups

LENGTHS = [5, 30, 12, 30, 7, 12]


def _cfg(tmp_path: Path, stage: str = "sft", **train: int) -> object:
    data = {
        "stage": stage,
        "model": {"policy_name_or_path": "some/model"},
        "data": {"train_file": "train.jsonl"},
        "train": {"batch_size": 6, "micro_batch_size": 2, **train},
    }
    if stage == "rl":
        data["reward"] = {"functions": [{"name": "gsm8k"}]}
        data["train"].pop("batch_size")
        data["train"]["prompts_per_step"] = 3
        data["generation"] = {"num_samples_per_prompt": 2}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


class MaxOver:
    """Stands in for DistContext: another rank needs `other` micro-batches."""

    def __init__(self, other: int) -> None:
        self.other = other

    def max_int(self, value: int) -> int:
        return max(value, self.other)


def test_row_count_micro_batches_keep_order(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    assert micro_batch_groups(LENGTHS, cfg, longest_first=True) == [[0, 1], [2, 3], [4, 5]]


def test_token_budget_longest_first(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, micro_batch_tokens=60)
    # Sorted: 30 (1), 30 (3), 12 (2), 12 (5), 7 (4), 5 (0). [30, 30] pads to 60; a third row
    # would make 3 x 30 = 90. The other four pad to 4 x 12 = 48.
    assert micro_batch_groups(LENGTHS, cfg, longest_first=True) == [[1, 3], [2, 5, 4, 0]]


def test_token_budget_in_row_order(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, micro_batch_tokens=60)
    # [5, 30] = 60; [12, 30] = 60; [7, 12] = 24.
    assert micro_batch_groups(LENGTHS, cfg, longest_first=False) == [[0, 1], [2, 3], [4, 5]]
    cfg = _cfg(tmp_path, micro_batch_tokens=40)
    # A 30-token row fits alone; [5, 30] would be 60 > 40.
    assert micro_batch_groups(LENGTHS, cfg, longest_first=False) == [[0], [1], [2], [3], [4, 5]]


def test_token_budget_matches_the_rank_with_most_micro_batches(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, micro_batch_tokens=60)
    groups = micro_batch_groups(LENGTHS, cfg, longest_first=True, dist=MaxOver(3))
    # [1, 3] pads to 2 x 30 = 60, more than [2, 5, 4, 0] at 4 x 12 = 48: it is split.
    assert groups == [[1], [3], [2, 5, 4, 0]]
    assert micro_batch_groups(LENGTHS, cfg, longest_first=True, dist=MaxOver(1)) == [
        [1, 3],
        [2, 5, 4, 0],
    ]


def test_token_budget_config_checks(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"train\.micro_batch_tokens = -1: must be >= 0"):
        _cfg(tmp_path, micro_batch_tokens=-1)
    with pytest.raises(UserError, match="gradient_accumulation_steps and train.micro_batch_tokens"):
        _cfg(tmp_path, micro_batch_tokens=64, gradient_accumulation_steps=3)
    # A budget replaces micro_batch_size, so the divisibility rules on it no longer apply.
    assert _cfg(tmp_path, micro_batch_size=4, micro_batch_tokens=64).train.micro_batch_tokens == 64
    with pytest.raises(UserError, match="divisible by train.micro_batch_size"):
        _cfg(tmp_path, "rl", micro_batch_size=4)
    assert _cfg(tmp_path, "rl", micro_batch_size=4, micro_batch_tokens=64).stage == "rl"
