"""The forwards of an RL step's rows: completion logits, log-prob passes, micro-batch plan.

Row layout (from `components.rollout.layout.build_training_tensors`): [left pad | prompt |
completion | right pad], the completion block starting at a common column P, so only the last
T+1 positions need logits. Shared by the no-grad passes here and the update (`rl_update`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, cast

import torch

from moepost.algorithms.logprobs import token_logprobs
from moepost.components.data.packing import without_trailing_padding_mask
from moepost.components.model.lm_head import head_chunk_rows, head_passthrough, head_weight_sharded
from moepost.components.moe.router_setup import RouterSetup
from moepost.components.rollout.batch_routes import SliceKey, recording_routes, slice_key
from moepost.components.rollout.shared_prefix import (
    PrefixShare,
    can_share_prefix,
    run_starts,
    shared_prefix_logits,
)
from moepost.config.schema import Config
from moepost.distributed import DistContext
from moepost.micro_batches import split_to_count
from moepost.recipes.common import micro_batch_groups
from moepost.recipes.rl_head import chunked_completion_logprobs, shared_prefix_logprobs
from moepost.recipes.step_tensors import StepTensors


def completion_logits(
    model: torch.nn.Module, t: StepTensors, idx: slice, share: PrefixShare | None = None
) -> torch.Tensor:
    """[n, T, V] logits predicting the T completion tokens of rows `idx` (only those positions
    computed; packed, the positions past a row's end hold zeros, which every use masks out;
    `share`: each shared prompt prefix runs once)."""
    T = t.completion_ids.shape[1]
    if share is not None:
        return shared_prefix_logits(model, t.rows(idx), share)
    if not t.packed:
        inputs = without_trailing_padding_mask(t.rows(idx))
        return model(**inputs, use_cache=False, logits_to_keep=T + 1).logits[:, :-1]
    real = t.attention_mask[idx].bool()
    S = real.shape[1]
    completion = t.completion_mask[idx].bool()
    # Position S - T - 1 + j predicts completion token j; keep those of real completion tokens.
    want = torch.zeros_like(real)
    want[:, S - T - 1 : S - 1] = completion
    flat = torch.cumsum(real.flatten(), 0).view_as(real) - 1  # packed index of each real token
    logits = model(**t.rows(idx), use_cache=False, logits_to_keep=flat[want]).logits[0]
    out = logits.new_zeros(real.shape[0], T, logits.shape[-1])
    return out.index_put(completion.nonzero(as_tuple=True), logits)


def head_chunk_logprobs(
    model: torch.nn.Module,
    t: StepTensors,
    idx: slice,
    cfg: Config,
    share: PrefixShare | None,
    chunk_rows: int,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[n, T] log-probs (and entropies) of rows `idx` through the chunked LM head."""
    if share is None:
        return chunked_completion_logprobs(
            model, t, idx, cfg, chunk_rows=chunk_rows, with_entropy=with_entropy
        )
    with head_passthrough(model) as head:  # the shared forwards' `.logits` are hidden states
        hidden = shared_prefix_logits(model, t.rows(idx), share)  # [n, T, H]
    return shared_prefix_logprobs(
        hidden, head, t, idx, cfg, chunk_rows=chunk_rows, with_entropy=with_entropy
    )


def shared_prefix_off(
    cfg: Config, dist: DistContext, *models: torch.nn.Module | None
) -> str | None:
    """None when the step's forwards may share prompt prefixes (`rl.shared_prefix`), else why
    not (said in the run log)."""
    if not cfg.rl.shared_prefix:
        return "rl.shared_prefix is false"
    if cfg.data.packing:
        return "data.packing runs padding-free rows instead"
    if dist.world_size > 1 and cfg.distributed.backend not in ("ddp", "fsdp"):
        return f"not yet with distributed.backend {cfg.distributed.backend}"
    for model in models:
        if model is not None and (why := can_share_prefix(model)) is not None:
            return why
    return None


def plan_step_micro_batches(
    t: StepTensors, cfg: Config, dist: DistContext | None = None
) -> list[slice]:
    """Consecutive row slices: `train.micro_batch_size` rows each, or as many rows as fit
    `train.micro_batch_tokens` tokens, a row costing its width after the shared left-pad cut
    (`columns`; packed: its real tokens, summed). Rows keep their order: routing replay indexes
    them. With `dist`, every rank runs as many micro-batches as the rank that needs most.
    With shared prefixes (`t.shared_prefix`) a micro-batch costs the tokens it feeds the model:
    each run of rows with the same prompt pays for the prompt once (`_shared_budget_slices`)."""
    if t.packed:  # a packed micro-batch costs its real tokens
        lengths = t.attention_mask.sum(dim=1).tolist()
    else:
        first = t.attention_mask.int().argmax(dim=1)  # each row's first real column
        lengths = (t.attention_mask.shape[1] - first).tolist()
    if t.shared_prefix and not t.packed and cfg.train.micro_batch_tokens > 0:
        groups = [list(range(s.start, s.stop)) for s in _shared_budget_slices(t, cfg)]
        if dist is not None:  # as many forwards as the rank that needs most
            groups = split_to_count(groups, lengths, dist.max_int(len(groups)))
    else:
        groups = micro_batch_groups(lengths, cfg, longest_first=False, dist=dist, packed=t.packed)
    return [slice(g[0], g[-1] + 1) for g in groups]


def _shared_budget_slices(t: StepTensors, cfg: Config) -> list[slice]:
    """Consecutive row slices whose shared-prefix forward feeds at most
    `train.micro_batch_tokens`: runs x prompt columns + rows x completion columns, after the
    micro-batch's left-pad cut. A row over the budget on its own gets a micro-batch of its own."""
    budget = cfg.train.micro_batch_tokens
    n, S = t.input_ids.shape
    T = int(t.completion_ids.shape[1])
    new_run = run_starts(t.input_ids, t.attention_mask, T).int().tolist()
    widths = (S - t.attention_mask.int().argmax(dim=1)).tolist()  # row width after its pad cut
    slices, start = [], 0
    while start < n:
        end, runs, width = start + 1, 1, widths[start]
        while end < n:
            more_runs, wider = runs + new_run[end], max(width, widths[end])
            if more_runs * (wider - T) + (end + 1 - start) * T > budget:
                break
            end, runs, width = end + 1, more_runs, wider
        slices.append(slice(start, end))
        start = end
    return slices


def micro_slices(t: StepTensors, cfg: Config) -> list[slice]:
    return list(t.micro_batches) or plan_step_micro_batches(t, cfg)


@torch.no_grad()
def logprob_pass(
    model: torch.nn.Module, t: StepTensors, cfg: Config, *, disable_adapter: bool = False
) -> torch.Tensor:
    """[N, T] log-probs of the sampled tokens without gradient (reference pass; LoRA's
    reference is the policy with `disable_adapter`)."""
    return _logprob_pass(model, t, cfg, None, disable_adapter)[0]


@torch.no_grad()
def old_logprob_pass(
    model: torch.nn.Module, t: StepTensors, cfg: Config, setup: RouterSetup
) -> tuple[torch.Tensor, dict[SliceKey, torch.Tensor]]:
    """[N, T] old-policy log-probs, and (R2 routing replay) the routes each micro-batch took,
    keyed by its rows, for the training passes to replay (`BatchRoutes.with_recorded`)."""
    return _logprob_pass(model, t, cfg, setup, False)


def _adapters_off(model: torch.nn.Module) -> AbstractContextManager[Any]:
    """LoRA's reference: the PEFT model with its adapters switched off inside the block."""
    disable = getattr(model, "disable_adapter", None)
    if not callable(disable):
        raise TypeError(f"{type(model).__name__} has no LoRA adapters to switch off")
    return cast(AbstractContextManager[Any], disable())


def _logprob_pass(
    model: torch.nn.Module,
    t: StepTensors,
    cfg: Config,
    record: RouterSetup | None,
    disable_adapter: bool,
) -> tuple[torch.Tensor, dict[SliceKey, torch.Tensor]]:
    out = torch.zeros_like(t.completion_mask)
    recorded: dict[SliceKey, torch.Tensor] = {}
    ctx = _adapters_off(model) if disable_adapter else nullcontext()
    chunk_rows = head_chunk_rows(model, cfg.train.lm_head_chunk_rows)
    shared_chunked = not head_weight_sharded(model)
    with ctx:
        for sl in micro_slices(t, cfg):
            share = t.share(sl)
            with recording_routes(record, share) as routes:
                if chunk_rows and (share is None or shared_chunked):
                    out[sl] = head_chunk_logprobs(model, t, sl, cfg, share, chunk_rows)[0]
                else:
                    out[sl] = completion_logprobs(
                        completion_logits(model, t, sl, share), t.completion_ids[sl], cfg
                    )
            if routes:
                recorded[slice_key(sl)] = routes[0]
    return out, recorded


def completion_logprobs(logits: torch.Tensor, tokens: torch.Tensor, cfg: Config) -> torch.Tensor:
    """[n, T] log-probs of `tokens` [n, T] under `logits` [n, T, V], with the run's temperature
    and the `stability` clips (the old-policy, reference and update passes all use this)."""
    return token_logprobs(
        logits,
        tokens,
        temperature=cfg.generation.temperature,
        logits_clip=cfg.stability.logits_clip,
        logprob_min=cfg.stability.logprob_min,
    )
