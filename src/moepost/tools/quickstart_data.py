"""The quickstart's dataset: arithmetic word problems with GSM8K-style answers, from a seed.

"Ann has 7 pens and buys 5 more. How many pens now?" -> "7+5=12\\n#### 12". Numbers are 1-9
(sums up to 18) so a character-level model of ~2 M parameters learns to copy and add them within
a few hundred steps. One-step problems add or take away; two-step problems (30%) do both, which
leaves headroom above what the short SFT stage teaches. The eval split never repeats a train
question, so its accuracy is on held-out problems (the arithmetic facts themselves recur).
Rows are `{question, answer}` (the `gsm8k` data format), which SFT turns into a user/assistant
pair and RL into a prompt plus reference answer.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

NAMES = ("Ann", "Ben", "Mia", "Sam", "Eva", "Tom")
OBJECTS = ("pens", "cards", "eggs", "books", "coins", "cups")
ADD_VERBS = ("buys", "finds", "gets")
SUB_VERBS = ("sells", "loses", "gives away")


@dataclass(frozen=True)
class Problem:
    question: str
    working: str  # the equations, one per line
    value: int

    @property
    def answer(self) -> str:
        """GSM8K form: the working, then "#### N"."""
        return f"{self.working}\n#### {self.value}"


def _one_step(rng: random.Random, max_number: int) -> Problem:
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    a = rng.randint(2, max_number)
    if rng.random() < 0.5:
        b = rng.randint(1, max_number)
        verb, op, value = rng.choice(ADD_VERBS), "+", a + b
        question = f"{name} has {a} {obj} and {verb} {b} more. How many {obj} now?"
    else:
        b = rng.randint(1, a - 1)
        verb, op, value = rng.choice(SUB_VERBS), "-", a - b
        question = f"{name} has {a} {obj} and {verb} {b}. How many {obj} now?"
    return Problem(question, f"{a}{op}{b}={value}", value)


def _two_step(rng: random.Random, max_number: int) -> Problem:
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    a, b = rng.randint(2, max_number), rng.randint(1, max_number)
    c = rng.randint(1, a + b - 1)
    add, sub = rng.choice(ADD_VERBS), rng.choice(SUB_VERBS)
    question = f"{name} has {a} {obj}, {add} {b} and {sub} {c}. How many {obj} now?"
    working = f"{a}+{b}={a + b}\n{a + b}-{c}={a + b - c}"
    return Problem(question, working, a + b - c)


def make_problems(
    n: int, rng: random.Random, *, max_number: int, two_step_frac: float, exclude: set[str]
) -> list[Problem]:
    """`n` distinct problems whose questions are not in `exclude` (which is updated)."""
    out: list[Problem] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct problems with max_number={max_number}")
        two = rng.random() < two_step_frac
        p = _two_step(rng, max_number) if two else _one_step(rng, max_number)
        if p.question in exclude:
            continue
        exclude.add(p.question)
        out.append(p)
    return out


def write_dataset(
    out_dir: str | Path,
    *,
    seed: int,
    num_train: int = 4000,
    num_eval: int = 200,
    max_number: int = 9,
    two_step_frac: float = 0.3,
) -> tuple[Path, Path]:
    """Write `train.jsonl` and `eval.jsonl` (rows `{question, answer}`) and return their paths.

    The eval problems are drawn first so that a different `num_train` never changes them.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1_000_003 * seed + 17)
    seen: set[str] = set()
    evals = make_problems(
        num_eval, rng, max_number=max_number, two_step_frac=two_step_frac, exclude=seen
    )
    train = make_problems(
        num_train, rng, max_number=max_number, two_step_frac=two_step_frac, exclude=seen
    )
    for name, problems in (("train.jsonl", train), ("eval.jsonl", evals)):
        with (out / name).open("w", encoding="utf-8") as f:
            for p in problems:
                f.write(json.dumps({"question": p.question, "answer": p.answer}) + "\n")
    return out / "train.jsonl", out / "eval.jsonl"
