"""The shipped configs (configs/**/*.yaml) load and validate, hold the values their comments
promise, build the prompts their data layout describes, and docs/configuration.md matches
config/schema.py key for key and default for default.

The presets name real hub models; nothing here loads a model (only a local character-level
tokenizer, for the data checks).
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from moepost.config.load import _coerce, load_config, read_config_file
from moepost.config.schema import Config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
PRESETS = sorted(CONFIGS.rglob("*.yaml"))
OWN_PRESETS = {
    "sft/qwen3_30b_a3b_lora.yaml",
    "sft/small_dataset.yaml",
    "sft/large_dataset.yaml",
    "rl/qwen15_moe_gsm8k_grpo.yaml",
    "rl/qwen35_35b_a3b_gspo_translation.yaml",
    "rl/qwen3_30b_a3b_dapo_math.yaml",
}


def _load(rel: str, overrides: list[str] | None = None) -> Config:
    return load_config(CONFIGS / rel, overrides)


def test_the_presets_exist() -> None:
    found = {p.relative_to(CONFIGS).as_posix() for p in PRESETS}
    assert OWN_PRESETS <= found


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_config_loads_and_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.stage in ("sft", "rl")
    assert cfg.model.policy_name_or_path


@pytest.mark.parametrize("rel", sorted(OWN_PRESETS))
def test_presets_say_how_to_launch_them(rel: str) -> None:
    text = (CONFIGS / rel).read_text(encoding="utf-8")
    assert text.startswith("#") and f"moepost train configs/{rel}" in text


def test_qwen3_lora_sft() -> None:
    cfg = _load("sft/qwen3_30b_a3b_lora.yaml")
    lora = cfg.model.lora
    assert cfg.stage == "sft" and cfg.model.policy_name_or_path == "Qwen/Qwen3-30B-A3B"
    assert (lora.enabled, lora.r, lora.alpha, lora.target_experts) == (True, 32, 64, True)
    # Expert targets go through peft's target_parameters, which take no dropout.
    assert lora.dropout == 0.0
    assert cfg.optim.learning_rate == pytest.approx(2e-4) and cfg.optim.weight_decay == 0.0
    assert cfg.model.dtype == "bfloat16" and cfg.model.gradient_checkpointing
    assert cfg.moe.router_aux_loss_coef == pytest.approx(1e-3)
    assert cfg.data.format == "alpaca" and cfg.data.max_seq_length == 2048
    # 32 sequences per step = 1 per pass x 32 accumulated.
    assert cfg.train.batch_size == cfg.train.micro_batch_size * 32


@pytest.mark.parametrize(
    ("rel", "epochs", "lr", "r", "length"),
    [("sft/small_dataset.yaml", 20, 2e-4, 4, 1024), ("sft/large_dataset.yaml", 10, 1e-4, 8, 2048)],
)
def test_dataset_size_presets(rel: str, epochs: int, lr: float, r: int, length: int) -> None:
    cfg = _load(rel)
    assert cfg.train.num_epochs == epochs and cfg.train.max_steps == 0
    assert cfg.optim.learning_rate == pytest.approx(lr)
    assert cfg.model.lora.enabled and cfg.model.lora.r == r and cfg.model.lora.alpha == 2 * r
    assert cfg.data.max_seq_length == length
    assert cfg.data.test_size == pytest.approx(0.1)  # a held-out set to see overfitting
    # Expert adapters need dropout 0 (peft target_parameters).
    assert not (cfg.model.lora.target_experts and cfg.model.lora.dropout)


def test_gsm8k_grpo() -> None:
    cfg = _load("rl/qwen15_moe_gsm8k_grpo.yaml")
    assert cfg.model.policy_name_or_path == "Qwen/Qwen1.5-MoE-A2.7B-Chat"
    assert cfg.rl.algorithm == "grpo" and cfg.generation.num_samples_per_prompt == 4
    # GRPO's preset, resolved at load: KL 0.04 with k3, token ratios clipped at 0.2.
    assert cfg.rl.kl_estimator == "k3" and cfg.rl.kl_coef == pytest.approx(0.04)
    assert (cfg.rl.clip_eps_low, cfg.rl.clip_eps_high) == (0.2, 0.2)
    assert cfg.rl.loss_aggregation == "seq_mean_token_mean" and cfg.rl.advantage_std_normalize
    assert cfg.reward.functions == [{"name": "gsm8k", "method": "strict", "weight": 1.0}]
    assert cfg.data.train_file == "data/gsm8k/train_chat.jsonl"
    assert cfg.data.format == "messages" and cfg.data.answer_key == "answer"


def test_translation_gspo_with_pipeline_aliases() -> None:
    raw = read_config_file(CONFIGS / "rl/qwen35_35b_a3b_gspo_translation.yaml")
    # The file uses the Qwen3.5 pipeline's spellings under rl: ...
    assert raw["rl"]["router_aux_loss_coef"] == 0.001 and "moe" not in raw
    cfg = _load("rl/qwen35_35b_a3b_gspo_translation.yaml")
    # ... and they land on the moe keys.
    assert cfg.moe.router_aux_loss_coef == pytest.approx(1e-3)
    assert cfg.moe.monitor_expert_utilization is True
    assert cfg.model.policy_name_or_path == "Qwen/Qwen3.5-35B-A3B"
    assert cfg.rl.algorithm == "gspo"
    assert (cfg.rl.clip_eps_low, cfg.rl.clip_eps_high) == (3e-4, 4e-4)  # GSPO's preset
    assert cfg.rl.kl_coef == 0.0 and cfg.rl.loss_aggregation == "seq_mean_token_mean"
    for section in (cfg.reward.metricx, cfg.reward.xcomet):
        assert section["path"].startswith("models/") and section["batch_size"] == 16
        assert section["device"] == "cuda:1"
    assert cfg.reward.metricx["tokenizer_path"] == "models/mt5-large"
    assert "{source}" in (cfg.data.prompt_template or "")


def test_translation_reward_keys_are_the_scorers_keywords() -> None:
    from moepost.components.rewards import resolve_rewards

    cfg = _load("rl/qwen35_35b_a3b_gspo_translation.yaml")
    # Resolving checks every key against the reward function's signature; nothing is loaded.
    rewards = resolve_rewards([], metricx=cfg.reward.metricx, xcomet=cfg.reward.xcomet)
    assert [r.name for r in rewards] == ["metricx", "xcomet"]
    assert rewards[0].kwargs["tokenizer_path"] == "models/mt5-large"


def test_dapo_math() -> None:
    cfg = _load("rl/qwen3_30b_a3b_dapo_math.yaml")
    rl = cfg.rl
    assert rl.algorithm == "dapo" and rl.dynamic_sampling and rl.overlong_shaping
    assert (rl.clip_eps_low, rl.clip_eps_high, rl.loss_aggregation) == (0.2, 0.28, "token_mean")
    assert rl.kl_coef == 0.0
    # The ramp starts 1,024 tokens before the 4,096-token limit.
    assert (rl.overlong_cache_length, cfg.generation.max_new_tokens) == (1024, 4096)
    assert cfg.reward.functions[0]["name"] == "math_verify"
    assert rl.num_policy_updates == 2 and cfg.moe.routing_replay == "r2"
    # 16 prompts x 16 samples = 256 completions, split into passes of 4.
    assert cfg.train.prompts_per_step * cfg.generation.num_samples_per_prompt == 256


def test_overrides_apply_to_presets() -> None:
    cfg = _load(
        "rl/qwen15_moe_gsm8k_grpo.yaml", ["data.train_file=/x/train.jsonl", "rl.algorithm=gspo"]
    )
    assert cfg.data.train_file == "/x/train.jsonl"
    # The algorithm changed, so the unset RL fields follow the new preset.
    assert cfg.rl.kl_coef == 0.0 and cfg.rl.clip_eps_high == pytest.approx(4e-4)


# ---------------------------------------------------------------- the presets' data layouts


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from moepost.tools.tiny_model import build_tokenizer

    return build_tokenizer()


def _prompts(tmp_path: Path, rel: str, rows: list[dict], tokenizer: Any) -> list[Any]:
    from moepost.components.data.loading import load_rl_data

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = _load(rel, [f"data.train_file={path}", "data.eval_file=null"])
    train, _, _ = load_rl_data(cfg.data, cfg.misc, tokenizer)
    return train


def test_gsm8k_preset_reads_converted_rows(tmp_path: Path, tokenizer: Any) -> None:
    rows = [{"messages": [{"role": "user", "content": "What is 2+3?"}], "answer": "#### 5"}]
    (ex,) = _prompts(tmp_path, "rl/qwen15_moe_gsm8k_grpo.yaml", rows, tokenizer)
    assert ex.prompt_messages == [
        {
            "role": "user",
            "content": "What is 2+3?\nLet's think step by step and output the final answer "
            'after "####".',
        }
    ]
    assert ex.columns == {"answer": "#### 5"}  # the gsm8k reward's reference


def test_translation_preset_keeps_source_for_the_rewards(tmp_path: Path, tokenizer: Any) -> None:
    rows = [{"source": "Guten Tag", "source_lang": "German", "target_lang": "English"}]
    (ex,) = _prompts(tmp_path, "rl/qwen35_35b_a3b_gspo_translation.yaml", rows, tokenizer)
    (message,) = ex.prompt_messages
    assert message["content"].startswith("Translate the following German text into English.")
    assert message["content"].endswith("German text:\nGuten Tag")
    assert ex.columns["source"] == "Guten Tag"  # what MetricX-QE and xCOMET score against


def test_math_preset_keeps_answer_out_of_the_prompt(tmp_path: Path, tokenizer: Any) -> None:
    rows = [{"problem": "What is 1/2 + 1/2?", "answer": "1"}]
    (ex,) = _prompts(tmp_path, "rl/qwen3_30b_a3b_dapo_math.yaml", rows, tokenizer)
    (message,) = ex.prompt_messages
    assert message["content"].endswith("put your final answer within \\boxed{}.")
    assert ex.columns["answer"] == "1"


# ---------------------------------------------------------------- docs/configuration.md


def _schema_defaults(cls: type = Config, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (type annotation, default) for every leaf field of the schema."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[Any, Any]] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_schema_defaults(tp, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out[f"{prefix}{f.name}"] = (tp, default)
    return out


_ROW = re.compile(r"^\| `([a-z_.]+)` \| `([^`]*)` \|")


def _documented_defaults() -> dict[str, str]:
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    rows: dict[str, str] = {}
    for line in text.splitlines():
        m = _ROW.match(line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} is documented twice"
            rows[m.group(1)] = m.group(2)
    return rows


def test_configuration_doc_lists_every_key_with_its_default() -> None:
    schema = _schema_defaults()
    documented = _documented_defaults()
    assert sorted(set(schema) - set(documented)) == [], "keys missing from docs/configuration.md"
    assert sorted(set(documented) - set(schema)) == [], "docs/configuration.md lists unknown keys"
    for key, (tp, default) in schema.items():
        # Read the documented default the way the loader reads a config value.
        value = _coerce(tp, yaml.safe_load(documented[key]), "docs/configuration.md", key)
        assert value == default, (
            f"{key}: documented default {documented[key]!r}, schema {default!r}"
        )
