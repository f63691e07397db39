"""Generation-based evaluation: greedy (by default) completions on the eval split, scored.

Used by the RL recipe (`eval_every`, the end of a run, `--eval-only`) and by the quickstart to
compare the base, SFT and RL models on the same held-out prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from moepost.components.rewards import FAULT_KINDS, score_rewards, trainer_state_for
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
    tally = _EvalTally.start(reward_fns)
    trainer_state = trainer_state_for(reward_fns, step)
    t0 = time.perf_counter()
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = engine.generate([ex.prompt_ids for ex in chunk], params)
        columns = _columns(chunk, batch.completion_ids)
        prompts = [ex.reward_prompt for ex in chunk]
        scores = score_rewards(
            reward_fns, prompts, batch.completion_texts, columns,
            completion_ids=batch.completion_ids, trainer_state=trainer_state,
            timeout_s=cfg.reward.timeout_s,
        )  # fmt: skip
        tally.add(chunk, batch, scores, cfg.data.answer_key or "answer")
    return tally.metrics(time.perf_counter() - t0), tally.rows


@dataclass
class _EvalTally:
    """What the eval chunks add up to: per-sample rows, rewards, fault counts, lengths."""

    reward_names: list[str]
    faults: dict[str, float]
    rows: list[dict[str, Any]] = field(default_factory=list)
    totals: list[float | None] = field(default_factory=list)
    per_fn: dict[str, list[float | None]] = field(default_factory=dict)
    logged: dict[str, list[float]] = field(default_factory=dict)  # log_metric, a mean per chunk
    lengths: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, reward_fns: list[Any]) -> _EvalTally:
        names = [r.name for r in reward_fns]
        faults = {f"eval/reward/{name}_{kind}": 0.0 for name in names for kind in FAULT_KINDS}
        return cls(names, faults, per_fn={name: [] for name in names})

    def add(self, chunk: list[Any], batch: Any, scores: Any, answer_key: str) -> None:
        """One generated chunk: its examples, the engine's batch and their reward scores."""
        self.totals.extend(scores.total)
        for name, values in scores.per_function.items():
            self.per_fn[name].extend(values)
        for name, counts in scores.faults.items():
            for kind, count in counts.items():
                self.faults[f"eval/reward/{name}_{kind}"] += count
        for key, value in scores.metrics.items():
            self.logged.setdefault(f"eval/reward/{key}", []).append(value)
        self.lengths.extend(len(c) for c in batch.completion_ids)
        for i, ex in enumerate(chunk):
            self.rows.append(
                {
                    "prompt": ex.prompt_text,
                    "completion": batch.completion_texts[i],
                    "reference": ex.columns.get(answer_key),
                    "reward": scores.total[i],
                    **{f"reward/{k}": v[i] for k, v in scores.per_function.items()},
                    **{f"extra/{k}": v[i] for k, v in scores.extra.items()},
                }
            )

    def metrics(self, time_s: float) -> dict[str, float]:
        kept = [v for v in self.totals if v is not None]
        metrics: dict[str, float] = {
            "eval/reward_mean": sum(kept) / len(kept) if kept else 0.0,
            "eval/num_samples": float(len(self.totals)),
            "eval/completion_length": sum(self.lengths) / max(1, len(self.lengths)),
            "eval/time_s": time_s,
        }
        if self.reward_names:
            first = self.per_fn[self.reward_names[0]]
            correct = sum(1 for v in first if v is not None and v >= 1.0)
            metrics["eval/accuracy"] = correct / max(1, len(first))
        metrics.update(self.faults)
        metrics.update({key: sum(values) / len(values) for key, values in self.logged.items()})
        for name, values in self.per_fn.items():
            vals = [v for v in values if v is not None]
            if vals:
                metrics[f"eval/reward/{name}"] = sum(vals) / len(vals)
        return metrics


def _columns(chunk: list[Any], completion_ids: list[list[int]]) -> dict[str, list[Any]]:
    """Dataset columns aligned with the completions (G copies per prompt), plus token lengths."""
    group = len(completion_ids) // max(1, len(chunk))
    keys = sorted({k for ex in chunk for k in ex.columns})
    cols = {k: [ex.columns.get(k) for ex in chunk for _ in range(group)] for k in keys}
    cols["completion_lengths"] = [len(c) for c in completion_ids]
    return cols
