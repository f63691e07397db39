"""Optimizer, fp32 master weights and learning-rate schedule construction."""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch

from moepost.config.schema import OptimConfig


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimConfig
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (decay only on tensors with dim >= 2).

    With `stochastic_rounding` the bf16 weights are updated through our stochastic-rounding AdamW,
    so updates smaller than bf16's resolution survive on average.
    """
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters (is everything frozen?)")
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    if cfg.stochastic_rounding:
        from moepost.algorithms.sr_adamw import StochasticRoundingAdamW

        return StochasticRoundingAdamW(groups, lr=cfg.learning_rate, betas=betas, eps=cfg.eps)
    # The fused kernel (CPU and CUDA) is ~8x faster than the per-tensor loop on a 20 M MoE
    # (bench/sft_vs_trl.py); foreach is the fallback where fused is not built.
    adamw = partial(torch.optim.AdamW, groups, lr=cfg.learning_rate, betas=betas, eps=cfg.eps)
    try:
        return adamw(fused=True)
    except (RuntimeError, ValueError):
        return adamw(foreach=True)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based).

    Linear warm-up from 1/(warmup+1) to 1, then constant, linear decay to 0, or cosine to 0.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_scheduler {kind!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        return lr_factor(step, total_steps=total_steps, warmup_steps=warmup, kind=cfg.lr_scheduler)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class MasterWeights:
    """fp32 master copies of low-precision trainable parameters (`optim.master_weights: fp32`).

    bf16 has 8 significant bits: an AdamW step of lr ~1e-6 on a weight near 1 is far below half
    an ulp (2^-9 relative) and round-to-nearest drops it, every step. Here the optimizer steps on
    float32 masters, which accumulate those updates; the model's bf16 weights are the masters
    rounded to nearest after each step, so they move once the accumulated change is large enough.

    Per optimizer step: `grads_to_masters()` (upcast the model's gradients into the masters'
    `.grad`, free the model's) -> gradient pipeline and optimizer step on `masters` ->
    `masters_to_params()`. float32 parameters are their own master (no copy, no extra memory).
    """

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.masters: list[torch.nn.Parameter] = [
            p if p.dtype == torch.float32 else torch.nn.Parameter(p.detach().float().clone())
            for p in params
        ]

    def _pairs(self) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        return [(p, m) for p, m in zip(self.params, self.masters) if m is not p]

    @torch.no_grad()
    def grads_to_masters(self) -> None:
        for p, m in self._pairs():
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def masters_to_params(self) -> None:
        for p, m in self._pairs():
            p.copy_(m)

    @torch.no_grad()
    def refresh_from_params(self) -> None:
        """Masters := the model's current weights (after loading weights without masters)."""
        for p, m in self._pairs():
            m.copy_(p)

    def zero_grad(self) -> None:
        for p, m in zip(self.params, self.masters):
            p.grad = None
            m.grad = None

    def state_dict(self) -> dict[str, Any]:
        # The masters hold what the bf16 weights cannot: without them a resume would restart
        # from the rounded weights and lose every not-yet-visible update.
        return {"masters": [m.detach().clone() for _, m in self._pairs()]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        pairs = self._pairs()
        saved = state["masters"]
        if len(saved) != len(pairs):
            raise ValueError(f"master weights: checkpoint has {len(saved)}, model {len(pairs)}")
        for (p, m), value in zip(pairs, saved):
            m.copy_(value.to(m.device, torch.float32))
            p.copy_(m)
