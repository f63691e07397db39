"""RL log-probs (and entropies) of the completion tokens through the chunked LM head.

The row layouts of `rl_update.completion_logits` (padded rows, packed rows; shared prompt
prefixes from the hidden states, `shared_prefix_logprobs`), but the model's head scores only
the real completion tokens, chunk by chunk (`components.lm_head`), so neither the forward nor
the autograd graph holds [n, T, V] logits.
Positions that are not completion tokens get a log-prob (and entropy) of 0: every use masks
them with `completion_mask`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moepost.algorithms.chunked_ce import linear_token_logprobs
from moepost.components.data.packing import without_trailing_padding_mask
from moepost.components.model.lm_head import HeadRequest, head_output, head_request
from moepost.config.schema import Config

if TYPE_CHECKING:
    from moepost.recipes.step_tensors import StepTensors


def chunked_completion_logprobs(
    model: torch.nn.Module,
    t: StepTensors,
    idx: slice,
    cfg: Config,
    *,
    chunk_rows: int,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([n, T] log-probs of the completion tokens of rows `idx`, [n, T] entropies or None).

    Same options as `rl_passes.completion_logprobs`: the sampling temperature,
    `stability.logits_clip` and `stability.logprob_min`. The entropy is that of
    softmax(logits / temperature), like `entropy_from_logits`, and comes back detached (a metric).
    """
    mask = t.completion_mask[idx].bool()
    labels = t.completion_ids[idx].masked_fill(~mask, -1)  # [n, T]

    def request(lab: torch.Tensor) -> HeadRequest:
        return HeadRequest(
            labels=lab,
            temperature=cfg.generation.temperature,
            logits_clip=cfg.stability.logits_clip,
            logprob_min=cfg.stability.logprob_min,
            chunk_size=chunk_rows,
            with_entropy=with_entropy,
        )

    if not t.packed:
        T = labels.shape[1]
        keep = torch.nn.functional.pad(labels, (0, 1), value=-1)  # the last position: no token
        req = request(keep)
        with head_request(model, req):
            out = model(
                **without_trailing_padding_mask(t.rows(idx)), use_cache=False, logits_to_keep=T + 1
            )
        logprobs = req.dense(head_output(out, req))[:, :T]
        ent = _entropy([req])
        return logprobs, None if ent is None else ent[:, :T]
    # Packed: position S - T - 1 + j of a row predicts its completion token j; the head sees
    # only the real completion tokens' positions (`logits_to_keep` as an index), row after row.
    real = t.attention_mask[idx].bool()
    S, T = real.shape[1], labels.shape[1]
    want = torch.zeros_like(real)
    want[:, S - T - 1 : S - 1] = mask
    flat = torch.cumsum(real.flatten(), 0).view_as(real) - 1  # packed index of each real token
    req = request(labels[mask][None])  # [1, K]
    with head_request(model, req):
        out = model(**t.rows(idx), use_cache=False, logits_to_keep=flat[want])
    logprobs = head_output(out, req)  # [K] in the row-major order of `mask`
    dense = logprobs.new_zeros(labels.shape).index_put((mask,), logprobs)
    ent = None
    if req.entropy is not None:
        ent = req.entropy.detach().new_zeros(labels.shape).index_put((mask,), req.entropy.detach())
    return dense, ent


def _entropy(requests: list[HeadRequest]) -> torch.Tensor | None:
    if any(r.entropy is None for r in requests):
        return None
    return torch.cat([r.dense(r.entropy.detach()) for r in requests], dim=1)  # type: ignore[union-attr]


def shared_prefix_logprobs(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    t: StepTensors,
    idx: slice,
    cfg: Config,
    *,
    chunk_rows: int,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`chunked_completion_logprobs` for the shared-prefix forwards: `hidden` [n, T, H] are
    the final hidden states `shared_prefix_logits` returns under `head_passthrough`."""
    mask = t.completion_mask[idx].bool()
    labels = t.completion_ids[idx][mask]
    logprobs, entropy, _ = linear_token_logprobs(
        hidden[mask],
        head.weight,
        labels,
        bias=head.bias,
        temperature=cfg.generation.temperature,
        logits_clip=cfg.stability.logits_clip,
        logprob_min=cfg.stability.logprob_min,
        chunk_size=chunk_rows,
        with_entropy=with_entropy,
    )
    dense = logprobs.new_zeros(mask.shape).index_put((mask,), logprobs)
    if entropy is None:
        return dense, None
    return dense, entropy.detach().new_zeros(mask.shape).index_put((mask,), entropy.detach())
