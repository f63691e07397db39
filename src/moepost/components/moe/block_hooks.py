"""Capture and replay for routers moepost has not verified: the block's own top-k, intercepted.

A v5 `*TopKRouter` returns its top-k indices, so one hook on it sees everything (`moe`). A custom
router (kind "block_topk", see `moe_discovery`) is usually a plain linear gate whose output the
MoE block turns into routes itself (`softmax`, `torch.topk`, maybe a renormalisation). So:

- a forward hook on the router takes its output (a tensor [..., E], or a tuple starting with
  one) as the raw router logits of this block call; a router that returns only its routes
  (top-k inside it, e.g. `(indices, weights)` as DeepSeek-style hub code does) gets its logits
  recomputed as `x W^T (+ b)` from its input x and its [E, H] weight, with their gradient;
- around the block's forward a `TorchFunctionMode` watches `torch.topk` / `Tensor.topk`; the
  first call with k = K over a last dimension of E experts is the block's routing choice. Its
  indices are captured; under replay the call returns the replayed indices instead, with the
  values gathered from the same input, so everything the block computes afterwards (gate
  weights, renormalisation) is the block's own arithmetic at the replayed experts and keeps its
  gradient to the router.

Every other op inside the block passes through the mode unchanged. `moepost doctor` verifies on
a real forward that this reading of the block is right (see `tools/doctor_router`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from moepost.components.moe.routers import MoELayerInfo

_TOPK = (torch.topk, torch.Tensor.topk)
_KEY_HINT = "set moe.router_module to the module that computes the router logits"

# (logits [N, E], used [N, K], own [N, K]) of one block call
Record = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
Take = Callable[[bool], torch.Tensor | None]  # recompute -> replay routes [N, K] or None


def in_backward() -> bool:
    """True while the autograd engine runs, i.e. during a gradient-checkpointing recompute."""
    return torch._C._current_graph_task_id() != -1


def merge_routes(
    info: MoELayerInfo, routes: torch.Tensor, own_indices: torch.Tensor
) -> torch.Tensor:
    """Replayed indices [N, K]; rows holding any -1 keep the router's own choice."""
    if routes.shape != own_indices.shape:
        raise RuntimeError(
            f"routing replay: routes for MoE layer {info.index} ({info.name}) have shape "
            f"{tuple(routes.shape)} but the router produced {tuple(own_indices.shape)} "
            "(tokens x top_k); replay routes must come from the same tokens in the same order"
        )
    routes = routes.to(device=own_indices.device, dtype=own_indices.dtype, non_blocking=True)
    unset = (routes < 0).any(dim=-1, keepdim=True)
    return torch.where(unset, own_indices, routes)


def _topk_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """(input, k, dim, largest) of a `torch.topk(input, k, dim, largest)` / `Tensor.topk` call."""
    x = args[0] if args else kwargs.get("input", kwargs.get("self"))
    k = args[1] if len(args) > 1 else kwargs.get("k")
    dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
    largest = args[3] if len(args) > 3 else kwargs.get("largest", True)
    return x, k, dim, largest


class _BlockTopk(TorchFunctionMode):
    """Active during one forward of one MoE block: finds, records and (replay) swaps its top-k."""

    def __init__(self, info: MoELayerInfo, routes: torch.Tensor | None) -> None:
        super().__init__()
        self.info = info
        self.routes = routes
        self.logits: torch.Tensor | None = None
        self.used: torch.Tensor | None = None
        self.own: torch.Tensor | None = None

    def _is_routing_topk(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        x, k, dim, largest = _topk_arguments(args, kwargs)
        if not isinstance(x, torch.Tensor) or x.ndim == 0 or k is None or not largest:
            return False
        last = dim in (-1, x.ndim - 1)
        return last and x.shape[-1] == self.info.num_experts and int(k) == self.info.top_k

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func not in _TOPK or not self._is_routing_topk(args, kwargs):
            return out
        if self.own is not None:  # a later top-k of the same shape: not the routing one
            return out
        values, own = out
        self.own = own.reshape(-1, self.info.top_k)
        if self.routes is None:
            self.used = self.own
            return out
        self.used = merge_routes(self.info, self.routes, self.own)
        used = self.used.reshape(own.shape)
        x = _topk_arguments(args, kwargs)[0]
        return torch.return_types.topk((x.gather(-1, used), used))


@dataclass(eq=False)
class BlockTopkHooks:
    """The three hooks of one custom-router MoE layer; `remove()` takes them all off."""

    info: MoELayerInfo
    take: Take
    record: Record
    handles: tuple[torch.utils.hooks.RemovableHandle, ...] = ()

    def __post_init__(self) -> None:
        block = self.info.block
        if block is None:
            raise ValueError(f"MoE layer {self.info.index} ({self.info.name}) has no block")
        self._calls: list[_BlockTopk] = []  # stack: a block does not nest, but be safe
        self.handles = (
            block.register_forward_pre_hook(self._enter),
            block.register_forward_hook(self._leave, always_call=True),
            self.info.router.register_forward_hook(self._router_out),
        )

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _enter(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        mode = _BlockTopk(self.info, self.take(in_backward()))
        mode.__enter__()
        self._calls.append(mode)

    def _router_out(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self._calls or self._calls[-1].logits is not None:
            return  # called outside its block, or again inside it: the first call routes
        logits = output[0] if isinstance(output, (tuple, list)) and output else output
        num_experts = self.info.num_experts
        if isinstance(logits, torch.Tensor) and logits.is_floating_point():
            if logits.shape[-1] == num_experts:
                self._calls[-1].logits = logits.reshape(-1, num_experts)
                return
        self._calls[-1].logits = self._recompute(args, output)

    def _recompute(self, args: tuple[Any, ...], output: Any) -> torch.Tensor:
        """Logits [N, E] = x W^T (+ b) from the router's input x [..., H], for a router that
        returns only its routes (top-k inside, e.g. `(indices, weights)`): by the definition
        of a router found by shape, its logits are that linear map of its input."""
        weight, bias = self.info.weight, self.info.bias
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.shape[-1] != weight.shape[1]:
            got = [tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__
                   for o in (output if isinstance(output, (tuple, list)) else [output])]  # fmt: skip
            raise RuntimeError(
                f"MoE layer {self.info.index}: router {self.info.name} returned {got}, not "
                f"logits [..., E={self.info.num_experts}], and its first input is not the hidden "
                f"states [..., H={weight.shape[1]}]; {_KEY_HINT}"
            )
        flat = x.reshape(-1, x.shape[-1]).to(weight.dtype)
        return torch.nn.functional.linear(flat, weight, bias)

    def _leave(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        mode = self._calls.pop()
        mode.__exit__(None, None, None)
        if output is None or in_backward():
            return  # the forward raised, or a checkpoint recompute (recorded the first time)
        where = f"MoE layer {self.info.index} ({self.info.name})"
        if mode.logits is None:
            raise RuntimeError(f"{where}: the block ran without calling its router; {_KEY_HINT}")
        if mode.used is None or mode.own is None:
            raise RuntimeError(
                f"{where}: no torch.topk with k={self.info.top_k} over the "
                f"{self.info.num_experts} experts ran in the block, so its routes cannot be "
                f"captured; {_KEY_HINT}"
            )
        if mode.used.shape[0] != mode.logits.shape[0]:
            raise RuntimeError(
                f"{where}: the block's top-k covers {mode.used.shape[0]} tokens but the router "
                f"gave logits for {mode.logits.shape[0]}; {_KEY_HINT}"
            )
        self.record(mode.logits, mode.used, mode.own)
