"""The rollout side of one RL step: sample prompts, generate G completions each, score them,
and turn the rewards into group advantages (DAPO's dynamic sampling included).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from moepost.algorithms.advantages import group_advantages, rewards_to_tensor
from moepost.components.moe.router_setup import RouterSetup
from moepost.components.rewards import (
    RewardScores,
    raise_if_all_none,
    score_rewards,
    trainer_state_for,
)
from moepost.components.rewards.length import overlong_penalty
from moepost.components.rollout.batch_routes import capture_generation, generation_routes
from moepost.components.rollout.engine import RolloutBatch, SamplingParams
from moepost.config.schema import Config
from moepost.distributed import DistContext
from moepost.errors import UserError
from moepost.recipes.common import TrainState


def total_steps(cfg: Config, num_prompts: int | None) -> int:
    """Optimizer steps of the run: train.max_steps, else one epoch of the prompts (None: a
    stream, whose length is unknown; the config check makes max_steps required then)."""
    if cfg.train.max_steps or num_prompts is None:
        return cfg.train.max_steps
    return max(1, num_prompts // cfg.train.prompts_per_step)


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
    router: RouterSetup,
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
        with capture_generation(router, engine) as holder:
            batch = engine.generate(prompts, sampling_params(cfg, seed))
        batch.routes = generation_routes(
            router, holder, prompts, batch, cfg.generation.micro_batch_size
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
    trainer_state = trainer_state_for(
        reward_fns, step, max_steps, batch_size=cfg.train.prompts_per_step
    )
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
            total=total,
            per_function={**scores.per_function, "overlong": list[float | None](penalty)},
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
    mode: Literal["rloo", "std", "mean"] = (
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
