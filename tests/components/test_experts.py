"""moepost_grouped experts forward: same outputs and gradients as transformers' grouped_mm on
every supported family (GPT-OSS covers transposed weights, biases and a custom gate), LoRA on
the expert weights, and the "auto" choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from moepost.components.model.loading import load_policy, load_reference
from moepost.components.moe import experts
from moepost.config.schema import LoraConfig, MiscConfig, ModelConfig
from moepost.tools.tiny_model import ARCHS, build_tiny_model

CPU = torch.device("cpu")


def _gpt_oss() -> nn.Module:
    from transformers import AutoModelForCausalLM, GptOssConfig

    torch.manual_seed(0)
    config = GptOssConfig(
        vocab_size=104, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
        num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # from_config leaves the expert biases at 0; make them count
        for name, p in model.named_parameters():
            if name.endswith("_bias") and "experts" in name:
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # DeepSeek-V3: one of two expert groups picked and a routed scale other than 1.
    extra = {"deepseek_v3": {"topk_group": 1, "routed_scaling_factor": 2.5}}
    return {
        arch: build_tiny_model(
            tmp_path_factory.mktemp(arch), arch, hidden_size=32, **extra.get(arch, {})
        )
        for arch in ARCHS
    }


def _load(arch: str, tiny_dirs: dict[str, Path]) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if arch == "gpt_oss":
        return _gpt_oss()
    return AutoModelForCausalLM.from_pretrained(
        tiny_dirs[arch], experts_implementation="grouped_mm"
    )


def _run(
    model: nn.Module, impl: str, *, pad: bool = True
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    experts.register()
    model.set_experts_implementation(impl)
    model.zero_grad(set_to_none=True)
    ids = torch.randint(10, 104, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in one row
    kwargs = {"attention_mask": mask} if pad else {}
    logits = model(input_ids=ids, use_cache=False, **kwargs).logits
    (logits.float().square().mean() + logits[:, -1].float().logsumexp(-1).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("arch", [*ARCHS, "gpt_oss"])
def test_same_outputs_and_grads_as_grouped_mm(arch: str, tiny_dirs: dict[str, Path]) -> None:
    model = _load(arch, tiny_dirs)
    # transformers' DeepSeek-V3 sdpa path fails on a padding mask with these head sizes
    # (independent of the experts); its rows are unpadded here.
    pad = arch != "deepseek_v3"
    ref_logits, ref_grads = _run(model, "grouped_mm", pad=pad)
    logits, grads = _run(model, experts.NAME, pad=pad)
    assert model.config._experts_implementation == experts.NAME
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    expert_grads = [n for n in grads if "experts" in n]
    assert expert_grads, "no expert parameters received a gradient"
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_lora_on_experts_gets_the_same_grads(tiny_dirs: dict[str, Path]) -> None:
    cfg = ModelConfig(
        policy_name_or_path=str(tiny_dirs["qwen3_moe"]),
        dtype="float32",
        lora=LoraConfig(enabled=True, r=4, alpha=8, target_experts=True),
    )
    model = load_policy(cfg, MiscConfig(), device=CPU)
    with torch.no_grad():  # lora_B starts at 0; give the adapter an effect to differentiate
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    ref_logits, ref_grads = _run(model, "grouped_mm")
    logits, grads = _run(model, experts.NAME)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    expert_lora = [n for n in grads if "experts" in n and "lora_" in n]
    assert expert_lora
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_auto_picks_moepost_grouped_on_cpu_and_explicit_choice_is_kept(
    tiny_dirs: dict[str, Path],
) -> None:
    path = str(tiny_dirs["mixtral"])
    auto = load_policy(ModelConfig(policy_name_or_path=path), MiscConfig(), device=CPU)
    assert auto.config._experts_implementation == experts.NAME
    ref = load_reference(ModelConfig(policy_name_or_path=path), MiscConfig(), device=CPU)
    assert ref is not None and ref.config._experts_implementation == experts.NAME
    for impl in ("grouped_mm", "eager", experts.NAME):
        cfg = ModelConfig(policy_name_or_path=path, experts_implementation=impl)
        assert load_policy(cfg, MiscConfig(), device=CPU).config._experts_implementation == impl
    assert experts.auto_experts_implementation(torch.device("cuda")) is None


@pytest.mark.parametrize("arch", [*ARCHS, "gpt_oss"])
def test_padded_bmm_path_without_grad_matches_grouped_mm(
    arch: str, tiny_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode-sized batches without autograd go through the padded [E, m, H] bmm path."""
    model = _load(arch, tiny_dirs).eval()
    ids = torch.randint(10, 104, (4, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        experts.register()
        model.set_experts_implementation(experts.NAME)
        taken: list[int] = []
        padded = experts._padded_experts
        monkeypatch.setattr(experts, "_padded_experts", lambda *a: taken.append(1) or padded(*a))
        out = model(input_ids=ids, use_cache=False).logits
    assert taken, "the padded path was not used"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_padded_path_only_without_grad_and_for_few_rows_per_expert() -> None:
    dense = torch.tensor([3, 1, 2, 5])
    with torch.no_grad():
        assert experts._use_padded(dense)
        assert not experts._use_padded(torch.tensor([3, 0, 0, 0]))  # one expert of four hit
        assert not experts._use_padded(torch.tensor([experts.PADDED_MAX_ROWS + 1, 1, 1, 1]))
    assert not experts._use_padded(dense)  # autograd on: training keeps grouped GEMMs
