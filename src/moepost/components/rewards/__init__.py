"""Reward functions: the builtins, user functions from ``module:function``, and their weighted sum.

Every reward follows TRL's convention ``fn(prompts, completions, **columns) -> list[float | None]``
where each dataset column is a list aligned with ``completions``. None means "cannot score this
sample"; a sample with a None from any function of non-zero weight gets a None total, and the RL
recipe drops it. When every total of a step is None the recipe stops: it calls
:func:`raise_if_all_none`.

A reward is named in the config as ``{name: gsm8k, method: strict, weight: 1.0}``: ``name`` is a
key of BUILTIN_REWARDS, ``"my_pkg.rewards:fn"`` or ``"path/to/file.py:fn"``; ``weight`` (default
1.0) scales it in the sum; every other key is passed to the function as a keyword argument and
wins over a dataset column of the same name.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from math import isfinite, sqrt
from numbers import Real
from pathlib import Path
from typing import Any, NamedTuple

from moepost.components.rewards.gsm8k import extract_gsm8k_answer, gsm8k
from moepost.components.rewards.length import length_penalty, overlong_penalty
from moepost.components.rewards.math import exact_match, format_reward, math_verify_reward
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


@dataclass
class RewardFunction:
    """A resolved reward: ``fn`` with its config keyword arguments, a log name and a weight."""

    name: str
    fn: Callable[..., Sequence[float | None]]
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    # None: fn takes **kwargs, so it gets every column; else only the columns it names.
    accepted: frozenset[str] | None = None

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[str], **columns: Any
    ) -> Sequence[float | None]:
        if self.accepted is not None:
            columns = {k: v for k, v in columns.items() if k in self.accepted}
        return self.fn(prompts, completions, **{**columns, **self.kwargs})


def _named_params(fn: Callable[..., Any]) -> tuple[frozenset[str], bool]:
    params = inspect.signature(fn).parameters.values()
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
    kwargs = {k: v for k, v in spec.items() if k not in ("name", "weight")}
    if name in BUILTIN_REWARDS:
        fn = BUILTIN_REWARDS[name]
        names, _ = _named_params(fn)
        valid = sorted(names - {"prompts", "completions"})
        for key in kwargs:
            if key not in names:
                raise UserError(f"reward {name!r}: unknown key {key!r}; valid keys: {valid}")
        return RewardFunction(name, fn, float(weight), kwargs)
    if ":" not in name:
        raise UserError(
            f"unknown reward {name!r}: use one of {sorted(BUILTIN_REWARDS)} or "
            f"'module:function' / 'path/to/file.py:function'"
        )
    fn = _load_user_function(name, Path(base_dir) if base_dir is not None else None)
    names, takes_kwargs = _named_params(fn)
    accepted = None if takes_kwargs else names
    return RewardFunction(name.rpartition(":")[2], fn, float(weight), kwargs, accepted)


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


class RewardScores(NamedTuple):
    """Weighted totals, each function's values, and per-function counts of raising samples."""

    total: list[float | None]
    per_function: dict[str, list[float | None]]
    errors: dict[str, int]


def _checked(values: Any, n: int, name: str) -> list[float | None]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise UserError(f"reward {name!r} returned {type(values).__name__}, expected a list")
    if len(values) != n:
        raise UserError(f"reward {name!r} returned {len(values)} values for {n} completions")
    out: list[float | None] = []
    for value in values:
        if value is not None and not isinstance(value, Real):
            raise UserError(f"reward {name!r} returned {value!r}; expected a float or None")
        # A NaN or inf would poison the group's advantages: treat it as "cannot score".
        out.append(None if value is None or not isfinite(value) else float(value))
    return out


def _sample_columns(columns: Mapping[str, Any], i: int, n: int) -> dict[str, Any]:
    return {
        k: v[i : i + 1] if isinstance(v, Sequence) and not isinstance(v, str) and len(v) == n else v
        for k, v in columns.items()
    }


def _score_function(
    reward: RewardFunction,
    prompts: Sequence[Any],
    completions: Sequence[str],
    columns: Mapping[str, Any],
) -> tuple[list[float | None], int]:
    n = len(completions)
    try:
        return _checked(reward(prompts, completions, **columns), n, reward.name), 0
    except UserError:
        raise
    except Exception as exc:
        logger.debug("reward %r raised on the batch (%r); retrying per sample", reward.name, exc)
    values: list[float | None] = []
    failed: list[tuple[int, Exception]] = []
    for i in range(n):
        try:
            one = reward(
                prompts[i : i + 1], completions[i : i + 1], **_sample_columns(columns, i, n)
            )
            values.append(_checked(one, 1, reward.name)[0])
        except UserError:
            raise
        except Exception as exc:
            values.append(None)
            failed.append((i, exc))
    if failed:
        index, exc = failed[0]
        logger.warning(
            "reward %r raised on %d of %d samples, scored None; first: sample %d: %s: %s",
            reward.name, len(failed), n, index, type(exc).__name__, exc,
        )  # fmt: skip
    return values, len(failed)


def score_rewards(
    reward_fns: Sequence[RewardFunction],
    prompts: Sequence[Any],
    completions: Sequence[str],
    columns: Mapping[str, Any] | None = None,
) -> RewardScores:
    """Score a batch with every function and sum with the weights.

    A function that raises on the batch is retried sample by sample; a sample whose call raises
    scores None and counts in ``errors``. UserError (bad config) is never swallowed.
    """
    columns = columns or {}
    per_function: dict[str, list[float | None]] = {}
    errors: dict[str, int] = {}
    for reward in reward_fns:
        per_function[reward.name], errors[reward.name] = _score_function(
            reward, prompts, completions, columns
        )
    total: list[float | None] = []
    for i in range(len(completions)):
        terms = [(r.weight, per_function[r.name][i]) for r in reward_fns if r.weight != 0]
        if any(value is None for _, value in terms):
            total.append(None)
        else:
            total.append(sum(w * v for w, v in terms))  # type: ignore[operator]
    return RewardScores(total, per_function, errors)


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def reward_metrics(scores: RewardScores) -> dict[str, float]:
    """``reward/mean``, ``reward/std`` (population) of the totals, ``reward/<name>`` means and
    ``reward/none_frac``; None values are left out of every mean (a mean of nothing is omitted)."""
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
    return metrics


def raise_if_all_none(scores: RewardScores, step: int) -> None:
    """UserError when no sample of the step could be scored (the RL recipe stops on it)."""
    if not scores.total or any(v is not None for v in scores.total):
        return
    n = len(scores.total)
    detail = "; ".join(
        f"{name}: {sum(v is None for v in values)}/{n} None, {scores.errors[name]} raised"
        for name, values in scores.per_function.items()
    )
    raise UserError(f"all rewards were None for step {step}: {detail} (see logger moepost.rewards)")


__all__ = [
    "BUILTIN_REWARDS",
    "RewardFunction",
    "RewardScores",
    "exact_match",
    "extract_gsm8k_answer",
    "format_reward",
    "gsm8k",
    "length_penalty",
    "math_verify_reward",
    "metricx_reward",
    "overlong_penalty",
    "raise_if_all_none",
    "resolve_reward",
    "resolve_rewards",
    "reward_metrics",
    "score_rewards",
    "xcomet_reward",
]
