"""The typed algorithm presets, resolved once into `cfg.rl` at load: every algorithm's resolved
fields against the preset table of ALGORITHMS.md (and docs/rl.md, its user-facing copy)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from moepost.algorithms.policy_loss import ALGORITHM_PRESETS, AlgorithmPreset
from moepost.config.load import load_config
from moepost.config.schema import Config
from moepost.config.validate import resolve_rl_presets

ROOT = Path(__file__).resolve().parents[2]

# ALGORITHMS.md "Algorithm presets", one row per algorithm: ratio, eps_low / eps_high,
# aggregation, kl_coef, advantage. "-" (unused) eps are 0.2: REINFORCE / RLOO have no ratio to
# clip, CISPO reads only eps_high. advantage: group std -> advantage_std_normalize true; "mean
# only" / "mean baseline" / "leave-one-out" -> false (RLOO's baseline is picked by algorithm).
# Columns: ratio_level, clip_eps_low, clip_eps_high, loss_aggregation, kl_coef,
# advantage_std_normalize, dynamic_sampling, overlong_shaping
TABLE = {
    "gspo": ("sequence", 3e-4, 4e-4, "seq_mean_token_mean", 0.0, True, False, False),
    "grpo": ("token", 0.2, 0.2, "seq_mean_token_mean", 0.04, True, False, False),
    "dapo": ("token", 0.2, 0.28, "token_mean", 0.0, True, True, True),
    "dr_grpo": ("token", 0.2, 0.2, "seq_mean_token_sum_norm", 0.0, False, False, False),
    "reinforce": ("none", 0.2, 0.2, "seq_mean_token_mean", 0.0, False, False, False),
    "rloo": ("none", 0.2, 0.2, "seq_mean_token_mean", 0.0, False, False, False),
    "cispo": ("cispo", 0.2, 0.28, "token_mean", 0.0, True, False, False),
}
FIELDS = (
    "ratio_level",
    "clip_eps_low",
    "clip_eps_high",
    "loss_aggregation",
    "kl_coef",
    "advantage_std_normalize",
    "dynamic_sampling",
    "overlong_shaping",
)


def _resolved(algorithm: str) -> tuple[object, ...]:
    cfg = Config()
    cfg.rl.algorithm = algorithm  # type: ignore[assignment]
    resolve_rl_presets(cfg)
    return tuple(getattr(cfg.rl, name) for name in FIELDS)


@pytest.mark.parametrize("algorithm", sorted(TABLE))
def test_resolved_fields_match_the_table(algorithm: str) -> None:
    assert _resolved(algorithm) == TABLE[algorithm]


def test_every_algorithm_has_a_row() -> None:
    assert set(ALGORITHM_PRESETS) == set(TABLE)
    assert {p.advantage_mode for p in ALGORITHM_PRESETS.values()} == {"std", "mean", "rloo"}
    assert ALGORITHM_PRESETS["rloo"].advantage_mode == "rloo"


def test_presets_are_frozen_values() -> None:
    preset = ALGORITHM_PRESETS["grpo"]
    assert isinstance(preset, AlgorithmPreset)
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset.kl_coef = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        ALGORITHM_PRESETS["grpo"] = preset  # type: ignore[index]


def test_user_values_win_and_resolution_is_idempotent() -> None:
    cfg = Config()
    cfg.rl.algorithm, cfg.rl.ratio_level, cfg.rl.kl_coef = "grpo", "sequence", 0.0
    resolve_rl_presets(cfg)
    assert (cfg.rl.ratio_level, cfg.rl.kl_coef, cfg.rl.clip_eps_high) == ("sequence", 0.0, 0.2)
    before = dataclasses.asdict(cfg.rl)
    resolve_rl_presets(cfg)
    assert dataclasses.asdict(cfg.rl) == before


def test_resolved_at_load(tmp_path: Path) -> None:
    path = tmp_path / "rl.yaml"
    path.write_text(
        "stage: rl\nmodel: {policy_name_or_path: some/model}\ndata: {train_file: t.jsonl}\n"
        "reward: {functions: [{name: gsm8k}]}\n"
    )
    cfg = load_config(path, ["rl.algorithm=dapo"])
    assert tuple(getattr(cfg.rl, name) for name in FIELDS) == TABLE["dapo"]


def test_docs_table_matches() -> None:
    """docs/rl.md's copy of the table: ratio, eps and aggregation columns per algorithm."""
    text = (ROOT / "docs" / "rl.md").read_text()
    rows = re.findall(r"^\| `(\w+)`[^|]*\| ([^|]+) \| ([^|]+) \| `(\w+)` \|", text, re.M)
    seen = {}
    for name, ratio, eps, aggregation in rows:
        if name in TABLE:
            seen[name] = (ratio.strip(), eps.strip(), aggregation)
    assert set(seen) == set(TABLE)
    for name, (ratio, eps, aggregation) in seen.items():
        want = TABLE[name]
        assert {"token weight": "cispo"}.get(ratio, ratio) == want[0], name
        assert aggregation == want[3], name
        if not eps.startswith("-"):
            low, high = (float(x) for x in eps.split("/"))
            assert (low, high) == want[1:3], name
