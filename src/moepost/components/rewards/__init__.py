"""Reward functions: the builtins, user functions from ``module:function``, and their weighted sum.

Every reward is called as TRL's GRPOTrainer calls it (see :mod:`.convention`): keywords only,
``fn(prompts=, completions=, completion_ids=, <data columns>=, trainer_state=, log_extra=,
log_metric=) -> list[float | None]``, with message-list completions when the prompts are
conversational. None means "cannot score this sample"; a sample with a None from any function of
non-zero weight gets a None total, and the RL recipe drops it. When every total of a step is None
the recipe stops: it calls :func:`raise_if_all_none`. What a failing function leads to is listed
in :mod:`.scoring`.

A reward is named in the config as ``{name: gsm8k, method: strict, weight: 1.0}``: ``name`` is a
key of BUILTIN_REWARDS, ``"my_pkg.rewards:fn"`` or ``"path/to/file.py:fn"``; ``weight`` (default
1.0) scales it in the sum; ``factory: {...}`` means ``name`` is a factory (TRL's
``get_soft_overlong_punishment``, a class) called once with those arguments to make the
function; every other key is passed to the function as a keyword argument and wins over a
dataset column of the same name.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from math import sqrt
from pathlib import Path
from typing import Any

from moepost.components.rewards.convention import PROVIDED, reward_state
from moepost.components.rewards.gsm8k import extract_gsm8k_answer, gsm8k
from moepost.components.rewards.length import length_penalty, overlong_penalty
from moepost.components.rewards.math import exact_match, format_reward, math_verify_reward
from moepost.components.rewards.scoring import (
    FAULT_KINDS,
    RewardFunction,
    RewardScores,
    needs_trainer_state,
    score_rewards,
    trainer_state_for,
)
from moepost.components.rewards.translation_qe import metricx_reward, xcomet_reward
from moepost.errors import UserError

logger = logging.getLogger("moepost.rewards")

# metricx / xcomet load their model on first call (cached per path and device), not here.
BUILTIN_REWARDS: dict[str, Callable[..., list[Any]]] = {
    "gsm8k": gsm8k,
    "math_verify": math_verify_reward,
    "format": format_reward,
    "exact_match": exact_match,
    "length_penalty": length_penalty,
    "overlong": length_penalty,
    "metricx": metricx_reward,
    "xcomet": xcomet_reward,
}


def _named_params(fn: Callable[..., Any]) -> tuple[frozenset[str], bool]:
    """The keyword names ``fn`` takes, and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read: pass it everything
        return frozenset(), True
    names = frozenset(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _load_user_function(name: str, base_dir: Path | None) -> Callable[..., Any]:
    target, _, attr = name.rpartition(":")
    if target.endswith(".py") or "/" in target or "\\" in target:
        file = Path(target).expanduser()
        if not file.is_absolute() and base_dir is not None:
            file = base_dir / file
        if not file.is_file():
            raise UserError(f"reward {name!r}: file {file} does not exist")
        # A stable name (not hash(), which is salted per process) so functions stay picklable.
        digest = hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:12]
        module_name = f"moepost_user_reward_{file.stem}_{digest}"
        spec = importlib.util.spec_from_file_location(module_name, file)
        if spec is None or spec.loader is None:
            raise UserError(f"reward {name!r}: cannot import {file} as a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise UserError(f"reward {name!r}: importing {file} failed: {exc!r}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise UserError(f"reward {name!r}: cannot import module {target!r}: {exc!r}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"reward {name!r}: {target} has no function {attr!r}")
    return fn


def _from_factory(name: str, factory: Callable[..., Any], args: Any) -> Callable[..., Any]:
    if not isinstance(args, Mapping):
        raise UserError(f"reward {name!r}: factory must be a mapping of arguments, got {args!r}")
    try:
        fn = factory(**args)
    except Exception as exc:
        raise UserError(f"reward {name!r}: factory({dict(args)}) failed: {exc}") from exc
    if not callable(fn):
        raise UserError(
            f"reward {name!r}: the factory returned {type(fn).__name__}, not a function"
        )
    return fn


def resolve_reward(
    spec: Mapping[str, Any], *, base_dir: str | Path | None = None
) -> RewardFunction:
    """``{name: gsm8k, method: strict, weight: 1.0}`` -> RewardFunction. Relative file paths in
    ``"file.py:fn"`` are taken from ``base_dir`` (e.g. the config's folder), else the cwd."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise UserError(f"reward.functions entry {spec!r} needs a 'name' string")
    name: str = spec["name"]
    weight = spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise UserError(f"reward {name!r}: weight must be a number, got {weight!r}")
    kwargs = {k: v for k, v in spec.items() if k not in ("name", "weight", "factory")}
    for key in kwargs:
        if key in PROVIDED:
            raise UserError(f"reward {name!r}: key {key!r} is an argument moepost passes itself")
    if name in BUILTIN_REWARDS:
        fn = BUILTIN_REWARDS[name]
        names, _ = _named_params(fn)
        valid = sorted(names - {"prompts", "completions"})
        for key in list(kwargs) + (["factory"] if "factory" in spec else []):
            if key not in names:
                raise UserError(f"reward {name!r}: unknown key {key!r}; valid keys: {valid}")
        return RewardFunction(name, fn, float(weight), kwargs, reads_trainer_state=False)
    if ":" not in name:
        raise UserError(
            f"unknown reward {name!r}: use one of {sorted(BUILTIN_REWARDS)} or "
            f"'module:function' / 'path/to/file.py:function'"
        )
    fn = _load_user_function(name, Path(base_dir) if base_dir is not None else None)
    log_name = name.rpartition(":")[2]
    if "factory" in spec:
        fn = _from_factory(name, fn, spec["factory"])
        log_name = str(getattr(fn, "__name__", log_name))  # TRL logs a reward by its __name__
    names, takes_kwargs = _named_params(fn)
    accepted = None if takes_kwargs else names
    return RewardFunction(log_name, fn, float(weight), kwargs, accepted)


def resolve_rewards(
    functions: Sequence[Mapping[str, Any]],
    *,
    metricx: Mapping[str, Any] | None = None,
    xcomet: Mapping[str, Any] | None = None,
    base_dir: str | Path | None = None,
) -> list[RewardFunction]:
    """Every reward of a ``reward:`` config section. Non-empty ``metricx`` / ``xcomet`` sections
    (unless ``enabled: false``) become ``{name: metricx, **section}``. Repeated names get
    ``_2``, ``_3`` suffixes so each logs under its own ``reward/<name>``."""
    specs = [dict(s) for s in functions]
    for kind, section in (("metricx", metricx), ("xcomet", xcomet)):
        if section and section.get("enabled", True):
            specs.append({"name": kind, **{k: v for k, v in section.items() if k != "enabled"}})
    resolved = [resolve_reward(s, base_dir=base_dir) for s in specs]
    seen: dict[str, int] = {}
    for reward in resolved:
        seen[reward.name] = seen.get(reward.name, 0) + 1
        if seen[reward.name] > 1:
            reward.name = f"{reward.name}_{seen[reward.name]}"
    return resolved


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def reward_metrics(
    scores: RewardScores,
    *,
    sum_counts: Callable[[list[float]], list[float]] | None = None,
) -> dict[str, float]:
    """``reward/mean``, ``reward/std`` (population) of the totals, ``reward/<name>`` means,
    ``reward/none_frac``, the fault counts ``reward/<name>_<kind>`` (kinds: errors, timeouts,
    nonfinite, none; always present) and ``reward/<name>/<metric>`` for what a function gave
    ``log_metric``. None values are left out of every mean (a mean of nothing is omitted).

    sum_counts: e.g. ``DistContext.sum_floats``, to add the counts up over data-parallel ranks
    (every rank has the same count keys, one set per function; the means are averaged later).
    """
    metrics: dict[str, float] = {}
    kept = [v for v in scores.total if v is not None]
    if kept:
        mean = sum(kept) / len(kept)
        metrics["reward/mean"] = mean
        metrics["reward/std"] = sqrt(sum((v - mean) ** 2 for v in kept) / len(kept))
    if scores.total:
        metrics["reward/none_frac"] = 1.0 - len(kept) / len(scores.total)
    for name, values in scores.per_function.items():
        value = _mean(values)
        if value is not None:
            metrics[f"reward/{name}"] = value
    for name, faults in scores.faults.items():
        for kind in FAULT_KINDS:
            metrics[f"reward/{name}_{kind}"] = float(faults.get(kind, 0))
    for key, value in scores.metrics.items():
        metrics[f"reward/{key}"] = value
    if sum_counts is not None:
        counts = fault_count_keys(metrics)
        metrics.update(zip(counts, sum_counts([metrics[k] for k in counts])))
    return metrics


def fault_count_keys(metrics: Mapping[str, Any]) -> list[str]:
    """The ``reward/<name>_<kind>`` count keys of ``reward_metrics`` (summed, not averaged,
    over data-parallel ranks)."""
    suffixes = tuple(f"_{kind}" for kind in FAULT_KINDS)
    return sorted(k for k in metrics if k.startswith("reward/") and k.endswith(suffixes))


def raise_if_all_none(scores: RewardScores, step: int) -> None:
    """UserError when no sample of the step could be scored (the RL recipe stops on it)."""
    if not scores.total or any(v is not None for v in scores.total):
        return
    n = len(scores.total)

    def why(name: str) -> str:
        faults = scores.faults.get(name, {})
        counts = [f"{faults[k]} {k}" for k in FAULT_KINDS if faults.get(k) and k != "none"]
        return f"{name}: {sum(v is None for v in scores.per_function[name])}/{n} None" + (
            f" ({', '.join(counts)})" if counts else ""
        )

    detail = "; ".join(why(name) for name in scores.per_function)
    raise UserError(f"all rewards were None for step {step}: {detail} (see logger moepost.rewards)")


__all__ = [
    "BUILTIN_REWARDS",
    "FAULT_KINDS",
    "RewardFunction",
    "RewardScores",
    "exact_match",
    "extract_gsm8k_answer",
    "fault_count_keys",
    "format_reward",
    "gsm8k",
    "length_penalty",
    "math_verify_reward",
    "metricx_reward",
    "needs_trainer_state",
    "overlong_penalty",
    "raise_if_all_none",
    "resolve_reward",
    "resolve_rewards",
    "reward_state",
    "reward_metrics",
    "score_rewards",
    "trainer_state_for",
    "xcomet_reward",
]
