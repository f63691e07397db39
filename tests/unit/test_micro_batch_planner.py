"""`moepost.micro_batches.plan_micro_batches`, the one planner behind the recipes, `moepost plan`
and config validation: hand-worked plans by rows, by token budget, packed, longest first."""

from __future__ import annotations

import pytest

from moepost.micro_batches import fullest_micro_batch_rows, plan_micro_batches, splits_evenly

LENGTHS = [3, 4, 5, 6, 2]


@pytest.mark.parametrize(
    ("lengths", "kwargs", "want"),
    [
        # by rows: `size` consecutive rows, the last one short
        (LENGTHS, {"size": 2}, [[0, 1], [2, 3], [4]]),
        (LENGTHS, {"size": 5}, [[0, 1, 2, 3, 4]]),
        (LENGTHS, {"size": 9}, [[0, 1, 2, 3, 4]]),
        # rows x longest <= 12: 3, 2x4=8 | 5, 2x6=12 | 2 (3x5=15 and 3x6=18 are over)
        (LENGTHS, {"size": 1, "token_budget": 12}, [[0, 1], [2, 3], [4]]),
        # longest first (6, 5, 4, 3, 2): 6, 2x6=12 | 4, 2x4=8, 3x4=12 (3x6=18 is over)
        (LENGTHS, {"size": 1, "token_budget": 12, "longest_first": True}, [[3, 2], [1, 0, 4]]),
        # packed, the sum: 3+4+5=12 | 6+2=8 (12+6=18 is over)
        (LENGTHS, {"size": 1, "token_budget": 12, "packed": True}, [[0, 1, 2], [3, 4]]),
        # equal lengths keep their row order when sorted longest first
        ([4, 4, 2], {"size": 1, "token_budget": 8, "longest_first": True}, [[0, 1], [2]]),
        # a row over the budget gets a micro-batch of its own, its neighbours do not join it
        ([2, 50, 3], {"size": 1, "token_budget": 10}, [[0], [1], [2]]),
        ([2, 50, 3], {"size": 1, "token_budget": 10, "packed": True}, [[0], [1], [2]]),
        ([2, 50, 3], {"size": 1, "token_budget": 10, "longest_first": True}, [[1], [2, 0]]),
        # the budget is what counts: `size` is ignored under a token budget
        ([1, 1, 1, 1], {"size": 1, "token_budget": 3}, [[0, 1, 2], [3]]),
        # nothing to plan
        ([], {"size": 2}, []),
        ([], {"size": 2, "token_budget": 10}, []),
    ],
)
def test_hand_worked_plans(lengths: list[int], kwargs: dict, want: list[list[int]]) -> None:
    assert plan_micro_batches(lengths, **kwargs) == want


def test_every_row_planned_once() -> None:
    lengths = [7, 1, 9, 3, 3, 12, 5, 2]
    for budget in (0, 1, 8, 13, 40, 1000):
        for longest_first in (False, True):
            plan = plan_micro_batches(
                lengths, size=3, token_budget=budget, longest_first=longest_first
            )
            assert sorted(i for g in plan for i in g) == list(range(len(lengths)))


def test_bad_size() -> None:
    with pytest.raises(ValueError, match="size must be >= 1"):
        plan_micro_batches([1, 2], size=0)


@pytest.mark.parametrize(
    ("seq", "size", "budget", "rows"),
    [(512, 4, 0, 4), (512, 4, 4096, 8), (512, 4, 4607, 8), (512, 4, 511, 1), (5000, 2, 4096, 1)],
)
def test_fullest_micro_batch_rows(seq: int, size: int, budget: int, rows: int) -> None:
    assert fullest_micro_batch_rows(seq, size=size, token_budget=budget) == rows
    # what `moepost plan` computed before the planner existed
    assert rows == (max(1, budget // seq) if budget else size)


@pytest.mark.parametrize(
    ("rows", "size", "even"),
    [(8, 4, True), (8, 8, True), (6, 4, False), (2, 4, False), (0, 3, True)],
)
def test_splits_evenly(rows: int, size: int, even: bool) -> None:
    assert splits_evenly(rows, size) is even
    assert even == (rows % size == 0)  # the divisibility check validation made before
