"""TRL's reward calling convention: which keyword arguments a reward function gets, and in what
form.

TRL's ``GRPOTrainer._calculate_rewards`` (trl 1.x) calls every reward function with keywords only::

    fn(prompts=..., completions=..., completion_ids=..., <every other dataset column>=...,
       trainer_state=..., log_extra=..., log_metric=...)

``prompts`` are the dataset's prompts as the model saw them; when they are conversational (a
list of ``{role, content}`` messages) each completion is a one-message list
``[{"role": "assistant", "content": text}]``, else a string. ``completion_ids`` are the generated
token ids. Every dataset column arrives as a list aligned with the completions (one copy per
sample of a group). The function returns one float or None per completion.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moepost.errors import UserError

# Keyword arguments the scorer itself provides; a data column or config key may not take them.
PROVIDED = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


def is_conversational(prompts: Sequence[Any]) -> bool:
    """TRL's test, on the first prompt: a list of messages (dicts with a ``role``)."""
    if not prompts or not isinstance(prompts[0], list) or not prompts[0]:
        return False
    first = prompts[0][0]
    return isinstance(first, Mapping) and "role" in first


def as_text(completion: Any) -> str:
    """A completion's text, whether a string or a list of messages (their contents joined)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(str(m.get("content") or "") for m in completion if isinstance(m, Mapping))
    return str(completion)


def texts(completions: Sequence[Any]) -> list[str]:
    """:func:`as_text` of each completion, so moepost's builtins accept both TRL forms."""
    return [as_text(c) for c in completions]


def completions_for(prompts: Sequence[Any], completions: Sequence[Any]) -> list[Any]:
    """Completions as TRL passes them: message lists when the prompts are conversational."""
    if not is_conversational(prompts):
        return list(completions)
    return [
        c if isinstance(c, list) else [{"role": "assistant", "content": c}] for c in completions
    ]


def reward_state(
    step: int, max_steps: int = 0, *, epoch: float = 0.0, batch_size: int | None = None
) -> Any:
    """A ``transformers.TrainerState`` like the one TRL passes as ``trainer_state``.

    ``global_step`` is the number of optimizer steps done before these rollouts (TRL's meaning).
    """
    from transformers import TrainerState

    return TrainerState(
        global_step=step, max_steps=max_steps, epoch=epoch, train_batch_size=batch_size
    )


@dataclass
class CallLog:
    """What one call passed to ``log_extra(column, values)`` and ``log_metric(name, value)``."""

    extra: dict[str, list[Any]] = field(default_factory=dict)
    metrics: dict[str, list[float]] = field(default_factory=dict)

    def log_extra(self, column: str, values: list[Any]) -> None:
        self.extra.setdefault(str(column), []).extend(values)

    def log_metric(self, name: str, value: float) -> None:
        self.metrics.setdefault(str(name), []).append(float(value))


def call_kwargs(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None,
    columns: Mapping[str, Any],
    trainer_state: Any,
    log: CallLog,
) -> dict[str, Any]:
    """Every keyword TRL would pass, for one call (a batch or a one-sample slice)."""
    return {
        **columns,
        "prompts": list(prompts),
        "completions": list(completions),
        "completion_ids": None if completion_ids is None else [list(c) for c in completion_ids],
        "trainer_state": trainer_state,
        "log_extra": log.log_extra,
        "log_metric": log.log_metric,
    }


def check_columns(columns: Mapping[str, Any]) -> None:
    """A data column named like a provided argument would be silently shadowed: refuse it."""
    clash = sorted(set(columns) & set(PROVIDED))
    if clash:
        raise UserError(
            f"data column(s) {clash} clash with the arguments every reward function gets "
            f"({', '.join(PROVIDED)}); rename them in the data"
        )


def check_signature(fn: Callable[..., Any], name: str, kwargs: Mapping[str, Any]) -> None:
    """UserError when ``fn`` cannot be called with these keywords (e.g. ``fn(p, c)``, which TRL
    cannot call either), instead of counting the TypeError as a per-sample failure."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        raise UserError(
            f"reward {name!r} cannot be called the way TRL calls reward functions ({exc}); "
            f"it gets keyword arguments only: {', '.join(PROVIDED)} and the data columns "
            f"{sorted(k for k in kwargs if k not in PROVIDED)}: name its parameters so (or take "
            "**kwargs), or, if it is a factory such as TRL's get_soft_overlong_punishment, give "
            "its arguments as `factory: {...}`"
        ) from None
