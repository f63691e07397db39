from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from moepost.config.load import load_config, write_resolved_config
from moepost.errors import UserError

BASE = {
    "stage": "sft",
    "model": {"policy_name_or_path": "some/model"},
    "data": {"train_file": "train.jsonl"},
}


def _write(tmp_path: Path, data: dict, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
    return p


def test_defaults_and_overrides(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, BASE), ["optim.learning_rate=3e-4", "train.max_steps=7"])
    assert cfg.optim.learning_rate == pytest.approx(3e-4)
    assert cfg.train.max_steps == 7
    assert cfg.model.lora.enabled is False


def test_json_config(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, BASE, "c.json"))
    assert cfg.data.train_file == "train.jsonl"


def test_unknown_key_names_section_and_suggestion(tmp_path: Path) -> None:
    data = {**BASE, "optim": {"learning_rat": 1e-4}}
    with pytest.raises(UserError) as e:
        load_config(_write(tmp_path, data))
    msg = str(e.value)
    assert "optim.learning_rat" in msg and "section 'optim'" in msg
    assert "did you mean 'learning_rate'" in msg


def test_unknown_nested_key(tmp_path: Path) -> None:
    data = {**BASE, "model": {"policy_name_or_path": "m", "lora": {"alpah": 4}}}
    with pytest.raises(UserError, match=r"model\.lora\.alpah.*did you mean 'alpha'"):
        load_config(_write(tmp_path, data))


def test_wrong_type(tmp_path: Path) -> None:
    data = {**BASE, "train": {"max_steps": "ten"}}
    with pytest.raises(UserError, match=r"train\.max_steps = 'ten': expected int"):
        load_config(_write(tmp_path, data))
    data = {**BASE, "rl": {"algorithm": "ppo"}}
    with pytest.raises(UserError, match=r"rl\.algorithm = 'ppo': expected 'gspo'"):
        load_config(_write(tmp_path, data))


def test_qwen35_aliases(tmp_path: Path) -> None:
    data = {
        **BASE,
        "rl": {
            "output_router_logits": True,
            "router_aux_loss_coef": 0.001,
            "monitor_expert_utilization": False,
        },
    }
    cfg = load_config(_write(tmp_path, data))
    assert cfg.moe.router_aux_loss_coef == pytest.approx(0.001)
    assert cfg.moe.monitor_expert_utilization is False


def test_rl_presets_resolved_and_user_value_wins(tmp_path: Path) -> None:
    data = {
        **BASE,
        "stage": "rl",
        "reward": {"functions": [{"name": "gsm8k"}]},
        "train": {"prompts_per_step": 2, "micro_batch_size": 4},
    }
    cfg = load_config(_write(tmp_path, data), ["rl.algorithm=grpo"])
    assert (cfg.rl.clip_eps_low, cfg.rl.clip_eps_high, cfg.rl.kl_coef) == (0.2, 0.2, 0.04)
    assert cfg.rl.loss_aggregation == "seq_mean_token_mean"
    cfg = load_config(_write(tmp_path, data), ["rl.algorithm=dapo", "rl.clip_eps_high=0.3"])
    assert cfg.rl.clip_eps_high == 0.3 and cfg.rl.loss_aggregation == "token_mean"
    assert cfg.rl.dynamic_sampling is True


def test_group_of_one_is_explained(tmp_path: Path) -> None:
    data = {**BASE, "stage": "rl", "reward": {"functions": [{"name": "gsm8k"}]}}
    with pytest.raises(UserError, match="at least 2 samples per prompt"):
        load_config(_write(tmp_path, data), ["generation.num_samples_per_prompt=1"])


def test_cross_field_checks(tmp_path: Path) -> None:
    rl = {**BASE, "stage": "rl", "reward": {"functions": [{"name": "gsm8k"}]}}
    with pytest.raises(UserError, match=r"prompts_per_step \(3\).*micro_batch_size \(5\)"):
        load_config(_write(tmp_path, rl), ["train.prompts_per_step=3", "train.micro_batch_size=5"])
    with pytest.raises(UserError, match="offload_param needs distributed.backend=deepspeed"):
        load_config(_write(tmp_path, BASE), ["distributed.offload_param=true"])
    for backend in ("ddp", "fsdp"):
        with pytest.raises(UserError, match=rf"offload_optimizer needs .*got backend={backend}"):
            load_config(
                _write(tmp_path, BASE),
                ["distributed.offload_optimizer=true", f"distributed.backend={backend}"],
            )
    with pytest.raises(UserError, match=r"batch_size \(8\) must equal"):
        load_config(
            _write(tmp_path, BASE),
            ["train.micro_batch_size=2", "train.gradient_accumulation_steps=3"],
        )


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("stage: sft\nmodel: [unclosed\n")
    with pytest.raises(UserError, match=r"bad\.yaml: line \d+: invalid YAML"):
        load_config(p)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, BASE), ["moe.freeze_router=true"])
    path = write_resolved_config(cfg, tmp_path / "run")
    again = load_config(path)
    assert again == cfg


def test_micro_batches_default_to_a_token_budget_unless_a_key_says_otherwise(
    tmp_path: Path,
) -> None:
    """Nothing set: a 1024-token budget. Any one of the three micro-batch keys, in the file or
    on the command line, turns the default off and is honoured as written."""
    path = _write(tmp_path, BASE)
    cfg = load_config(path)
    assert (cfg.train.micro_batch_tokens, cfg.train.micro_batch_size) == (1024, 1)
    assert load_config(path, ["train.micro_batch_size=2"]).train.micro_batch_tokens == 0
    assert load_config(path, ["train.micro_batch_tokens=0"]).train.micro_batch_tokens == 0
    assert load_config(path, ["train.micro_batch_tokens=512"]).train.micro_batch_tokens == 512
    accum = load_config(path, ["train.gradient_accumulation_steps=8"])
    assert (accum.train.micro_batch_tokens, accum.train.micro_batch_size) == (0, 1)
    in_file = load_config(_write(tmp_path, {**BASE, "train": {"micro_batch_size": 4}}, "f.yaml"))
    assert (in_file.train.micro_batch_tokens, in_file.train.micro_batch_size) == (0, 4)
