"""Sign / range checks of numeric config keys: every numeric key has a decided range, values
outside it are one-line errors (exit 2) naming the key, boundary values pass."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from moepost.cli import main
from moepost.config.ranges import RANGES, UNBOUNDED, check_ranges
from moepost.config.schema import Config
from moepost.errors import UserError


def _numeric_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _numeric_keys(tp, f"{prefix}{f.name}.")
            continue
        args = set(typing.get_args(tp)) | {tp}
        for a in list(args):
            args |= set(typing.get_args(a))
        if args & {int, float}:
            keys.append(f"{prefix}{f.name}")
    return keys


def test_every_numeric_key_has_a_decided_range() -> None:
    numeric = set(_numeric_keys(Config))
    assert numeric - set(RANGES) - UNBOUNDED == set()
    assert set(RANGES) - numeric == set()  # no stale entries


def _set(cfg: Config, key: str, value: Any) -> None:
    *path, last = key.split(".")
    node: Any = cfg
    for part in path:
        node = getattr(node, part)
    setattr(node, last, [value, value] if key == "optim.betas" else value)


def _outside(key: str) -> list[float]:
    low, low_inc, high, high_inc = RANGES[key]
    out = [float("nan")]
    if low is not None:
        out.append(low - 1 if low_inc else low)
    if high is not None:
        out.append(high + 1 if high_inc else high)
    return out


@pytest.mark.parametrize("key", sorted(RANGES))
def test_out_of_range_is_an_error_naming_the_key(key: str) -> None:
    for value in _outside(key):
        cfg = Config()
        _set(cfg, key, value)
        with pytest.raises(UserError, match="^" + re.escape(key) + " = .*: must be "):
            check_ranges(cfg)


@pytest.mark.parametrize("key", sorted(RANGES))
def test_boundary_values_pass(key: str) -> None:
    low, low_inc, high, high_inc = RANGES[key]
    for value in [v for v, inc in ((low, low_inc), (high, high_inc)) if v is not None and inc]:
        cfg = Config()
        _set(cfg, key, value)
        check_ranges(cfg)


def test_defaults_pass() -> None:
    check_ranges(Config())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.learning_rate=-1", "optim.learning_rate = -1.0: must be >= 0"),
        ("train.batch_size=0", "train.batch_size = 0: must be >= 1"),
        ("train.max_steps=-1", "train.max_steps = -1: must be >= 0"),
        ("optim.betas=[0.9,1.5]", "optim.betas = [0.9, 1.5]: must be in [0, 1)"),
        ("train.seed=-3", "train.seed = -3: must be in [0, 4.29497e+09]"),
    ],
)
def test_cli_one_line_exit_2(
    override: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = {
        "stage": "sft",
        "model": {"policy_name_or_path": str(tmp_path / "model")},
        "data": {"train_file": str(tmp_path / "d.jsonl")},
        "logging": {"output_dir": str(tmp_path / "run")},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), override]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"moepost: error: {message}"
    assert not (tmp_path / "run").exists()
