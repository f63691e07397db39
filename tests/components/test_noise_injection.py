"""NoiseInjector (AQN): which norms it targets, bit-exact restore, noise scale, schedule, seeds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from moepost.components.training.noise import NoiseInjector, find_norm_weights
from moepost.config.schema import NoiseInjectionConfig
from moepost.errors import UserError
from moepost.tools.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def make_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., nn.Module]:
    from transformers import AutoModelForCausalLM

    paths: dict[str, Path] = {}

    def make(arch: str = "qwen3_moe", dtype: torch.dtype = torch.float32) -> nn.Module:
        if arch not in paths:
            # DeepSeek-V3 with a dense first layer: its post-attention norm feeds no experts.
            extra = {"first_k_dense_replace": 1} if arch == "deepseek_v3" else {}
            paths[arch] = build_tiny_model(tmp_path_factory.mktemp(arch), arch, **extra)
        return AutoModelForCausalLM.from_pretrained(paths[arch], dtype=dtype)

    return make


def _cfg(**kw: object) -> NoiseInjectionConfig:
    base = {"enabled": True, "sigma_start": 1e-2, "sigma_end": 1e-4, "num_stages": 10}
    return NoiseInjectionConfig(**{**base, **kw})  # type: ignore[arg-type]


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_default_targets_are_the_decoder_layer_norms(make_model: Callable[..., nn.Module]) -> None:
    names = [n for n, _ in find_norm_weights(make_model(), [])]
    # q_norm / k_norm inside self_attn and the final model.norm are not candidates.
    assert names == [
        "model.layers.0.input_layernorm",
        "model.layers.0.post_attention_layernorm",
        "model.layers.1.input_layernorm",
        "model.layers.1.post_attention_layernorm",
    ]


def test_target_modules_narrow_by_name_and_fed_block(make_model: Callable[..., nn.Module]) -> None:
    model = make_model()

    def names(targets: list[str]) -> list[str]:
        return [n for n, _ in find_norm_weights(model, targets)]

    post = ["model.layers.0.post_attention_layernorm", "model.layers.1.post_attention_layernorm"]
    pre = ["model.layers.0.input_layernorm", "model.layers.1.input_layernorm"]
    assert names(["experts", "mlp"]) == post  # the scenario's setting: norms feeding MoE blocks
    assert names(["experts"]) == post
    assert names(["self_attn"]) == pre  # matched through the block it feeds
    assert names(["input_layernorm"]) == pre  # matched on its own name
    assert names(["layers.1."]) == [pre[1], post[1]]
    with pytest.raises(UserError, match="noise_injection.target_modules"):
        names(["vision_tower"])


def test_experts_target_skips_dense_layers(make_model: Callable[..., nn.Module]) -> None:
    model = make_model("deepseek_v3")
    assert [n for n, _ in find_norm_weights(model, ["experts"])] == [
        "model.layers.1.post_attention_layernorm"
    ]
    assert len(find_norm_weights(model, ["mlp"])) == 2  # the dense MLP counts as "mlp"


def test_noise_inside_and_bit_exact_restore(make_model: Callable[..., nn.Module]) -> None:
    model = make_model()
    before = _snapshot(model)
    injector = NoiseInjector(model, _cfg(), total_steps=100, seed=7)
    for step in (10, 11, 50):  # sigma 1e-2, 1e-2, 1e-3
        with injector.around_rollout(step) as sigma:
            inside = _snapshot(model)
        diffs = torch.cat([(inside[f"{n}.weight"] - before[f"{n}.weight"]) for n in injector.names])
        # 4 norms x 64 = 256 draws: the sample std is within a few % of sigma (SE ~ 4.4%).
        assert diffs.numel() == 256
        assert 0.8 * sigma < float(diffs.std()) < 1.2 * sigma
        assert abs(float(diffs.mean())) < 4 * sigma / 16  # 4 standard errors of the mean
        changed = {k for k in before if not torch.equal(before[k], inside[k])}
        assert changed == {f"{n}.weight" for n in injector.names}
        after = _snapshot(model)
        assert all(torch.equal(before[k], after[k]) for k in before)  # bit-exact, every tensor
    assert injector.last_sigma == pytest.approx(1e-3)


def test_schedule_and_zero_sigma_leaves_weights_alone(make_model: Callable[..., nn.Module]) -> None:
    model = make_model()
    injector = NoiseInjector(model, _cfg(), total_steps=100, seed=0)
    # ALGORITHMS.md's worked example: (1e-2, 1e-4, 10 stages, 100 steps).
    assert [injector.sigma(s) for s in (0, 9, 10, 19)] == [0.0, 0.0, 1e-2, 1e-2]
    assert injector.sigma(20) == pytest.approx(5.623413e-3, rel=1e-6)  # 1e-2 * 10^(-1/4)
    assert injector.sigma(50) == pytest.approx(1e-3) and injector.sigma(99) == pytest.approx(1e-4)
    before = _snapshot(model)
    with injector.around_rollout(3) as sigma:
        assert sigma == 0.0
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    disabled = NoiseInjector(model, NoiseInjectionConfig(enabled=False), total_steps=100, seed=0)
    assert disabled.names == [] and disabled.sigma(50) == 0.0


def test_deterministic_per_seed_and_step(make_model: Callable[..., nn.Module]) -> None:
    model = make_model()

    def noisy(seed: int, step: int, cfg_seed: int | None = None) -> torch.Tensor:
        injector = NoiseInjector(model, _cfg(seed=cfg_seed), total_steps=100, seed=seed)
        torch.manual_seed(step)  # the global RNG must not matter
        with injector.around_rollout(step):
            return torch.cat([w.detach().clone() for _, w in injector.targets])

    assert torch.equal(noisy(1, 30), noisy(1, 30))
    assert not torch.equal(noisy(1, 30), noisy(1, 31))
    assert not torch.equal(noisy(1, 30), noisy(2, 30))
    assert torch.equal(noisy(1, 30, cfg_seed=5), noisy(5, 30))  # noise_injection.seed wins


def test_restored_after_an_error(make_model: Callable[..., nn.Module]) -> None:
    model = make_model()
    before = _snapshot(model)
    injector = NoiseInjector(model, _cfg(), total_steps=10, seed=0)
    with pytest.raises(RuntimeError, match="generation failed"):
        with injector.around_rollout(5):
            raise RuntimeError("generation failed")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bf16_norms_keep_small_noise(make_model: Callable[..., nn.Module]) -> None:
    """sigma 1e-3 is below half a bf16 ulp at 1.0 (2^-8 = 3.9e-3): round-to-nearest would erase
    nearly all of it; the injector's stochastic rounding keeps it, bit-exact restore included."""
    model = make_model(dtype=torch.bfloat16)
    before = _snapshot(model)
    injector = NoiseInjector(model, _cfg(), total_steps=100, seed=0)
    with injector.around_rollout(50) as sigma:
        diffs = torch.cat(
            [(w.detach().float() - before[f"{n}.weight"].float()) for n, w in injector.targets]
        )
    assert sigma == pytest.approx(1e-3)
    # The weights are 1.0 (ulp 2^-7 above, 2^-8 below): SR moves a weight with probability
    # ~|noise| / ulp, so about a fifth of 256 weights move; the std stays ~sigma on average.
    assert 20 < int((diffs != 0).sum()) < 120
    assert 0.5 * sigma < float(diffs.std()) < 2.0 * sigma
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
