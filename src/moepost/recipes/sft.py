"""Supervised fine-tuning (full weights or LoRA, experts included) of a MoE causal LM.

Loss: token-level cross-entropy on assistant tokens only, summed over the micro-batches of an
optimizer step and divided by the step's total number of target tokens, so that
`micro_batch_size x gradient_accumulation_steps` can be traded freely without changing the
result. The router's load-balancing loss (Hugging Face scaling) is added with
`moe.router_aux_loss_coef` (default: the checkpoint's own coefficient), computed from the raw
router logits captured at the router, padding excluded.

Departures from the usual trainer: no callbacks; evaluation is eval loss + token accuracy.

Launch: `moepost train configs/sft/....yaml` on one device; under `torchrun --nproc_per_node N`
(or `accelerate launch` / `deepspeed`) the same command runs data parallel.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from moepost.algorithms.sft_loss import sft_loss, sft_loss_from_logprobs
from moepost.components.data.packing import (
    collate_packed,
    collate_sft,
    without_trailing_padding_mask,
)
from moepost.components.model.lm_head import (
    HeadRequest,
    describe_head,
    head_chunk_rows,
    head_output,
    head_request,
)
from moepost.components.model.loading import load_policy, load_tokenizer
from moepost.components.model.lora import describe_parameters, parameter_report
from moepost.components.moe.expert_monitor import ExpertMonitor
from moepost.components.moe.router_loss import GlobalRouteCounts
from moepost.components.moe.router_setup import (
    RouterSetup,
    add_route_counts,
    aux_loss,
    capture_router,
    describe_router,
    new_monitor,
    record_load,
    reduce_route_counts,
    route_counts,
    router_setup,
)
from moepost.components.training.stability import drop_nonfinite_rows
from moepost.config.schema import Config
from moepost.distributed import (
    DistContext,
    attach_optimizer,
    prepare_model,
)
from moepost.recipes.common import (
    EVAL_LOGS,
    Optimization,
    Run,
    TrainState,
    finish_run,
    maybe_resume,
    micro_batch_groups,
    open_run,
    reset_logs,
    save,
    save_final,
    stop_if_signalled,
)
from moepost.recipes.data_source import sft_train_data


def run_sft(
    cfg: Config,
    *,
    resume: str | None = None,
    eval_only: bool = False,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Train (or only evaluate) and return the last logged metrics."""
    run = open_run(cfg, resume=resume, eval_only=eval_only, allow_config_change=allow_config_change)
    dist, device = run.dist, run.device
    tokenizer = load_tokenizer(cfg.model, cfg.misc)
    train_set, eval_set, _, data_line = sft_train_data(cfg, tokenizer)
    run.say(data_line)
    model = load_policy(cfg.model, cfg.misc, device=device, for_training=not eval_only)
    router = router_setup(model, cfg.moe)
    run.say(f"model: {describe_parameters(parameter_report(model))}; {describe_router(router)}")
    if eval_only:
        reset_logs(run, after_step=None, names=EVAL_LOGS)
        metrics = {"step": 0, **evaluate(model, eval_set, cfg, device, tokenizer.pad_token_id)}
        run.logger.log(metrics)
        run.say(f"eval: {metrics}")
        return metrics

    total = total_steps(cfg, None if train_set.streaming else len(train_set))
    train_model = prepare_model(model, cfg, dist)  # DDP / FSDP2; `model` stays the raw one
    opt = Optimization(model, cfg, total)
    train_model = attach_optimizer(opt, cfg, dist)  # DeepSpeed engine (else unchanged)
    state = maybe_resume(run, resume, model, opt)
    train_set.restore(state)
    run.say(describe_head(train_model, cfg.train.lm_head_chunk_rows))
    from moepost.components.training.logging import Console

    console = Console(total, "sft", enabled=run.is_main)
    monitor = new_monitor(router, cfg.moe)  # expert load between logged steps
    last: dict[str, Any] = {}
    while state.step < total:
        last = _sft_step(
            run, train_model, tokenizer, (router, monitor), opt, state, train_set, total
        )
        console.update(state.step, last)
        if eval_set and cfg.train.eval_every and state.step % cfg.train.eval_every == 0:
            last.update(_eval_and_best(run, model, tokenizer, state, eval_set))
        if cfg.train.save_every and state.step % cfg.train.save_every == 0:
            save(run, model, tokenizer, opt, state)
        stop_if_signalled(run, model, tokenizer, opt, state)
    console.close()
    if eval_set and not any(k.startswith("eval/") for k in last):  # not already at this step
        last.update(_eval_and_best(run, model, tokenizer, state, eval_set))
    if cfg.logging.save_final:
        save_final(run, model, tokenizer)
    finish_run(run)
    dist.close()
    return last


def _sft_step(
    run: Run,
    train_model: torch.nn.Module,
    tokenizer: Any,
    routers: tuple[RouterSetup, ExpertMonitor],
    opt: Optimization,
    state: TrainState,
    train_set: Any,
    total: int,
) -> dict[str, Any]:
    """One optimizer step: forward + backward, optimizer, metrics, log; the logged row."""
    cfg, dist, device = run.cfg, run.dist, run.device
    t0 = time.perf_counter()
    batch = dist.shard(train_set.take(state, cfg.train.batch_size))  # this rank's examples
    router, monitor = routers
    metrics = train_step(
        train_model, batch, cfg, device, router, tokenizer.pad_token_id, dist=dist, monitor=monitor
    )
    metrics.update(dist.optimizer_step(opt))
    state.step += 1
    metrics["time/step_s"] = time.perf_counter() - t0
    metrics["throughput/tokens_per_s"] = metrics.pop("num_input_tokens") / metrics["time/step_s"]
    metrics["epoch"] = train_set.epoch(state)
    metrics.update(train_set.metrics())
    moe_metrics, load_row = monitor.flush(state.step, reduce_sum=dist.all_reduce_sum)
    metrics.update(moe_metrics)
    metrics = dist.mean_metrics(metrics)
    last = {"step": state.step, **metrics}
    if state.step % cfg.logging.log_every == 0 or state.step == total:
        run.logger.log(last)
        if load_row is not None:
            run.logger.write("expert_load.jsonl", load_row)
    return last


def _eval_and_best(
    run: Run, model: torch.nn.Module, tokenizer: Any, state: TrainState, eval_set: Any
) -> dict[str, Any]:
    """Eval metrics (means over ranks), logged; saves `best` when they improve."""
    ev = run.dist.mean_metrics(
        evaluate(model, eval_set, run.cfg, run.device, tokenizer.pad_token_id)
    )
    run.logger.log({"step": state.step, **ev})
    _maybe_best(run, model, tokenizer, state, ev)
    return ev


def total_steps(cfg: Config, num_rows: int | None) -> int:
    """train.max_steps, else train.num_epochs passes over `num_rows` (None: a stream, whose
    length is unknown; the config check makes max_steps required then)."""
    if cfg.train.max_steps > 0 or num_rows is None:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.num_epochs * num_rows / cfg.train.batch_size))


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def collate(examples: list[Any], cfg: Config, pad_token_id: int) -> dict[str, torch.Tensor]:
    return (
        collate_packed(examples, pad_token_id)
        if cfg.data.packing
        else collate_sft(examples, pad_token_id)
    )


def forward_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    num_global_tokens: int,
    *,
    chunk_rows: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of one micro-batch, normalised by the step's target-token count.

    Rows whose logits give a NaN/Inf loss are dropped from the loss (their target tokens stay
    in the normaliser) and counted in `nonfinite_tokens`. `chunk_rows` > 0: the LM head runs
    chunked at the target positions only (`components.lm_head`), no [B, T, V] logits.
    """
    labels = batch.pop("labels")
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    if chunk_rows > 0:
        return _chunked_forward_loss(model, batch, shifted, num_global_tokens, chunk_rows)
    logits = model(**without_trailing_padding_mask(batch), use_cache=False).logits
    loss, metrics = sft_loss(logits, shifted, num_global_tokens=num_global_tokens)
    dropped = 0
    if not bool(torch.isfinite(metrics["loss_sum"])):
        logits, shifted, dropped = drop_nonfinite_rows(logits, shifted)
        loss, metrics = sft_loss(logits, shifted, num_global_tokens=num_global_tokens)
    metrics["nonfinite_tokens"] = torch.tensor(float(dropped))
    return loss, metrics


def _chunked_forward_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    shifted: torch.Tensor,
    num_global_tokens: int,
    chunk_rows: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`forward_loss` with the chunked head: [N] log-probs of the N target tokens only."""
    request = HeadRequest(labels=shifted.masked_fill(shifted == -100, -1), chunk_size=chunk_rows)
    with head_request(model, request):
        out = model(**without_trailing_padding_mask(batch), use_cache=False)
    logprobs = head_output(out, request)  # [N]
    assert request.valid is not None and request.argmax is not None
    correct = request.argmax == shifted[request.valid]
    loss, metrics = sft_loss_from_logprobs(logprobs, correct, num_global_tokens=num_global_tokens)
    dropped = 0
    if not bool(torch.isfinite(metrics["loss_sum"])):
        # Drop whole rows (a packed row: the whole pack), as `drop_nonfinite_rows` does.
        row_of = request.valid.nonzero()[:, 0]  # [N] row of each target token
        bad_rows = torch.zeros(shifted.shape[0], dtype=torch.bool, device=shifted.device)
        bad_rows[row_of[~torch.isfinite(logprobs.detach())]] = True
        keep = ~bad_rows[row_of]
        dropped = int((~keep).sum())
        loss, metrics = sft_loss_from_logprobs(
            logprobs, correct, keep=keep, num_global_tokens=num_global_tokens
        )
    metrics["nonfinite_tokens"] = torch.tensor(float(dropped))
    return loss, metrics


def _num_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def train_step(
    model: torch.nn.Module,
    examples: list[Any],
    cfg: Config,
    device: torch.device,
    router: RouterSetup,
    pad_token_id: int,
    *,
    dist: DistContext | None = None,
    monitor: ExpertMonitor | None = None,
) -> dict[str, Any]:
    """Forward + backward over the micro-batches of one optimizer step (no optimizer step).

    `examples` are this rank's share of the step; token counts are summed over ranks first,
    so each rank's loss is its part of the global-batch loss (`dist` None: one process).
    `monitor` gathers the expert load (None: a throw-away one).
    """
    dist = dist or DistContext(device=device)
    monitor = monitor or ExpertMonitor(router.num_experts, cfg.moe)
    model.train()
    chunk_rows = head_chunk_rows(model, cfg.train.lm_head_chunk_rows)
    lengths = [len(ex.input_ids) for ex in examples]
    groups = micro_batch_groups(lengths, cfg, longest_first=True, dist=dist)
    micro = [collate([examples[i] for i in g], cfg, pad_token_id) for g in groups]
    masks = [_token_mask(b, cfg.moe.aux_loss_tokens) for b in micro]
    local_counts = [sum(_num_targets(b) for b in micro), sum(int(m.sum()) for m in masks)]
    num_targets, num_inputs = (int(n) for n in dist.sum_floats(local_counts))
    counts = None
    if router.global_scope:
        counts = reduce_route_counts(
            count_routes(model, micro, masks, device, router), dist.all_reduce_sum
        )
    loss_sum = correct = aux_sum = nonfinite = 0.0
    for i, (batch, token_mask) in enumerate(zip(micro, masks)):
        batch = _to_device(batch, device)
        share = float(token_mask.sum()) / max(1, num_inputs)
        dist.set_grad_sync(last=i == len(micro) - 1)
        with capture_router(router) as cap:
            loss, m = forward_loss(model, batch, max(1, num_targets), chunk_rows=chunk_rows)
        record_load(monitor, router, cap, token_mask)
        aux, aux_metrics = aux_loss(router, cap, token_mask, share=share, counts=counts)
        dist.backward(loss + aux if aux is not None else loss)
        loss_sum += float(m["loss_sum"])
        correct += float(m["token_accuracy"]) * float(m["num_tokens"])
        aux_sum += aux_metrics.get("aux_loss", 0.0) * share
        nonfinite += float(m["nonfinite_tokens"])
    loss_sum, correct, aux_sum, nonfinite = dist.sum_floats([loss_sum, correct, aux_sum, nonfinite])
    out: dict[str, Any] = {
        "loss": loss_sum / max(1, num_targets),
        "token_accuracy": correct / max(1, num_targets),
        "num_tokens": num_targets,
        "num_input_tokens": num_inputs,
        "stability/nonfinite_tokens": nonfinite,
        "train/micro_batches": len(micro),
    }
    if router.aux_enabled:
        out["aux_loss"] = aux_sum
    return out


@torch.no_grad()
def count_routes(
    model: torch.nn.Module,
    micro: list[dict[str, torch.Tensor]],
    masks: list[torch.Tensor],
    device: torch.device,
    router: RouterSetup,
) -> GlobalRouteCounts | None:
    """aux_loss_scope=global: expert counts of this rank's whole step before any backward."""
    counts = None
    for batch, token_mask in zip(micro, masks):
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        with capture_router(router) as cap:
            model(**inputs, use_cache=False)
        counts = add_route_counts(counts, route_counts(router, cap, token_mask))
    return counts


def _token_mask(batch: dict[str, torch.Tensor], tokens: str = "all") -> torch.Tensor:
    """[B*T] bool: real (non-padding) tokens, in the order the routers see them.

    Collators of packed rows hand it over as `token_mask` (their attention mask is 4-D).
    With tokens="completion" only target (assistant) tokens count.
    """
    real = batch.pop("token_mask") if "token_mask" in batch else batch["attention_mask"]
    if tokens == "completion":  # `moe.aux_loss_tokens`: only the tokens the loss trains on
        return (batch["labels"] != -100).flatten()
    return real.flatten().bool()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, examples: list[Any], cfg: Config, device: torch.device, pad_id: int
) -> dict[str, float]:
    """Eval loss and token accuracy over the whole eval split."""
    if not examples:
        return {}
    was_training = model.training
    model.eval()
    loss_sum = correct = 0.0
    count = 0
    chunk_rows = head_chunk_rows(model, cfg.train.lm_head_chunk_rows)
    lengths = [len(ex.input_ids) for ex in examples]
    for group in micro_batch_groups(lengths, cfg, longest_first=True):
        batch = _to_device(collate_sft([examples[i] for i in group], pad_id), device)
        _, m = forward_loss(model, batch, 1, chunk_rows=chunk_rows)
        loss_sum += float(m["loss_sum"])
        correct += float(m["token_accuracy"]) * float(m["num_tokens"])
        count += int(m["num_tokens"])
    model.train(was_training)
    return {"eval/loss": loss_sum / max(1, count), "eval/token_accuracy": correct / max(1, count)}


def _maybe_best(
    run: Run, model: torch.nn.Module, tokenizer: Any, state: TrainState, ev: dict[str, float]
) -> None:
    metric = run.cfg.train.eval_metric or "eval/loss"
    value = ev.get(metric)
    if value is None:
        return
    lower_is_better = "loss" in metric
    best = state.best_metric
    if best is None or (value < best if lower_is_better else value > best):
        state.best_metric = float(value)
        save_final(run, model, tokenizer, name="best")
