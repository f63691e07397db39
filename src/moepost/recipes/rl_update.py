"""The micro-batched policy update of one RL step (forward + backward, no optimizer step).

`policy_update` reads as its steps: the route-count pre-pass (aux_loss_scope=global), then per
micro-batch `micro_batch_loss` (forward, non-finite row drop, policy loss, router aux loss),
backward and `add_micro_batch_metrics` (a fold over `MetricMeans`). Router state is explicit:
the run's `RouterSetup`, the batch's `BatchRoutes` in, the update's own routes out (`Update`),
and the run's `ExpertMonitor`, which accumulates until the step is logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from moepost.algorithms.logprobs import entropy_from_logits, nonfinite_rows
from moepost.algorithms.policy_loss import policy_loss
from moepost.components.model.lm_head import head_chunk_rows, head_weight_sharded
from moepost.components.moe.capture import RouterCapture
from moepost.components.moe.expert_monitor import ExpertMonitor
from moepost.components.moe.router_loss import GlobalRouteCounts
from moepost.components.moe.router_setup import (
    RouterSetup,
    add_route_counts,
    aux_loss,
    capture_router,
    record_load,
    reduce_route_counts,
    route_counts,
)
from moepost.components.rollout.batch_routes import BatchRoutes, SliceKey, observe_drift, slice_key
from moepost.config.schema import Aggregation, Config, RatioLevel
from moepost.distributed import DistContext
from moepost.recipes.rl_passes import (
    completion_logits,
    completion_logprobs,
    head_chunk_logprobs,
    micro_slices,
)
from moepost.recipes.step_tensors import StepTensors


def router_token_mask(t: StepTensors, sl: slice, cfg: Config) -> torch.Tensor:
    """[n*S'] bool over the tokens `t.tokens(sl)` the model sees, in router row order: those the
    aux loss and its counts use (`moe.aux_loss_tokens`: every real token, or completion only)."""
    mask = t.attention_mask.bool()
    if cfg.moe.aux_loss_tokens == "completion":
        mask = mask.clone()
        mask[:, : mask.shape[1] - t.completion_ids.shape[1]] = False
    return t.select(mask, sl)


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
    own_routes: torch.Tensor | None  # [L, N, K] the routes this pass chose (detached)


@dataclass(frozen=True)
class LossSettings:
    """The policy-loss settings of `cfg.rl` after the algorithm preset filled them in."""

    ratio_level: RatioLevel
    clip_eps_low: float
    clip_eps_high: float
    aggregation: Aggregation
    kl_coef: float


def loss_settings(cfg: Config) -> LossSettings:
    """`cfg.rl`'s loss settings; config loading (`resolve_rl_presets`) must have run."""
    rl = cfg.rl
    if (
        rl.ratio_level is None
        or rl.clip_eps_low is None
        or rl.clip_eps_high is None
        or rl.loss_aggregation is None
        or rl.kl_coef is None
    ):
        raise ValueError("cfg.rl has unset preset fields: call config.validate.resolve_rl_presets")
    return LossSettings(
        rl.ratio_level, rl.clip_eps_low, rl.clip_eps_high, rl.loss_aggregation, rl.kl_coef
    )


@dataclass(frozen=True)
class UpdateSetup:
    """What every micro-batch of one policy update shares (built once per update)."""

    update_index: int
    loss: LossSettings
    norms: dict[str, float]  # whole-step normalisers (`normalisers`)
    step_tokens: float  # tokens the aux loss counts, over all ranks
    chunk_rows: int
    shared_chunked: bool  # shared-prefix forwards may use the chunked head
    router: RouterSetup
    routes: BatchRoutes  # this batch's rollout / recorded / previous-update routes
    counts: GlobalRouteCounts | None  # aux_loss_scope=global: the step's route counts


@torch.no_grad()
def count_step_routes(
    model: torch.nn.Module,
    t: StepTensors,
    cfg: Config,
    setup: RouterSetup,
    routes: BatchRoutes,
    dist: DistContext,
) -> GlobalRouteCounts | None:
    """aux_loss_scope=global: a no-grad pre-pass over every micro-batch gives the step's expert
    counts, summed over ranks, before the step's first backward."""
    counts = None
    for sl in micro_slices(t, cfg):
        with capture_router(setup, routes.replay_for(sl, t.tokens(sl))) as cap:
            model(**t.rows(sl), use_cache=False, logits_to_keep=1)
        counts = add_route_counts(counts, route_counts(setup, cap, router_token_mask(t, sl, cfg)))
    return reduce_route_counts(counts, dist.all_reduce_sum)


def _train_forward(
    model: torch.nn.Module, t: StepTensors, sl: slice, cfg: Config, u: UpdateSetup
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, RouterCapture | None]:
    """(log-probs [n, T], entropy or None, logits [n, T, V] or None, router capture)."""
    cols, share = t.tokens(sl), t.share(sl)
    logits = entropy = None
    with capture_router(u.router, u.routes.replay_for(sl, cols, share)) as cap:
        if u.chunk_rows and (share is None or u.shared_chunked):  # no [n, T, V] logits
            logprobs, entropy = head_chunk_logprobs(model, t, sl, cfg, share, u.chunk_rows, True)
        else:
            logits = completion_logits(model, t, sl, share)
    if cap is not None and share is not None:
        cap.reorder(share.to_padded)  # read the routes as the padded forward's
    if logits is not None:
        logprobs = completion_logprobs(logits, t.completion_ids[sl], cfg)
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
        if entropy is not None:
            entropy = torch.where(bad[:, None], torch.zeros_like(entropy), entropy)
    else:
        zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
        logits = torch.where(bad[:, None, None], zero, logits)
        logprobs = completion_logprobs(logits, tokens, cfg)
    return logprobs, entropy, logits, mask, nonfinite


def micro_batch_loss(
    model: torch.nn.Module,
    t: StepTensors,
    sl: slice,
    cfg: Config,
    u: UpdateSetup,
    monitor: ExpertMonitor,
) -> MicroBatchLoss:
    """Forward of rows `sl`, their policy loss and router aux loss (no backward); adds the
    pass's expert load and drift to `monitor`."""
    logprobs, entropy, logits, cap = _train_forward(model, t, sl, cfg, u)
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
        ratio_level=u.loss.ratio_level,
        clip_eps_low=u.loss.clip_eps_low,
        clip_eps_high=u.loss.clip_eps_high,
        aggregation=u.loss.aggregation,
        ref_logprobs=t.ref_logprobs[sl] if t.ref_logprobs is not None else None,
        kl_coef=u.loss.kl_coef,
        kl_estimator=cfg.rl.kl_estimator,
        max_new_tokens=cfg.generation.max_new_tokens,
        **u.norms,
    )
    aux_mask = router_token_mask(t, sl, cfg)
    share = float(aux_mask.sum()) / max(u.step_tokens, 1.0)
    record_load(monitor, u.router, cap, aux_mask)
    aux, aux_m = aux_loss(u.router, cap, aux_mask, share=share, counts=u.counts)
    real = t.select(t.attention_mask.bool(), sl)
    own = observe_drift(monitor, u.routes, cap, sl, real, u.update_index, t.tokens(sl))
    return MicroBatchLoss(
        loss, aux, m, aux_m, float(aux_mask.sum()), logprobs, logits, entropy, mask, nonfinite, own
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
    if ent is not None:  # the full logits or the chunked head give it
        means = means.add({"entropy": float((ent * mb.mask).sum() / max(n_tok, 1.0))}, n_tok)
    if u.update_index == 0:  # later updates see a moved policy: no longer comparable
        gap = (mb.logprobs.detach() - t.rollout_logprobs[sl]).abs() * mb.mask
        means = means.add({"logprob_gap/mean": float(gap.sum() / max(n_tok, 1.0))}, n_tok)
        means = means.add_max("logprob_gap/max", float(gap.max()))
    if mb.aux is not None:
        means = means.add({"aux_loss": mb.aux_metrics.get("aux_loss", 0.0)}, mb.aux_tokens)
    return means


def update_setup(
    model: torch.nn.Module,
    t: StepTensors,
    cfg: Config,
    update_index: int,
    dist: DistContext,
    router: RouterSetup,
    routes: BatchRoutes,
) -> UpdateSetup:
    """What the micro-batches of one update share; runs the route-count pre-pass if needed."""
    counts = None
    if router.global_scope:  # before anything else of the step: the ranks' collectives agree
        counts = count_step_routes(model, t, cfg, router, routes, dist)
    step_tokens = dist.sum_floats([float(router_token_mask(t, slice(None), cfg).sum())])[0]
    return UpdateSetup(
        update_index=update_index,
        loss=loss_settings(cfg),
        norms=normalisers(t, dist),
        step_tokens=step_tokens,
        chunk_rows=head_chunk_rows(model, cfg.train.lm_head_chunk_rows),
        # Shared-prefix forwards score hidden states after the forward: not with a sharded head.
        shared_chunked=not head_weight_sharded(model),
        router=router,
        routes=routes,
        counts=counts,
    )


class Update(NamedTuple):
    """What one policy update gives back: its logged metrics, and the routes each micro-batch's
    training pass took (keyed by its rows; the next update's drift reference)."""

    metrics: dict[str, float]
    own_routes: dict[SliceKey, torch.Tensor]


def policy_update(
    model: torch.nn.Module,
    t: StepTensors,
    cfg: Config,
    router: RouterSetup,
    *,
    update_index: int,
    dist: DistContext | None = None,
    routes: BatchRoutes | None = None,
    monitor: ExpertMonitor | None = None,
) -> Update:
    """Forward + backward of every micro-batch of the step (no optimizer step).

    `t` holds this rank's rows; normalisers, aux token counts and metrics are global. `routes`:
    the batch's routes (none: no replay, no drift); `monitor` gathers load and drift (none: a
    throw-away one).
    """
    dist = dist or DistContext()
    monitor = monitor or ExpertMonitor(router.num_experts, cfg.moe)
    model.train()
    u = update_setup(model, t, cfg, update_index, dist, router, routes or BatchRoutes())
    slices = micro_slices(t, cfg)
    means, nonfinite, own = MetricMeans(), 0, {}
    for i, sl in enumerate(slices):
        dist.set_grad_sync(last=i == len(slices) - 1)
        mb = micro_batch_loss(model, t, sl, cfg, u, monitor)
        dist.backward(mb.loss + mb.aux if mb.aux is not None else mb.loss)
        means = add_micro_batch_metrics(means, mb, t, sl, cfg, u)
        nonfinite += mb.nonfinite
        if mb.own_routes is not None:
            own[slice_key(sl)] = mb.own_routes
    out = means.means(dist)
    if update_index == 0:
        out["logprob_gap/max"] = out.get("logprob_gap/max", 0.0)
    out["stability/nonfinite_tokens"] = float(int(dist.sum_floats([nonfinite])[0]))
    out["train/micro_batches"] = float(len(slices))
    return Update(out, own)
