"""Reward functions get what TRL's GRPOTrainer gives them: keyword arguments, message-list
completions for conversational prompts, completion_ids, the columns, trainer_state, log_extra
and log_metric; factories, async functions and TRL's own docstring examples."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any

import pytest
from trl.rewards import (
    accuracy_reward,
    get_cosine_scaled_reward,
    get_repetition_penalty_reward,
    get_soft_overlong_punishment,
    think_format_reward,
)

from moepost.components.rewards import (
    RewardFunction,
    gsm8k,
    needs_trainer_state,
    resolve_reward,
    reward_metrics,
    reward_state,
    score_rewards,
    trainer_state_for,
)
from moepost.errors import UserError

CHAT = [[{"role": "user", "content": "1/3?"}], [{"role": "user", "content": "1/3?"}]]


def _spy() -> tuple[RewardFunction, list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def spy(**kwargs: Any) -> list[float]:
        seen.append(kwargs)
        return [0.0] * len(kwargs["completions"])

    return RewardFunction("spy", spy), seen


def test_keywords_and_forms_as_trl_passes_them() -> None:
    spy, seen = _spy()
    state = reward_state(3, 10)
    columns = {"solution": ["a", "b"], "answer": ["1", "2"]}
    score_rewards([spy], ["p1", "p2"], ["x", "y"], columns, completion_ids=[[1], [2, 3]],
                  trainer_state=state)  # fmt: skip
    got = seen[0]
    assert set(got) == {
        "prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric",
        "solution", "answer",
    }  # fmt: skip
    assert got["prompts"] == ["p1", "p2"] and got["completions"] == ["x", "y"]
    assert got["completion_ids"] == [[1], [2, 3]] and got["solution"] == ["a", "b"]
    assert got["trainer_state"].global_step == 3 and got["trainer_state"].max_steps == 10
    score_rewards([spy], CHAT, ["x", "y"])
    assert seen[1]["prompts"] == CHAT
    assert seen[1]["completions"] == [
        [{"role": "assistant", "content": "x"}],
        [{"role": "assistant", "content": "y"}],
    ]


def test_trl_docstring_examples_score_the_same() -> None:
    good = "<think>\nreasoning\n</think>\nMy answer is \\boxed{\\frac{1}{3}}"
    bad = "<think>\nreasoning\nMy answer is \\boxed{\\frac{1}{2}}"
    fns = [
        RewardFunction("think_format_reward", think_format_reward),
        RewardFunction("accuracy_reward", accuracy_reward),
        RewardFunction("cosine", get_cosine_scaled_reward(max_len=100)),
        RewardFunction("repetition", get_repetition_penalty_reward(ngram_size=2)),
        RewardFunction("overlong", get_soft_overlong_punishment(100, 20)),
    ]
    scores = score_rewards(
        fns, CHAT, [good, bad], {"solution": ["\\frac{1}{3}", "\\frac{1}{3}"]},
        completion_ids=[[1] * 50, [1, 2, 3, 4] * 23],
    )  # fmt: skip
    per = scores.per_function
    assert per["think_format_reward"] == [1.0, 0.0]
    assert per["accuracy_reward"] == [1.0, 0.0]
    # correct at half of max_len: 0.75 (TRL's example); wrong at 92 of 100 tokens: near -0.5.
    assert per["cosine"] == pytest.approx([0.75, -0.5 - 0.25 * (1 + math.cos(0.92 * math.pi))])
    # 2-grams: 1 distinct of 49, and 4 distinct of 91 (period 4).
    assert per["repetition"] == pytest.approx([-(1 - 1 / 49), -(1 - 4 / 91)])
    assert per["overlong"] == [0.0, -0.6]  # (80 - 92) / 20
    assert scores.extra["solution"] == ["\\frac{1}{3}", "\\frac{1}{3}"]  # accuracy's log_extra


def test_user_functions_in_trl_style(tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text(
        "def short(completions, **kwargs):\n"
        "    return [-len(c if isinstance(c, str) else c[0]['content']) for c in completions]\n"
        "def matches(prompts, completions, answer, **kwargs):\n"
        "    text = lambda c: c if isinstance(c, str) else c[0]['content']\n"
        "    return [float(text(c) == a) for c, a in zip(completions, answer)]\n"
    )
    fns = [resolve_reward({"name": f"{tmp_path}/mine.py:{n}"}) for n in ("short", "matches")]
    for prompts in (["q1", "q2"], CHAT):
        scores = score_rewards(fns, prompts, ["7", "eight"], {"answer": ["7", "8"]})
        assert scores.per_function == {"short": [-1.0, -5.0], "matches": [1.0, 0.0]}


def test_only_user_functions_make_the_scorer_build_a_trainer_state(tmp_path: Path) -> None:
    """Builtins never read trainer_state, so a run of builtins only skips building one (an
    import of transformers' trainer utilities and peft); any other function keeps TRL's."""
    (tmp_path / "mine.py").write_text(
        "def step_of(completions, trainer_state, **kwargs):\n"
        "    return [float(trainer_state.global_step)] * len(completions)\n"
    )
    builtins = [resolve_reward({"name": n}) for n in ("gsm8k", "format", "exact_match")]
    user = resolve_reward({"name": f"{tmp_path}/mine.py:step_of"})
    assert [r.reads_trainer_state for r in builtins] == [False, False, False]
    assert user.reads_trainer_state
    assert not needs_trainer_state(builtins)
    assert needs_trainer_state([*builtins, user])
    assert trainer_state_for(builtins, 4, 10) is None
    state = trainer_state_for([*builtins, user], 4, 10, batch_size=2)
    assert (state.global_step, state.max_steps, state.train_batch_size) == (4, 10, 2)
    # what the recipes then pass: None to builtins only; a real TrainerState otherwise
    scores = score_rewards(builtins[:1], ["q"], ["#### 7"], {"answer": ["7"]}, trainer_state=None)
    assert scores.per_function["gsm8k"] == [1.0]
    scores = score_rewards([user], ["q"], ["x"], trainer_state=reward_state(4))
    assert scores.per_function["step_of"] == [4.0]


def test_builtins_accept_message_completions() -> None:
    fn = RewardFunction("gsm8k", gsm8k, kwargs={"method": "flexible"})
    scores = score_rewards([fn], CHAT, ["so 12", "#### 13"], {"answer": ["#### 12", "#### 12"]})
    assert scores.per_function["gsm8k"] == [1.0, 0.0]


def test_factory_key_builds_the_function_and_names_it_like_trl() -> None:
    reward = resolve_reward(
        {"name": "trl.rewards:get_soft_overlong_punishment", "weight": 0.5,
         "factory": {"max_completion_len": 10, "soft_punish_cache": 5}}
    )  # fmt: skip
    assert reward.name == "soft_overlong_punishment_reward" and reward.weight == 0.5
    scores = score_rewards([reward], ["a", "b"], ["x", "y"], completion_ids=[[1] * 4, [1] * 8])
    assert scores.per_function[reward.name] == [0.0, -0.6]
    forgot = resolve_reward({"name": "trl.rewards:get_soft_overlong_punishment"})
    with pytest.raises(UserError, match="factory"):
        score_rewards([forgot], ["a"], ["x"], completion_ids=[[1]])
    with pytest.raises(UserError, match="factory.*failed"):
        resolve_reward({"name": "trl.rewards:get_repetition_penalty_reward",
                        "factory": {"max_penalty": 1.0}})  # fmt: skip


def test_positional_only_style_is_a_clear_error() -> None:
    bad = RewardFunction("two_args", lambda p, c: [0.0] * len(c))
    with pytest.raises(UserError, match="two_args.*keyword arguments only"):
        score_rewards([bad], ["a"], ["x"])
    with pytest.raises(UserError, match="clash"):
        score_rewards([_spy()[0]], ["a"], ["x"], {"completions": ["oops"]})
    with pytest.raises(UserError, match="argument moepost passes"):
        resolve_reward({"name": "trl.rewards:think_format_reward", "prompts": []})


def test_log_extra_and_log_metric_reach_the_scores() -> None:
    def logs(completions: list[str], log_extra: Any, log_metric: Any, **kwargs: Any) -> list[float]:
        log_extra("length", [len(c) for c in completions])
        log_metric("calls", 1.0)
        log_metric("calls", 3.0)
        return [1.0] * len(completions)

    scores = score_rewards([RewardFunction("logs", logs)], ["a", "b"], ["xy", "z"])
    assert scores.extra == {"length": [2, 1]}
    assert reward_metrics(scores)["reward/logs/calls"] == 2.0


def test_async_functions_run_concurrently() -> None:
    async def slow(completions: list[str], **kwargs: Any) -> list[float]:
        await asyncio.sleep(0.4)
        return [2.0] * len(completions)

    class AsyncJudge:  # an async __call__, as TRL also accepts
        async def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
            await asyncio.sleep(0.4)
            return [1.0] * len(completions)

    fns = [RewardFunction("slow", slow), RewardFunction("judge", AsyncJudge())]
    start = time.monotonic()
    scores = score_rewards(fns, ["a", "b"], ["x", "y"], timeout_s=5.0)
    elapsed = time.monotonic() - start
    assert scores.total == [3.0, 3.0]
    assert elapsed < 0.75, elapsed  # both waited at once: about 0.4 s, not 0.8 s
