"""`StepTensors`: the rows of one RL step as the update sees them, built once and frozen.

Row layout (from `components.rollout.layout.build_training_tensors`): [left pad | prompt |
completion | right pad], the completion block starting at a common column P, so only the last
T+1 positions need logits. The value is never changed after it is made: the step's micro-batch
plan and the old / reference log-probs come in through `dataclasses.replace`, so a pass that
read the rows can never see them change under it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moepost.components.moe.router_setup import Tokens
from moepost.components.rollout.shared_prefix import PrefixShare


@dataclass(frozen=True)
class StepTensors:
    """Everything the update needs for the N rows of one RL step (on the training device)."""

    input_ids: torch.Tensor  # [N, S]
    attention_mask: torch.Tensor  # [N, S]
    position_ids: torch.Tensor  # [N, S]
    completion_ids: torch.Tensor  # [N, T]
    completion_mask: torch.Tensor  # [N, T] float
    advantages: torch.Tensor  # [N]
    rollout_logprobs: torch.Tensor  # [N, T] from the engine
    old_logprobs: torch.Tensor | None = None  # [N, T]
    ref_logprobs: torch.Tensor | None = None  # [N, T]
    # Row slices of the step's micro-batches (`rl_passes.plan_step_micro_batches`); empty: micro_batch_size rows
    micro_batches: Sequence[slice] = ()
    # data.packing: each micro-batch is one padding-free row of its rows' real tokens
    packed: bool = False
    # rl.shared_prefix: run a micro-batch's shared prompt prefixes once (`share`)
    shared_prefix: bool = False

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    def columns(self, idx: slice) -> slice:
        """The columns rows `idx` use: leading columns that are padding in all of them are cut
        (the completion block stays last, so completion logits keep their positions)."""
        used = self.attention_mask[idx].any(dim=0).nonzero()
        return slice(int(used[0]) if used.numel() else 0, None)

    def tokens(self, idx: slice) -> Tokens:
        """The tokens of rows `idx` the forward sees, in router order: `columns(idx)`, or
        packed, the [n, S] mask of real tokens (row after row)."""
        return self.attention_mask[idx].bool() if self.packed else self.columns(idx)

    def rows(self, idx: slice) -> dict[str, torch.Tensor]:
        """Model inputs of rows `idx`: trimmed to `columns(idx)`, or packed into one [1, N] row
        whose position ids restart at every row (transformers then keeps attention inside each
        row: a block-diagonal mask for sdpa / eager, varlen for flash attention)."""
        if self.packed:
            real = self.attention_mask[idx].bool()
            return {
                "input_ids": self.input_ids[idx][real][None],
                "position_ids": self.position_ids[idx][real][None],
            }
        cols = self.columns(idx)
        return {
            "input_ids": self.input_ids[idx, cols],
            "attention_mask": self.attention_mask[idx, cols],
            "position_ids": self.position_ids[idx, cols],
        }

    def share(self, idx: slice) -> PrefixShare | None:
        """How rows `idx` (trimmed to `columns(idx)`) share prompt prefixes; None: they do not,
        or sharing is off."""
        if not self.shared_prefix or self.packed:
            return None
        cols = self.columns(idx)
        T = int(self.completion_ids.shape[1])
        return PrefixShare.find(self.input_ids[idx, cols], self.attention_mask[idx, cols], T)

    def select(self, mask: torch.Tensor, idx: slice) -> torch.Tensor:
        """[n*S'] / [N]: a [N_rows, S] per-token mask at the tokens rows `idx` show the model."""
        tokens = self.tokens(idx)
        if isinstance(tokens, slice):
            return mask[idx, tokens].flatten()
        return mask[idx][tokens]


def tensors_for_step(
    batch: Any,
    advantages: torch.Tensor,
    pad_token_id: int,
    device: torch.device,
    *,
    packed: bool = False,
    shared_prefix: bool = False,
) -> StepTensors:
    """The step's rows from a rollout batch (`packed`: `data.packing`; `shared_prefix`:
    prefix sharing is on for this run); no micro-batch plan or old / reference log-probs yet."""
    from moepost.components.rollout.layout import build_training_tensors

    lay = build_training_tensors(batch.prompt_ids, batch.completion_ids, pad_token_id, device)
    T = lay["num_completion_positions"]
    rollout_lp = torch.zeros((len(batch.completion_ids), T), dtype=torch.float32)
    width = min(T, batch.logprobs.shape[1])
    rollout_lp[:, :width] = batch.logprobs[:, :width]
    return StepTensors(
        input_ids=lay["input_ids"],
        attention_mask=lay["attention_mask"],
        position_ids=lay["position_ids"],
        completion_ids=lay["completion_ids"],
        completion_mask=lay["completion_mask"],
        advantages=advantages.to(device),
        rollout_logprobs=rollout_lp.to(device),
        packed=packed,
        shared_prefix=shared_prefix,
    )
