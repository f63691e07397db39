"""Reading what a run logs (DESIGN.md section 4): JSONL rows, numbers and per-key series.

Tolerates a run that is still going or was killed: a missing file reads as no rows, a
half-written last line is skipped, and non-finite values logged as the strings "nan" / "inf"
read as floats.
"""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path
from typing import Any

_NONFINITE = {"nan": math.nan, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf, "infinity": math.inf, "-infinity": -math.inf}  # fmt: skip


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every JSON object in `path` (one per line); [] if it is missing. Lines that do not parse
    (the half-written last line of a live or killed run) are skipped; values come back as written,
    "nan" strings too (a completion may read "nan"): `as_float` reads them as numbers."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def as_float(value: Any) -> float | None:
    """A logged number as a float ("nan"/"inf" strings included); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return _NONFINITE.get(value.strip().lower())
    return None


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key`, sorted by step; a step logged twice (resume) keeps the last."""
    by_step: dict[float, float] = {}
    for i, row in enumerate(rows):
        value, step = as_float(row.get(key)), as_float(row.get("step", i))
        if value is not None and step is not None:
            by_step[step] = value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def numeric_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Keys with a numeric value in any row, in first-seen order (step / epoch left out)."""
    numeric = (k for r in rows for k, v in r.items() if as_float(v) is not None)
    return [k for k in dict.fromkeys(numeric) if k not in ("step", "epoch")]


def match_keys(keys: list[str], patterns: list[str]) -> list[str]:
    """`keys` matching any fnmatch pattern, grouped by pattern in the order given."""
    return [k for p in patterns for k in keys if fnmatch.fnmatchcase(k, p)]
