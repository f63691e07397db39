"""Evaluation during and after an RL run: generate on the held-out prompts, score, log, and
keep the `best` checkpoint by `train.eval_metric`."""

from __future__ import annotations

from typing import Any

import torch

from moepost.recipes.common import Run, TrainState, save_final
from moepost.recipes.evaluate import evaluate_generation


def evaluate_and_keep_best(
    run: Run,
    engine: Any,
    eval_set: list[Any],
    reward_fns: list[Any],
    model: torch.nn.Module,
    tokenizer: Any,
    state: TrainState,
) -> dict[str, Any]:
    """Evaluate at the current step; saves `best` when the eval metric improves."""
    ev = evaluate_rl(run, engine, eval_set, reward_fns, step=state.step)
    keep_best(run, model, tokenizer, state, ev)
    return ev


def evaluate_rl(
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


def keep_best(
    run: Run, model: torch.nn.Module, tokenizer: Any, state: TrainState, ev: dict[str, Any]
) -> None:
    metric = run.cfg.train.eval_metric or "eval/reward_mean"
    value = ev.get(metric)
    if value is not None and (state.best_metric is None or value > state.best_metric):
        state.best_metric = float(value)
        save_final(run, model, tokenizer, name="best")
