"""Rewards for math answers: math-verify (LaTeX / boxed), exact match, format (GSM8K: gsm8k.py).

All functions follow TRL's reward calling convention:
``fn(prompts=..., completions=..., **dataset_columns) -> list[float | None]``, where each dataset
column is a list aligned with ``completions`` (e.g. ``answer=[...]``). Completions may be strings
or TRL's conversational form (a list of messages; their contents are scored). Extra keywords are
accepted and ignored, so one call can pass every column of the batch.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from typing import Any

from moepost.components.rewards.convention import texts
from moepost.errors import UserError

logger = logging.getLogger("moepost.rewards")


def _column(name: str, values: Sequence[Any] | None, n: int, reward: str) -> Sequence[Any]:
    if values is None:
        raise UserError(f"{reward} reward needs a '{name}' column in the data")
    if len(values) != n:
        raise UserError(
            f"{reward} reward: column '{name}' has {len(values)} values for {n} completions"
        )
    return values


def exact_match(
    prompts: Sequence[Any],
    completions: Sequence[str],
    answer: Sequence[str] | None = None,
    strip: bool = True,
    **columns: Any,
) -> list[float]:
    """1.0 when the completion equals the reference answer (both stripped if ``strip``)."""
    answers = _column("answer", answer, len(completions), "exact_match")
    completions = texts(completions)
    rewards = []
    for completion, reference in zip(completions, answers):
        a, b = str(completion), str(reference)
        if strip:
            a, b = a.strip(), b.strip()
        rewards.append(1.0 if a == b else 0.0)
    return rewards


def format_reward(
    prompts: Sequence[Any],
    completions: Sequence[str],
    pattern: str | None = None,
    **columns: Any,
) -> list[float]:
    """1.0 when ``re.search(pattern, completion, re.DOTALL)`` matches, else 0.0.

    search (not fullmatch) so that a pattern checks for a structure anywhere; anchor it with
    ``^...$`` to require the whole completion. DOTALL lets ``.`` cross newlines, which reasoning
    blocks such as ``<think>.*</think>`` need.
    """
    if pattern is None:
        raise UserError("format reward needs a 'pattern' key (a Python regular expression)")
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise UserError(f"format reward: invalid regular expression {pattern!r}: {exc}") from exc
    return [1.0 if compiled.search(c) else 0.0 for c in texts(completions)]


class _DropTimeoutWarning(logging.Filter):
    """math-verify warns that its own timeout is off; we run our own timeout, so it is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


def _import_math_verify() -> tuple[Any, Any]:
    try:
        from math_verify import parse, verify
    except ImportError as exc:
        raise UserError(
            "math_verify reward needs the math-verify package: pip install 'moepost[math]'"
        ) from exc
    for name in ("math_verify.parser", "math_verify.grader"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropTimeoutWarning) for f in log.filters):
            log.addFilter(_DropTimeoutWarning())
    return parse, verify


def _verify_one(completion: str, reference: str) -> float:
    parse, verify = _import_math_verify()
    # parsing_timeout / timeout_seconds = None turn off math-verify's signal.alarm timeout, which
    # raises off the main thread (rollout workers, async scoring). _run_with_timeout replaces it.
    gold = parse(str(reference), parsing_timeout=None)
    if not gold:
        raise ValueError(f"math_verify reward: cannot parse reference answer {reference!r}")
    predicted = parse(completion, parsing_timeout=None)
    if not predicted:
        return 0.0
    return 1.0 if verify(gold, predicted, timeout_seconds=None) else 0.0


def _run_with_timeout(completion: str, reference: str, timeout_s: float) -> float | None:
    """Run ``_verify_one`` in a daemon thread; None if it takes longer than ``timeout_s``.

    Works from any thread. A Python thread cannot be killed, so a timed-out sympy computation
    keeps running in the background until it ends; daemon=True keeps it from blocking exit.
    """
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = _verify_one(completion, reference)
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    worker = threading.Thread(target=target, name="moepost-math-verify", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return None
    if "error" in result:
        raise result["error"]
    return result["value"]


def math_verify_reward(
    prompts: Sequence[Any],
    completions: Sequence[str],
    answer: Sequence[str] | None = None,
    timeout_s: float = 5.0,
    **columns: Any,
) -> list[float | None]:
    """1.0 when math-verify finds the completion's answer equal to the reference (LaTeX, boxed,
    fractions: "\\boxed{1/2}" equals "0.5"), 0.0 otherwise, None when a sample times out."""
    answers = _column("answer", answer, len(completions), "math_verify")
    completions = texts(completions)
    _import_math_verify()  # fail early with the install hint, not once per sample
    rewards = [_run_with_timeout(c, a, timeout_s) for c, a in zip(completions, answers)]
    timed_out = sum(r is None for r in rewards)
    if timed_out:
        logger.warning(
            "math_verify reward: %d of %d samples took over %.1f s and scored None",
            timed_out, len(rewards), timeout_s,
        )  # fmt: skip
    return rewards
