"""The training side of one RL step: log-prob passes and the micro-batched policy update.

Kept apart from `rl.py` so the loop there reads as its phases. Row layout (from
`components.rollout.layout.build_training_tensors`): [left pad | prompt | completion |
right pad], the completion block starting at a common column P, so only the last T+1 positions
need logits.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from moepost.algorithms.logprobs import entropy_from_logits, nonfinite_rows, token_logprobs
from moepost.algorithms.policy_loss import policy_loss
from moepost.components.data.packing import without_trailing_padding_mask
from moepost.components.model.lm_head import head_chunk_rows, head_passthrough, head_weight_sharded
from moepost.components.moe.router_tools import RouterTools
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


def _chunked_logprobs(
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


def plan_micro_batches(t: StepTensors, cfg: Config, dist: DistContext | None = None) -> list[slice]:
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
    return t.micro_batches or plan_micro_batches(t, cfg)


@torch.no_grad()
def logprob_pass(
    model: torch.nn.Module,
    t: StepTensors,
    cfg: Config,
    *,
    router: RouterTools | None = None,
    disable_adapter: bool = False,
) -> torch.Tensor:
    """[N, T] log-probs of the sampled tokens without gradient (old-policy or reference pass)."""
    out = torch.zeros_like(t.completion_mask)
    ctx = model.disable_adapter() if disable_adapter else nullcontext()
    chunk_rows = head_chunk_rows(model, cfg.train.lm_head_chunk_rows)
    shared_chunked = not head_weight_sharded(model)
    with ctx:
        for sl in micro_slices(t, cfg):
            cols, share = t.tokens(sl), t.share(sl)
            record = router.record_routes(sl, cols, share) if router is not None else nullcontext()
            with record:
                if chunk_rows and (share is None or shared_chunked):
                    out[sl] = _chunked_logprobs(model, t, sl, cfg, share, chunk_rows)[0]
                    continue
                logits = completion_logits(model, t, sl, share)
            out[sl] = _logprobs(logits, t.completion_ids[sl], cfg)
    return out


def router_token_mask(t: StepTensors, sl: slice, cfg: Config) -> torch.Tensor:
    """[n*S'] bool over the tokens `t.tokens(sl)` the model sees, in router row order: those the
    aux loss and its counts use (`moe.aux_loss_tokens`: every real token, or completion only)."""
    mask = t.attention_mask.bool()
    if cfg.moe.aux_loss_tokens == "completion":
        mask = mask.clone()
        mask[:, : mask.shape[1] - t.completion_ids.shape[1]] = False
    return t.select(mask, sl)


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, cfg: Config) -> torch.Tensor:
    return token_logprobs(
        logits,
        tokens,
        temperature=cfg.generation.temperature,
        logits_clip=cfg.stability.logits_clip,
        logprob_min=cfg.stability.logprob_min,
    )


def normalisers(t: StepTensors, dist: DistContext | None = None) -> dict[str, float]:
    """Whole-step denominators (summed over ranks), so the micro-batch losses of all ranks
    add up to the one-batch loss."""
    lengths = t.completion_mask.sum(dim=1)
    tokens, seqs = float(lengths.sum()), float((lengths > 0).sum())
    if dist is not None:
        tokens, seqs = dist.sum_floats([tokens, seqs])
    return {"num_global_tokens": max(tokens, 1.0), "num_global_seqs": max(seqs, 1.0)}


@dataclass(frozen=True)
class MetricMeans:
    """Weighted sums of the update's metrics (value x weight, and the weights), plus maxima.

    A value: `add` and `add_max` return a new one, so the micro-batch loop reads as a fold.
    """

    sums: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    maxima: dict[str, float] = field(default_factory=dict)

    def add(self, values: dict[str, float], weight: float) -> MetricMeans:
        """Every `values[key]` added with the same `weight`."""
        sums, weights = dict(self.sums), dict(self.weights)
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value * weight
            weights[key] = weights.get(key, 0.0) + weight
        return MetricMeans(sums, weights, self.maxima)

    def add_max(self, key: str, value: float) -> MetricMeans:
        maxima = {**self.maxima, key: max(self.maxima.get(key, 0.0), value)}
        return MetricMeans(self.sums, self.weights, maxima)

    def means(self, dist: DistContext) -> dict[str, float]:
        """Means over every rank's micro-batches; maxima stay rank-local (`mean_metrics` of
        `run_rl` takes their max); `loss` stays a sum (already normalised over the step)."""
        sums, weights = dist.sum_metrics(dict(self.sums)), dist.sum_metrics(dict(self.weights))
        sums.update(self.maxima)
        out = {k: (v / weights[k] if weights.get(k) else v) for k, v in sums.items()}
        out["loss"] = sums["loss"]
        return out


@dataclass(frozen=True)
class MicroBatchLoss:
    """One micro-batch's loss terms and what its metrics are computed from."""

    loss: torch.Tensor  # policy loss (a scalar, step-normalised)
    aux: torch.Tensor | None  # router aux (+ z) loss, scaled by the micro-batch's token share
    metrics: dict[str, Any]  # `policy_loss` metrics
    aux_metrics: dict[str, float]
    aux_tokens: float  # tokens the aux loss counted
    logprobs: torch.Tensor  # [n, T]
    logits: torch.Tensor | None  # [n, T, V]; None with the chunked head
    entropy: torch.Tensor | None  # [n, T] from the chunked head, else None
    mask: torch.Tensor  # [n, T] completion mask, non-finite rows dropped
    nonfinite: int  # completion tokens dropped


@dataclass(frozen=True)
class UpdateSetup:
    """What every micro-batch of one policy update shares (built once per update)."""

    update_index: int
    norms: dict[str, float]  # whole-step normalisers (`normalisers`)
    step_tokens: float  # tokens the aux loss counts, over all ranks
    chunk_rows: int
    shared_chunked: bool  # shared-prefix forwards may use the chunked head


def count_step_routes(
    model: torch.nn.Module, t: StepTensors, cfg: Config, router: RouterTools, **kw: Any
) -> None:
    """aux_loss_scope=global: a no-grad pre-pass adds every micro-batch's expert counts, summed
    over ranks, before the step's first backward (`kw`: update_index, dist)."""
    with torch.no_grad():
        for sl in micro_slices(t, cfg):
            replay = router.replay_for(sl, kw["update_index"], t.tokens(sl))
            with router.capture(replay=replay) as cap:
                model(**t.rows(sl), use_cache=False, logits_to_keep=1)
            router.add_step_counts(cap, router_token_mask(t, sl, cfg))
    router.reduce_step_counts(kw["dist"].all_reduce_sum)


def _train_forward(
    model: torch.nn.Module,
    t: StepTensors,
    sl: slice,
    cfg: Config,
    router: RouterTools,
    u: UpdateSetup,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, Any]:
    """(log-probs [n, T], entropy or None, logits [n, T, V] or None, router capture)."""
    cols, share = t.tokens(sl), t.share(sl)
    logits = entropy = None
    with router.capture(replay=router.replay_for(sl, u.update_index, cols, share)) as cap:
        if u.chunk_rows and (share is None or u.shared_chunked):  # no [n, T, V] logits
            logprobs, entropy = _chunked_logprobs(model, t, sl, cfg, share, u.chunk_rows, True)
        else:
            logits = completion_logits(model, t, sl, share)
    if cap is not None and share is not None:
        cap.reorder(share.to_padded)  # read the routes as the padded forward's
    if logits is not None:
        logprobs = _logprobs(logits, t.completion_ids[sl], cfg)
    return logprobs, entropy, logits, cap


def _drop_nonfinite(
    logprobs: torch.Tensor,
    entropy: torch.Tensor | None,
    logits: torch.Tensor | None,
    mask: torch.Tensor,
    tokens: torch.Tensor,
    cfg: Config,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor, int]:
    """Never let NaN/Inf reach the loss: drop the affected rows, count their tokens.

    Masking the log-probs is not enough (softmax(inf) x 0 is NaN in backward): the rows are
    cut out of the graph with `torch.where` (the chunked head's backward gives rows with a
    zero upstream gradient an exact zero) or at the logits, recomputed.
    """
    bad = nonfinite_rows(logprobs.detach(), mask)
    if not bool(bad.any()):
        return logprobs, entropy, logits, mask, 0
    nonfinite = int(mask[bad].sum())
    mask = mask * (~bad)[:, None]
    if logits is None:
        logprobs = torch.where(bad[:, None], torch.zeros_like(logprobs), logprobs)
        entropy = torch.where(bad[:, None], torch.zeros_like(entropy), entropy)
    else:
        zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
        logits = torch.where(bad[:, None, None], zero, logits)
        logprobs = _logprobs(logits, tokens, cfg)
    return logprobs, entropy, logits, mask, nonfinite


def micro_batch_loss(
    model: torch.nn.Module,
    t: StepTensors,
    sl: slice,
    cfg: Config,
    router: RouterTools,
    u: UpdateSetup,
) -> MicroBatchLoss:
    """Forward of rows `sl`, their policy loss and router aux loss (no backward)."""
    logprobs, entropy, logits, cap = _train_forward(model, t, sl, cfg, router, u)
    logprobs, entropy, logits, mask, nonfinite = _drop_nonfinite(
        logprobs, entropy, logits, t.completion_mask[sl], t.completion_ids[sl], cfg
    )
    # One update on fresh samples: the pre-update policy *is* the current one, so the
    # detached log-probs are the exact old log-probs (ratio exactly 1, no extra pass).
    old = t.old_logprobs[sl] if t.old_logprobs is not None else logprobs.detach()
    loss, m = policy_loss(
        logprobs,
        old,
        t.advantages[sl],
        mask,
        ratio_level=cfg.rl.ratio_level,
        clip_eps_low=cfg.rl.clip_eps_low,
        clip_eps_high=cfg.rl.clip_eps_high,
        aggregation=cfg.rl.loss_aggregation,
        ref_logprobs=t.ref_logprobs[sl] if t.ref_logprobs is not None else None,
        kl_coef=cfg.rl.kl_coef,
        kl_estimator=cfg.rl.kl_estimator,
        max_new_tokens=cfg.generation.max_new_tokens,
        **u.norms,
    )
    aux_mask = router_token_mask(t, sl, cfg)
    share = float(aux_mask.sum()) / max(u.step_tokens, 1.0)
    aux, aux_m = router.losses(cap, aux_mask, share=share)
    real = t.select(t.attention_mask.bool(), sl)
    router.observe_training_routes(cap, sl, real, u.update_index, t.tokens(sl))
    return MicroBatchLoss(
        loss, aux, m, aux_m, float(aux_mask.sum()), logprobs, logits, entropy, mask, nonfinite
    )


@torch.no_grad()
def add_micro_batch_metrics(
    means: MetricMeans, mb: MicroBatchLoss, t: StepTensors, sl: slice, cfg: Config, u: UpdateSetup
) -> MetricMeans:
    """`means` with one micro-batch's loss, KL / clip figures, entropy, rollout gap, aux."""
    n_tok, n_seq = float(mb.mask.sum()), float(mb.metrics["num_seqs"])
    # GSPO's clip_frac / ratio_mean are means over sequences: weighted by sequences.
    per_seq = ("clip_frac", "ratio_mean") if cfg.rl.ratio_level == "sequence" else ()
    means = means.add({"loss": float(mb.loss.detach())}, 1.0)
    for key in ("kl", "approx_kl", "clip_frac", "ratio_mean"):
        if key in mb.metrics:
            means = means.add({key: float(mb.metrics[key])}, n_seq if key in per_seq else n_tok)
    ent = mb.entropy
    if mb.logits is not None:
        temperature = cfg.generation.temperature
        ent = entropy_from_logits(mb.logits.detach(), temperature=temperature)
    means = means.add({"entropy": float((ent * mb.mask).sum() / max(n_tok, 1.0))}, n_tok)
    if u.update_index == 0:  # later updates see a moved policy: no longer comparable
        gap = (mb.logprobs.detach() - t.rollout_logprobs[sl]).abs() * mb.mask
        means = means.add({"logprob_gap/mean": float(gap.sum() / max(n_tok, 1.0))}, n_tok)
        means = means.add_max("logprob_gap/max", float(gap.max()))
    if mb.aux is not None:
        means = means.add({"aux_loss": mb.aux_metrics.get("aux_loss", 0.0)}, mb.aux_tokens)
    return means


def update_setup(
    model: torch.nn.Module, t: StepTensors, cfg: Config, update_index: int, dist: DistContext
) -> UpdateSetup:
    step_tokens = dist.sum_floats([float(router_token_mask(t, slice(None), cfg).sum())])[0]
    return UpdateSetup(
        update_index=update_index,
        norms=normalisers(t, dist),
        step_tokens=step_tokens,
        chunk_rows=head_chunk_rows(model, cfg.train.lm_head_chunk_rows),
        # Shared-prefix forwards score hidden states after the forward: not with a sharded head.
        shared_chunked=not head_weight_sharded(model),
    )


def policy_update(
    model: torch.nn.Module,
    t: StepTensors,
    cfg: Config,
    router: RouterTools,
    *,
    update_index: int,
    dist: DistContext | None = None,
) -> dict[str, float]:
    """Forward + backward of every micro-batch of the step (no optimizer step).

    `t` holds this rank's rows; normalisers, aux token counts and metrics are global.
    """
    dist = dist or DistContext()
    model.train()
    if router.global_scope:
        count_step_routes(model, t, cfg, router, update_index=update_index, dist=dist)
    u = update_setup(model, t, cfg, update_index, dist)
    slices = micro_slices(t, cfg)
    means, nonfinite = MetricMeans(), 0
    for i, sl in enumerate(slices):
        dist.set_grad_sync(last=i == len(slices) - 1)
        mb = micro_batch_loss(model, t, sl, cfg, router, u)
        dist.backward(mb.loss + mb.aux if mb.aux is not None else mb.loss)
        means = add_micro_batch_metrics(means, mb, t, sl, cfg, u)
        nonfinite += mb.nonfinite
    router.end_step()
    out = means.means(dist)
    if update_index == 0:
        out["logprob_gap/max"] = out.get("logprob_gap/max", 0.0)
    out["stability/nonfinite_tokens"] = float(int(dist.sum_floats([nonfinite])[0]))
    out["train/micro_batches"] = float(len(slices))
    return out
