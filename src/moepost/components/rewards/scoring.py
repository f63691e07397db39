"""Scoring a batch with every reward function, the TRL way, and what happens when one misbehaves.

Outcomes per function and batch (each counted in ``RewardScores.faults``, logged as
``reward/<name>_<kind>``):

- returns None for a sample: that sample is skipped (TRL's meaning), counted as ``none``;
- returns NaN or +-inf: treated as None, counted as ``nonfinite``;
- raises: the batch is retried sample by sample; samples whose call raises score None,
  counted as ``errors`` (one warning per batch names the first exception);
- runs past ``reward.timeout_s``: the whole batch scores None, counted as ``timeouts``, and is
  not retried per sample (that could take the limit once per sample);
- returns the wrong number of values, a string / non-numeric value, or no list at all, or
  cannot be called with TRL's keywords: a UserError naming the function (a bug in the function,
  not in one sample; the run stops with exit code 2, like TRL's ValueError);
- raises UserError (a builtin's "needs an 'answer' column"): passed through, the run stops.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from math import isfinite
from numbers import Real
from typing import Any, NamedTuple

from moepost.components.rewards.calls import PendingCall, is_async_callable, start_call
from moepost.components.rewards.convention import (
    CallLog,
    call_kwargs,
    check_columns,
    check_signature,
    completions_for,
    reward_state,
)
from moepost.errors import UserError

logger = logging.getLogger("moepost.rewards")

FAULT_KINDS = ("errors", "timeouts", "nonfinite", "none")


@dataclass
class RewardFunction:
    """A resolved reward: ``fn`` with its config keyword arguments, a log name and a weight."""

    name: str
    fn: Callable[..., Sequence[float | None]]
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    # None: fn takes **kwargs, so it gets every argument; else only the ones it names.
    accepted: frozenset[str] | None = None
    # Worker threads of calls that ran past reward.timeout_s and have not returned yet.
    abandoned: list[threading.Thread] = field(default_factory=list)
    # moepost's builtins never read `trainer_state`: they get None instead (see
    # `trainer_state_for`). Every other function gets a TrainerState, as under TRL.
    reads_trainer_state: bool = True

    def arguments(self, provided: Mapping[str, Any]) -> dict[str, Any]:
        """The keywords ``fn`` gets: what it accepts of ``provided``, then the config keys."""
        if self.accepted is not None:
            provided = {k: v for k, v in provided.items() if k in self.accepted}
        return {**provided, **self.kwargs}

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any
    ) -> Sequence[float | None]:
        """A direct call, for scripts and tests: ``fn`` gets keywords, as TRL calls it."""
        return self.fn(
            **self.arguments({**columns, "prompts": prompts, "completions": completions})
        )


class RewardScores(NamedTuple):
    """Weighted totals and each function's values, plus per-function fault counts
    (``faults[name][kind]``, kinds in FAULT_KINDS; ``errors`` repeats the raising counts), the
    columns functions gave ``log_extra`` (``extra[column]``, aligned with the completions) and
    the means of what they gave ``log_metric`` (``metrics["<function>/<name>"]``)."""

    total: list[float | None]
    per_function: dict[str, list[float | None]]
    errors: dict[str, int]
    faults: dict[str, dict[str, int]] = {}
    extra: dict[str, list[Any]] = {}
    metrics: dict[str, float] = {}


@dataclass
class _Batch:
    prompts: Sequence[Any]
    completions: list[Any]
    completion_ids: Sequence[Sequence[int]] | None
    columns: Mapping[str, Any]
    trainer_state: Any

    def __len__(self) -> int:
        return len(self.completions)

    def one(self, i: int) -> _Batch:
        n = len(self)
        columns = {
            k: v[i : i + 1] if isinstance(v, Sequence) and not isinstance(v, str) and len(v) == n
            else v
            for k, v in self.columns.items()
        }  # fmt: skip
        ids = None if self.completion_ids is None else self.completion_ids[i : i + 1]
        return _Batch(
            self.prompts[i : i + 1], self.completions[i : i + 1], ids, columns, self.trainer_state
        )


@dataclass
class _Result:
    values: list[float | None]
    faults: dict[str, int]
    extra: dict[str, list[Any]] = field(default_factory=dict)
    metrics: dict[str, list[float]] = field(default_factory=dict)


def _number(value: Any, name: str, index: int) -> float | None:
    if hasattr(value, "item") and not isinstance(value, Real):  # 0-d tensor / numpy scalar
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            pass
    if value is None:
        return None
    if isinstance(value, Real):
        return float(value)
    raise UserError(
        f"reward {name!r} returned {value!r:.60} ({type(value).__name__}) for sample {index}; "
        "expected a float or None"
    )


def _checked(values: Any, n: int, name: str) -> list[float | None]:
    """The returned values as floats / None (NaN and inf stay NaN here; see _count)."""
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):  # tensor / ndarray
        values = values.tolist()
    if callable(values):
        raise UserError(
            f"reward {name!r} returned a function, not scores: if it is a factory (such as TRL's "
            "get_soft_overlong_punishment), give its arguments as `factory: {...}`"
        )
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
        raise UserError(
            f"reward {name!r} returned {type(values).__name__}, expected a list of float or None"
        )
    if len(values) != n:
        raise UserError(
            f"reward {name!r} returned {len(values)} values for {n} completions "
            "(one per completion expected)"
        )
    return [_number(v, name, i) for i, v in enumerate(values)]


def _finish_values(values: list[float | None], faults: dict[str, int]) -> list[float | None]:
    """None stays None (counted), NaN / inf become None (counted): they would poison the
    group's advantages."""
    out: list[float | None] = []
    for v in values:
        if v is None:
            faults["none"] += 1
        elif not isfinite(v):
            faults["nonfinite"] += 1
            v = None
        out.append(v)
    return out


def _start(
    reward: RewardFunction, batch: _Batch, timeout_s: float | None
) -> tuple[PendingCall, CallLog]:
    """Check that ``reward`` can take TRL's keywords for ``batch``, then start the call."""
    log = CallLog()
    provided = call_kwargs(
        batch.prompts, batch.completions, batch.completion_ids, batch.columns,
        batch.trainer_state, log,
    )  # fmt: skip
    kwargs = reward.arguments(provided)
    check_signature(reward.fn, reward.name, kwargs)
    return start_call(reward.fn, kwargs, timeout_s, reward.abandoned, reward.name), log


def _aligned(log: CallLog, n: int, name: str) -> dict[str, list[Any]]:
    for column, values in log.extra.items():
        if len(values) != n:
            raise UserError(
                f"reward {name!r}: log_extra({column!r}, ...) got {len(values)} values for "
                f"{n} completions"
            )
    return log.extra


def _finish(
    reward: RewardFunction,
    pending: PendingCall,
    log: CallLog,
    batch: _Batch,
    timeout_s: float | None,
) -> _Result:
    n = len(batch)
    faults = dict.fromkeys(FAULT_KINDS, 0)
    outcome = pending.outcome(reward.abandoned)
    if outcome.timed_out:
        faults["timeouts"] = n
        logger.warning(
            "reward %r ran past reward.timeout_s=%s s on a batch of %d; all scored None",
            reward.name, timeout_s, n,
        )  # fmt: skip
        return _Result([None] * n, faults)
    if outcome.error is None:
        values = _finish_values(_checked(outcome.value, n, reward.name), faults)
        return _Result(values, faults, _aligned(log, n, reward.name), log.metrics)
    if isinstance(outcome.error, UserError):
        raise outcome.error
    logger.debug(
        "reward %r raised on the batch (%r); retrying per sample", reward.name, outcome.error
    )
    return _per_sample(reward, batch, timeout_s, faults)


def _per_sample(
    reward: RewardFunction, batch: _Batch, timeout_s: float | None, faults: dict[str, int]
) -> _Result:
    n = len(batch)
    values: list[float | None] = []
    extra: dict[str, list[Any]] = {}
    metrics: dict[str, list[float]] = {}
    failed: list[tuple[int, BaseException]] = []
    for i in range(n):
        pending, log = _start(reward, batch.one(i), timeout_s)
        outcome = pending.outcome(reward.abandoned)
        if outcome.timed_out:  # the rest would likely hang too: stop retrying
            faults["timeouts"] += n - i
            values.extend([None] * (n - i))
            logger.warning(
                "reward %r ran past reward.timeout_s=%s s on sample %d; it and the %d after it "
                "scored None", reward.name, timeout_s, i, n - i - 1,
            )  # fmt: skip
            break
        if isinstance(outcome.error, UserError):
            raise outcome.error
        if outcome.error is not None:
            faults["errors"] += 1
            failed.append((i, outcome.error))
            values.append(None)
            one_extra: dict[str, list[Any]] = {}
        else:
            values.extend(_finish_values(_checked(outcome.value, 1, reward.name), faults))
            one_extra = _aligned(log, 1, reward.name)
            for key, logged in log.metrics.items():
                metrics.setdefault(key, []).extend(logged)
        for column in set(extra) | set(one_extra):
            extra.setdefault(column, [None] * i).extend(one_extra.get(column, [None]))
    for column in extra:
        extra[column].extend([None] * (n - len(extra[column])))
    if failed:
        index, exc = failed[0]
        logger.warning(
            "reward %r raised on %d of %d samples, scored None; first: sample %d: %s: %s",
            reward.name, len(failed), n, index, type(exc).__name__, exc,
        )  # fmt: skip
    return _Result(values, faults, extra, metrics)


def needs_trainer_state(reward_fns: Sequence[RewardFunction]) -> bool:
    """Whether any function may read ``trainer_state``."""
    return any(r.reads_trainer_state for r in reward_fns)


def trainer_state_for(
    reward_fns: Sequence[RewardFunction], step: int, max_steps: int = 0, **fields: Any
) -> Any:
    """The ``trainer_state`` to score with: :func:`reward_state` when any function may read it,
    else None. Building a ``transformers.TrainerState`` imports transformers' trainer utilities
    and, through them, peft (0.18 s of a bench RL run, about 2 s in a fresh process here)."""
    return reward_state(step, max_steps, **fields) if needs_trainer_state(reward_fns) else None


def score_rewards(
    reward_fns: Sequence[RewardFunction],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: Mapping[str, Any] | None = None,
    *,
    completion_ids: Sequence[Sequence[int]] | None = None,
    trainer_state: Any = None,
    timeout_s: float | None = None,
) -> RewardScores:
    """Score a batch with every function (called as TRL calls them) and sum with the weights.

    prompts: strings, or message lists (conversational: completions then go to the functions as
        ``[{"role": "assistant", "content": text}]``). columns: dataset columns, each a list
        aligned with the completions. Async functions start first and run concurrently on the
        shared event loop while the sync ones run one after another, as in TRL.
    """
    columns = dict(columns or {})
    check_columns(columns)
    batch = _Batch(
        prompts, completions_for(prompts, completions), completion_ids, columns, trainer_state
    )
    started = {r.name: _start(r, batch, timeout_s) for r in reward_fns if is_async_callable(r.fn)}
    results: dict[str, _Result] = {}
    for reward in reward_fns:
        if reward.name not in started:  # sync: one after another, while the async ones run
            pending, log = _start(reward, batch, timeout_s)
            results[reward.name] = _finish(reward, pending, log, batch, timeout_s)
    for reward in reward_fns:
        if reward.name in started:
            results[reward.name] = _finish(reward, *started[reward.name], batch, timeout_s)
    return _combine(reward_fns, results, len(batch))


def _combine(
    reward_fns: Sequence[RewardFunction], results: Mapping[str, _Result], n: int
) -> RewardScores:
    total: list[float | None] = []
    for i in range(n):
        terms = [(r.weight, results[r.name].values[i]) for r in reward_fns if r.weight != 0]
        if any(value is None for _, value in terms):
            total.append(None)
        else:
            total.append(sum((w * v for w, v in terms if v is not None), 0.0))
    extra: dict[str, list[Any]] = {}
    metrics: dict[str, float] = {}
    for name, result in results.items():
        extra.update(result.extra)
        for key, values in result.metrics.items():
            metrics[f"{name}/{key}"] = sum(values) / len(values)
    return RewardScores(
        total,
        {name: r.values for name, r in results.items()},
        {name: r.faults["errors"] for name, r in results.items()},
        {name: r.faults for name, r in results.items()},
        extra,
        metrics,
    )
