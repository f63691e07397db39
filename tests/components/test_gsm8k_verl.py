"""GSM8K reward vs verl's ``verl.utils.reward_score.gsm8k.compute_score``, case by case.

Every expected verl score below was worked out by hand from verl's source (last 300 characters;
strict: last ``#### (-?[0-9.,]+)`` with commas removed; flexible: last ``-?[0-9.,]+`` that is
not "."; string equality with the ground truth). The ground truth verl sees is the reference
after verl's GSM8K preprocessing ("... #### 1,234" -> "1234"), which for a plain string
reference is the reference itself.

Scores: Z = no answer (0), F = wrong / format_score, S = correct (score).
"""

from __future__ import annotations

import pytest

from moepost.components.rewards.gsm8k import CLIP_CHARS, verl_ground_truth
from moepost.errors import UserError
from moepost.rewards import extract_gsm8k_answer, gsm8k

Z, F, S = 0.0, 0.25, 2.0  # format_score and score chosen so that each outcome is distinct
SOLUTION = "Natalia sold 48/2 = 24 clips in May.\nShe sold 1,000 + 234 in all.\n#### 1,234"

# (completion, reference, verl strict, verl flexible, moepost strict, moepost flexible)
CASES: list[tuple[str, object, float, float, float, float]] = [
    ("#### 72", "72", S, S, S, S),
    ("Step 1 ... so the answer is\n#### 72", "72", S, S, S, S),
    ("####72", "72", Z, S, Z, S),  # strict needs exactly one space after ####
    ("####  72", "72", Z, S, Z, S),
    ("#### $72", "72", Z, S, Z, S),  # "$" is not in verl's character class
    ("#### -72", "-72", S, S, S, S),
    ("#### +72", "72", Z, S, Z, S),  # "+" neither
    ("#### 1,234", "1234", S, F, S, S),  # flexible keeps the comma: "1,234" != "1234"
    ("#### 72,000", "72000", S, F, S, S),
    ("#### 3,4", "34", S, F, S, F),  # "3,4" is not a number with thousands commas
    ("#### 72.0", "72", F, F, S, S),  # deliberate: numbers compare as numbers
    ("#### 72.50", "72.5", F, F, S, S),
    ("#### 72.", "72", F, F, S, S),
    ("#### 0072", "72", F, F, S, S),
    ("#### -0", "0", F, F, S, S),
    ("#### 72 apples.", "72", S, S, S, S),  # the trailing "." is its own match, skipped
    ("#### 7 then #### 72", "72", S, S, S, S),  # the last #### wins
    ("#### 72 then #### 7", "72", F, F, F, F),
    ("#### 72#### 73", "72", F, F, F, F),
    ("#### 72\n#### 72.5", "72.5", S, S, S, S),
    ("I think it is 72", "72", Z, S, Z, S),
    ("no number here", "72", Z, Z, Z, Z),
    ("The end.", "72", Z, F, Z, F),  # flexible: only "." matches, and "." is the answer
    ("Yes, 72 is it", "72", Z, S, Z, S),
    ("72, final", "72", Z, F, Z, S),  # flexible answer "72,"
    ("#### 72\n\nI hope this helps! Step 3 was 5.", "72", S, F, S, F),  # trailing text
    ("5-3=2", "2", Z, S, Z, S),
    ("The total is -$5", "-5", Z, F, Z, F),  # "-$5": the sign does not reach the digits
    ("#### -", "72", Z, Z, Z, Z),
    ("#### .", "72", F, F, F, F),
    ("#### ,", "72", F, F, F, F),  # strict answer "" (comma removed) is not None
    ("#### 1.2.3", "72", F, F, F, F),
    ("#### \uff17\uff12", "72", Z, Z, Z, Z),  # full-width digits are not [0-9]
    ("#### 72" + "x" * CLIP_CHARS, "72", Z, Z, Z, Z),  # the clip drops the answer
    ("#### 72" + " " * (CLIP_CHARS - 7), "72", S, S, S, S),  # exactly 300 chars: no clip
    ("#### 72" + " " * (CLIP_CHARS - 6), "72", Z, S, Z, S),  # 301: clip leaves "### 72"
    ("1234" + "y" * (CLIP_CHARS - 2), "1234", Z, F, Z, F),  # the clip cuts 1234 to 34
    ("x" * 500 + "\n#### 72", "72", S, S, S, S),
    ("#### 72", "#### 72", S, S, S, S),  # reference given as "#### N"
    ("#### 1234", SOLUTION, S, S, S, S),  # reference: a whole GSM8K solution
    ("#### 1,234", SOLUTION, S, F, S, S),
    ("so 1,234", SOLUTION, Z, F, Z, S),
    ("#### 72", 72, S, S, S, S),  # int reference (str() for verl)
    ("#### 72", 72.0, F, F, S, S),  # str(72.0) == "72.0"
]


def _score(method: str, completion: str, reference: object) -> float:
    rewards = gsm8k(
        ["p"],
        [completion],
        answer=[reference],
        method=method,
        format_score=F,
        score=S,  # type: ignore[arg-type]
    )
    return rewards[0]


@pytest.mark.parametrize(("text", "ref", "v_strict", "v_flex", "strict", "flex"), CASES)
def test_gsm8k_case_table(
    text: str, ref: object, v_strict: float, v_flex: float, strict: float, flex: float
) -> None:
    assert _score("verl", text, ref) == v_strict
    assert _score("verl_flexible", text, ref) == v_flex
    assert _score("strict", text, ref) == strict
    assert _score("flexible", text, ref) == flex


def test_differences_from_verl_are_only_numeric_equality() -> None:
    """Where moepost's strict / flexible differ from verl, verl said "wrong" and moepost says
    "correct" because the answer and the reference are the same number; never the other way."""
    assert len(CASES) >= 30
    differences = 0
    for text, ref, v_strict, v_flex, strict, flex in CASES:
        for ours, theirs, method in ((strict, v_strict, "strict"), (flex, v_flex, "flexible")):
            if ours != theirs:
                differences += 1
                assert (theirs, ours) == (F, S), (text, method)
                answer = extract_gsm8k_answer(text, method)  # type: ignore[arg-type]
                assert answer is not None and answer != verl_ground_truth(ref)
    assert differences == 17  # pinned so that a new difference is a conscious change


def test_default_scores_and_score_alias() -> None:
    # Defaults are verl's: score 1.0, format_score 0.0, and 0 with no answer.
    assert gsm8k([""] * 3, ["#### 72", "#### 7", "none"], answer=["72"] * 3) == [1.0, 0.0, 0.0]
    assert gsm8k([""], ["#### 72"], answer=["72"], correct=3.0) == [3.0]
    with pytest.raises(UserError, match="not both"):
        gsm8k([""], ["#### 72"], answer=["72"], correct=3.0, score=2.0)
    with pytest.raises(UserError, match="method must be one of"):
        gsm8k([""], ["#### 72"], answer=["72"], method="loose")  # type: ignore[arg-type]


def test_verl_ground_truth_matches_verl_preprocessing() -> None:
    # verl's examples/data_preprocess/gsm8k.py takes the FIRST "#### N" and drops commas.
    assert verl_ground_truth(SOLUTION) == "1234"
    assert verl_ground_truth("#### 5 or #### 6") == "5"
    assert verl_ground_truth("72") == "72"
    assert verl_ground_truth(72) == "72"
