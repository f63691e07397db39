"""moepost's policy losses against TRL's own `GRPOTrainer._compute_loss` (trl 1.x), run unchanged.

The trainer object is made without `__init__` (no model, no data): `_compute_loss` reads a
handful of attributes, and its model call (`_get_per_token_logps_and_entropies`) is replaced
by one that returns the given log-probs. Both sides then see the same per-token log-probs, old
log-probs, reference log-probs, advantages and mask; the loss values and the gradients with
respect to the log-probs must agree. This pins the ratio level, the clipping, the KL term and
the aggregation to TRL's, which is what `bench/learning_vs_trl.py` compares against.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from trl import GRPOTrainer

from moepost.algorithms.policy_loss import policy_loss

B, T = 6, 7


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    old = -torch.rand(B, T, generator=g) * 3
    # Drift of up to 2e-3 per token: around GSPO's 3e-4 / 4e-4 range, so both branches occur.
    logp = old + (torch.rand(B, T, generator=g) - 0.5) * 4e-3
    return {
        "logp": logp,
        "old": old,
        "ref": old + (torch.rand(B, T, generator=g) - 0.5) * 0.2,
        "adv": torch.randn(B, generator=g),
        "mask": mask,
    }


def _trl(b: dict[str, torch.Tensor], **settings: Any) -> tuple[float, torch.Tensor]:
    trainer: Any = GRPOTrainer.__new__(GRPOTrainer)
    # DAPO / CISPO rescale by steps_per_generation: 1, one generation batch per optimizer step
    args = SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1)
    defaults = dict(
        importance_sampling_level="token", loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2,
        beta=0.0, max_completion_length=T, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, use_vllm=False, vllm_importance_sampling_correction=False,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, current_gradient_accumulation_steps=1,
        model=SimpleNamespace(training=True), accelerator=Accelerator(cpu=True), args=args,
        _metrics={"train": _Metrics(), "eval": _Metrics()},
    )  # fmt: skip
    for key, value in {**defaults, **settings}.items():
        object.__setattr__(trainer, key, value)
    logp = b["logp"].clone().requires_grad_(True)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros(B, T), None)
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": b["mask"],
        "advantages": b["adv"],
        "old_per_token_logps": b["old"],
        "ref_per_token_logps": b["ref"],
        "num_items_in_batch": b["mask"].sum(),
    }
    loss = trainer._compute_loss(None, inputs)
    loss.backward()
    assert logp.grad is not None
    return float(loss.detach()), logp.grad


class _Metrics(dict):  # TRL appends to `_metrics[mode][name]`
    def __missing__(self, key: str) -> list[float]:
        self[key] = []
        return self[key]


def _ours(b: dict[str, torch.Tensor], **settings: Any) -> tuple[float, torch.Tensor]:
    logp = b["logp"].clone().requires_grad_(True)
    loss, _ = policy_loss(logp, b["old"], b["adv"], b["mask"], ref_logprobs=b["ref"], **settings)
    loss.backward()
    assert logp.grad is not None
    return float(loss.detach()), logp.grad


CASES = {
    # name: (TRL settings, moepost settings); TRL's CISPO bound is absolute (1 + eps)
    "gspo": (
        dict(importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4),
        dict(ratio_level="sequence", clip_eps_low=3e-4, clip_eps_high=4e-4),
    ),
    "gspo_kl": (
        dict(importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4, beta=0.04),
        dict(ratio_level="sequence", clip_eps_low=3e-4, clip_eps_high=4e-4, kl_coef=0.04),
    ),
    "grpo_kl": (
        dict(epsilon_low=2e-4, epsilon_high=2e-4, beta=0.04),
        dict(ratio_level="token", clip_eps_low=2e-4, clip_eps_high=2e-4, kl_coef=0.04),
    ),
    "dapo": (
        dict(loss_type="dapo", epsilon_low=2e-4, epsilon_high=2.8e-4),
        dict(ratio_level="token", clip_eps_low=2e-4, clip_eps_high=2.8e-4, aggregation="token_mean"),
    ),
    "dr_grpo": (
        dict(loss_type="dr_grpo", epsilon_low=2e-4, epsilon_high=2e-4),
        dict(ratio_level="token", clip_eps_low=2e-4, clip_eps_high=2e-4,
             aggregation="seq_mean_token_sum_norm", max_new_tokens=T),
    ),
    "cispo": (
        dict(loss_type="cispo", epsilon_high=1 + 2e-4),
        dict(ratio_level="cispo", clip_eps_high=2e-4, aggregation="token_mean"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_gradient_equal_trls(name: str, seed: int) -> None:
    trl_settings, ours = CASES[name]
    b = _batch(seed)
    want_loss, want_grad = _trl(b, **trl_settings)
    got_loss, got_grad = _ours(b, **ours)
    assert got_loss == pytest.approx(want_loss, rel=1e-5, abs=1e-9)
    assert want_grad.abs().sum() > 0  # the case exercises a gradient
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-9)


def test_the_batch_hits_both_clip_branches() -> None:
    """Otherwise the clipping cases above would compare two unclipped losses."""
    b = _batch(0)
    _, metrics = policy_loss(
        b["logp"].clone(), b["old"], b["adv"], b["mask"],
        ratio_level="sequence", clip_eps_low=3e-4, clip_eps_high=4e-4,
    )  # fmt: skip
    assert 0.0 < float(metrics["clip_frac"]) < 1.0
