"""Reward-function faults (issue 17): raise, hang (reward.timeout_s), wrong length, NaN / inf,
strings, None. Each has its documented outcome and count (docs/rl.md#fault-handling)."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from moepost.components.rewards import (
    RewardFunction,
    raise_if_all_none,
    reward_metrics,
    score_rewards,
)
from moepost.components.rewards.calls import MAX_ABANDONED
from moepost.errors import UserError

PROMPTS = ["p"] * 4
COMPLETIONS = ["a", "bad", "c", "bad"]


def ok(completions: list[str], **kwargs: Any) -> list[float]:
    return [1.0] * len(completions)


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at the end of a test so that hung worker threads return and do not pile up."""
    event = threading.Event()
    yield event
    event.set()


def test_raise_scores_none_per_sample_and_is_counted(caplog: pytest.LogCaptureFixture) -> None:
    def picky(completions: list[str], **kwargs: Any) -> list[float]:
        if "bad" in completions:
            raise RuntimeError("cannot score bad")
        return [0.5] * len(completions)

    fns = [RewardFunction("picky", picky), RewardFunction("ok", ok)]
    with caplog.at_level(logging.WARNING, logger="moepost.rewards"):
        scores = score_rewards(fns, PROMPTS, COMPLETIONS, timeout_s=5.0)
    assert scores.per_function["picky"] == [0.5, None, 0.5, None]
    assert scores.total == [1.5, None, 1.5, None]
    metrics = reward_metrics(scores)
    assert metrics["reward/picky_errors"] == 2.0 and metrics["reward/ok_errors"] == 0.0
    assert metrics["reward/picky_timeouts"] == 0.0
    assert any("raised on 2 of 4 samples" in r.getMessage() for r in caplog.records)


def test_hang_times_out_counted_and_run_goes_on(release: threading.Event) -> None:
    def hangs(completions: list[str], **kwargs: Any) -> list[float]:
        release.wait()
        return [1.0] * len(completions)

    hung = RewardFunction("hangs", hangs)
    start = time.monotonic()
    scores = score_rewards([hung, RewardFunction("ok", ok)], PROMPTS, COMPLETIONS, timeout_s=0.3)
    assert time.monotonic() - start < 2.0  # one limit for the batch, no per-sample retry
    assert scores.per_function["hangs"] == [None] * 4
    assert scores.per_function["ok"] == [1.0] * 4
    assert reward_metrics(scores)["reward/hangs_timeouts"] == 4.0
    assert len(hung.abandoned) == 1 and hung.abandoned[0].daemon
    with pytest.raises(UserError, match=r"step 5: hangs: 4/4 None \(4 timeouts\)"):
        raise_if_all_none(score_rewards([hung], PROMPTS, COMPLETIONS, timeout_s=0.1), step=5)


def test_threads_still_hung_stop_the_run(release: threading.Event) -> None:
    hung = RewardFunction("stuck", lambda completions, **k: release.wait() and [1.0])
    for _ in range(MAX_ABANDONED):
        score_rewards([hung], ["p"], ["a"], timeout_s=0.05)
    with pytest.raises(UserError, match=r"'stuck': 4 earlier calls ran past reward.timeout_s"):
        score_rewards([hung], ["p"], ["a"], timeout_s=0.05)
    release.set()
    for thread in hung.abandoned:
        thread.join(5)
    assert score_rewards([hung], ["p"], ["a"], timeout_s=1.0).per_function["stuck"] == [1.0]


def test_async_hang_is_cancelled_and_counted() -> None:
    cancelled = threading.Event()

    async def judge(completions: list[str], **kwargs: Any) -> list[float]:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return [1.0] * len(completions)

    scores = score_rewards([RewardFunction("judge", judge)], PROMPTS, COMPLETIONS, timeout_s=0.2)
    assert scores.per_function["judge"] == [None] * 4
    assert scores.faults["judge"]["timeouts"] == 4
    assert cancelled.wait(5)


def test_no_limit_runs_in_the_calling_thread() -> None:
    where: list[threading.Thread] = []

    def here(completions: list[str], **kwargs: Any) -> list[float]:
        where.append(threading.current_thread())
        return [1.0] * len(completions)

    score_rewards([RewardFunction("here", here)], ["p"], ["a"], timeout_s=None)
    score_rewards([RewardFunction("here", here)], ["p"], ["a"], timeout_s=1.0)
    assert where[0] is threading.current_thread()
    assert where[1] is not threading.current_thread()


@pytest.mark.parametrize("timeout_s", [None, 1.0])
def test_wrong_length_is_a_user_error_naming_the_function(timeout_s: float | None) -> None:
    short = RewardFunction("short", lambda completions, **k: [1.0])
    with pytest.raises(UserError, match=r"reward 'short' returned 1 values for 4 completions"):
        score_rewards([short], PROMPTS, COMPLETIONS, timeout_s=timeout_s)


def test_nan_and_inf_become_none_and_are_counted() -> None:
    fn = RewardFunction("wild", lambda completions, **k: [math.nan, 1.0, math.inf, -math.inf])
    scores = score_rewards([fn], PROMPTS, COMPLETIONS)
    assert scores.per_function["wild"] == [None, 1.0, None, None]
    assert scores.faults["wild"] == {"errors": 0, "timeouts": 0, "nonfinite": 3, "none": 0}
    assert reward_metrics(scores)["reward/wild_nonfinite"] == 3.0


def test_none_skips_the_sample_and_is_counted() -> None:
    fn = RewardFunction("maybe", lambda completions, **k: [None, 0.5, None, 1.0])
    scores = score_rewards([fn], PROMPTS, COMPLETIONS)
    assert scores.total == [None, 0.5, None, 1.0]
    metrics = reward_metrics(scores)
    assert metrics["reward/maybe_none"] == 2.0 and metrics["reward/maybe"] == 0.75
    assert metrics["reward/none_frac"] == 0.5


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (["1.0", 1.0, 1.0, 1.0], r"reward 'bad' returned '1.0' \(str\) for sample 0; expected"),
        ([1.0, {"r": 1}, 1.0, 1.0], r"reward 'bad' returned \{'r': 1\} \(dict\) for sample 1"),
        ("1111", r"reward 'bad' returned str, expected a list of float or None"),
        (None, r"reward 'bad' returned NoneType, expected a list"),
        (1.0, r"reward 'bad' returned float, expected a list"),
    ],
)
def test_non_numeric_returns_are_one_line_errors(returned: Any, message: str) -> None:
    bad = RewardFunction("bad", lambda completions, **k: returned)
    with pytest.raises(UserError, match=message) as info:
        score_rewards([bad], PROMPTS, COMPLETIONS)
    assert "\n" not in str(info.value)


def test_tensor_and_numpy_returns_are_numbers() -> None:
    import numpy as np

    fns = [
        RewardFunction("tensor", lambda completions, **k: torch.tensor([0.5, 1.0, 0.0, 2.0])),
        RewardFunction("array", lambda completions, **k: np.array([1.0, 1.0, np.nan, 1.0])),
        RewardFunction("scalars", lambda completions, **k: [torch.tensor(1.0), np.float32(2)] * 2),
    ]
    scores = score_rewards(fns, PROMPTS, COMPLETIONS)
    assert scores.per_function["tensor"] == [0.5, 1.0, 0.0, 2.0]
    assert scores.per_function["array"] == [1.0, 1.0, None, 1.0]
    assert scores.per_function["scalars"] == [1.0, 2.0, 1.0, 2.0]


def test_user_error_inside_a_worker_is_not_swallowed() -> None:
    def needs(completions: list[str], **kwargs: Any) -> list[float]:
        raise UserError("needs a 'source' column")

    with pytest.raises(UserError, match="needs a 'source' column"):
        score_rewards([RewardFunction("needs", needs)], PROMPTS, COMPLETIONS, timeout_s=1.0)


def test_fault_counts_add_up_over_ranks() -> None:
    def two_equal_ranks(values: list[float]) -> list[float]:
        return [2 * v for v in values]

    fn = RewardFunction("maybe", lambda completions, **k: [None, 0.5, None, 1.0])
    scores = score_rewards([fn], PROMPTS, COMPLETIONS)
    metrics = reward_metrics(scores, sum_counts=two_equal_ranks)
    assert metrics["reward/maybe_none"] == 4.0 and metrics["reward/maybe_errors"] == 0.0
    assert metrics["reward/maybe"] == 0.75  # a mean stays a mean


def test_log_extra_stays_aligned_when_samples_raise() -> None:
    def picky(completions: list[str], log_extra: Any, **kwargs: Any) -> list[float]:
        log_extra("seen", list(completions))
        if "bad" in completions:
            raise ValueError("bad")
        return [1.0] * len(completions)

    scores = score_rewards([RewardFunction("picky", picky)], PROMPTS, COMPLETIONS)
    # The failed batch call's log is dropped; failed samples get None in the column.
    assert scores.extra == {"seen": ["a", None, "c", None]}
    assert scores.faults["picky"]["errors"] == 2


@pytest.mark.parametrize("value", [0, -1.0])
def test_timeout_must_be_positive_or_null(value: float) -> None:
    from moepost.config.schema import Config
    from moepost.config.validate import check_all

    cfg = Config()
    cfg.stage = "rl"
    cfg.reward.functions = [{"name": "gsm8k"}]
    cfg.reward.timeout_s = value
    with pytest.raises(UserError, match=r"^reward.timeout_s = .*: must be > 0$"):
        check_all(cfg)


def test_an_async_function_raising_timeouterror_is_an_error_not_a_timeout() -> None:
    async def client(completions: list[str], **kwargs: Any) -> list[float]:
        if len(completions) > 1:
            raise TimeoutError("the judge's HTTP call timed out")
        return [1.0]

    scores = score_rewards([RewardFunction("client", client)], PROMPTS, COMPLETIONS, timeout_s=5)
    assert scores.per_function["client"] == [1.0] * 4  # retried per sample after the error
    assert scores.faults["client"]["timeouts"] == 0
