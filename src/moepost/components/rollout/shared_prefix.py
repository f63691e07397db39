"""Shared-prefix training forwards: a group's prompt runs once, its G completions on top of it.

In an RL micro-batch the G samples of a prompt repeat the same prompt columns, and causal
attention makes the prompt's activations independent of what follows. So the prompt can run
once per group with a KV cache, the cache rows be copied to the group's rows, and only the
completion columns run per row. Gradients reach the prompt's activations through the copied
cache (a differentiable gather), so losses, gradients and log-probs equal the padded forward's
up to float rounding (tests pin this).

Router records come out in the *shared* token order: the distinct prefixes first
([u, p] row-major), then every row's completion columns ([n, T] row-major). `PrefixShare`
holds the index maps between that order and the padded one ([n, p + T] row-major), so the aux
loss, the drift metrics and routing replay see exactly the tokens (and counts) of the padded
forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from moepost.components.data.packing import without_trailing_padding_mask
from moepost.components.moe.routers import unwrap_model
from moepost.components.rollout.kv_cache import cache_kwargs


@dataclass(frozen=True)
class PrefixShare:
    """How the n rows [n, p + T] of a micro-batch share their first p columns.

    representative: [u] the first row of each run of consecutive rows with equal prefixes.
    owner: [n] the run (index into `representative`) each row belongs to.
    """

    representative: torch.Tensor
    owner: torch.Tensor
    prefix_width: int
    completion_width: int

    @classmethod
    def find(
        cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_width: int
    ) -> PrefixShare | None:
        """The sharing among rows input_ids / attention_mask [n, p + T] whose last T columns
        are the completion block; None when no two neighbouring rows share their prefix."""
        n, width = input_ids.shape
        p = width - completion_width
        if n < 2 or p < 1 or completion_width < 1:
            return None
        starts = run_starts(input_ids, attention_mask, completion_width)
        if bool(starts.all()):
            return None
        owner = torch.cumsum(starts.long(), dim=0) - 1
        return cls(starts.nonzero().squeeze(1), owner, p, completion_width)

    @property
    def num_rows(self) -> int:
        return int(self.owner.shape[0])

    @property
    def call_sizes(self) -> tuple[int, int]:
        """Router rows of the prefix call and of the completion call."""
        u = int(self.representative.shape[0])
        return u * self.prefix_width, self.num_rows * self.completion_width

    @cached_property
    def to_shared(self) -> torch.Tensor:
        """[u*p + n*T]: the padded-order position (row-major over [n, p + T]) of each token in
        shared order."""
        p, T, width = (
            self.prefix_width,
            self.completion_width,
            self.prefix_width + self.completion_width,
        )
        cols = torch.arange(p, device=self.owner.device)
        head = (self.representative[:, None] * width + cols).flatten()
        rows = torch.arange(self.num_rows, device=self.owner.device)
        tail = (rows[:, None] * width + p + torch.arange(T, device=rows.device)).flatten()
        return torch.cat([head, tail])

    @cached_property
    def to_padded(self) -> torch.Tensor:
        """[n*(p + T)]: the shared-order position of each token in padded order."""
        p, T = self.prefix_width, self.completion_width
        u = int(self.representative.shape[0])
        cols = torch.arange(p, device=self.owner.device)
        head = self.owner[:, None] * p + cols  # [n, p]
        rows = torch.arange(self.num_rows, device=self.owner.device)
        tail = u * p + rows[:, None] * T + torch.arange(T, device=rows.device)  # [n, T]
        return torch.cat([head, tail], dim=1).flatten()

    def split_routes(self, routes: torch.Tensor) -> list[list[torch.Tensor]]:
        """Padded-order routes [L, n*(p + T), K] -> per layer, the entries of the two calls."""
        shared = routes[:, self.to_shared]
        a, _ = self.call_sizes
        return [[layer[:a], layer[a:]] for layer in shared]


def run_starts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_width: int
) -> torch.Tensor:
    """[n] bool: row r's prompt columns (all but the last `completion_width`) differ from row
    r - 1's, ids or padding; True for row 0."""
    p = input_ids.shape[1] - completion_width
    same = (input_ids[1:, :p] == input_ids[:-1, :p]).all(dim=1)
    same &= (attention_mask[1:, :p] == attention_mask[:-1, :p]).all(dim=1)
    return torch.cat([same.new_ones(1), ~same])


def can_share_prefix(model: torch.nn.Module) -> str | None:
    """None when `model` supports shared-prefix forwards, else why not (one phrase)."""
    base = unwrap_model(model)
    checkpointing = getattr(base, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers before the v5 rename
        checkpointing = getattr(base, "is_gradient_checkpointing", False)
    if checkpointing:
        return "activation checkpointing drops the KV cache in training forwards"
    config = getattr(base, "config", None)
    try:
        cache = DynamicCache(config=config)
    except Exception as err:  # a config DynamicCache cannot read
        return f"no DynamicCache for this model ({type(err).__name__})"
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        return "the model has sliding-window or linear-attention cache layers"
    return None


def shared_prefix_logits(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], share: PrefixShare
) -> torch.Tensor:
    """[n, T, V] logits predicting the T completion tokens of rows `inputs` [n, p + T]
    (input_ids, attention_mask, position_ids), with each shared prefix run once."""
    ids, mask, pos = inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]
    p, rep = share.prefix_width, share.representative
    cache = DynamicCache(config=getattr(unwrap_model(model), "config", None))
    head = model(
        **without_trailing_padding_mask(
            {
                "input_ids": ids[rep, :p],
                "attention_mask": mask[rep, :p],
                "position_ids": pos[rep, :p],
            }
        ),
        **cache_kwargs(model, cache),
        use_cache=True,
        logits_to_keep=1,
    ).logits  # [u, 1, V]: predicts completion token 0
    cache.batch_select_indices(share.owner)  # differentiable gather of the cache rows
    keep = torch.arange(share.completion_width - 1, device=ids.device)
    tail = model(
        # the mask spans the cached prefix columns too; dropped when only trailing padding
        **without_trailing_padding_mask(
            {"input_ids": ids[:, p:], "attention_mask": mask, "position_ids": pos[:, p:]}
        ),
        **cache_kwargs(model, cache),
        use_cache=True,
        logits_to_keep=keep,
    ).logits  # [n, T - 1, V]: position j predicts completion token j + 1
    return torch.cat([head[share.owner], tail], dim=1)
