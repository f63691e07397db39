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
from typing import Any

import torch

from moepost.algorithms.advantages import group_advantages, rewards_to_tensor
from moepost.components.model.lm_head import describe_head, head_weight_sharded
from moepost.components.model.loading import load_policy, load_reference, load_tokenizer
from moepost.components.model.lora import describe_parameters, parameter_report
from moepost.components.model.placement import gpu_ids_device, place_reward_models
from moepost.components.moe.router_tools import RouterTools
from moepost.components.rewards import (
    RewardScores,
    raise_if_all_none,
    resolve_rewards,
    reward_metrics,
    reward_state,
    score_rewards,
)
from moepost.components.rewards.length import overlong_penalty
from moepost.components.rollout.engine import RolloutBatch, SamplingParams, build_engine
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
from moepost.recipes.evaluate import evaluate_generation
from moepost.recipes.rl_update import (
    logprob_pass,
    plan_micro_batches,
    policy_update,
    shared_prefix_off,
)
from moepost.recipes.step_tensors import StepTensors, tensors_for_step


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
    reward_fns = resolve_rewards(
        cfg.reward.functions, metricx=cfg.reward.metricx, xcomet=cfg.reward.xcomet
    )
    for line in place_reward_models(reward_fns, cfg.reward, device):  # each rank its own
        run.say(line)
    model = load_policy(cfg.model, cfg.misc, device=device, for_training=not eval_only)
    router = RouterTools(model, cfg.moe)
    engine = _build_engine(run, model, tokenizer)
    run.say(f"model: {describe_parameters(parameter_report(model))}; {router.describe()}")
    if eval_only:
        reset_logs(run, after_step=None, names=EVAL_LOGS)
        return _evaluate(run, engine, eval_set or train_set.all_examples(), reward_fns, step=0)

    reference = _load_reference(cfg, dist, device)
    total = total_steps(cfg, None if train_set.streaming else len(train_set))
    train_model = prepare_model(model, cfg, dist)  # DDP; `model` stays the raw one
    opt = Optimization(model, cfg, total)
    train_model = attach_optimizer(opt, cfg, dist)  # DeepSpeed engine (else unchanged)
    state = maybe_resume(run, resume, model, opt)
    train_set.restore(state)
    no_sharing = _say_forwards(run, train_model, reference)
    noise = NoiseInjector(model, cfg.noise_injection, total, cfg.train.seed)
    console = Console(total, cfg.rl.algorithm, enabled=run.is_main)
    last: dict[str, Any] = {}
    while state.step < total:
        last = _rl_step(
            run, engine, model, train_model, reference, tokenizer, router, opt, noise, state,
            train_set, reward_fns, shared_prefix=no_sharing is None,
        )  # fmt: skip
        console.update(state.step, last)
        if cfg.train.eval_every and state.step % cfg.train.eval_every == 0 and eval_set:
            last.update(_evaluate_best(run, engine, eval_set, reward_fns, model, tokenizer, state))
        if cfg.train.save_every and state.step % cfg.train.save_every == 0:
            save(run, model, tokenizer, opt, state)
        stop_if_signalled(run, model, tokenizer, opt, state)
    console.close()
    if eval_set and not any(k.startswith("eval/") for k in last):  # not already at this step
        last.update(_evaluate_best(run, engine, eval_set, reward_fns, model, tokenizer, state))
    if cfg.logging.save_final:
        save_final(run, model, tokenizer)
    finish_run(run)
    dist.close()
    return last


def _rl_step(
    run: Run,
    engine: Any,
    model: torch.nn.Module,
    train_model: torch.nn.Module,
    reference: torch.nn.Module | None,
    tokenizer: Any,
    router: RouterTools,
    opt: Optimization,
    noise: NoiseInjector,
    state: TrainState,
    train_set: Any,
    reward_fns: list[Any],
    *,
    shared_prefix: bool,
) -> dict[str, Any]:
    """One RL step: rollout, score, advantages, log-prob passes, updates, metrics, log."""
    cfg, dist, device = run.cfg, run.dist, run.device
    t_step = time.perf_counter()
    with noise.around_rollout(state.step) as sigma:
        engine_sync_if_noisy(engine, model, sigma)
        batch, examples, scores, gen_rounds = rollout_and_score(
            engine, train_set, reward_fns, cfg, state, router, dist=dist
        )
    engine_sync_if_noisy(engine, model, sigma)
    advantages, adv_metrics = compute_advantages(scores, batch, cfg)
    layout = {"packed": cfg.data.packing, "shared_prefix": shared_prefix}
    tensors = tensors_for_step(batch, advantages, tokenizer.pad_token_id, device, **layout)
    tensors = dataclasses.replace(tensors, micro_batches=plan_micro_batches(tensors, cfg, dist))
    width, num_completion = tensors.input_ids.shape[1], tensors.completion_ids.shape[1]
    router.set_rollout_routes(batch.routes, batch.prompt_ids, width, width - num_completion)
    t_update = time.perf_counter()
    tensors = reference_and_old_logprobs(model, reference, tensors, cfg, router, batch)
    metrics: dict[str, Any] = {}
    for update in range(cfg.rl.num_policy_updates):
        metrics.update(
            policy_update(train_model, tensors, cfg, router, update_index=update, dist=dist)
        )
        metrics.update(dist.optimizer_step(opt))
    router.end_batch()
    engine.sync_weights(model)  # vLLM holds its own copy; the HF engine is the model
    state.step += 1
    metrics.update(adv_metrics)
    metrics.update(reward_metrics(scores, sum_counts=dist.sum_floats))  # counts: summed
    metrics.update(_rollout_metrics(batch, gen_rounds))
    metrics.update(train_set.metrics())
    if cfg.noise_injection.enabled:
        metrics["noise/sigma"] = sigma
    metrics["time/update_s"] = time.perf_counter() - t_update
    metrics["time/step_s"] = time.perf_counter() - t_step
    tokens = sum(len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids))
    tokens = dist.sum_floats([tokens])[0]  # all ranks' tokens
    metrics["throughput/tokens_per_s"] = tokens / metrics["time/step_s"]
    moe_metrics, load_row = router.flush(state.step, reduce_sum=dist.all_reduce_sum)
    metrics.update(moe_metrics)
    metrics = dist.mean_metrics(metrics)
    last = {"step": state.step, **metrics}
    _log_step(run, last, load_row, batch, examples, scores, advantages)
    return last


def _load_reference(cfg: Config, dist: DistContext, device: torch.device) -> torch.nn.Module | None:
    """The reference model when `rl.kl_coef` needs one (LoRA: None, the policy's base)."""
    reference = None
    ref_device = gpu_ids_device(
        cfg.model.reference_gpu_ids, key="model.reference_gpu_ids", world_size=dist.world_size
    )
    if cfg.rl.kl_coef:
        reference = load_reference(cfg.model, cfg.misc, device=ref_device or device, needed=True)
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


def _evaluate_best(
    run: Run,
    engine: Any,
    eval_set: list[Any],
    reward_fns: list[Any],
    model: torch.nn.Module,
    tokenizer: Any,
    state: TrainState,
) -> dict[str, Any]:
    """Evaluate at the current step; saves `best` when the eval metric improves."""
    ev = _evaluate(run, engine, eval_set, reward_fns, step=state.step)
    _maybe_best(run, model, tokenizer, state, ev)
    return ev


def total_steps(cfg: Config, num_prompts: int | None) -> int:
    """Optimizer steps of the run: train.max_steps, else one epoch of the prompts (None: a
    stream, whose length is unknown; the config check makes max_steps required then)."""
    if cfg.train.max_steps or num_prompts is None:
        return cfg.train.max_steps
    return max(1, num_prompts // cfg.train.prompts_per_step)


def engine_sync_if_noisy(engine: Any, model: torch.nn.Module, sigma: float) -> None:
    """AQN: an engine with its own weights (vLLM) generates with the noisy norms only if they
    are synced in, and must get the clean ones back after; the HF engine shares the model."""
    if sigma:
        engine.sync_weights(model)


def sampling_params(cfg: Config, seed: int) -> SamplingParams:
    g = cfg.generation
    return SamplingParams(
        num_samples_per_prompt=g.num_samples_per_prompt,
        max_new_tokens=g.max_new_tokens,
        temperature=g.temperature,
        top_p=g.top_p,
        top_k=g.top_k,
        stop=list(g.stop),
        seed=seed,
    )


def rollout_and_score(
    engine: Any,
    train_set: Any,
    reward_fns: list[Any],
    cfg: Config,
    state: TrainState,
    router: RouterTools,
    *,
    dist: DistContext | None = None,
) -> tuple[RolloutBatch, list[Any], RewardScores, int]:
    """Generate and score; DAPO's dynamic sampling keeps only groups with reward variance.

    The routes the engine's forwards took are captured per row (R3 replays them; drift
    metrics compare the training pass with them). Data parallel: every rank draws the same
    step's prompts and keeps its slice (whole groups on one rank), sampled with its own seed;
    regenerate / give up are decided over all ranks, so the data position stays in step.
    """
    dist = dist or DistContext()
    want = cfg.train.prompts_per_step
    rounds = 0
    while True:
        examples = dist.shard(train_set.take(state, want))  # ListData / StreamData
        seed = dist.sampling_seed(cfg.train.seed * 7919 + state.step * 31 + rounds)
        prompts = [ex.prompt_ids for ex in examples]
        with router.capture_generation(engine) as holder:
            batch = engine.generate(prompts, sampling_params(cfg, seed))
        batch.routes = router.generation_routes(
            holder, prompts, batch, cfg.generation.micro_batch_size
        )
        scores = score_batch(
            reward_fns,
            examples,
            batch,
            cfg,
            state.step,
            total_steps(cfg, None if train_set.streaming else len(train_set)),
        )
        if not cfg.rl.dynamic_sampling:
            return batch, examples, scores, rounds + 1
        keep = _groups_with_variance(scores.total, cfg.generation.num_samples_per_prompt)
        all_full, all_some = dist.all_true(len(keep) == len(examples)), dist.all_true(bool(keep))
        if all_full or (all_some and rounds >= cfg.rl.max_dynamic_sampling_rounds):
            # Past the cap we train on the informative groups we have (logged as gen_rounds).
            return _select_groups(batch, examples, scores, keep) + (rounds + 1,)
        if rounds >= cfg.rl.max_dynamic_sampling_rounds:
            raise UserError(
                f"rl.dynamic_sampling: no prompt group with reward variance after "
                f"{rounds + 1} generation rounds at step {state.step}; the task is too easy or "
                "too hard for the policy (raise rl.max_dynamic_sampling_rounds or check rewards)"
            )
        rounds += 1


def score_batch(
    reward_fns: list[Any],
    examples: list[Any],
    batch: RolloutBatch,
    cfg: Config,
    step: int,
    max_steps: int = 0,
) -> RewardScores:
    """Every reward function on the step's completions, called as TRL calls them."""
    from moepost.recipes.evaluate import _columns

    group = batch.group_size
    prompts = [ex.reward_prompt for ex in examples for _ in range(group)]
    columns = _columns(examples, batch.completion_ids)
    trainer_state = reward_state(step, max_steps, batch_size=cfg.train.prompts_per_step)
    scores = score_rewards(
        reward_fns, prompts, batch.completion_texts, columns,
        completion_ids=batch.completion_ids, trainer_state=trainer_state,
        timeout_s=cfg.reward.timeout_s,
    )  # fmt: skip
    raise_if_all_none(scores, step)
    if cfg.rl.overlong_shaping:
        penalty = overlong_penalty(
            [len(c) for c in batch.completion_ids],
            cfg.generation.max_new_tokens,
            cfg.rl.overlong_cache_length,
        )
        total = [None if v is None else v + p for v, p in zip(scores.total, penalty)]
        scores = scores._replace(
            total=total, per_function={**scores.per_function, "overlong": penalty}
        )
    return scores


def _groups_with_variance(total: list[float | None], group: int) -> list[int]:
    keep = []
    for g in range(len(total) // group):
        vals = [v for v in total[g * group : (g + 1) * group] if v is not None]
        if len(vals) >= 2 and max(vals) > min(vals):
            keep.append(g)
    return keep


def _select_groups(
    batch: RolloutBatch, examples: list[Any], scores: RewardScores, keep: list[int]
) -> tuple[RolloutBatch, list[Any], RewardScores]:
    g = batch.group_size
    rows = [g * k + j for k in keep for j in range(g)]
    pick = lambda xs: [xs[r] for r in rows]  # noqa: E731
    sub = RolloutBatch(
        prompt_ids=pick(batch.prompt_ids),
        completion_ids=pick(batch.completion_ids),
        completion_texts=pick(batch.completion_texts),
        logprobs=batch.logprobs[rows],
        truncated=pick(batch.truncated),
        finish_reason=pick(batch.finish_reason),
        group_size=g,
        gen_time_s=batch.gen_time_s,
        num_prompt_tokens=batch.num_prompt_tokens,
        num_completion_tokens=sum(len(c) for c in pick(batch.completion_ids)),
        logprobs_exact=batch.logprobs_exact,
        routes=pick(batch.routes) if batch.routes is not None else None,
    )
    sub_scores = scores._replace(
        total=pick(scores.total),
        per_function={k: pick(v) for k, v in scores.per_function.items()},
        extra={k: pick(v) for k, v in scores.extra.items()},
    )
    return sub, [examples[k] for k in keep], sub_scores


def compute_advantages(
    scores: RewardScores, batch: RolloutBatch, cfg: Config
) -> tuple[torch.Tensor, dict[str, float]]:
    mode = (
        "rloo"
        if cfg.rl.algorithm == "rloo"
        else ("std" if cfg.rl.advantage_std_normalize else "mean")
    )
    adv, m = group_advantages(rewards_to_tensor(scores.total), batch.group_size, mode=mode)
    return adv, {
        f"adv/{k}" if k != "zero_std_frac" else "zero_std_frac": float(v)
        for k, v in m.items()
        if torch.as_tensor(v).numel() == 1
    }


def reference_and_old_logprobs(
    model: torch.nn.Module,
    reference: torch.nn.Module | None,
    t: StepTensors,
    cfg: Config,
    router: RouterTools,
    batch: RolloutBatch,
) -> StepTensors:
    """`t` with `ref_logprobs` / `old_logprobs`, each only where the configuration needs it."""
    if cfg.rl.kl_coef:
        if reference is not None:
            t = dataclasses.replace(t, ref_logprobs=_reference_logprobs(reference, t, cfg))
        else:  # LoRA: the base model is the policy with its adapters switched off
            ref = logprob_pass(model, t, cfg, disable_adapter=True)
            t = dataclasses.replace(t, ref_logprobs=ref)
    if cfg.rl.num_policy_updates > 1 or not batch.logprobs_exact:
        t = dataclasses.replace(t, old_logprobs=logprob_pass(model, t, cfg, router=router))
    return t


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


def _evaluate(
    run: Run, engine: Any, examples: list[Any], reward_fns: list[Any], *, step: int
) -> dict[str, Any]:
    metrics, rows = evaluate_generation(engine, examples, reward_fns, run.cfg, step=step)
    row = {"step": step, **metrics}
    run.logger.log(row)
    if run.cfg.logging.save_eval_outputs:
        for r in rows:
            run.logger.write("eval_outputs.jsonl", {"step": step, **r})
    run.say(
        f"eval @ step {step}: accuracy {metrics.get('eval/accuracy', 0.0):.3f}, "
        f"reward_mean {metrics['eval/reward_mean']:.3f} on {len(rows)} prompts"
    )
    return row


def _maybe_best(
    run: Run, model: torch.nn.Module, tokenizer: Any, state: TrainState, ev: dict[str, Any]
) -> None:
    metric = run.cfg.train.eval_metric or "eval/reward_mean"
    value = ev.get(metric)
    if value is not None and (state.best_metric is None or value > state.best_metric):
        state.best_metric = float(value)
        save_final(run, model, tokenizer, name="best")
