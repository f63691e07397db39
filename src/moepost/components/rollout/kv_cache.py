"""A transformers DynamicCache whose full-attention layers grow in place.

transformers' DynamicLayer appends each decode step's keys/values with `torch.cat`, which copies
the whole cache of every layer at every token: O(L) work per token, O(L^2) per sequence, and ~12%
of the bench's generation time on CPU (docs/benchmarks.md). `ReservedLayer` keeps its keys and
values in a buffer with room for `reserve` more tokens and returns views of the filled part, so
a decode step writes one position. Results are bit-identical: the same values reach attention,
only their storage differs (a strided view, which sdpa and eager attention accept).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from moepost.components.moe.routers import unwrap_model


class ReservedLayer(DynamicLayer):
    """DynamicLayer with `reserve` spare positions; keys/values [B, H, S, D] are views."""

    def __init__(self, reserve: int) -> None:
        super().__init__()
        self.reserve = reserve
        self._key_buf: torch.Tensor | None = None
        self._value_buf: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old = self.get_seq_length()
        new = old + key_states.shape[-2]
        buf = self._key_buf
        if buf is None or new > buf.shape[-2] or buf.shape[:-2] != key_states.shape[:-2]:
            assert self.keys is not None and self.values is not None  # lazy_initialization
            self._key_buf = self._regrow(self.keys, key_states, old, new)
            self._value_buf = self._regrow(self.values, value_states, old, new)
        assert self._key_buf is not None and self._value_buf is not None
        self._key_buf[..., old:new, :].copy_(key_states)
        self._value_buf[..., old:new, :].copy_(value_states)
        self.keys = self._key_buf[..., :new, :]
        self.values = self._value_buf[..., :new, :]
        return self.keys, self.values

    def _regrow(
        self, current: torch.Tensor, incoming: torch.Tensor, old: int, new: int
    ) -> torch.Tensor:
        """A buffer for `new + reserve` positions holding the `old` ones already cached."""
        shape = (*incoming.shape[:-2], new + self.reserve, incoming.shape[-1])
        buf = incoming.new_empty(shape)
        if old:
            buf[..., :old, :].copy_(current)
        return buf

    def _drop_buffers(self) -> None:
        # keys/values were replaced by new tensors; the next update re-buffers them
        self._key_buf = self._value_buf = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._drop_buffers()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._drop_buffers()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._drop_buffers()

    def reset(self) -> None:
        super().reset()
        self._drop_buffers()


def reserved_cache(config: Any, reserve: int) -> DynamicCache:
    """DynamicCache for `config` whose plain full-attention layers are ReservedLayers.

    Sliding-window, linear-attention and other special layers keep transformers' own classes.
    """
    cache = DynamicCache(config=config)
    cache.layers = [
        ReservedLayer(reserve) if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """`{name: cache}` for a forward call of `model`, `name` being the keyword its forward takes.

    transformers 5.2x renamed `past_key_values` to `cache` and warns (FutureWarning) on the old
    name; a `trust_remote_code` model written for older releases only knows `past_key_values`
    and would swallow `cache=` in its `**kwargs`, decoding every step without the cache. So the
    name comes from the forward's own signature (through peft / DDP wrappers).
    """
    forward = type(unwrap_model(model)).forward
    name = _CACHE_KWARG.get(forward)
    if name is None:
        params = inspect.signature(forward).parameters
        name = "cache" if "cache" in params else "past_key_values"
        _CACHE_KWARG[forward] = name
    return {name: cache}


_CACHE_KWARG: dict[Any, str] = {}  # per forward function: its cache keyword


def drop_finished_rows(
    cache: Any, rows: torch.Tensor | None, running: torch.Tensor, n: int
) -> torch.Tensor | None:
    """Drop finished rows from the decode batch once they are a quarter of it.

    rows: chunk rows the cache holds, in cache order (None: all n); running [n] bool. Returns
    the rows of the next forward. Dropping copies the remaining KV cache rows once, so it waits
    until enough rows have finished to pay for it. With no row running (lock-step generation:
    other ranks still decode) one finished row stays, so the forward has a batch.
    """
    held = torch.arange(n, device=running.device) if rows is None else rows
    keep = running[held]
    if not keep.any():
        keep = torch.zeros_like(keep)
        keep[0] = True
    if keep.all() or int((~keep).sum()) * 4 < held.numel():
        return rows
    cache.batch_select_indices(keep.nonzero().squeeze(1))
    return held[keep]
