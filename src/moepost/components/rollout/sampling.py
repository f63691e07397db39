"""Drawing the next token of every row from its logits (the HF rollout engine's sampler)."""

from __future__ import annotations

import torch

from moepost.components.rollout.interface import SamplingParams


def sample_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from logits [N, V].

    Returns (tokens [N] long, logprobs [N] float32), the log-probs being those of the unfiltered
    tempered distribution (see `RolloutBatch`), whatever top-k / top-p removed from sampling.
    """
    scores = logits.float() / params.logprob_temperature
    logprobs_all = torch.log_softmax(scores, dim=-1)
    if params.is_greedy:
        tokens = scores.argmax(dim=-1)
    else:
        if 0 < params.top_k < scores.shape[-1]:
            kth = torch.topk(scores, params.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
            probs = torch.softmax(sorted_scores, dim=-1)
            # Drop a token when the mass strictly before it already reaches top_p; the most
            # likely token always survives.
            drop = (probs.cumsum(-1) - probs) >= params.top_p
            sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
            scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
        probs = torch.softmax(scores, dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs_all.gather(-1, tokens[:, None]).squeeze(-1)
