"""`export_model`: merged LoRA (attention, expert and router adapters) equals the PEFT model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moepost.components.model.loading import load_policy
from moepost.config.schema import LoraConfig, MiscConfig, ModelConfig
from moepost.errors import UserError
from moepost.tools.export import export_model, resolve_checkpoint
from moepost.tools.tiny_model import build_tiny_model

CPU = torch.device("cpu")
INPUT_IDS = torch.tensor([[10, 20, 30, 40, 50, 60, 70], [15, 25, 35, 45, 55, 65, 75]])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A run folder with two adapter checkpoints; returns it and the newest one's logits."""
    root = tmp_path_factory.mktemp("export")
    base = build_tiny_model(root / "base", "qwen3_moe")
    lora = LoraConfig(enabled=True, target_experts=True, target_router=True)
    cfg = ModelConfig(policy_name_or_path=str(base), lora=lora)
    model = load_policy(cfg, MiscConfig(), device=CPU).eval()
    run = root / "run"
    torch.manual_seed(1)
    for step in (3, 10):
        with torch.no_grad():  # B = 0 at init would make the adapters a no-op
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.normal_(0.0, 0.1)
        model.save_pretrained(run / f"checkpoint-{step}")
        (run / f"checkpoint-{step}" / "trainer_state.pt").write_bytes(b"optimizer and rng")
        (run / f"checkpoint-{step}" / "manifest.json").write_text('{"files": {}}')
    with torch.no_grad():
        logits = model(input_ids=INPUT_IDS).logits
        # The perturbation must matter, or equality below would prove nothing.
        with model.disable_adapter():
            base_logits = model(input_ids=INPUT_IDS).logits
    assert (logits - base_logits).abs().max() > 1e-2
    return run, logits


def test_resolve_checkpoint_picks_newest(run_dir: tuple[Path, torch.Tensor]) -> None:
    run, _ = run_dir
    assert resolve_checkpoint(run).name == "checkpoint-10"


def test_merged_export_matches_peft_logits(
    run_dir: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    run, peft_logits = run_dir
    out = export_model(run, tmp_path / "merged", merge_lora=True)
    assert not (out / "adapter_config.json").exists()
    assert (out / "tokenizer.json").is_file()  # taken from the base model
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        logits = merged(input_ids=INPUT_IDS).logits
    torch.testing.assert_close(logits, peft_logits, atol=1e-5, rtol=0)
    # The expert stacks and routers themselves carry the merged adapters.
    base = AutoModelForCausalLM.from_pretrained(run.parent / "base")
    for name in ("model.layers.1.mlp.experts.down_proj", "model.layers.1.mlp.gate.weight"):
        delta = merged.get_parameter(name) - base.get_parameter(name)
        assert delta.abs().max() > 1e-3, name


def test_adapter_export_copies_adapter_without_state(
    run_dir: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    from peft import PeftModel

    run, peft_logits = run_dir
    out = export_model(run / "checkpoint-10", tmp_path / "adapter", merge_lora=False)
    assert (out / "adapter_config.json").is_file()
    assert not (out / "trainer_state.pt").exists()
    assert not (out / "manifest.json").exists()
    base = AutoModelForCausalLM.from_pretrained(run.parent / "base")
    reloaded = PeftModel.from_pretrained(base, str(out))
    with torch.no_grad():
        logits = reloaded(input_ids=INPUT_IDS).logits
    torch.testing.assert_close(logits, peft_logits, atol=1e-5, rtol=0)


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is not a folder"):
        export_model(tmp_path / "missing", tmp_path / "out", merge_lora=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no model"):
        export_model(tmp_path / "empty", tmp_path / "out", merge_lora=True)
    adapter = tmp_path / "orphan"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "org/not-cached"}')
    with pytest.raises(UserError, match="not in the Hugging Face cache"):
        export_model(adapter, tmp_path / "out", merge_lora=True, cache_dir=str(tmp_path / "c"))
