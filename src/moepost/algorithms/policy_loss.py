"""Clipped policy-gradient losses of the RL family: GRPO, GSPO, DAPO, Dr.GRPO, REINFORCE, RLOO,
CISPO. They differ in three choices only: the ratio level, the clip range and the aggregation
(see docs ALGORITHMS.md); this module is those choices and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Literal

import torch

from moepost.algorithms.aggregate import Aggregation, Normaliser, aggregate
from moepost.algorithms.kl import KLEstimator, kl_penalty
from moepost.errors import UserError

RatioLevel = Literal["token", "sequence", "sequence_token", "none", "cispo"]
RATIO_LEVELS: tuple[str, ...] = ("token", "sequence", "sequence_token", "none", "cispo")

_LOG_RATIO_CLAMP = 20.0

AdvantageMode = Literal["std", "mean", "rloo"]


@dataclass(frozen=True)
class AlgorithmPreset:
    """One algorithm's defaults (ALGORITHMS.md, "Algorithm presets"). Config loading copies
    them into every `rl.*` field left unset (`config.validate.resolve_rl_presets`), once; the
    run then reads `cfg.rl`, never this table.

    ratio_level .. kl_estimator are `policy_loss` keyword arguments (clip_eps_* of "none" are
    unused; CISPO uses only clip_eps_high: its weight is min(r, 1 + eps_high)). advantage_mode:
    "std" divides group advantages by the group's std, "mean" subtracts the mean only, "rloo"
    is the leave-one-out baseline.
    """

    ratio_level: RatioLevel
    clip_eps_low: float
    clip_eps_high: float
    aggregation: Aggregation
    kl_coef: float
    kl_estimator: KLEstimator
    advantage_mode: AdvantageMode
    dynamic_sampling: bool
    overlong_shaping: bool


# Read-only: a preset is a value, not a place to patch a run's settings.
ALGORITHM_PRESETS: Mapping[str, AlgorithmPreset] = MappingProxyType(
    {
        "gspo": AlgorithmPreset(
            ratio_level="sequence",
            clip_eps_low=3e-4,
            clip_eps_high=4e-4,
            aggregation="seq_mean_token_mean",
            kl_coef=0.0,
            kl_estimator="k3",
            advantage_mode="std",
            dynamic_sampling=False,
            overlong_shaping=False,
        ),
        "grpo": AlgorithmPreset(
            ratio_level="token",
            clip_eps_low=0.2,
            clip_eps_high=0.2,
            aggregation="seq_mean_token_mean",
            kl_coef=0.04,
            kl_estimator="k3",
            advantage_mode="std",
            dynamic_sampling=False,
            overlong_shaping=False,
        ),
        "dapo": AlgorithmPreset(
            ratio_level="token",
            clip_eps_low=0.2,
            clip_eps_high=0.28,
            aggregation="token_mean",
            kl_coef=0.0,
            kl_estimator="k3",
            advantage_mode="std",
            dynamic_sampling=True,
            overlong_shaping=True,
        ),
        "dr_grpo": AlgorithmPreset(
            ratio_level="token",
            clip_eps_low=0.2,
            clip_eps_high=0.2,
            aggregation="seq_mean_token_sum_norm",
            kl_coef=0.0,
            kl_estimator="k3",
            advantage_mode="mean",
            dynamic_sampling=False,
            overlong_shaping=False,
        ),
        "reinforce": AlgorithmPreset(
            ratio_level="none",
            clip_eps_low=0.2,
            clip_eps_high=0.2,
            aggregation="seq_mean_token_mean",
            kl_coef=0.0,
            kl_estimator="k3",
            advantage_mode="mean",
            dynamic_sampling=False,
            overlong_shaping=False,
        ),
        "rloo": AlgorithmPreset(
            ratio_level="none",
            clip_eps_low=0.2,
            clip_eps_high=0.2,
            aggregation="seq_mean_token_mean",
            kl_coef=0.0,
            kl_estimator="k3",
            advantage_mode="rloo",
            dynamic_sampling=False,
            overlong_shaping=False,
        ),
        "cispo": AlgorithmPreset(
            ratio_level="cispo",
            clip_eps_low=0.2,
            clip_eps_high=0.28,
            aggregation="token_mean",
            kl_coef=0.0,
            kl_estimator="k3",
            advantage_mode="std",
            dynamic_sampling=False,
            overlong_shaping=False,
        ),
    }
)


def _clipped_objective(
    ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(-min(r A, clip(r) A), clipped-branch-active mask); all tensors [B, T]."""
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).detach()


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    picked = torch.where(valid, values, torch.zeros_like(values))
    return (picked.sum() / valid.sum().clamp(min=1)).detach()


def _sequence_log_ratio(log_ratio: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B] mean token log-ratio per sequence (log of GSPO's length-normalised ratio s_i)."""
    return log_ratio.sum(dim=-1) / valid.sum(dim=-1).clamp(min=1).to(log_ratio.dtype)


def _per_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    valid: torch.Tensor,
    ratio_level: str,
    eps_low: float,
    eps_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """([B, T] loss, ratio, clipped) with ratio / clipped [B, T] for token-level ratios and [B]
    (one per sequence) for GSPO's sequence ratios, matching the unit clip_frac is counted in.
    """
    log_ratio = (logprobs - old_logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    log_ratio = torch.where(valid, log_ratio, torch.zeros_like(log_ratio))
    if ratio_level == "token":
        ratio = torch.exp(log_ratio)
        loss, clipped = _clipped_objective(ratio, advantages, eps_low, eps_high)
        return loss, ratio.detach(), clipped
    if ratio_level in ("sequence", "sequence_token"):
        seq_ratio = torch.exp(_sequence_log_ratio(log_ratio, valid))[:, None]
        if ratio_level == "sequence":
            ratio = seq_ratio.expand_as(logprobs)
        else:
            # Value s_i on every token, gradient s_i * d logp_t: lets A vary along the sequence.
            ratio = seq_ratio.detach() * torch.exp(logprobs - logprobs.detach())
        loss, clipped = _clipped_objective(ratio, advantages, eps_low, eps_high)
        return loss, seq_ratio.detach().squeeze(-1), (clipped & valid).any(dim=-1)
    ratio = torch.exp(log_ratio).detach()
    if ratio_level == "cispo":
        weight = ratio.clamp(max=1.0 + eps_high)
        return -weight * advantages * logprobs, ratio, ratio > 1.0 + eps_high
    # "none": plain policy gradient, for REINFORCE / RLOO on fresh samples.
    return -advantages * logprobs, ratio, torch.zeros_like(valid)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ratio_level: RatioLevel,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    aggregation: Aggregation = "seq_mean_token_mean",
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    max_new_tokens: int | None = None,
    num_global_tokens: Normaliser | None = None,
    num_global_seqs: Normaliser | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy-gradient loss of one micro-batch, scaled for the whole optimizer step.

    logprobs: [B, T] float32 under the current policy (with grad); old_logprobs: [B, T] from the
    sampling / pre-update policy (may be None for ratio_level "none"); advantages: [B] (one per
    sequence) or [B, T] (per token); mask: [B, T] completion mask; ref_logprobs: [B, T] or None.
    Ratio levels: token (GRPO/DAPO), sequence (GSPO), sequence_token (GSPO-token), cispo,
    none (REINFORCE/RLOO). The k-estimator KL times kl_coef is added per token before
    aggregation. Normalisers: see moepost.algorithms.aggregate.aggregate.

    Returns (loss scalar, metrics), metrics as detached 0-dim tensors (no host sync):
    pg_loss: the policy-gradient part of the returned loss (same normalisers, so it sums over
    micro-batches like the loss); means over this micro-batch's valid tokens: kl (only when
    ref_logprobs is given), approx_kl = mean(old - logp), and clip_frac, ratio_mean (over
    non-empty sequences for sequence ratios); num_tokens, num_seqs weight them globally.
    """
    if ratio_level not in RATIO_LEVELS:
        raise UserError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    if old_logprobs is None:
        if ratio_level != "none":
            raise ValueError(f"ratio_level {ratio_level!r} needs old_logprobs")
        old_logprobs = logprobs.detach()
    valid = mask.bool()
    advantages = advantages.to(logprobs.dtype)
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    advantages = advantages.expand_as(logprobs)
    # Padding may hold anything (even NaN); it must not leak into sums or gradients.
    logprobs = torch.where(valid, logprobs, torch.zeros_like(logprobs))
    old_logprobs = torch.where(valid, old_logprobs.detach(), torch.zeros_like(logprobs))

    per_token, ratio, clipped = _per_token_loss(
        logprobs, old_logprobs, advantages, valid, ratio_level, clip_eps_low, clip_eps_high
    )
    aggregate_step = partial(  # the whole step's normalisers fixed
        aggregate,
        mode=aggregation,
        num_global_tokens=num_global_tokens,
        num_global_seqs=num_global_seqs,
        max_new_tokens=max_new_tokens,
    )
    pg_loss = aggregate_step(per_token, valid)
    loss = pg_loss
    metrics: dict[str, torch.Tensor] = {"pg_loss": pg_loss.detach()}

    if ref_logprobs is not None:
        ref = torch.where(valid, ref_logprobs.detach(), torch.zeros_like(logprobs))
        kl = kl_penalty(logprobs, ref, estimator=kl_estimator)
        if kl_coef > 0:
            loss = loss + aggregate_step(kl_coef * kl, valid)
        metrics["kl"] = _masked_mean(kl, valid)

    nonempty = valid.any(dim=-1)
    with torch.no_grad():
        # [B] stats (sequence ratios) are averaged over sequences, [B, T] ones over tokens.
        stat_valid = nonempty if ratio.dim() == 1 else valid
        metrics["clip_frac"] = _masked_mean(clipped.float(), stat_valid)
        metrics["ratio_mean"] = _masked_mean(ratio, stat_valid)
        metrics["approx_kl"] = _masked_mean(old_logprobs - logprobs, valid)
        metrics["num_tokens"] = valid.sum().to(torch.float32)
        metrics["num_seqs"] = nonempty.sum().to(torch.float32)
    return loss, metrics
