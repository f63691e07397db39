"""Per-token log-probabilities and entropies from LM logits, computed chunk by chunk.

A [B, T, V] logits tensor of a MoE model with a 150k vocabulary is already the largest activation
of the step in bf16; a float32 copy of it (what a plain ``log_softmax(logits.float())`` makes, and
keeps alive for backward) can run a GPU out of memory. Everything here walks T in chunks, casts
one chunk to float32 at a time, and keeps only [B, T] results for backward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from moepost.errors import UserError


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 at least; float64 inputs stay float64 so gradcheck can be used in tests.
    return torch.promote_types(dtype, torch.float32)


def _check_options(temperature: float, chunk_size: int, logits_clip: float | None) -> None:
    if temperature <= 0:
        raise UserError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise UserError(f"logprob chunk_size must be >= 1, got {chunk_size}")
    if logits_clip is not None and logits_clip <= 0:
        raise UserError(f"logits_clip must be > 0 (or unset), got {logits_clip}")


def _scaled_chunk(
    chunk: torch.Tensor, temperature: float, logits_clip: float | None
) -> torch.Tensor:
    """Float32 (or float64) copy of a [B, c, V] chunk, divided by temperature and clamped."""
    x = chunk.to(_compute_dtype(chunk.dtype))
    if temperature != 1.0:
        x = x / temperature
    if logits_clip is not None:
        x = x.clamp(-logits_clip, logits_clip)
    return x


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., index] without keeping the full log_softmax.

    logits: [..., V] (any float dtype; computed in float32), index: [...] int64 in [0, V).
    Returns [...] float32. Not chunked: meant for one chunk or a small tensor.
    """
    x = logits.to(_compute_dtype(logits.dtype))
    picked = x.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(x, dim=-1)


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log p(label) with a hand-written chunked backward.

    Only the logits (already alive), the labels and the [B, T] logsumexp are saved, so backward
    also works one float32 chunk at a time and writes straight into one gradient buffer.
    d logp / d z = (onehot(label) - softmax(x)) * 1[|z/tau| <= clip] / tau, with x the clamped
    z / tau.
    """

    @staticmethod
    def forward(
        ctx: Any,  # torch's FunctionCtx; it carries the attributes set below
        logits: torch.Tensor,
        labels: torch.Tensor,
        temperature: float,
        chunk_size: int,
        logits_clip: float | None,
    ) -> torch.Tensor:
        batch, seq_len, _ = logits.shape
        valid = labels >= 0
        safe_labels = labels.clamp(min=0)
        out_dtype = _compute_dtype(logits.dtype)
        out = logits.new_empty((batch, seq_len), dtype=out_dtype)
        lse = logits.new_empty((batch, seq_len), dtype=out_dtype)
        for start in range(0, seq_len, chunk_size):
            end = min(start + chunk_size, seq_len)
            x = _scaled_chunk(logits[:, start:end], temperature, logits_clip)
            lse[:, start:end] = torch.logsumexp(x, dim=-1)
            picked = x.gather(-1, safe_labels[:, start:end, None]).squeeze(-1)
            out[:, start:end] = picked - lse[:, start:end]
        out = torch.where(valid, out, torch.zeros_like(out))
        ctx.save_for_backward(logits, safe_labels, valid, lse)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.logits_clip = logits_clip
        return out

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None, None, None]:
        logits, safe_labels, valid, lse = ctx.saved_tensors
        temperature, chunk_size, clip = ctx.temperature, ctx.chunk_size, ctx.logits_clip
        grad_logits = torch.empty_like(logits)
        grad = torch.where(valid, grad_out, torch.zeros_like(grad_out)).to(lse.dtype)
        for start in range(0, logits.shape[1], chunk_size):
            end = min(start + chunk_size, logits.shape[1])
            x = _scaled_chunk(logits[:, start:end], temperature, None)
            inside = None if clip is None else x.abs() <= clip
            if clip is not None:
                x = x.clamp(-clip, clip)
            g = grad[:, start:end, None]
            dx = torch.exp(x - lse[:, start:end, None]).mul_(-g)
            dx.scatter_add_(-1, safe_labels[:, start:end, None], g)
            if inside is not None:
                dx.mul_(inside)
            if temperature != 1.0:
                dx.div_(temperature)
            grad_logits[:, start:end] = dx.to(logits.dtype)
        return grad_logits, None, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    logits_clip: float | None = None,
    logprob_min: float | None = None,
) -> torch.Tensor:
    """Log-probability of each label token, chunked over T.

    logits: [B, T, V] (bf16/fp16/fp32), labels: [B, T] int64 aligned with logits (labels[b, t]
    is the token scored by logits[b, t]); negative labels (e.g. -100) are ignored: they get 0 and
    no gradient. temperature must match the sampling temperature or importance ratios are biased.
    Returns [B, T] float32 (float64 for float64 logits), differentiable w.r.t. logits.
    """
    _check_options(temperature, chunk_size, logits_clip)
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"token_logprobs expects logits [B, T, V] and labels [B, T], "
            f"got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    logprobs = _ChunkedTokenLogprobs.apply(
        logits, labels.long(), float(temperature), int(chunk_size), logits_clip
    )
    if logprob_min is not None:
        # A floor keeps one absurdly unlikely token from dominating ratios and the loss.
        logprobs = logprobs.clamp(min=logprob_min)
    return logprobs


def _chunk_entropy(chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    x = _scaled_chunk(chunk, temperature, None)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    probs = torch.exp(x - lse)
    # -inf logits (masked vocabulary) have p = 0; clamping keeps 0 * -inf from becoming NaN.
    x_finite = x.clamp(min=torch.finfo(x.dtype).min)
    return lse.squeeze(-1) - (probs * x_finite).sum(dim=-1)


def entropy_from_logits(
    logits: torch.Tensor, *, temperature: float = 1.0, chunk_size: int = 1024
) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position, chunked over T.

    logits: [B, T, V]. Returns [B, T] float32. Differentiable: under autograd each chunk is
    recomputed in backward (activation checkpointing) so no float32 [B, T, V] stays alive.
    """
    _check_options(temperature, chunk_size, None)
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    parts = []
    for start in range(0, logits.shape[1], chunk_size):
        chunk = logits[:, start : start + chunk_size]
        if needs_grad:
            parts.append(checkpoint(_chunk_entropy, chunk, temperature, use_reentrant=False))
        else:
            parts.append(_chunk_entropy(chunk, temperature))
    if not parts:
        return logits.new_zeros(logits.shape[:2], dtype=_compute_dtype(logits.dtype))
    return torch.cat(parts, dim=1)


def nonfinite_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Which sequences hold a NaN or Inf at a valid position.

    x: [B, T] (log-probs, ratios ...), mask: [B, T] (bool or 0/1). Returns [B] bool. Padding
    positions are not inspected: garbage there never reaches the loss.
    """
    return (~torch.isfinite(x) & mask.bool()).any(dim=-1)
