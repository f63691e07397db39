"""Batching SFT examples: padded collation and packing several examples into one row (grouping
rows into micro-batches by a token budget is `moepost.micro_batches`).

Packed rows must give exactly the losses of the unpacked examples. Three things make that so:
attention stays inside each example (a block-diagonal causal mask, or position_ids that
transformers turns into one), position_ids restart at 0 for every example, and the prediction
that would cross a boundary (last token of one example -> first token of the next) is masked by
giving each example's first token the label -100.

How transformers v5 reads a packed batch (masking_utils.py, modeling_flash_attention_utils.py):
- A 4-D attention_mask [B, 1, T, T] is used as-is by every mask builder (`_preprocess_mask_arguments`
  returns early). sdpa takes a bool mask (True = attend) or an additive float mask of the
  query dtype; eager adds the mask to the scores, so it needs the additive float form (a bool
  mask would be added as 0/1 and attend everywhere).
- With attention_mask=None and no cache, position_ids that restart (a step other than +1) are
  detected as packed sequences and sdpa / eager / flex build the block-diagonal mask themselves.
  "No cache" means calling the model with use_cache=False: config.use_cache defaults to True,
  and with a DynamicCache the detection is skipped silently (the rows then attend across seams).
- Flash attention takes the varlen path from position_ids only when the batch has ONE row, so
  for flash (and flex) use mask="flat": every packed token in a single [1, N] row, no padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from moepost.components.data.formats import IGNORE_INDEX, SFTExample

PackedMask = Literal["bool", "float", "flat"]


def collate_sft(examples: Sequence[SFTExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids [B, T], attention_mask [B, T] (1 = token), labels [B, T].

    Labels are unshifted (HF convention: labels[t] is the token at t; the loss shifts) and -100
    on padding.
    """
    if not examples:
        raise ValueError("collate_sft: no examples")
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[b, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class PackedRow:
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # one entry per packed example, in order


class _FirstFit:
    """Finds the first open row with at least `need` free tokens in O(log n).

    A max segment tree over the rows' free space; rows not opened yet have full capacity, so
    "first row that fits" is also how a new row gets opened.
    """

    def __init__(self, num_rows: int, capacity: int) -> None:
        self.size = 1
        while self.size < num_rows:
            self.size *= 2
        self.free = [0] * (2 * self.size)
        for i in range(num_rows):
            self.free[self.size + i] = capacity
        for node in range(self.size - 1, 0, -1):
            self.free[node] = max(self.free[2 * node], self.free[2 * node + 1])

    def take(self, need: int) -> int:
        node = 1
        while node < self.size:
            node = 2 * node if self.free[2 * node] >= need else 2 * node + 1
        self.free[node] -= need
        row, node = node - self.size, node // 2
        while node:
            self.free[node] = max(self.free[2 * node], self.free[2 * node + 1])
            node //= 2
        return row


def pack_sft(examples: Sequence[SFTExample], max_seq_length: int) -> list[PackedRow]:
    """Greedy first-fit packing in example order; an example is never split across rows.

    Examples are expected to be truncated to max_seq_length already (load_sft_data does).
    """
    if any(len(ex.input_ids) > max_seq_length for ex in examples):
        raise ValueError("pack_sft: an example is longer than max_seq_length; truncate first")
    fit = _FirstFit(len(examples), max_seq_length)
    rows: list[PackedRow] = []
    for ex in examples:
        index = fit.take(len(ex.input_ids))
        if index == len(rows):
            rows.append(PackedRow())
        row = rows[index]
        row.input_ids.extend(ex.input_ids)
        row.labels.extend(ex.labels)
        row.lengths.append(len(ex.input_ids))
    return rows


def _row_tensors(row: PackedRow) -> tuple[list[int], list[int], list[int], list[int]]:
    """ids, labels (first of each example -100), positions and example index per token."""
    labels, positions, seq_ids = list(row.labels), list[int](), list[int]()
    offset = 0
    for j, n in enumerate(row.lengths):
        labels[offset] = IGNORE_INDEX
        positions.extend(range(n))
        seq_ids.extend([j] * n)
        offset += n
    return row.input_ids, labels, positions, seq_ids


def collate_packed(
    rows: Sequence[PackedRow],
    pad_token_id: int,
    *,
    mask: PackedMask = "bool",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Packed rows -> model inputs.

    Returns input_ids [B, T], labels [B, T] (unshifted, -100 on each example's first token and
    on padding), position_ids [B, T] restarting at 0 per example, token_mask [B, T] (1 on real
    tokens; for router statistics, not a model argument) and, unless mask="flat",
    attention_mask [B, 1, T, T]: block-diagonal causal, bool (True = attend, for sdpa) or
    additive float of `dtype` (0 / dtype min, for eager; dtype must match the model's).
    mask="flat" puts every row's tokens into one row [1, N] with no padding and no
    attention_mask: the form flash-attention varlen (and the position-id path) needs; call the
    model with use_cache=False then.
    The padding tail of a row is its own causal block so padded queries stay finite.
    """
    if not rows:
        raise ValueError("collate_packed: no rows")
    parts = [_row_tensors(r) for r in rows]
    if mask == "flat":
        flat: tuple[list[int], ...] = ([], [], [], [])
        for part in parts:
            for column, values in zip(flat, part):
                column.extend(values)
        parts = [flat]  # type: ignore[list-item]
    width = max(len(p[0]) for p in parts)
    shape = (len(parts), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    seq_ids = torch.full(shape, -1, dtype=torch.long)
    for b, (ids, labs, pos, seq) in enumerate(parts):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids)
        labels[b, :n] = torch.tensor(labs)
        position_ids[b, :n] = torch.tensor(pos)
        position_ids[b, n:] = torch.arange(width - n)
        seq_ids[b, :n] = torch.tensor(seq)
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "token_mask": (seq_ids >= 0).long(),
    }
    if mask == "flat":
        return batch
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (seq_ids[:, :, None] == seq_ids[:, None, :]) & causal  # padding (-1) pairs up too
    allowed = allowed[:, None]
    if mask == "bool":
        batch["attention_mask"] = allowed
    else:
        additive = torch.zeros(allowed.shape, dtype=dtype)
        batch["attention_mask"] = additive.masked_fill(~allowed, torch.finfo(dtype).min)
    return batch


def packed_mask_for(attn_implementation: str | None) -> PackedMask:
    """The collate_packed mask form an attention implementation reads correctly."""
    if attn_implementation in (None, "sdpa"):
        return "bool"
    if attn_implementation == "eager":
        return "float"
    return "flat"  # flash_attention_*, flex_attention, kernels: sequence boundaries from positions


def without_trailing_padding_mask(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a 2-D attention_mask whose padding is only at the end of each row.

    Under causal attention a real token never attends to a later position, so trailing padding
    cannot change a real token's output; the mask only stops sdpa from taking its causal path
    (which skips the upper triangle) and costs a [B, 1, T, T] mask build. Outputs at real
    positions are unchanged; padded positions (excluded from every loss and count) then see
    each other. Left padding, 4-D (packed) masks and rows with holes keep their mask.
    Position ids are added when missing, so they stay those of the masked call.
    """
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return inputs
    if not bool((mask[:, 1:] <= mask[:, :-1]).all()):  # not of the form 1..1 0..0
        return inputs
    out = {k: v for k, v in inputs.items() if k != "attention_mask"}
    if "position_ids" not in out:
        # transformers' default positions (arange) equal the masked call's for 1..1 0..0 rows
        out["position_ids"] = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return out
