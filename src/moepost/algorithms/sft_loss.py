"""Supervised fine-tuning loss: token cross-entropy without a float32 copy of the logits."""

from __future__ import annotations

import torch

from moepost.algorithms.aggregate import Normaliser
from moepost.algorithms.logprobs import token_logprobs

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Labels aligned with logits: out[b, t] = labels[b, t + 1], the last position ignored.

    labels: [B, T] (input_ids with prompt / padding already set to ignore_index). Returns [B, T].
    """
    shifted = torch.full_like(labels, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = 1024,
    num_global_tokens: Normaliser | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed token cross-entropy divided by the step's token count.

    logits: [B, T, V] any float dtype; labels: [B, T] already shifted (labels[b, t] is the target
    of logits[b, t]), ignore_index (-100) where no loss is taken. num_global_tokens: valid tokens
    of the whole optimizer step (all micro-batches and ranks), default this batch's count; with
    it, the per-micro-batch losses add up to the one-big-batch mean.
    Returns (loss, metrics) with detached 0-dim tensors num_tokens, loss_sum and token_accuracy
    (share of valid tokens whose argmax is the label), all local to this batch.
    """
    valid = labels != ignore_index
    targets = torch.where(valid, labels, torch.full_like(labels, -1))
    logprobs = token_logprobs(logits, targets, chunk_size=chunk_size)  # 0 where ignored
    loss_sum = -logprobs.sum()
    num_tokens = valid.sum()
    denominator = num_tokens if num_global_tokens is None else num_global_tokens
    denominator = torch.as_tensor(denominator, dtype=loss_sum.dtype, device=loss_sum.device)
    loss = loss_sum / denominator.clamp(min=1)

    with torch.no_grad():
        # argmax of the original dtype: the float cast is monotone, so no float32 copy needed.
        correct = torch.zeros((), dtype=torch.long, device=logits.device)
        for start in range(0, logits.shape[1], chunk_size):
            chunk_pred = logits[:, start : start + chunk_size].argmax(dim=-1)
            chunk_valid = valid[:, start : start + chunk_size]
            correct += ((chunk_pred == labels[:, start : start + chunk_size]) & chunk_valid).sum()
        count = num_tokens.to(torch.float32)
        metrics = {
            "num_tokens": count,
            "loss_sum": loss_sum.detach(),
            "token_accuracy": correct.to(torch.float32) / count.clamp(min=1),
        }
    return loss, metrics


def sft_loss_from_logprobs(
    logprobs: torch.Tensor,
    correct: torch.Tensor,
    *,
    keep: torch.Tensor | None = None,
    num_global_tokens: Normaliser | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`sft_loss` from the log-probs of the N target tokens alone (the chunked LM head's output).

    logprobs: [N] float; correct: [N] bool, argmax == label; keep: [N] bool, tokens that stay
    in the loss (default all): the others are cut out of the graph with `torch.where`, so a
    NaN there sends an exact zero gradient back, and they leave num_tokens and the accuracy,
    but not `num_global_tokens`. Returns (loss, metrics) as `sft_loss` does.
    """
    if keep is not None:
        logprobs = torch.where(keep, logprobs, torch.zeros_like(logprobs))
        correct = correct & keep
    loss_sum = -logprobs.sum()
    num_tokens = torch.as_tensor(
        logprobs.numel() if keep is None else keep.sum(), device=logprobs.device
    )
    denominator = num_tokens if num_global_tokens is None else num_global_tokens
    denominator = torch.as_tensor(denominator, dtype=loss_sum.dtype, device=loss_sum.device)
    loss = loss_sum / denominator.clamp(min=1)
    count = num_tokens.to(torch.float32)
    metrics = {
        "num_tokens": count,
        "loss_sum": loss_sum.detach(),
        "token_accuracy": correct.sum().to(torch.float32) / count.clamp(min=1),
    }
    return loss, metrics
