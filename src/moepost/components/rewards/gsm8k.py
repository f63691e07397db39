"""GSM8K correctness reward, scored like verl's ``verl.utils.reward_score.gsm8k.compute_score``.

How verl scores a completion (verl is not a dependency; this is the behaviour, re-implemented):

1. Only the last 300 characters of the completion are read (verl clips long texts for speed),
   so a "#### N" earlier than that is not seen and a number cut by the clip is read cut.
2. The answer string. strict: the LAST match of ``#### (-?[0-9.,]+)`` (exactly one space after
   "####", so "####72", "####  72", "#### $72" and "#### +72" have no answer), commas removed.
   flexible: the last match of ``-?[0-9.,]+`` anywhere that is not "."; commas are kept, so
   "5," or "1,234." are answers as written; when every match is "." the answer is ".".
3. No answer: 0. Answer string == ground-truth string: ``score``. Otherwise ``format_score``.

``method: strict`` / ``flexible`` do steps 1 and 2 exactly as verl, and differ from step 3 in
one deliberate way: an answer that is not string-equal to the reference is still correct when
both are the same decimal number ("72.0", "72." and "007" equal "72"; in flexible mode "5,"
and "1,234." equal "5" and "1234"), and the reference may be an int/float, "1,234", "$72", or a
whole GSM8K solution ending in "#### 72" (verl would compare against that text verbatim).
A reference with no number is a data error (ValueError), not a wrong answer.

``method: verl`` / ``verl_flexible`` are verl's strict / flexible scores bit for bit. The reference
is taken the way verl's GSM8K preprocessing stores it: a text containing "#### N" becomes N
with commas removed (the first match, as verl's ``examples/data_preprocess/gsm8k.py``); any
other reference is compared as ``str(reference)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, Literal

from moepost.components.rewards.convention import texts
from moepost.components.rewards.math import _column
from moepost.errors import UserError

GSM8KMethod = Literal["strict", "flexible", "verl", "verl_flexible"]
METHODS: tuple[str, ...] = ("strict", "flexible", "verl", "verl_flexible")

CLIP_CHARS = 300  # verl's _SOLUTION_CLIP_CHARS
_STRICT_RE = re.compile(r"#### (-?[0-9.,]+)")
_FLEXIBLE_RE = re.compile(r"-?[0-9.,]+")
# A number as written in an answer or a reference: optional sign, digits (thousands commas only
# in groups of three), optional decimals, one optional trailing "." or "," (end of a sentence).
_DECIMAL_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?[.,]?")
_ANY_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise UserError(f"gsm8k reward: method must be one of {list(METHODS)}, got {method!r}")


def verl_extract(text: str, method: Literal["strict", "flexible"]) -> str | None:
    """verl's answer string for ``text`` (see the module docstring), or None."""
    if len(text) > CLIP_CHARS:
        text = text[-CLIP_CHARS:]
    if method == "strict":
        found = _STRICT_RE.findall(text)
        return found[-1].replace(",", "") if found else None
    matches = _FLEXIBLE_RE.findall(text)
    if not matches:
        return None
    valid = [m for m in matches if m != "."]
    # verl's loop ends on the first match when none is valid; every match is then ".".
    return valid[-1] if valid else matches[0]


def _decimal(text: str) -> Decimal | None:
    """'1,234.' -> Decimal('1234'); None when ``text`` is not one plain number."""
    text = text.strip()
    if not _DECIMAL_RE.fullmatch(text) or not any(c.isdigit() for c in text):
        return None
    return Decimal(text.rstrip(".,").replace(",", ""))


def _reference_number(answer: str | float | int) -> Decimal:
    """'72', 72, 72.0, '$1,234', '#### 72' or a whole GSM8K solution ending in '#### 72'."""
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    text = text.strip().replace("$", "", 1)
    value = _decimal(text)
    if value is None:
        numbers = _ANY_NUMBER_RE.findall(text)
        value = _decimal(numbers[-1]) if numbers else None
    if value is None:
        raise ValueError(f"gsm8k reward: reference answer {str(answer)[-80:]!r} has no number")
    return value


def verl_ground_truth(answer: str | float | int) -> str:
    """The reference as verl's GSM8K preprocessing stores it ('... #### 1,234' -> '1234')."""
    text = str(answer)
    found = _STRICT_RE.search(text)
    return found.group(1).replace(",", "") if found else text


def extract_gsm8k_answer(text: str, method: GSM8KMethod = "strict") -> str | None:
    """The answer string verl reads from ``text`` ('1234', '-3', '72.0', '5,'), or None.

    strict / verl: the number after the last "#### "; flexible / verl_flexible: the last
    number anywhere; both within the last 300 characters.
    """
    _check_method(method)
    return verl_extract(text, "strict" if method in ("strict", "verl") else "flexible")


def _score_one(completion: str, reference: Any, method: str, correct: float, wrong: float) -> float:
    answer = extract_gsm8k_answer(completion, method)  # type: ignore[arg-type]
    if method in ("verl", "verl_flexible"):
        if answer is None:
            return 0.0
        return correct if answer == verl_ground_truth(reference) else wrong
    expected = _reference_number(reference)  # a bad reference fails whatever the completion
    if answer is None:
        return 0.0
    if answer == str(reference):
        return correct
    predicted = _decimal(answer)
    return correct if predicted is not None and predicted == expected else wrong


def gsm8k(
    prompts: Sequence[Any],
    completions: Sequence[str],
    answer: Sequence[str] | None = None,
    method: GSM8KMethod = "strict",
    correct: float = 1.0,
    format_score: float = 0.0,
    score: float | None = None,
    **columns: Any,
) -> list[float]:
    """GSM8K correctness: ``correct`` if the extracted answer equals the reference, else
    ``format_score`` when an answer was extracted but is wrong, else 0.0.

    ``score`` is verl's name for ``correct``; give one of the two. See the module docstring for
    the methods and for how strict / flexible differ from verl (numeric equality).
    """
    _check_method(method)
    if score is not None:
        if correct != 1.0:
            raise UserError("gsm8k reward: give 'correct' or its verl name 'score', not both")
        correct = score
    answers = _column("answer", answer, len(completions), "gsm8k")
    return [
        _score_one(c, ref, method, float(correct), float(format_score))
        for c, ref in zip(texts(completions), answers)
    ]
