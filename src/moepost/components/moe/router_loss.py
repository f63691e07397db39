"""The router's aux (+ z) loss of one micro-batch, as a call without hidden state.

The global-batch route counts come in as arguments, as the policy losses take
`num_global_tokens`: the caller counts them (a pre-pass over the step) and passes them on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moepost.algorithms.moe import load_balancing_loss, load_balancing_loss_global, router_z_loss


@dataclass(frozen=True)
class GlobalRouteCounts:
    """Expert counts of the whole step (all micro-batches, all ranks) for the global aux loss."""

    counts: torch.Tensor  # [E] layer-pooled (token, choice) slots per expert
    num_tokens: float  # tokens counted, each once


def router_aux_loss(
    logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    top_k: int,
    aux_coef: float,
    z_coef: float,
    global_counts: GlobalRouteCounts | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """aux_coef x load-balancing loss (+ z_coef x z-loss) of one micro-batch, and its metrics.

    logits: [L, N, E] raw router logits; mask: [N] the tokens that count (padding excluded).
    With `global_counts` the f_e of the load-balancing loss are the whole step's.
    """
    if global_counts is not None:
        aux = load_balancing_loss_global(
            logits,
            top_k,
            mask,
            global_counts=global_counts.counts,
            global_num_tokens=global_counts.num_tokens,
        )
    else:
        aux = load_balancing_loss(logits, top_k, mask)
    total = aux_coef * aux
    metrics = {"aux_loss": float(aux.detach())}
    if z_coef:
        z = router_z_loss(logits, mask)
        total = total + z_coef * z
        metrics["z_loss"] = float(z.detach())
    return total, metrics
