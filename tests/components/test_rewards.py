"""Reward functions: GSM8K extraction, math-verify, format / exact match, DAPO overlong shaping,
resolving names (builtin, module:function, file.py:function) and the weighted sum."""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path

import pytest

import moepost.components.rewards.math as math_rewards
from moepost.components.rewards import (
    BUILTIN_REWARDS,
    RewardFunction,
    raise_if_all_none,
    resolve_reward,
    resolve_rewards,
    reward_metrics,
    score_rewards,
)
from moepost.errors import UserError
from moepost.rewards import (
    exact_match,
    extract_gsm8k_answer,
    format_reward,
    gsm8k,
    length_penalty,
    math_verify_reward,
    overlong_penalty,
)


@pytest.mark.parametrize(
    ("text", "method", "expected"),
    [
        ("so #### 72", "strict", "72"),
        ("#### 72.0", "strict", "72.0"),
        ("#### 1,234.", "strict", "1234."),  # verl: commas removed, the rest as written
        ("#### $1,234", "strict", None),  # verl's strict pattern has no "$"
        ("#### -3", "strict", "-3"),
        ("#### 1 ... then #### 2", "strict", "2"),  # the last "####" wins
        ("I think 5 apples, 6 pears", "strict", None),  # strict ignores numbers not after ####
        ("no number here", "flexible", None),
        ("The answer is $1,234.", "flexible", "1,234."),
        ("3 cats and 4.5 dogs, total -7.25.", "flexible", "-7.25."),
        ("#### 9 and later 11", "flexible", "11"),
    ],
)
def test_extract_gsm8k_answer(text: str, method: str, expected: str | None) -> None:
    assert extract_gsm8k_answer(text, method) == expected  # type: ignore[arg-type]


def test_gsm8k_strict_compares_numbers() -> None:
    completions = [
        "#### 72",  # 1: plain
        "#### 72.0",  # 1: 72.0 == 72
        "Answer: #### 72.",  # 1: trailing period stripped
        "#### 1,234",  # 1: reference given as a full solution
        "#### -3",  # 1
        "The answer is 72",  # 0: no "####"
        "#### 71",  # 0: wrong
        "#### 72 ... #### 8",  # 0: the last "####" (8) wins
    ]
    answers = ["72", "#### 72", "72", "She pays 1,000 + 234 = 1234.\n#### 1,234", "-3", "72", "72"]
    answers.append("72")
    assert gsm8k([""] * 8, completions, answer=answers) == [1, 1, 1, 1, 1, 0, 0, 0]


def test_gsm8k_flexible_and_scores() -> None:
    completions = ["The answer is $1,234.", "so 0.5", "nothing", "I get 3"]
    answers = ["1234", ".5", "1", "4"]
    # correct=2.0 for the right number, format_score=0.1 for a wrong one, 0 with no number.
    rewards = gsm8k(
        [""] * 4, completions, answer=answers, method="flexible", correct=2.0, format_score=0.1
    )
    assert rewards == [2.0, 2.0, 0.0, 0.1]


def test_gsm8k_errors() -> None:
    with pytest.raises(UserError, match="'answer' column"):
        gsm8k(["p"], ["#### 1"])
    with pytest.raises(UserError, match="method must be one of"):
        gsm8k(["p"], ["#### 1"], answer=["1"], method="loose")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="has no number"):
        gsm8k(["p"], ["#### 1"], answer=["unknown"])


def test_exact_match_and_format() -> None:
    assert exact_match(["", ""], [" Paris\n", "paris"], answer=["Paris", "Paris"]) == [1.0, 0.0]
    assert exact_match([""], [" Paris"], answer=["Paris"], strip=False) == [0.0]
    pattern = r"^<think>.*</think>\s*\S"
    completions = ["<think>a\nb</think> 42", "42", "<think>x</think>"]
    # DOTALL: '.' spans the newline in the first; the last has nothing after </think>.
    assert format_reward([""] * 3, completions, pattern=pattern) == [1.0, 0.0, 0.0]
    with pytest.raises(UserError, match="invalid regular expression"):
        format_reward([""], ["x"], pattern="(")
    with pytest.raises(UserError, match="'pattern'"):
        format_reward([""], ["x"])


def test_math_verify_from_a_worker_thread() -> None:
    # math-verify's own timeout uses signal.alarm, which raises off the main thread.
    result: dict[str, object] = {}

    def work() -> None:
        result["value"] = math_verify_reward(
            ["", ""], ["so \\boxed{1/2}", "so \\boxed{3}"], answer=["0.5", "0.5"]
        )

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(30)
    assert result["value"] == [1.0, 0.0]


def test_math_verify_timeout_gives_none(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(completion: str, reference: str) -> float:
        time.sleep(1.0)
        return 1.0

    monkeypatch.setattr(math_rewards, "_verify_one", slow)
    result: dict[str, object] = {}

    def work() -> None:
        result["value"] = math_verify_reward([""], ["\\boxed{1}"], answer=["1"], timeout_s=0.05)

    start = time.perf_counter()
    worker = threading.Thread(target=work)
    worker.start()
    worker.join(5)
    assert result["value"] == [None]
    assert time.perf_counter() - start < 0.9  # returned at the timeout, not after the sleep


def test_overlong_penalty_numbers() -> None:
    # max_len=10, cache_len=4: 0 up to 6 tokens, then (6 - L) / 4, and -1 beyond 10.
    lengths = [0, 6, 7, 8, 10, 11, 100]
    assert overlong_penalty(lengths, max_len=10, cache_len=4) == [0, 0, -0.25, -0.5, -1, -1, -1]
    # cache_len=0 is a hard cut at max_len.
    assert overlong_penalty([10, 11], max_len=10, cache_len=0) == [0.0, -1.0]
    with pytest.raises(UserError, match="cache_len <= max_len"):
        overlong_penalty([1], max_len=4, cache_len=5)


def test_length_penalty_reward_form() -> None:
    out = length_penalty(["", ""], ["a", "b"], completion_lengths=[5, 9], max_len=10, cache_len=4)
    assert out == [0.0, -0.75]  # (6 - 9) / 4
    with pytest.raises(UserError, match="completion_lengths"):
        length_penalty([""], ["abc"], max_len=10, cache_len=4)
    # Characters instead of tokens when asked: len("abcdefgh") = 8 -> (6 - 8) / 4.
    chars = length_penalty([""], ["abcdefgh"], max_len=10, cache_len=4, fallback_to_chars=True)
    assert chars == [-0.5]


def test_resolve_builtin_and_unknown_keys() -> None:
    reward = resolve_reward({"name": "gsm8k", "method": "flexible", "weight": 0.5})
    assert (reward.name, reward.weight, reward.kwargs) == ("gsm8k", 0.5, {"method": "flexible"})
    assert reward(["p"], ["it is 4"], answer=["4"]) == [1.0]
    with pytest.raises(UserError, match="unknown key 'methd'"):
        resolve_reward({"name": "gsm8k", "methd": "strict"})
    with pytest.raises(UserError, match="weight must be a number"):
        resolve_reward({"name": "gsm8k", "weight": "high"})


def test_unknown_name_lists_builtins() -> None:
    with pytest.raises(UserError) as info:
        resolve_reward({"name": "gsm9k"})
    message = str(info.value)
    assert "'gsm9k'" in message
    assert all(name in message for name in BUILTIN_REWARDS)


def _write_user_module(folder: Path, module: str) -> None:
    (folder / f"{module}.py").write_text(
        "def shout(prompts, completions, answer):\n"
        "    return [float(c.isupper()) for c in completions]\n"
        "def scaled(prompts, completions, scale=1.0, **columns):\n"
        "    return [scale * len(c) for c in completions]\n"
    )


def test_user_function_from_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_user_module(tmp_path, "moepost_test_user_rew")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = resolve_reward({"name": "moepost_test_user_rew:shout"})
    assert reward.name == "shout"
    # shout() takes no **kwargs: the extra 'source' column is not passed to it.
    assert reward(["", ""], ["HI", "hi"], answer=["", ""], source=["", ""]) == [1.0, 0.0]
    with pytest.raises(UserError, match="no function 'missing'"):
        resolve_reward({"name": "moepost_test_user_rew:missing"})
    with pytest.raises(UserError, match="cannot import module 'no_such_pkg_xyz.rew'"):
        resolve_reward({"name": "no_such_pkg_xyz.rew:fn"})


def test_user_function_from_file(tmp_path: Path) -> None:
    _write_user_module(tmp_path, "my_rewards")
    reward = resolve_reward({"name": "my_rewards.py:scaled", "scale": 2.0}, base_dir=tmp_path)
    assert reward(["", ""], ["abc", "a"]) == [6.0, 2.0]
    absolute = resolve_reward({"name": f"{tmp_path}/my_rewards.py:scaled"})
    assert absolute(["", ""], ["ab", ""]) == [2.0, 0.0]
    with pytest.raises(UserError, match="does not exist"):
        resolve_reward({"name": f"{tmp_path}/nope.py:scaled"})


def _const(value: float | None) -> RewardFunction:
    return RewardFunction("const", lambda completions, **k: [value] * len(completions))


def test_weighted_sum_and_metrics() -> None:
    fns = resolve_rewards(
        [
            {"name": "gsm8k", "weight": 1.0},
            {"name": "length_penalty", "max_len": 10, "cache_len": 4, "weight": 0.5},
            {"name": "exact_match", "weight": 0.0},  # logged, not summed
        ]
    )
    completions = ["#### 4", "#### 5", "#### 4"]
    columns = {"answer": ["4", "4", "#### 4"], "completion_lengths": [3, 8, 10]}
    scores = score_rewards(fns, [""] * 3, completions, columns)
    # totals: 1 + 0.5*0 = 1; 0 + 0.5*(-0.5) = -0.25; 1 + 0.5*(-1) = 0.5
    assert scores.total == [1.0, -0.25, 0.5]
    # exact_match compares strings: only "#### 4" == "#### 4" (the third) matches.
    assert scores.per_function["exact_match"] == [0.0, 0.0, 1.0]
    assert scores.errors == {"gsm8k": 0, "length_penalty": 0, "exact_match": 0}
    metrics = reward_metrics(scores)
    assert metrics["reward/mean"] == pytest.approx(1.25 / 3)
    assert metrics["reward/gsm8k"] == pytest.approx(2 / 3)
    assert metrics["reward/length_penalty"] == pytest.approx(-0.5)
    assert metrics["reward/none_frac"] == 0.0


def test_duplicate_names_get_suffixes() -> None:
    fns = resolve_rewards([{"name": "format", "pattern": "a"}, {"name": "format", "pattern": "b"}])
    assert [f.name for f in fns] == ["format", "format_2"]


def test_raising_sample_scores_none_and_is_counted(caplog: pytest.LogCaptureFixture) -> None:
    def picky(prompts, completions, **columns):
        if any(c == "bad" for c in completions):
            raise RuntimeError("cannot score bad")
        return [1.0] * len(completions)

    fns = [
        RewardFunction("picky", picky),
        RewardFunction("half", lambda completions, **k: [0.5] * len(completions)),
    ]
    with caplog.at_level(logging.WARNING, logger="moepost.rewards"):
        scores = score_rewards(fns, [""] * 3, ["ok", "bad", "ok"], {"answer": ["a", "b", "c"]})
    assert scores.per_function["picky"] == [1.0, None, 1.0]
    assert scores.total == [1.5, None, 1.5]
    assert scores.errors == {"picky": 1, "half": 0}
    warnings = [r.getMessage() for r in caplog.records if r.name == "moepost.rewards"]
    assert len(warnings) == 1
    assert "sample 1" in warnings[0] and "cannot score bad" in warnings[0]
    assert reward_metrics(scores)["reward/none_frac"] == pytest.approx(1 / 3)


def test_none_nan_and_zero_weight() -> None:
    none_fn = RewardFunction("maybe", lambda completions, **k: [None, 1.0, math.nan])
    ignored = RewardFunction("ignored", lambda completions, **k: [None, None, None], weight=0.0)
    scores = score_rewards([none_fn, ignored], [""] * 3, ["a", "b", "c"])
    # NaN counts as None; a weight-0 function's None does not void the total.
    assert scores.total == [None, 1.0, None]
    raise_if_all_none(scores, step=1)  # one total is not None: no error


def test_all_none_raises_and_bad_return_is_user_error() -> None:
    scores = score_rewards([_const(None)], [""] * 2, ["a", "b"])
    with pytest.raises(UserError, match="all rewards were None for step 7: const: 2/2 None"):
        raise_if_all_none(scores, step=7)
    wrong_len = RewardFunction("short", lambda completions, **k: [1.0])
    with pytest.raises(UserError, match="returned 1 values for 2 completions"):
        score_rewards([wrong_len], [""] * 2, ["a", "b"])
    with pytest.raises(UserError, match="expected a float or None"):
        score_rewards([RewardFunction("s", lambda completions, **k: ["x"])], [""], ["a"])
