"""DAPO overlong reward shaping (Yu et al., 2025, "soft overlong punishment").

With L_max = ``max_len`` and L_cache = ``cache_len``, a completion of |y| tokens gets

    0                                   if |y| <= L_max - L_cache
    ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
    -1                                  if |y| > L_max

i.e. 0 up to the start of the cache window, then a straight line down to -1 at L_max.
The penalty is added to the task reward (give it weight 1.0 in ``reward.functions``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from moepost.components.rewards.convention import texts
from moepost.errors import UserError


def _check_lengths(max_len: int | None, cache_len: int | None, name: str) -> tuple[int, int]:
    if max_len is None or cache_len is None:
        raise UserError(f"{name} needs 'max_len' and 'cache_len' (tokens)")
    if max_len <= 0 or cache_len < 0 or cache_len > max_len:
        raise UserError(
            f"{name}: expected 0 <= cache_len <= max_len and max_len > 0, "
            f"got max_len={max_len}, cache_len={cache_len}"
        )
    return int(max_len), int(cache_len)


def overlong_penalty(
    completion_lengths: Sequence[int], max_len: int, cache_len: int
) -> list[float]:
    """The DAPO overlong penalty for each completion length (in tokens); values in [-1, 0]."""
    max_len, cache_len = _check_lengths(max_len, cache_len, "overlong_penalty")
    start = max_len - cache_len
    penalties = []
    for length in completion_lengths:
        if length <= start:
            penalties.append(0.0)
        elif length <= max_len:
            # cache_len > 0 here: with cache_len == 0, start == max_len and this branch is empty.
            penalties.append((start - length) / cache_len)
        else:
            penalties.append(-1.0)
    return penalties


def length_penalty(
    prompts: Sequence[Any],
    completions: Sequence[str],
    completion_lengths: Sequence[int] | None = None,
    max_len: int | None = None,
    cache_len: int | None = None,
    fallback_to_chars: bool = False,
    **columns: Any,
) -> list[float]:
    """Reward-function form of :func:`overlong_penalty`.

    ``completion_lengths`` (tokens) is a column the RL recipe passes with every batch. Without it
    the function raises, unless ``fallback_to_chars: true`` is set, in which case it measures
    ``len(completion)`` in characters (then ``max_len``/``cache_len`` are characters too).
    """
    if completion_lengths is None:
        if not fallback_to_chars:
            raise UserError(
                "length_penalty needs the 'completion_lengths' column (tokens, given by the RL "
                "recipe); set fallback_to_chars: true to measure characters instead"
            )
        completion_lengths = [len(c) for c in texts(completions)]
    if len(completion_lengths) != len(completions):
        raise UserError(
            f"length_penalty: {len(completion_lengths)} completion_lengths for "
            f"{len(completions)} completions"
        )
    return overlong_penalty(completion_lengths, max_len, cache_len)  # type: ignore[arg-type]
