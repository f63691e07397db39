"""Policy / reference / tokenizer loading and LoRA on experts and routers, on tiny MoE checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moepost.components.model.loading import (
    load_policy,
    load_reference,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from moepost.components.model.lora import (
    apply_lora,
    describe_parameters,
    lora_target_parameters,
    parameter_report,
)
from moepost.config.schema import LoraConfig, MiscConfig, ModelConfig
from moepost.errors import UserError
from moepost.tools.tiny_model import build_tiny_model

CPU = torch.device("cpu")
# Tiny default: hidden 64, 2 layers, 4 experts of width 64 -> gate_up_proj [4, 128, 64],
# down_proj [4, 64, 64], router weight [4, 64].
EXPERT_PARAMS = 2 * (4 * 128 * 64 + 4 * 64 * 64)  # 98304
ROUTER_PARAMS = 2 * 4 * 64  # 512
# LoRA r=8 on a [E, out, in] stack: A is in x (r*E), B is (r*E) x out.
#   gate_up: 64*32 + 32*128 = 6144; down: 64*32 + 32*64 = 4096  -> 2 layers: 20480
#   router (a 2-D [4, 64] weight, one "expert"): 64*8 + 8*4 = 544 -> 2 layers: 1088
LORA_EXPERT_PARAMS = 20480
LORA_ROUTER_PARAMS = 1088


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(root / arch, arch) for arch in ("qwen3_moe", "deepseek_v3")}


def _cfg(path: Path, **lora: object) -> ModelConfig:
    return ModelConfig(policy_name_or_path=str(path), lora=LoraConfig(**lora))


def _batch() -> torch.Tensor:
    return torch.tensor([[10, 20, 30, 40, 50, 60], [11, 21, 31, 41, 51, 61]])


def test_resolve_device_and_dtype() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
    with pytest.raises(UserError, match="model.dtype: 'int8'"):
        resolve_dtype("int8", CPU)
    with pytest.raises(UserError, match="misc.device"):
        resolve_device("no-such-device")


def test_load_policy_full(tiny_dirs: dict[str, Path]) -> None:
    model = load_policy(_cfg(tiny_dirs["qwen3_moe"]), MiscConfig(), device=CPU)
    assert model.training
    assert next(model.parameters()).dtype == torch.float32
    report = parameter_report(model)
    assert report["trainable"] == report["total"]
    assert report["trainable_experts"] == EXPERT_PARAMS
    assert report["trainable_router"] == ROUTER_PARAMS
    assert describe_parameters(report).startswith("params ")


def test_experts_implementations_agree(tiny_dirs: dict[str, Path]) -> None:
    logits = {}
    for impl in ("eager", "grouped_mm"):
        cfg = _cfg(tiny_dirs["qwen3_moe"])
        cfg.experts_implementation = impl
        model = load_policy(cfg, MiscConfig(), device=CPU, for_training=False)
        assert not model.training
        assert model.config._experts_implementation == impl
        with torch.no_grad():
            logits[impl] = model(input_ids=_batch()).logits
    torch.testing.assert_close(logits["eager"], logits["grouped_mm"], atol=1e-5, rtol=1e-5)


def test_missing_model_is_one_line_user_error(tmp_path: Path) -> None:
    misc = MiscConfig(huggingface_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError) as info:
        load_policy(_cfg(tmp_path / "nope"), misc, device=CPU)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("model.policy_name_or_path: '")
    assert "not in the Hugging Face cache" in message
    with pytest.raises(UserError, match="not a local folder"):
        load_tokenizer(ModelConfig(policy_name_or_path="org/not-cached"), misc)


def test_empty_folder_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="holds no loadable model"):
        load_policy(_cfg(tmp_path), MiscConfig(), device=CPU)


def test_tokenizer_pad_token(tiny_dirs: dict[str, Path]) -> None:
    tokenizer = load_tokenizer(_cfg(tiny_dirs["qwen3_moe"]), MiscConfig())
    assert tokenizer.pad_token == "<|endoftext|>"


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_lora_on_experts_gets_gradient(arch: str, tiny_dirs: dict[str, Path]) -> None:
    cfg = _cfg(tiny_dirs[arch], enabled=True, target_modules=[], target_experts=True)
    model = load_policy(cfg, MiscConfig(), device=CPU)
    assert lora_target_parameters(model.get_base_model(), cfg.lora) == [
        "mlp.experts.down_proj",
        "mlp.experts.gate_up_proj",
    ]
    report = parameter_report(model)
    assert report["trainable"] == report["trainable_experts"] == LORA_EXPERT_PARAMS
    assert report["trainable_router"] == 0
    model(input_ids=_batch(), labels=_batch()).loss.backward()
    lora_b = [(n, p) for n, p in model.named_parameters() if "experts" in n and "lora_B" in n]
    assert len(lora_b) == 4  # 2 layers x (gate_up_proj, down_proj)
    # B starts at zero so A's gradient is zero at step 0; B's must not be.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in lora_b)


def test_lora_router_and_default_modules(tiny_dirs: dict[str, Path]) -> None:
    cfg = _cfg(tiny_dirs["qwen3_moe"], enabled=True, target_experts=True, target_router=True)
    model = load_policy(cfg, MiscConfig(), device=CPU)
    report = parameter_report(model)
    assert report["trainable_router"] == LORA_ROUTER_PARAMS
    assert report["trainable_experts"] == LORA_EXPERT_PARAMS
    # q,k,v,o with r=8: q 64*8+8*64, k 64*8+8*32, v same, o 64*8+8*64 = 1024+768+768+1024 per layer
    assert report["trainable"] == LORA_EXPERT_PARAMS + LORA_ROUTER_PARAMS + 2 * 3584


def test_lora_dropout_with_experts_is_user_error(tiny_dirs: dict[str, Path]) -> None:
    cfg = _cfg(tiny_dirs["qwen3_moe"], enabled=True, target_experts=True, dropout=0.1)
    with pytest.raises(UserError, match="model.lora.dropout"):
        load_policy(cfg, MiscConfig(), device=CPU)


def test_gradient_checkpointing_matches_plain_backward(tiny_dirs: dict[str, Path]) -> None:
    grads = []
    for checkpointing in (False, True):
        cfg = _cfg(tiny_dirs["qwen3_moe"], enabled=True, target_experts=True, target_router=True)
        cfg.gradient_checkpointing = checkpointing
        torch.manual_seed(0)
        model = load_policy(cfg, MiscConfig(), device=CPU)
        assert model.get_base_model().is_activation_checkpointing == checkpointing
        with torch.no_grad():  # non-zero B so every adapter (A included) gets a gradient
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.05)
        model(input_ids=_batch(), labels=_batch()).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0, name
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_reference_model(tiny_dirs: dict[str, Path]) -> None:
    path = tiny_dirs["qwen3_moe"]
    reference = load_reference(_cfg(path), MiscConfig(), device=CPU)
    assert reference is not None and not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    assert load_reference(_cfg(path), MiscConfig(), device=CPU, needed=False) is None
    # LoRA: the adapter-disabled policy is the reference, no second model.
    assert load_reference(_cfg(path, enabled=True), MiscConfig(), device=CPU) is None


def test_reference_copied_from_the_loaded_policy(tiny_dirs: dict[str, Path]) -> None:
    """Same path, full weights, same device: the reference is an in-memory copy of the untrained
    policy (no second read), equal to what loading gives, frozen, sharing no storage with it."""
    path = tiny_dirs["qwen3_moe"]
    policy = load_policy(_cfg(path), MiscConfig(), device=CPU)
    copied = load_reference(_cfg(path), MiscConfig(), device=CPU, policy=policy)
    loaded = load_reference(_cfg(path), MiscConfig(), device=CPU)
    assert copied is not None and loaded is not None and copied is not policy
    assert not copied.training and not any(p.requires_grad for p in copied.parameters())
    assert all(p.requires_grad for p in policy.parameters()) and policy.training
    want = loaded.state_dict()
    got = copied.state_dict()
    assert got.keys() == want.keys()
    for name, tensor in got.items():
        assert torch.equal(tensor, want[name]), name
    pointers = {p.data_ptr() for p in policy.parameters()}
    assert not pointers & {p.data_ptr() for p in copied.parameters()}
    with torch.no_grad():
        torch.testing.assert_close(copied(_batch()).logits, loaded(_batch()).logits)
    # A training step on the policy leaves the copy where the policy started.
    with torch.no_grad():
        next(policy.parameters()).add_(1.0)
    first = next(iter(got))
    assert torch.equal(copied.state_dict()[first], want[first])


def test_reference_loaded_when_a_copy_would_differ(tiny_dirs: dict[str, Path]) -> None:
    """Checkpointing hooks on the policy, or an explicit reference path: read from disk."""
    path = tiny_dirs["qwen3_moe"]
    cfg = ModelConfig(policy_name_or_path=str(path), gradient_checkpointing=True)
    policy = load_policy(cfg, MiscConfig(), device=CPU)
    with torch.no_grad():
        next(policy.parameters()).add_(1.0)  # a copy would show this; a fresh load does not
    name, start = next(
        iter(load_reference(_cfg(path), MiscConfig(), device=CPU).state_dict().items())
    )
    for reference_cfg in (
        cfg,
        ModelConfig(policy_name_or_path=str(path), reference_name_or_path=str(path)),
    ):
        reference = load_reference(reference_cfg, MiscConfig(), device=CPU, policy=policy)
        assert reference is not None
        assert torch.equal(reference.state_dict()[name], start), reference_cfg


def test_adapter_folder_as_policy(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg(tiny_dirs["qwen3_moe"], enabled=True, target_experts=True)
    model = load_policy(cfg, MiscConfig(), device=CPU)
    model.save_pretrained(tmp_path / "adapter")
    again = load_policy(_cfg(tmp_path / "adapter", enabled=True), MiscConfig(), device=CPU)
    assert parameter_report(again)["trainable_experts"] == LORA_EXPERT_PARAMS
    # LoRA off: the adapter is merged and every weight trains.
    merged = load_policy(_cfg(tmp_path / "adapter"), MiscConfig(), device=CPU)
    assert not hasattr(merged, "peft_config")
    assert parameter_report(merged)["trainable_experts"] == EXPERT_PARAMS
    # The adapter folder has no tokenizer; the base model's is used.
    assert load_tokenizer(_cfg(tmp_path / "adapter"), MiscConfig()).pad_token == "<|endoftext|>"
    # A second adapter would stack silently on the first, so it is refused.
    with pytest.raises(ValueError, match="already carries a peft adapter"):
        apply_lora(again, LoraConfig(enabled=True, target_modules=["q_proj"], target_experts=True))
