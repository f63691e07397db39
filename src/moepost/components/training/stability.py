"""The numerical-stability glue of both recipes (docs/stability.md).

- `GradientPipeline`, run between backward and the optimizer step. Order (ALGORITHMS.md):
  non-finite check -> centralise -> normalise -> adaptive clip (or plain clip) -> non-finite
  check -> optimizer step. Under data parallelism the gradients are already all-reduced when
  this runs, so every rank sees the same global norm and takes the same skip decision.
- `drop_nonfinite_rows`: takes rows with NaN/Inf log-probs out of a loss (SFT).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from moepost.algorithms.logprobs import nonfinite_rows, token_logprobs
from moepost.algorithms.stability import (
    GlobalAdaptiveClipper,
    PerTensorAdaptiveClipper,
    centralize_gradients,
    clip_by_global_norm,
    global_grad_norm,
    normalize_gradients,
)
from moepost.config.schema import StabilityConfig
from moepost.errors import UserError


class GradientPipeline:
    """Applies the configured gradient transforms and decides whether the step may run."""

    def __init__(self, cfg: StabilityConfig, max_grad_norm: float | None) -> None:
        self.cfg = cfg
        self.max_grad_norm = max_grad_norm
        agc = cfg.adaptive_grad_clip
        self.clipper: GlobalAdaptiveClipper | PerTensorAdaptiveClipper | None = None
        if agc.enabled and agc.mode == "global":
            # With warm-up steps, those steps use plain clipping at optim.max_grad_norm; without,
            # the first step's norm starts the EMA unclipped.
            self.clipper = GlobalAdaptiveClipper(
                ema_beta=agc.ema_beta,
                coef=agc.coef,
                warmup_steps=agc.warmup_steps,
                warmup_max_norm=max_grad_norm if agc.warmup_steps > 0 else None,
            )
        elif agc.enabled:
            self.clipper = PerTensorAdaptiveClipper(
                ema_beta=agc.ema_beta,
                coef=agc.coef,
                warmup_steps=agc.warmup_steps,
                warmup_max_norm=max_grad_norm or 1.0,
            )
        self.skipped_total = 0
        self.consecutive_skips = 0

    def __call__(self, params: list[torch.nn.Parameter]) -> tuple[bool, dict[str, float]]:
        """Transform the gradients of `params` in place; returns (step_ok, metrics).

        Metrics: `grad_norm` (straight out of backward), `stability/grad_norm_raw` (what the
        clipper saw, after centralisation / normalisation), `stability/grad_norm_clipped` (what
        the optimizer gets), `stability/clip_coef` (clipped / raw; 0 on a skipped step),
        `stability/grad_norm_ema` (global adaptive clipping), `stability/clipped_tensors` /
        `stability/in_warmup` (adaptive modes), `stability/step_skipped` (0/1) and
        `stability/skipped` (skipped steps so far in the run).
        """
        # Keep the None entries: the per-tensor clipper tracks its history by position.
        grads = [p.grad for p in params]
        if all(g is None for g in grads):
            return True, self._metrics(0.0, {"grad_norm_clipped": 0.0, "clip_coef": 1.0})
        raw = float(global_grad_norm(grads))
        if self.cfg.skip_nonfinite and not math.isfinite(raw):
            return self._skip(params, raw)
        # Centralisation / normalisation change the gradients: their norm must be taken again,
        # and only they can turn finite gradients non-finite (the clippers scale by <= 1).
        transformed = self.cfg.grad_centralization or self.cfg.grad_normalization.enabled
        if self.cfg.grad_centralization:
            centralize_gradients(grads)
        if self.cfg.grad_normalization.enabled:
            normalize_gradients(grads, self.cfg.grad_normalization.alpha)
        known = None if transformed else raw
        if self.clipper is not None:
            clip_metrics = self.clipper(grads)
        elif self.max_grad_norm is not None and self.max_grad_norm > 0:
            clip_metrics = clip_by_global_norm(grads, self.max_grad_norm, norm=known)
        else:
            norm = float(global_grad_norm(grads)) if known is None else known
            clip_metrics = {"grad_norm_raw": norm, "grad_norm_clipped": norm, "clip_coef": 1.0}
        if transformed:
            final = float(global_grad_norm(grads))
            if self.cfg.skip_nonfinite and not math.isfinite(final):
                return self._skip(params, final)
        self.consecutive_skips = 0
        return True, self._metrics(raw, clip_metrics)

    def _metrics(self, raw: float, clip_metrics: dict[str, float]) -> dict[str, float]:
        metrics = {"grad_norm": raw, "stability/grad_norm_raw": raw}
        for key, value in clip_metrics.items():
            metrics[f"stability/{key}"] = float(value)
        if isinstance(self.clipper, GlobalAdaptiveClipper):
            metrics["stability/grad_norm_ema"] = float(self.clipper.ema or 0.0)
        metrics["stability/step_skipped"] = 0.0
        metrics["stability/skipped"] = float(self.skipped_total)
        return metrics

    def _skip(self, params: list[torch.nn.Parameter], norm: float) -> tuple[bool, dict[str, float]]:
        # Zeroing (not just not stepping) keeps NaN out of the next accumulation and the
        # optimizer state; the scheduler is not advanced by the caller.
        for p in params:
            p.grad = None
        self.skipped_total += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.cfg.max_consecutive_skips:
            raise UserError(
                f"{self.consecutive_skips} consecutive optimizer steps had a non-finite gradient "
                f"norm ({norm}); stopping (stability.max_consecutive_skips = "
                f"{self.cfg.max_consecutive_skips}). The last checkpoint is intact; lower "
                "optim.learning_rate, enable stability.adaptive_grad_clip or check the data"
            )
        metrics = self._metrics(norm, {"grad_norm_clipped": 0.0, "clip_coef": 0.0})
        metrics["stability/step_skipped"] = 1.0
        return False, metrics

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"skipped_total": self.skipped_total}
        if self.clipper is not None:
            state["clipper"] = self.clipper.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_total = int(state.get("skipped_total", 0))
        if self.clipper is not None and "clipper" in state:
            self.clipper.load_state_dict(state["clipper"])


@torch.no_grad()
def _rows_with_nonfinite_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    valid = labels != ignore_index
    logprobs = token_logprobs(logits.detach(), torch.where(valid, labels, -1))
    return nonfinite_rows(logprobs, valid)


def drop_nonfinite_rows(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Take the rows whose target log-probs are NaN/Inf out of the loss and out of the graph.

    logits: [B, T, V]; labels: [B, T] aligned with logits, `ignore_index` where no loss is taken.
    Returns (logits with those rows zeroed, labels with them ignored, number of target tokens
    dropped). Masking the labels alone is not enough: the log-softmax backward multiplies a NaN
    softmax by the zero upstream gradient and still yields NaN; `torch.where` passes an exact
    zero gradient to the dropped rows instead. A NaN that starts inside the model (not in the
    logits) still reaches the weight gradients; the non-finite guard then skips the step.
    Meant for the rare path (call it when the loss came out non-finite): it runs one more
    log-softmax pass and copies the logits.
    """
    bad = _rows_with_nonfinite_logprobs(logits, labels, ignore_index)
    dropped = int(((labels != ignore_index) & bad[:, None]).sum())
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    clean = torch.where(bad[:, None, None], zero, logits)
    return clean, labels.masked_fill(bad[:, None], ignore_index), dropped
