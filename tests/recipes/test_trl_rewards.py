"""TRL's own reward functions, unchanged, through `moepost train`: every public function of
`trl.rewards` (factories built with `factory:`), on standard and on conversational data, and the
logged `reward/<function>` compared with the function called directly on the logged rollouts."""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trl.rewards as trl_rewards  # the `dev` extra installs trl
import yaml
from recipe_support import read_log, write_jsonl
from test_rl_recipe import rl_config

# Arguments for TRL's factories (functions that build a reward function). Sized for
# generation.max_new_tokens = 8, so length-based values vary between completions.
FACTORY_ARGS: dict[str, dict[str, Any]] = {
    "get_cosine_scaled_reward": {"max_len": 8},
    "get_repetition_penalty_reward": {"ngram_size": 1, "max_penalty": -1.0},
    "get_soft_overlong_punishment": {"max_completion_len": 6, "soft_punish_cache": 3},
}
# TRL's readers of `completion[0]["content"]`: on standard (string) data they raise, in TRL too.
# They score None there (counted in reward/<fn>_errors), so they get weight 0 in the standard run.
NEEDS_MESSAGES = {"accuracy_reward", "reasoning_accuracy_reward", "get_cosine_scaled_reward"}
NEEDS_MESSAGES |= {"think_format_reward"}
# Functions with a value for every sample here; the others (None on the unparseable golds) are
# logged with weight 0 so that the total is never None.
IN_TOTAL = {"think_format_reward", "get_repetition_penalty_reward", "get_soft_overlong_punishment"}

USER_REWARDS = """
def completions_only(completions, **kwargs):
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [len(t) / 10 for t in texts]


def prompt_answer(prompts, completions, answer, **kwargs):
    step = kwargs["trainer_state"].global_step
    out = []
    for p, c, a in zip(prompts, completions, answer):
        prompt_len = len(p) if isinstance(p, str) else len(p[-1]["content"])
        form = 0.5 if isinstance(c, list) and c[0]["role"] == "assistant" else 0.0
        out.append(prompt_len + len(a) + form + 100 * step)
    return out


async def async_ids(completion_ids, log_metric, **kwargs):  # TRL also awaits async functions
    log_metric("batch", float(len(completion_ids)))
    return [float(sum(ids) % 7) for ids in completion_ids]
"""
USER_NAMES = ("completions_only", "prompt_answer", "async_ids")


def public_trl_rewards() -> dict[str, Any]:
    """Every public callable of trl.rewards (its submodules left out)."""
    names = [n for n in dir(trl_rewards) if not n.startswith("_")]
    return {
        n: getattr(trl_rewards, n) for n in names if inspect.isfunction(getattr(trl_rewards, n))
    }


def is_factory(fn: Any) -> bool:
    params = inspect.signature(fn).parameters
    takes = {"prompts", "completions", "completion_ids"}
    return not (takes & set(params)) and not any(p.kind == p.VAR_KEYWORD for p in params.values())


def build(name: str, fn: Any) -> Any:
    return fn(**FACTORY_ARGS[name]) if is_factory(fn) else fn


def problems() -> list[dict[str, str]]:
    # Unique questions (the rollouts are matched back to them); every other gold solution is
    # not parseable, so accuracy_reward returns None there.
    rows = []
    for i in range(8):
        solution = f"\\frac{{1}}{{{i + 2}}}" if i % 2 == 0 else "no math here"
        rows.append({"question": f"Problem {i}: what is 1/{i + 2}?", "solution": solution,
                     "answer": str(i)})  # fmt: skip
    return rows


def data_rows(conversational: bool) -> list[dict[str, Any]]:
    out = []
    for p in problems():
        prompt: Any = p["question"]
        if conversational:
            prompt = [{"role": "user", "content": p["question"]}]
        out.append({"prompt": prompt, "solution": p["solution"], "answer": p["answer"]})
    return out


def reward_specs(user_file: Path, conversational: bool) -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = []
    for name, fn in public_trl_rewards().items():
        spec: dict[str, Any] = {"name": f"trl.rewards:{name}"}
        if is_factory(fn):
            spec["factory"] = FACTORY_ARGS[name]
        if name not in IN_TOTAL or (name in NEEDS_MESSAGES and not conversational):
            spec["weight"] = 0.0
        specs.append(spec)
    specs.append({"name": f"{user_file}:completions_only", "weight": 1.0})
    specs.append({"name": f"{user_file}:prompt_answer", "weight": 0.0})
    specs.append({"name": f"{user_file}:async_ids", "weight": 0.0})
    return specs


def logged_name(name: str) -> str:
    """moepost logs a factory's product under its __name__ (as TRL does), else the config name."""
    fn = public_trl_rewards().get(name)
    return getattr(build(name, fn), "__name__", name) if fn is not None else name


def expected(fn: Any, rows: list[dict[str, Any]], conversational: bool) -> list[float | None]:
    """The function called directly, as TRL would, on one step's logged rollouts."""
    by_question = {p["question"]: p for p in problems()}
    probs = [next(p for q, p in by_question.items() if q in r["prompt"]) for r in rows]
    if conversational:
        prompts: list[Any] = [[{"role": "user", "content": p["question"]}] for p in probs]
        completions: list[Any] = [[{"role": "assistant", "content": r["completion"]}] for r in rows]
    else:
        prompts, completions = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    from transformers import TrainerState

    result = fn(
        prompts=prompts,
        completions=completions,
        completion_ids=[r["completion_ids"] for r in rows],
        solution=[p["solution"] for p in probs],
        answer=[p["answer"] for p in probs],
        trainer_state=TrainerState(global_step=rows[0]["step"] - 1),
        log_extra=lambda column, values: None,
        log_metric=lambda name, value: None,
    )
    return asyncio.run(result) if inspect.iscoroutine(result) else result


def run_train(cfg: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run(
        [sys.executable, "-m", "moepost", "train", str(path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_factory_table_covers_every_trl_factory() -> None:
    factories = {n for n, fn in public_trl_rewards().items() if is_factory(fn)}
    assert factories == set(FACTORY_ARGS), "a TRL factory without arguments in FACTORY_ARGS"
    assert len(public_trl_rewards()) >= 6


@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
def test_every_trl_reward_through_moepost_train(
    tiny_model: Path, tmp_path: Path, conversational: bool
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", data_rows(conversational))
    user_file = tmp_path / "user_rewards.py"
    user_file.write_text(USER_REWARDS)
    out = tmp_path / "run"
    cfg = rl_config(tiny_model, data, out)
    cfg["data"]["test_size"] = 0
    # Common characters as stop strings: the random policy's completions end at varied lengths.
    cfg["generation"]["stop"] = list("aeiou0123")
    cfg["reward"] = {"functions": reward_specs(user_file, conversational)}
    result = run_train(cfg, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    namespace: dict[str, Any] = {}
    exec(USER_REWARDS, namespace)  # the same user functions, called directly
    functions = {**public_trl_rewards(), **{k: namespace[k] for k in USER_NAMES}}
    log = {r["step"]: r for r in read_log(out) if "loss" in r}
    rollouts = read_log(out, "train_rollouts.jsonl")
    assert sorted(log) == [1, 2] and len(rollouts) == 16
    for name, raw in functions.items():
        fn = build(name, raw) if name in public_trl_rewards() else raw
        logged = logged_name(name)
        for step, row in log.items():
            rows = [r for r in rollouts if r["step"] == step]
            if name in NEEDS_MESSAGES and not conversational:
                with pytest.raises((TypeError, KeyError)):  # TRL itself fails the same way
                    expected(fn, rows, conversational)
                assert row[f"reward/{logged}_errors"] == len(rows)
                assert f"reward/{logged}" not in row
                assert all(r[f"reward/{logged}"] is None for r in rows)
                continue
            want = expected(fn, rows, conversational)
            got = [r[f"reward/{logged}"] for r in rows]
            assert got == pytest.approx(want), (name, step)
            kept = [v for v in want if v is not None]
            assert row[f"reward/{logged}"] == pytest.approx(sum(kept) / len(kept)), name
            assert row[f"reward/{logged}_errors"] == 0
            assert row[f"reward/{logged}_none"] == len(want) - len(kept)
    # The total is the weighted sum of the functions that have a weight.
    weights = {
        logged_name(s["name"].rpartition(":")[2]): s.get("weight", 1.0)
        for s in cfg["reward"]["functions"]
    }
    assert sum(w != 0 for w in weights.values()) == (4 if conversational else 3)
    for r in rollouts:
        terms = [w * r[f"reward/{n}"] for n, w in weights.items() if w]
        assert r["reward"] == pytest.approx(sum(terms))
    # The values vary: a constant 0 from a broken call path would not pass the comparisons.
    assert len({r["reward/soft_overlong_punishment_reward"] for r in rollouts}) > 1
    assert any(r["reward/prompt_answer"] >= 100 for r in rollouts)  # step 2 saw global_step 1
    assert all(row["reward/async_ids/batch"] == 8.0 for row in log.values())  # its log_metric
    assert json.dumps(rollouts[0])  # plain JSON (message lists are not logged)
    assert all(math.isfinite(r["reward"]) for r in rollouts)
