"""Router statistics and auxiliary losses for top-k Mixture-of-Experts layers.

Shapes: L MoE layers, N token rows per layer (batch * sequence, flattened), E experts,
K experts per token (top_k). ``router_logits`` are the raw router outputs ``h W^T`` captured at
the gate, stacked over layers ([L, N, E]); ``indices`` are the chosen experts ([L, N, K]).
``mask`` ([N], bool or 0/1) marks the valid token rows; the same mask applies to every layer.

Conventions follow docs/ALGORITHMS.md ("MoE router"):

* The load-balancing loss uses Hugging Face's scaling (the one ``router_aux_loss_coef`` was tuned
  against): tokens of all layers are pooled, f_e = c_e / T_rows with c_e the number of (row,
  choice) slots routed to e (so sum_e f_e = K), P_e = mean router probability of e, and
  aux = E * sum_e f_e P_e. Perfect balance gives K, not 1.
* Load statistics use f_e = c_e / (K T) per layer (sum_e f_e = 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "expert_load_stats",
    "load_balancing_loss",
    "load_balancing_loss_global",
    "looks_like_probabilities",
    "router_z_loss",
    "routing_counts",
    "routing_drift",
]


def _as_layers(router_logits: Tensor | Sequence[Tensor]) -> Tensor:
    """Stack per-layer [N, E] logits into [L, N, E]; a [N, E] tensor counts as one layer."""
    if not isinstance(router_logits, Tensor):
        router_logits = torch.stack(list(router_logits))
    if router_logits.dim() == 2:
        router_logits = router_logits.unsqueeze(0)
    if router_logits.dim() != 3:
        raise ValueError(f"router_logits must be [L, N, E], got shape {tuple(router_logits.shape)}")
    return router_logits


def _valid_rows(mask: Tensor | None, num_rows: int, device: torch.device) -> Tensor:
    """[N] bool mask of valid token rows (all True when mask is None)."""
    if mask is None:
        return torch.ones(num_rows, dtype=torch.bool, device=device)
    flat = mask.reshape(-1)
    if flat.numel() != num_rows:
        raise ValueError(f"mask has {flat.numel()} entries but there are {num_rows} token rows")
    return flat.to(device=device).bool()


def looks_like_probabilities(router_outputs: Tensor, atol: float = 1e-3) -> bool:
    """True when captured router rows [..., E] are already softmax outputs, not raw logits.

    The aux and z losses need raw logits; a hook that captured probabilities would silently
    compute softmax(softmax(.)). Rows that are all >= 0 and sum to 1 are almost never logits.
    """
    rows = router_outputs.detach().float().reshape(-1, router_outputs.shape[-1])
    if rows.numel() == 0:
        return False
    sums_to_one = torch.allclose(rows.sum(-1), torch.ones_like(rows[:, 0]), atol=atol)
    return bool((rows >= 0).all()) and sums_to_one


def routing_counts(
    indices: Tensor, num_experts: int, mask: Tensor | None = None, *, per_layer: bool = False
) -> Tensor:
    """Number of (token, choice) slots routed to each expert, over valid tokens.

    Args:
        indices: [L, N, K] (or [N, K]) expert ids chosen by top-k.
        num_experts: E.
        mask: [N] valid token rows, or None for all.
        per_layer: return [L, E] instead of the layer-pooled [E].

    Returns:
        int64 counts, [E] (pooled over layers) or [L, E]. Integer so that an all-reduce sum over
        ranks and micro-batches stays exact.
    """
    if indices.dim() == 2:
        indices = indices.unsqueeze(0)
    num_layers, num_rows, top_k = indices.shape
    valid = _valid_rows(mask, num_rows, indices.device)
    weights = valid.to(torch.int64).view(1, num_rows, 1).expand(num_layers, num_rows, top_k)
    counts = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=indices.device)
    counts.scatter_add_(1, indices.reshape(num_layers, -1).long(), weights.reshape(num_layers, -1))
    return counts if per_layer else counts.sum(0)


def load_balancing_loss(
    router_logits: Tensor | Sequence[Tensor],
    top_k: int,
    mask: Tensor | None = None,
    *,
    scaling: Literal["hf"] = "hf",
) -> Tensor:
    """Switch-style load-balancing loss with Hugging Face scaling, from local tokens only.

    Args:
        router_logits: [L, N, E] raw router logits (not probabilities), or a sequence of L
            [N, E] tensors.
        top_k: K.
        mask: [N] valid token rows (padding excluded), or None.
        scaling: only "hf": aux = E * sum_e f_e P_e with f_e summed over the K choices.

    Returns:
        float32 scalar; gradients flow through P_e only (the top-k choice is discrete).
    """
    if scaling != "hf":
        raise ValueError(f"unknown load-balancing scaling {scaling!r}; expected 'hf'")
    logits = _as_layers(router_logits)
    valid = _valid_rows(mask, logits.shape[1], logits.device)
    probs = torch.softmax(logits.float(), dim=-1)  # float32, as the router does
    indices = torch.topk(probs, top_k, dim=-1).indices
    counts = routing_counts(indices, logits.shape[-1], valid)
    return _hf_aux(logits, probs, valid, counts, counts.sum() / top_k)


def load_balancing_loss_global(
    router_logits: Tensor | Sequence[Tensor],
    top_k: int,
    mask: Tensor | None = None,
    *,
    global_counts: Tensor,
    global_num_tokens: float | Tensor | None = None,
    scaling: Literal["hf"] = "hf",
) -> Tensor:
    """Global-batch load-balancing loss: f_e from the whole step's counts, P_e from local tokens.

    Typical use: ``c = routing_counts(indices, E, mask)`` for every micro-batch of the step, sum
    them, all-reduce (SUM) over data-parallel ranks, then call this for each micro-batch.

    Args:
        router_logits: [L, N, E] raw local router logits (or a sequence of L [N, E]).
        top_k: K.
        mask: [N] valid local token rows, or None.
        global_counts: [E] layer-pooled counts, or [L, E] per-layer counts (summed here), of the
            whole step (all micro-batches, all ranks).
        global_num_tokens: valid tokens of the whole step, each counted once (not times L).
            None derives it from the counts: every valid token puts K slots in every layer.
        scaling: only "hf".

    Returns:
        float32 scalar. With local counts and tokens it equals ``load_balancing_loss``.
    """
    if scaling != "hf":
        raise ValueError(f"unknown load-balancing scaling {scaling!r}; expected 'hf'")
    logits = _as_layers(router_logits)
    valid = _valid_rows(mask, logits.shape[1], logits.device)
    probs = torch.softmax(logits.float(), dim=-1)  # float32, as the router does
    counts = global_counts.to(logits.device)
    counts = counts.sum(0) if counts.dim() == 2 else counts
    if counts.shape != (logits.shape[-1],):
        raise ValueError(f"global_counts must be [E] or [L, E] with E={logits.shape[-1]}")
    if global_num_tokens is None:
        global_rows = counts.sum() / top_k
    else:
        global_rows = torch.as_tensor(global_num_tokens, device=logits.device) * logits.shape[0]
    return _hf_aux(logits, probs, valid, counts, global_rows)


def _hf_aux(logits: Tensor, probs: Tensor, valid: Tensor, counts: Tensor, rows: Tensor) -> Tensor:
    """E * sum_e (c_e / rows) * P_e, P_e the mean local probability over valid (layer, row)."""
    local_rows = valid.sum() * logits.shape[0]
    if local_rows == 0 or rows == 0:
        # Keep the graph so callers can always add it to the loss and backpropagate.
        return logits.float().sum() * 0.0
    prob_per_expert = (probs * valid.view(1, -1, 1).to(probs.dtype)).sum(dim=(0, 1)) / local_rows
    tokens_per_expert = counts.to(torch.float32) / rows.to(torch.float32)
    return logits.shape[-1] * (tokens_per_expert * prob_per_expert).sum()


def router_z_loss(router_logits: Tensor | Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
    """Router z-loss: mean over valid (layer, token) rows of logsumexp(logits)^2.

    Args:
        router_logits: [L, N, E] raw router logits (or a sequence of L [N, E]).
        mask: [N] valid token rows, or None.

    Returns:
        float32 scalar (0, still attached to the graph, when no row is valid).
    """
    logits = _as_layers(router_logits)
    valid = _valid_rows(mask, logits.shape[1], logits.device)
    lse_sq = torch.logsumexp(logits.float(), dim=-1).square()  # [L, N]
    weights = valid.view(1, -1).to(lse_sq.dtype).expand_as(lse_sq)
    return (lse_sq * weights).sum() / weights.sum().clamp_min(1.0)


def expert_load_stats(
    indices: Tensor, num_experts: int, mask: Tensor | None = None
) -> dict[str, Tensor]:
    """Per-layer load statistics from the chosen experts of valid tokens.

    Args:
        indices: [L, N, K] int64 expert ids (or [N, K] for one layer).
        num_experts: E.
        mask: [N] valid token rows, or None.

    Returns:
        ``counts`` [L, E] int64; ``load_fraction`` [L, E] = c_e / (K T); ``entropy`` [L]
        normalised -sum f log f / log E (0 log 0 = 0; 1 = uniform); ``max_violation`` [L] =
        (max c - mean c) / mean c; ``cv`` [L] = population std(c) / mean(c); ``dead`` [L] int64 =
        #{c_e = 0}. Layers without a valid token get NaN entropy / max_violation / cv.
    """
    if indices.dim() == 2:
        indices = indices.unsqueeze(0)
    return load_stats_from_counts(routing_counts(indices, num_experts, mask, per_layer=True))


def load_stats_from_counts(counts: Tensor) -> dict[str, Tensor]:
    """`expert_load_stats` from per-layer counts [L, E] (e.g. summed over a whole step)."""
    num_experts = counts.shape[-1]
    c = counts.to(torch.float64)
    total = c.sum(-1, keepdim=True)
    fraction = c / total  # NaN for an empty layer, by design
    plogp = torch.where(c > 0, fraction * torch.log(fraction), torch.zeros_like(fraction))
    entropy = -plogp.sum(-1) / torch.log(torch.tensor(float(num_experts), dtype=torch.float64))
    entropy = torch.where(total.squeeze(-1) > 0, entropy, torch.full_like(entropy, float("nan")))
    mean = c.mean(-1)
    return {
        "counts": counts,
        "load_fraction": torch.nan_to_num(fraction, nan=0.0).float(),
        "entropy": entropy.float(),
        "max_violation": ((c.max(-1).values - mean) / mean).float(),
        "cv": (c.std(-1, correction=0) / mean).float(),
        "dead": (counts == 0).sum(-1),
    }


def routing_drift(
    indices_a: Tensor, indices_b: Tensor, mask: Tensor | None = None
) -> dict[str, Tensor]:
    """How much routing changed between two passes over the same tokens.

    Args:
        indices_a: [L, N, K] expert ids of pass A (e.g. the rollout engine).
        indices_b: [L, N, K] expert ids of pass B (e.g. the training forward).
        mask: [N] valid token rows, or None.

    Returns:
        ``flip_rate`` (scalar) and ``flip_rate_per_layer`` [L]: share of valid (layer, token)
        rows whose top-k SET differs (the order inside the top-k does not count);
        ``replaced_share`` (scalar) and ``replaced_share_per_layer`` [L]: mean of
        (K - |A ∩ B|) / K. Means are over valid rows; NaN when no row is valid.
    """
    if indices_a.shape != indices_b.shape:
        raise ValueError(
            f"routing_drift needs equal shapes, got {tuple(indices_a.shape)} and "
            f"{tuple(indices_b.shape)}"
        )
    if indices_a.dim() == 2:
        indices_a, indices_b = indices_a.unsqueeze(0), indices_b.unsqueeze(0)
    top_k = indices_a.shape[-1]
    valid = _valid_rows(mask, indices_a.shape[1], indices_a.device).to(torch.float32)
    sorted_a = indices_a.sort(dim=-1).values
    sorted_b = indices_b.sort(dim=-1).values
    flipped = (sorted_a != sorted_b).any(dim=-1).to(torch.float32)  # [L, N]
    # Top-k ids are distinct within a row, so matches of each A id against B count |A ∩ B|.
    overlap = (indices_a.unsqueeze(-1) == indices_b.unsqueeze(-2)).any(dim=-1).sum(dim=-1)
    replaced = (top_k - overlap).to(torch.float32) / top_k  # [L, N]
    n_valid = valid.sum()
    return {
        "flip_rate": (flipped * valid).sum() / (n_valid * flipped.shape[0]),
        "flip_rate_per_layer": (flipped * valid).sum(-1) / n_valid,
        "replaced_share": (replaced * valid).sum() / (n_valid * replaced.shape[0]),
        "replaced_share_per_layer": (replaced * valid).sum(-1) / n_valid,
    }
