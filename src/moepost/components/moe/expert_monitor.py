"""Expert-load and routing-drift statistics between two flushes (one logged step).

`add_load` and `add_drift` accumulate over the micro-batches and updates of a step; `flush`
turns them into the `moe/*` metrics and the `expert_load.jsonl` row and starts the next
interval. Only `moe/collapse_steps` (and the one-time collapse warning) span the whole run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from moepost.algorithms.moe import load_stats_from_counts, routing_counts, routing_drift
from moepost.config.schema import MoEConfig

log = logging.getLogger("moepost.moe")


class ExpertMonitor:
    def __init__(self, num_experts: int, cfg: MoEConfig) -> None:
        self.num_experts = num_experts
        self.entropy_threshold = cfg.collapse_entropy_threshold
        self.dead_threshold = cfg.collapse_dead_threshold
        self._counts: torch.Tensor | None = None  # [L, E] summed since the last flush
        self._drift: dict[str, list[tuple[float, float]]] = {}  # (rate, tokens) per pass
        self._collapses = 0  # run lifetime: steps whose load collapsed
        self._warned = False

    def add_load(self, indices: torch.Tensor, mask: torch.Tensor) -> None:
        """Per-layer expert counts of routes `indices` [L, N, K] over the `mask` [N] tokens."""
        counts = routing_counts(indices, self.num_experts, mask, per_layer=True)
        self._counts = counts if self._counts is None else self._counts + counts

    def add_drift(self, key: str, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> None:
        """Flip rate of routes `b` against `a` ([L, N, K]) over the `mask` tokens."""
        value = routing_drift(a, b, mask)["flip_rate"]
        if torch.isfinite(value):
            self._drift.setdefault(key, []).append((float(value), float(mask.sum())))

    def flush(
        self, step: int, *, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> tuple[dict[str, float], dict[str, Any] | None]:
        """`moe/*` metrics since the last flush, and the `expert_load.jsonl` row.

        Data parallel: `reduce_sum` (a sum over ranks) makes the load statistics those of
        every rank's tokens; every rank must call flush at the same steps.
        """
        metrics: dict[str, float] = {}
        for key, values in self._drift.items():  # token-weighted: any micro-batch split agrees
            metrics[key] = sum(r * n for r, n in values) / sum(n for _, n in values)
        self._drift = {}
        if self._counts is None:
            return metrics, None
        if reduce_sum is not None:
            self._counts = reduce_sum(self._counts)
        stats = load_stats_from_counts(self._counts)
        self._counts = None
        entropy = stats["entropy"]
        metrics["moe/load_entropy"] = float(entropy.nanmean())
        metrics["moe/load_entropy_min"] = float(entropy.min())
        metrics["moe/max_violation"] = float(stats["max_violation"].max())
        metrics["moe/cv"] = float(stats["cv"].mean())
        metrics["moe/dead_experts"] = float(stats["dead"].sum())
        self._count_collapse(step, stats)
        metrics["moe/collapse_steps"] = float(self._collapses)
        row = {
            "step": step,
            "load_fraction": [[round(float(x), 6) for x in r] for r in stats["load_fraction"]],
            "entropy": [float(e) for e in entropy],
            "dead": [int(d) for d in stats["dead"]],
        }
        return metrics, row

    def _count_collapse(self, step: int, stats: dict[str, torch.Tensor]) -> None:
        entropy = stats["entropy"]
        collapsed = (entropy < self.entropy_threshold) | (stats["dead"] > self.dead_threshold)
        if not bool(collapsed.any()):
            return
        self._collapses += 1
        if not self._warned:
            self._warned = True
            layers = [i for i, c in enumerate(collapsed.tolist()) if c]
            log.warning(
                "expert load collapsed in MoE layer(s) %s at step %d (normalised entropy %s, "
                "dead experts %s); further collapses are counted in moe/collapse_steps",
                layers, step, [round(float(e), 3) for e in entropy], stats["dead"].tolist(),
            )  # fmt: skip
