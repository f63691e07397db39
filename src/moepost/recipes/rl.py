"""RL post-training of a MoE causal LM: one loop for GSPO, GRPO, DAPO, Dr.GRPO, REINFORCE,
RLOO and CISPO (they differ only in loss settings, see ALGORITHMS.md and `rl.algorithm`).

Per step: sample `train.prompts_per_step` prompts -> generate G completions each -> score with
the reward functions -> group advantages -> (old log-probs, only when
`rl.num_policy_updates > 1` or the engine's log-probs are not exact) -> reference log-probs when
`rl.kl_coef > 0` (LoRA runs use the base with adapters disabled) -> `num_policy_updates`
micro-batched updates -> log -> eval / save on schedule.

Departures from the papers: with one update per batch the old log-probs are the detached
log-probs of the training forward itself (the pre-update policy is the current one), so ratios
are exactly 1 and no extra forward is spent; the engine's log-probs are only used to measure the
train-vs-rollout gap. DAPO's dynamic sampling re-generates at most
`rl.max_dynamic_sampling_rounds` times and then stops with an error.

Launch: `moepost train configs/rl/....yaml` on one device, or under
`torchrun --nproc_per_node N` for data parallelism (same command).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch

from moepost.components.model.lm_head import describe_head, head_weight_sharded
from moepost.components.model.loading import load_policy, load_reference, load_tokenizer
from moepost.components.model.lora import describe_parameters, parameter_report
from moepost.components.model.placement import gpu_ids_device, place_reward_models
from moepost.components.moe.expert_monitor import ExpertMonitor
from moepost.components.moe.router_setup import (
    RouterSetup,
    describe_router,
    new_monitor,
    router_setup,
)
from moepost.components.rewards import RewardScores, resolve_rewards, reward_metrics
from moepost.components.rollout.batch_routes import BatchRoutes, batch_routes
from moepost.components.rollout.engine import RolloutBatch, build_engine
from moepost.components.training.logging import Console
from moepost.components.training.noise import NoiseInjector
from moepost.config.schema import Config
from moepost.distributed import (
    DistContext,
    attach_optimizer,
    generation_lockstep,
    prepare_model,
)
from moepost.errors import UserError
from moepost.recipes.common import (
    EVAL_LOGS,
    Optimization,
    Run,
    TrainState,
    finish_run,
    maybe_resume,
    open_run,
    reset_logs,
    save,
    save_final,
    stop_if_signalled,
)
from moepost.recipes.data_source import rl_train_data
from moepost.recipes.rl_eval import evaluate_and_keep_best, evaluate_rl
from moepost.recipes.rl_passes import (
    logprob_pass,
    old_logprob_pass,
    plan_step_micro_batches,
    shared_prefix_off,
)
from moepost.recipes.rl_rollout import compute_advantages, rollout_and_score, total_steps
from moepost.recipes.rl_update import policy_update
from moepost.recipes.step_tensors import StepTensors, tensors_for_step


@dataclass(frozen=True)
class RLParts:
    """The fixed parts of an RL run, built once by `run_rl` (the loop's state is `TrainState`,
    the optimizer's is `Optimization`, the expert statistics' is `monitor`)."""

    engine: Any  # the rollout engine (`generation.backend`)
    model: torch.nn.Module  # as loaded; checkpoints, the engine and router hooks use it
    train_model: torch.nn.Module  # what the update runs (DDP / DeepSpeed wrapper, or `model`)
    reference: torch.nn.Module | None
    tokenizer: Any
    router: RouterSetup
    monitor: ExpertMonitor  # expert load and drift between logged steps
    noise: NoiseInjector
    train_set: Any
    reward_fns: list[Any]
    shared_prefix: bool  # the step's forwards share prompt prefixes


def run_rl(
    cfg: Config,
    *,
    resume: str | None = None,
    eval_only: bool = False,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    run = open_run(cfg, resume=resume, eval_only=eval_only, allow_config_change=allow_config_change)
    dist, device = run.dist, run.device
    tokenizer = load_tokenizer(cfg.model, cfg.misc)
    train_set, eval_set, _, data_line = rl_train_data(cfg, tokenizer)
    run.say(data_line)
    reward_fns = _reward_functions(run)
    model = load_policy(cfg.model, cfg.misc, device=device, for_training=not eval_only)
    # before the router's hooks go on: a reference copied from the policy must not carry them
    reference = None if eval_only else _load_reference(cfg, dist, device, policy=model)
    router = router_setup(model, cfg.moe)
    engine = _build_engine(run, model, tokenizer)
    run.say(f"model: {describe_parameters(parameter_report(model))}; {describe_router(router)}")
    if eval_only:
        reset_logs(run, after_step=None, names=EVAL_LOGS)
        return evaluate_rl(run, engine, eval_set or train_set.all_examples(), reward_fns, step=0)

    total = total_steps(cfg, None if train_set.streaming else len(train_set))
    train_model = prepare_model(model, cfg, dist)  # DDP; `model` stays the raw one
    opt = Optimization(model, cfg, total)
    train_model = attach_optimizer(opt, cfg, dist)  # DeepSpeed engine (else unchanged)
    state = maybe_resume(run, resume, model, opt)
    train_set.restore(state)
    parts = RLParts(
        engine, model, train_model, reference, tokenizer, router, new_monitor(router, cfg.moe),
        NoiseInjector(model, cfg.noise_injection, total, cfg.train.seed), train_set, reward_fns,
        shared_prefix=_say_forwards(run, train_model, reference) is None,
    )  # fmt: skip
    console = Console(total, cfg.rl.algorithm, enabled=run.is_main)
    last: dict[str, Any] = {}
    while state.step < total:
        last = _rl_step(run, parts, opt, state)
        console.update(state.step, last)
        if cfg.train.eval_every and state.step % cfg.train.eval_every == 0 and eval_set:
            last.update(
                evaluate_and_keep_best(
                    run, parts.engine, eval_set, parts.reward_fns, model, tokenizer, state
                )
            )
        if cfg.train.save_every and state.step % cfg.train.save_every == 0:
            save(run, model, tokenizer, opt, state)
        stop_if_signalled(run, model, tokenizer, opt, state)
    console.close()
    if eval_set and not any(k.startswith("eval/") for k in last):  # not already at this step
        last.update(
            evaluate_and_keep_best(
                run, parts.engine, eval_set, parts.reward_fns, model, tokenizer, state
            )
        )
    if cfg.logging.save_final:
        save_final(run, model, tokenizer)
    finish_run(run)
    dist.close()
    return last


def _rl_step(run: Run, p: RLParts, opt: Optimization, state: TrainState) -> dict[str, Any]:
    """One RL step: rollout, score, advantages, log-prob passes, updates, metrics, log."""
    cfg, dist = run.cfg, run.dist
    t_step = time.perf_counter()
    with p.noise.around_rollout(state.step) as sigma:
        engine_sync_if_noisy(p.engine, p.model, sigma)
        batch, examples, scores, gen_rounds = rollout_and_score(
            p.engine, p.train_set, p.reward_fns, cfg, state, p.router, dist=dist
        )
    engine_sync_if_noisy(p.engine, p.model, sigma)
    advantages, adv_metrics = compute_advantages(scores, batch, cfg)
    t_update = time.perf_counter()
    metrics = _train_on_batch(run, p, opt, batch, advantages)
    p.engine.sync_weights(p.model)  # vLLM holds its own copy; the HF engine is the model
    state.step += 1
    metrics.update(adv_metrics)
    metrics.update(reward_metrics(scores, sum_counts=dist.sum_floats))  # counts: summed
    metrics.update(_rollout_metrics(batch, gen_rounds))
    metrics.update(p.train_set.metrics())
    if cfg.noise_injection.enabled:
        metrics["noise/sigma"] = sigma
    metrics["time/update_s"] = time.perf_counter() - t_update
    metrics["time/step_s"] = time.perf_counter() - t_step
    tokens = sum(len(a) + len(c) for a, c in zip(batch.prompt_ids, batch.completion_ids))
    tokens = dist.sum_floats([tokens])[0]  # all ranks' tokens
    metrics["throughput/tokens_per_s"] = tokens / metrics["time/step_s"]
    moe_metrics, load_row = p.monitor.flush(state.step, reduce_sum=dist.all_reduce_sum)
    metrics.update(moe_metrics)
    metrics = dist.mean_metrics(metrics)
    last = {"step": state.step, **metrics}
    _log_step(run, last, load_row, batch, examples, scores, advantages)
    return last


def _train_on_batch(
    run: Run, p: RLParts, opt: Optimization, batch: RolloutBatch, advantages: torch.Tensor
) -> dict[str, Any]:
    """The step's rows and routes, the reference / old log-prob passes, and the
    `rl.num_policy_updates` updates with their optimizer steps; the update metrics."""
    cfg, dist = run.cfg, run.dist
    layout = {"packed": cfg.data.packing, "shared_prefix": p.shared_prefix}
    tensors = tensors_for_step(batch, advantages, p.tokenizer.pad_token_id, run.device, **layout)
    tensors = dataclasses.replace(
        tensors, micro_batches=plan_step_micro_batches(tensors, cfg, dist)
    )
    width, num_completion = tensors.input_ids.shape[1], tensors.completion_ids.shape[1]
    routes = batch_routes(
        p.router, batch.routes, batch.prompt_ids, width, width - num_completion
    )  # the batch's routes: passed to its passes, dropped with it
    tensors, routes = reference_and_old_logprobs(p, tensors, cfg, routes, batch)
    metrics: dict[str, Any] = {}
    for index in range(cfg.rl.num_policy_updates):
        update = policy_update(
            p.train_model, tensors, cfg, p.router,
            update_index=index, dist=dist, routes=routes, monitor=p.monitor,
        )  # fmt: skip
        routes = routes.with_previous(update.own_routes)
        metrics.update(update.metrics)
        metrics.update(dist.optimizer_step(opt))
    return metrics


def _reward_functions(run: Run) -> list[Any]:
    """The reward functions, their models placed on this rank's devices (said in the log)."""
    cfg = run.cfg
    reward_fns = resolve_rewards(
        cfg.reward.functions, metricx=cfg.reward.metricx, xcomet=cfg.reward.xcomet
    )
    for line in place_reward_models(reward_fns, cfg.reward, run.device):  # each rank its own
        run.say(line)
    return reward_fns


def _load_reference(
    cfg: Config, dist: DistContext, device: torch.device, *, policy: torch.nn.Module
) -> torch.nn.Module | None:
    """The reference model when `rl.kl_coef` needs one (LoRA: None, the policy's base); a copy
    of the just-loaded `policy` when it would be the same weights on the same device."""
    reference = None
    ref_device = gpu_ids_device(
        cfg.model.reference_gpu_ids, key="model.reference_gpu_ids", world_size=dist.world_size
    )
    if cfg.rl.kl_coef:
        reference = load_reference(
            cfg.model, cfg.misc, device=ref_device or device, needed=True, policy=policy
        )
    if ref_device is not None and reference is None:
        raise UserError(
            "model.reference_gpu_ids: this run loads no separate reference model (rl.kl_coef "
            "is 0, or LoRA uses the policy with its adapter off); remove the key"
        )
    return reference


def _say_forwards(
    run: Run, train_model: torch.nn.Module, reference: torch.nn.Module | None
) -> str | None:
    """Says in the run log how the step's forwards run; returns why prompt prefixes are not
    shared (None: they are)."""
    cfg = run.cfg
    no_sharing = shared_prefix_off(cfg, run.dist, train_model, reference)
    run.say(f"shared-prefix forwards: {'on' if no_sharing is None else f'off ({no_sharing})'}")
    run.say(describe_head(train_model, cfg.train.lm_head_chunk_rows))
    if no_sharing is None and head_weight_sharded(train_model):
        run.say("lm_head: shared-prefix forwards take full logits at completion positions (FSDP)")
    return no_sharing


def _build_engine(run: Run, model: torch.nn.Module, tokenizer: Any) -> Any:
    """The rollout engine (`generation.backend`); says what packing costs with this attention."""
    cfg = run.cfg
    lockstep = generation_lockstep(cfg, run.dist)  # sharded weights: all ranks decode in step
    engine = build_engine(
        cfg.generation.backend,
        model,
        tokenizer,
        micro_batch_size=cfg.generation.micro_batch_size,
        **({"lockstep": lockstep} if lockstep is not None else {}),
    )
    attn = getattr(model.config, "_attn_implementation", None)
    if cfg.data.packing and attn in ("sdpa", "eager"):
        run.say(
            f"data.packing with {attn} attention: N x N block masks (flash attention needs none)"
        )
    return engine


def engine_sync_if_noisy(engine: Any, model: torch.nn.Module, sigma: float) -> None:
    """AQN: an engine with its own weights (vLLM) generates with the noisy norms only if they
    are synced in, and must get the clean ones back after; the HF engine shares the model."""
    if sigma:
        engine.sync_weights(model)


def reference_and_old_logprobs(
    p: RLParts, t: StepTensors, cfg: Config, routes: BatchRoutes, batch: RolloutBatch
) -> tuple[StepTensors, BatchRoutes]:
    """`t` with `ref_logprobs` / `old_logprobs`, each only where the configuration needs it,
    and `routes` with the old-policy pass's routes (R2 replays them)."""
    if cfg.rl.kl_coef:
        if p.reference is not None:
            t = dataclasses.replace(t, ref_logprobs=_reference_logprobs(p.reference, t, cfg))
        else:  # LoRA: the base model is the policy with its adapters switched off
            ref = logprob_pass(p.model, t, cfg, disable_adapter=True)
            t = dataclasses.replace(t, ref_logprobs=ref)
    if cfg.rl.num_policy_updates > 1 or not batch.logprobs_exact:
        old, recorded = old_logprob_pass(p.model, t, cfg, p.router)
        t = dataclasses.replace(t, old_logprobs=old)
        routes = routes.with_recorded(recorded)
    return t, routes


def _reference_logprobs(reference: torch.nn.Module, t: StepTensors, cfg: Config) -> torch.Tensor:
    """[N, T] reference log-probs; a reference on its own GPU (`model.reference_gpu_ids`)
    gets a copy of the rows there, and the log-probs come back to the policy's device."""
    ref_device = next(reference.parameters()).device
    home = t.input_ids.device
    if ref_device == home:
        return logprob_pass(reference, t, cfg)
    moved = dataclasses.replace(
        t,
        **{
            f.name: getattr(t, f.name).to(ref_device)
            for f in dataclasses.fields(t)
            if isinstance(getattr(t, f.name), torch.Tensor)
        },
    )
    return logprob_pass(reference, moved, cfg).to(home)


def _rollout_metrics(batch: RolloutBatch, rounds: int) -> dict[str, float]:
    lengths = [len(c) for c in batch.completion_ids]
    return {
        "completion_length/mean": sum(lengths) / max(1, len(lengths)),
        "completion_length/max": float(max(lengths, default=0)),
        "truncated_frac": sum(batch.truncated) / max(1, len(batch.truncated)),
        "time/rollout_s": batch.gen_time_s,
        "gen_rounds": float(rounds),
    }


def _log_step(
    run: Run,
    row: dict[str, Any],
    load_row: dict[str, Any] | None,
    batch: RolloutBatch,
    examples: list[Any],
    scores: RewardScores,
    advantages: torch.Tensor,
) -> None:
    cfg = run.cfg
    step = row["step"]
    if step % cfg.logging.log_every == 0:
        run.logger.log(row)
        if load_row is not None:
            run.logger.write("expert_load.jsonl", load_row)
    if cfg.logging.save_rollouts:
        g = batch.group_size
        for i, text in enumerate(batch.completion_texts):
            ex = examples[i // g]
            run.logger.write(
                "train_rollouts.jsonl",
                {
                    "step": step,
                    "prompt": ex.prompt_text,
                    "completion": text,
                    "completion_ids": list(batch.completion_ids[i]),
                    "reference": ex.columns.get(cfg.data.answer_key or "answer"),
                    "reward": scores.total[i],
                    **{f"reward/{k}": v[i] for k, v in scores.per_function.items()},
                    **{f"extra/{k}": v[i] for k, v in scores.extra.items()},
                    "advantage": float(advantages[i]),
                    "finish_reason": batch.finish_reason[i],
                },
            )
