"""The one micro-batch planner: which rows of a step share a forward pass.

Pure: row lengths (ints) in, row-index lists out; no torch, no config objects, no collectives.
It lives at the top of the package, next to `errors.py`, because every layer that plans
micro-batches must be able to import it: `config.validate` (which sits below `components/`:
components import the config schema), `components/`, the recipes (SFT, RL) and `tools.plan`.
The recipes adapt it to their config and process group in `recipes.common.micro_batch_groups`.

Two ways to cut a step (`docs/configuration.md`, `train.micro_batch_size` /
`train.micro_batch_tokens`):
- by rows: `size` consecutive rows per micro-batch (the last one may be short);
- by a token budget: as many consecutive rows as fit `token_budget` padded tokens (rows x
  longest row; `packed`: the sum of the lengths, one padding-free row). A row longer than the
  budget gets a micro-batch of its own; it is never split or dropped.
"""

from __future__ import annotations

from collections.abc import Sequence


def plan_micro_batches(
    lengths: Sequence[int],
    *,
    size: int,
    token_budget: int = 0,
    packed: bool = False,
    longest_first: bool = False,
) -> list[list[int]]:
    """Row ids (indices into `lengths`) of each micro-batch of one step, in forward order.

    token_budget <= 0: `size` consecutive rows each. Otherwise rows grouped under the budget;
    `longest_first` sorts them by length first, longest first, ties in row order (SFT: less
    padding, and the peak memory shows at the first micro-batch); without it the rows keep
    their order (RL: routing replay indexes them). Empty `lengths` -> [].
    """
    n = len(lengths)
    if token_budget <= 0:
        if size < 1:
            raise ValueError(f"plan_micro_batches: size must be >= 1, got {size}")
        return [list(range(i, min(i + size, n))) for i in range(0, n, size)]
    order = sorted(range(n), key=lambda i: -lengths[i]) if longest_first else list(range(n))
    ordered = [lengths[i] for i in order]
    return [[order[j] for j in g] for g in batch_by_tokens(ordered, token_budget, packed=packed)]


def batch_by_tokens(
    lengths: Sequence[int], max_tokens: int, max_rows: int | None = None, *, packed: bool = False
) -> list[list[int]]:
    """Consecutive index groups whose padded size (rows * longest; `packed`: the sum of the
    lengths, a padding-free row) stays within max_tokens.

    Order-preserving and deterministic; an example longer than max_tokens gets a batch of its own.
    """
    if max_tokens < 1:
        raise ValueError(f"batch_by_tokens: max_tokens must be >= 1, got {max_tokens}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"batch_by_tokens: max_rows must be >= 1, got {max_rows}")
    batches: list[list[int]] = []
    current: list[int] = []
    longest = total = 0
    for i, n in enumerate(lengths):
        grown = max(longest, n)
        cost = total + n if packed else (len(current) + 1) * grown
        full = max_rows is not None and len(current) >= max_rows
        if current and (full or cost > max_tokens):
            batches.append(current)
            current, grown, total = [], n, 0
        current.append(i)
        longest, total = grown, total + n
    if current:
        batches.append(current)
    return batches


def split_to_count(
    groups: Sequence[Sequence[int]], lengths: Sequence[int], count: int, *, packed: bool = False
) -> list[list[int]]:
    """Split the costliest group (padded size rows * longest; `packed`: the sum of the
    lengths) in two, keeping order, until there are `count` groups.

    Ranks of a data-parallel job must run the same number of forward passes (DDP syncs buffers
    and FSDP / ZeRO-3 gather weights in every forward), so a rank whose token budget gives
    fewer micro-batches than another splits some of its own. `lengths` is indexed by the ids
    in `groups`.
    """
    out = [list(g) for g in groups]
    rows = sum(len(g) for g in out)
    if count < len(out) or count > rows:
        raise ValueError(f"split_to_count: cannot make {count} groups of {len(out)} ({rows} rows)")

    def cost(group: list[int]) -> int:
        sizes = [lengths[k] for k in group]
        return sum(sizes) if packed else len(sizes) * max(sizes)

    while len(out) < count:
        i = max((j for j, g in enumerate(out) if len(g) > 1), key=lambda j: cost(out[j]))
        half = len(out[i]) // 2
        out[i : i + 1] = [out[i][:half], out[i][half:]]
    return out


def fullest_micro_batch_rows(row_length: int, *, size: int, token_budget: int = 0) -> int:
    """Rows of the fullest micro-batch when every row is `row_length` tokens long (the memory
    worst case `moepost plan` sizes): `size`, or as many such rows as fit the budget (>= 1).

    One row more than the budget can hold is planned, so the first micro-batch is as full as the
    budget allows, whatever the number of rows a step has.
    """
    rows = size if token_budget <= 0 else token_budget // max(row_length, 1) + 1
    plan = plan_micro_batches([row_length] * rows, size=size, token_budget=token_budget)
    return max(len(group) for group in plan)


def splits_evenly(rows: int, size: int) -> bool:
    """True when `rows` rows make whole micro-batches of `size` rows (config validation: a
    step's rows, or each rank's share, under `train.micro_batch_size`)."""
    return all(len(group) == size for group in plan_micro_batches([1] * rows, size=size))
