"""Generation-based evaluation: greedy (by default) completions on the eval split, scored.

Used by the RL recipe (`eval_every`, the end of a run, `--eval-only`) and by the quickstart to
compare the base, SFT and RL models on the same held-out prompts.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from moepost.components.rewards import FAULT_KINDS, reward_state, score_rewards
from moepost.components.rollout.engine import RolloutEngine, SamplingParams
from moepost.config.schema import Config


def eval_params(cfg: Config) -> SamplingParams:
    g = cfg.generation
    return SamplingParams(
        num_samples_per_prompt=1,
        max_new_tokens=g.eval_max_new_tokens or g.max_new_tokens,
        temperature=g.eval_temperature,
        top_p=g.top_p if g.eval_temperature > 0 else 1.0,
        top_k=g.top_k if g.eval_temperature > 0 else 0,
        stop=list(g.stop),
        greedy=g.eval_temperature == 0,
        seed=cfg.train.seed,
    )


@torch.no_grad()
def evaluate_generation(
    engine: RolloutEngine,
    examples: list[Any],
    reward_fns: list[Any],
    cfg: Config,
    *,
    batch_size: int = 32,
    step: int = 0,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Metrics (`eval/accuracy`, `eval/reward_mean`, `eval/reward/<name>`, the fault counts
    `eval/reward/<name>_<kind>`) and one row per sample.

    `eval/accuracy` is the share of samples whose first reward function scored >= 1 (a correct
    answer for gsm8k / math_verify / exact_match); for continuous rewards read reward_mean.
    """
    params = eval_params(cfg)
    rows: list[dict[str, Any]] = []
    totals: list[float | None] = []
    per_fn: dict[str, list[float | None]] = {r.name: [] for r in reward_fns}
    faults = {f"eval/reward/{r.name}_{kind}": 0.0 for r in reward_fns for kind in FAULT_KINDS}
    logged: dict[str, list[float]] = {}  # log_metric values, one mean per chunk
    lengths: list[int] = []
    t0 = time.perf_counter()
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = engine.generate([ex.prompt_ids for ex in chunk], params)
        columns = _columns(chunk, batch.completion_ids)
        prompts = [ex.reward_prompt for ex in chunk]
        scores = score_rewards(
            reward_fns, prompts, batch.completion_texts, columns,
            completion_ids=batch.completion_ids, trainer_state=reward_state(step),
            timeout_s=cfg.reward.timeout_s,
        )  # fmt: skip
        totals.extend(scores.total)
        for name, values in scores.per_function.items():
            per_fn[name].extend(values)
        for name, counts in scores.faults.items():
            for kind, count in counts.items():
                faults[f"eval/reward/{name}_{kind}"] += count
        for key, value in scores.metrics.items():
            logged.setdefault(f"eval/reward/{key}", []).append(value)
        lengths.extend(len(c) for c in batch.completion_ids)
        for i, ex in enumerate(chunk):
            rows.append(
                {
                    "prompt": ex.prompt_text,
                    "completion": batch.completion_texts[i],
                    "reference": ex.columns.get(cfg.data.answer_key or "answer"),
                    "reward": scores.total[i],
                    **{f"reward/{k}": v[i] for k, v in scores.per_function.items()},
                    **{f"extra/{k}": v[i] for k, v in scores.extra.items()},
                }
            )
    kept = [v for v in totals if v is not None]
    metrics: dict[str, float] = {
        "eval/reward_mean": sum(kept) / len(kept) if kept else 0.0,
        "eval/num_samples": float(len(totals)),
        "eval/completion_length": sum(lengths) / max(1, len(lengths)),
        "eval/time_s": time.perf_counter() - t0,
    }
    if reward_fns:
        first = per_fn[reward_fns[0].name]
        metrics["eval/accuracy"] = sum(1 for v in first if v is not None and v >= 1.0) / max(
            1, len(first)
        )
    metrics.update(faults)
    metrics.update({key: sum(values) / len(values) for key, values in logged.items()})
    for name, values in per_fn.items():
        vals = [v for v in values if v is not None]
        if vals:
            metrics[f"eval/reward/{name}"] = sum(vals) / len(vals)
    return metrics, rows


def _columns(chunk: list[Any], completion_ids: list[list[int]]) -> dict[str, list[Any]]:
    """Dataset columns aligned with the completions (G copies per prompt), plus token lengths."""
    group = len(completion_ids) // max(1, len(chunk))
    keys = sorted({k for ex in chunk for k in ex.columns})
    cols = {k: [ex.columns.get(k) for ex in chunk for _ in range(group)] for k in keys}
    cols["completion_lengths"] = [len(c) for c in completion_ids]
    return cols
