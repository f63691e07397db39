"""LM head + log-softmax in chunks of rows: per-token log-probs without [N, V] logits.

The LM head of a 150k-vocabulary model turns N hidden states into N x V logits. Even with
`token_logprobs` walking them one float32 chunk at a time, the [N, V] logits themselves (model
dtype) and their gradient stay alive for backward; at N = 8192 tokens that is 2.4 GB in bf16,
twice. Here the head's matmul is part of the chunk: forward keeps only the hidden states, the
labels and one logsumexp per row, and backward recomputes each chunk's logits to form that
chunk's grad_hidden and its share of grad_weight. Peak extra memory is one [chunk, V] float32
block instead of [N, V], for one more head matmul per chunk in backward.

The numbers are the ones `token_logprobs(F.linear(hidden, weight, bias), labels, ...)` gives:
same float32 log-softmax after the temperature and the optional clamp (`logits_clip`), the same
zero gradient where a logit was clamped, and the same floor (`logprob_min`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from moepost.algorithms.logprobs import _check_options, _compute_dtype, _scaled_chunk


def _entropy(x: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """[c] entropy of softmax(x) for [c, V] float32 x with [c] logsumexp `lse`."""
    probs = torch.sub(x, lse[:, None]).exp_()
    # -inf logits (masked vocabulary) have p = 0; the clamp keeps 0 * -inf from becoming NaN.
    return lse - probs.mul_(x.clamp(min=torch.finfo(x.dtype).min)).sum(dim=-1)


def _chunk_stats(
    z: torch.Tensor, labels: torch.Tensor, temperature: float, clip: float | None, entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Of [c, V] logits `z`: log-prob of the label and logsumexp after the clamp, and
    (optionally) entropy and logsumexp without it (`entropy_from_logits` ignores the clip)."""
    x = _scaled_chunk(z, temperature, None)
    x_clipped = x if clip is None else x.clamp(-clip, clip)
    lse = torch.logsumexp(x_clipped, dim=-1)
    picked = x_clipped.gather(-1, labels[:, None]).squeeze(-1) - lse
    if not entropy:
        return picked, lse, None, None
    lse_all = lse if clip is None else torch.logsumexp(x, dim=-1)
    return picked, lse, _entropy(x, lse_all), lse_all


class _LinearTokenLogprobs(torch.autograd.Function):
    """(log p(label), entropy, argmax) of z = h W^T + b, chunked over rows.

    log p comes from softmax(clamp(z / tau, +-clip)), the entropy from softmax(z / tau), as
    `token_logprobs` and `entropy_from_logits` compute them. Saved for backward: hidden, weight,
    bias, labels and per row the logsumexps and the entropy.
    d logp / dx = onehot(label) - p with dx / dz = 1[|z/tau| <= clip] / tau;
    d H / dx = -p (log p + H) with dx / dz = 1 / tau.
    A row whose upstream gradients are all exactly zero gets an exact zero gradient, whatever its
    logits (so a row dropped with `torch.where` for NaN logits stays out of the gradients).
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        temperature: float,
        clip: float | None,
        chunk_size: int,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        cdt = _compute_dtype(hidden.dtype)
        valid = labels >= 0
        safe = labels.clamp(min=0)
        logprobs = hidden.new_zeros(n, dtype=cdt)
        lse = hidden.new_zeros(n, dtype=cdt)
        entropy = hidden.new_zeros(n if with_entropy else 0, dtype=cdt)
        lse_all = hidden.new_zeros(n if with_entropy else 0, dtype=cdt)
        argmax = torch.zeros(n, dtype=torch.long, device=hidden.device)
        with torch.no_grad():
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                z = F.linear(hidden[start:end], weight, bias)  # [c, V], model dtype
                argmax[start:end] = z.argmax(dim=-1)  # the float cast is monotone: no copy
                lp, lse[start:end], ent, ent_lse = _chunk_stats(
                    z, safe[start:end], temperature, clip, with_entropy
                )
                logprobs[start:end] = lp
                if ent is not None and ent_lse is not None:
                    entropy[start:end], lse_all[start:end] = ent, ent_lse
        logprobs = torch.where(valid, logprobs, torch.zeros_like(logprobs))
        ctx.save_for_backward(hidden, weight, bias, safe, valid, lse, entropy, lse_all)
        ctx.options = (temperature, clip, chunk_size)
        ctx.mark_non_differentiable(argmax)
        ctx.set_materialize_grads(False)
        return logprobs, entropy, argmax

    @staticmethod
    def backward(
        ctx: Any, g_lp: torch.Tensor | None, g_ent: torch.Tensor | None, _g_argmax: Any
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, safe, valid, lse, entropy, lse_all = ctx.saved_tensors
        temperature, clip, chunk_size = ctx.options
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        # float32 accumulation over chunks, cast once at the end (as one big matmul would)
        grad_w = (
            torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        )
        grad_b = (
            torch.zeros(weight.shape[0], dtype=lse.dtype, device=weight.device) if need_b else None
        )
        if g_lp is not None:
            g_lp = torch.where(valid, g_lp, torch.zeros_like(g_lp)).to(lse.dtype)
        if g_ent is not None and g_ent.numel() == 0:
            g_ent = None
        if g_ent is not None:
            g_ent = g_ent.to(lse.dtype)
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            h = hidden[start:end]
            with torch.no_grad():
                dx = _chunk_grad(
                    F.linear(h, weight, bias),
                    safe[start:end],
                    lse[start:end],
                    None if g_lp is None else g_lp[start:end],
                    None
                    if g_ent is None
                    else (g_ent[start:end], entropy[start:end], lse_all[start:end]),
                    temperature,
                    clip,
                )
                dz = dx.to(weight.dtype)
                if grad_h is not None:
                    grad_h[start:end] = dz @ weight
                if grad_w is not None:
                    grad_w += (dz.t() @ h).to(grad_w.dtype)
                if grad_b is not None:
                    grad_b += dz.sum(dim=0).to(grad_b.dtype)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _chunk_grad(
    z: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    g_lp: torch.Tensor | None,
    g_ent: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    temperature: float,
    clip: float | None,
) -> torch.Tensor:
    """[c, V] d loss / d z of one chunk (float32), from its recomputed logits `z`.
    g_ent: (upstream gradient, entropy, unclipped logsumexp) of the chunk's rows."""
    # In-place steps throughout: at most three [c, V] float32 blocks are alive at once.
    x = _scaled_chunk(z, temperature, None)
    dx: torch.Tensor | None = None
    zero_rows = torch.ones_like(lse, dtype=torch.bool)
    if g_lp is not None:
        x_clipped = x if clip is None else x.clamp(-clip, clip)
        dx = torch.sub(x_clipped, lse[:, None]).exp_().mul_(-g_lp[:, None])
        del x_clipped
        dx.scatter_add_(-1, labels[:, None], g_lp[:, None])
        if clip is not None:
            dx.masked_fill_(x.abs() > clip, 0.0)  # a clamped logit passes no gradient
        zero_rows &= g_lp == 0
    if g_ent is not None:
        g, ent, lse_all = g_ent
        logp = torch.sub(x, lse_all[:, None])
        probs = logp.exp()
        # -p (log p + H) g; the clamp: p = 0 where log p = -inf
        d_ent = logp.clamp_(min=torch.finfo(logp.dtype).min).add_(ent[:, None])
        d_ent.mul_(probs).mul_(g[:, None])
        del probs
        dx = d_ent.neg_() if dx is None else dx.sub_(d_ent)
        zero_rows &= g == 0
    if dx is None:
        dx = torch.zeros_like(x)
    dx.masked_fill_(zero_rows[:, None], 0.0)
    if temperature != 1.0:
        dx.div_(temperature)
    return dx


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logits_clip: float | None = None,
    logprob_min: float | None = None,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-token log-probs of `labels` under softmax(clamp((hidden @ weight.T + bias) / tau)).

    hidden: [N, H] (model dtype), weight: [V, H], bias: [V] or None, labels: [N] int64; a
    negative label is ignored (log-prob 0, no gradient). Rows are processed `chunk_size` at a
    time in forward and again in backward, so no [N, V] tensor is ever kept.
    Returns (logprobs [N] float32, entropy [N] float32 or None, argmax [N] int64 of the raw
    logits). logprobs and entropy are differentiable w.r.t. hidden, weight and bias.
    """
    _check_options(temperature, chunk_size, logits_clip)
    if hidden.dim() != 2 or weight.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(
            "linear_token_logprobs expects hidden [N, H], weight [V, H] and labels [N], got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)} and {tuple(labels.shape)}"
        )
    logprobs, entropy, argmax = _LinearTokenLogprobs.apply(
        hidden,
        weight,
        bias,
        labels.long(),
        float(temperature),
        logits_clip,
        int(chunk_size),
        bool(with_entropy),
    )
    if logprob_min is not None:
        # A floor keeps one absurdly unlikely token from dominating ratios and the loss.
        logprobs = logprobs.clamp(min=logprob_min)
    return logprobs, (entropy if with_entropy else None), argmax
