"""Router capture and routing replay for transformers v5 MoE models.

Both work through one forward hook per router module (see `moe_routers` for what a v5 router
returns). Capture reads `(router_logits, _, router_indices)` off the router's output and never
changes it, so the model's outputs are bit-identical with and without capture. Replay swaps the
router's own top-k for given indices and recomputes the gate weights from the router's own logits
(`gate_weights`), so the router still gets gradients through them.

Routers moepost has not verified (kind "block_topk", found by `moe_discovery`) have no such
output: `moe_block_hooks` reads their logits off the router module and their routes off the
block's own `torch.topk`, and replays by changing what that top-k returns.

One forward call of a router is one record. Under gradient checkpointing the backward pass runs
each checkpointed layer's forward again; that recompute is recognised by running inside the
autograd engine (`torch._C._current_graph_task_id() != -1`): capture ignores it (the record of
the first forward is kept, and its logits still backpropagate through the recompute), and replay
hands the recompute the same indices its original forward used. Use non-reentrant checkpointing
(transformers' default): with the reentrant kind the first forward runs under no_grad, so the
captured logits carry no gradient.

The hooks need the router module to run in eager mode: a hub kernel that replaces the whole
sparse block (`use_kernels=True`, e.g. GPT-OSS's MegaBlocks MLP) bypasses the router, and
torch.compile has not been tried.

Cached generation (prefill, then one forward per new token): the prefill call records
N = B * prompt_len rows (padding rows included, batch-major), each decode step N = B rows.
`assemble_generation_routes` turns those records into per-token routes [L, B, T, K] for R3.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from moepost.components.moe.block_hooks import BlockTopkHooks, in_backward, merge_routes
from moepost.components.moe.routers import (
    MoELayerInfo,
    find_moe_layers,
    freeze_router,
    gate_weights,
    router_parameters,
    unwrap_model,
)

__all__ = [
    "MoELayerInfo",
    "ReplaySource",
    "RouterCapture",
    "RouterRecord",
    "assemble_generation_routes",
    "capture_routing",
    "find_moe_layers",
    "freeze_router",
    "replay_routing",
    "router_parameters",
    "unwrap_model",
]


class RouterRecord(NamedTuple):
    """One forward call of one router.

    logits [N, E]: raw router logits (None when captured with keep_logits=False);
    indices [N, K]: the experts actually used (the replayed ones under replay);
    own_indices [N, K]: the router's own top-k (the same tensor as `indices` without replay).
    """

    logits: torch.Tensor | None
    indices: torch.Tensor
    own_indices: torch.Tensor


_Handle = torch.utils.hooks.RemovableHandle | BlockTopkHooks  # both have remove()


@dataclass(eq=False)
class _RouterState:
    info: MoELayerInfo
    handle: _Handle
    captures: list[RouterCapture] = field(default_factory=list)
    replay: ReplaySource | None = None


_STATES: weakref.WeakKeyDictionary[nn.Module, _RouterState] = weakref.WeakKeyDictionary()


def _router_hook(
    module: nn.Module, args: tuple[object, ...], output: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    state = _STATES.get(module)
    if state is None:
        return None
    if not isinstance(output, tuple) or len(output) != 3:
        # e.g. a hub kernel replaced the forward: records and replay would silently go missing.
        raise RuntimeError(
            f"{type(module).__name__} at {state.info.name} did not return "
            "(router_logits, router_scores, router_indices); load the model without kernels"
        )
    logits, scores, own_indices = output
    recompute = in_backward()
    indices, new_output = own_indices, None
    if state.replay is not None:
        routes = state.replay._take(state.info.index, recompute=recompute)
        if routes is not None:
            indices = merge_routes(state.info, routes, own_indices)
            weights = gate_weights(state.info, logits, indices).to(scores.dtype)
            new_output = (logits, weights, indices)
    if not recompute:
        for capture in state.captures:
            capture._record(state.info.index, logits, indices, own_indices)
    return new_output


def _attach(info: MoELayerInfo) -> _RouterState:
    state = _STATES.get(info.router)
    if state is None:
        handle: _Handle
        if info.kind == "block_topk":
            router = info.router
            handle = BlockTopkHooks(
                info,
                take=lambda recompute: _block_routes(router, recompute),
                record=lambda *rows: _block_record(router, *rows),
            )
        else:
            handle = info.router.register_forward_hook(_router_hook)
        state = _RouterState(info=info, handle=handle)
        _STATES[info.router] = state
    return state


def _block_routes(router: nn.Module, recompute: bool) -> torch.Tensor | None:
    """Replay routes [N, K] for this call of a custom-router block (None: its own top-k)."""
    state = _STATES.get(router)
    if state is None or state.replay is None:
        return None
    return state.replay._take(state.info.index, recompute=recompute)


def _block_record(
    router: nn.Module, logits: torch.Tensor, indices: torch.Tensor, own: torch.Tensor
) -> None:
    state = _STATES.get(router)
    if state is not None:
        for capture in state.captures:
            capture._record(state.info.index, logits, indices, own)


def _detach_if_idle(router: nn.Module) -> None:
    state = _STATES.get(router)
    if state is not None and not state.captures and state.replay is None:
        state.handle.remove()
        del _STATES[router]


def _select(infos: list[MoELayerInfo], layers: Sequence[int] | None) -> list[MoELayerInfo]:
    if layers is None:
        return infos
    by_index = {info.index: info for info in infos}
    missing = [i for i in layers if i not in by_index]
    if missing:
        raise ValueError(f"MoE layers {missing} do not exist; the model has {len(infos)}")
    return [by_index[i] for i in layers]


class RouterCapture:
    """Per MoE layer, per forward call: raw router logits and chosen indices.

    `records[j]` lists the `RouterRecord`s of `layers[j]` (j is the position in `layers`, which
    is every MoE layer unless `capture_routing(layers=...)` picked some), one per forward call
    in call order. Logits keep their autograd graph when grad is enabled, so an aux loss built
    from them backpropagates to the router.
    """

    def __init__(self, layers: list[MoELayerInfo], *, keep_logits: bool = True) -> None:
        self.layers = layers
        self.keep_logits = keep_logits
        self.records: list[list[RouterRecord]] = [[] for _ in layers]
        self._slot = {info.index: j for j, info in enumerate(layers)}
        self._order: torch.Tensor | None = None  # see `reorder`

    def _record(
        self, index: int, logits: torch.Tensor, indices: torch.Tensor, own: torch.Tensor
    ) -> None:
        slot = self._slot.get(index)
        if slot is not None:
            kept = logits if self.keep_logits else None
            self.records[slot].append(RouterRecord(kept, indices, own))

    @property
    def num_calls(self) -> int:
        """Forward calls recorded (the same for every layer after whole-model forwards)."""
        return len(self.records[0]) if self.records else 0

    def clear(self) -> None:
        """Drop every record (and with them the graphs their logits hold)."""
        self.records = [[] for _ in self.layers]
        self._order = None

    def reorder(self, order: torch.Tensor) -> None:
        """Read the calls' rows as `cat(rows)[order]` from now on (a shared-prefix forward's
        records, read in the order of the padded forward they replace; rows may repeat)."""
        self._order = order

    def _gather(self, field_name: str, layer: int | None) -> torch.Tensor:
        slots = range(len(self.layers)) if layer is None else [self._slot_of(layer)]
        per_layer = []
        for slot in slots:
            parts = [getattr(r, field_name) for r in self.records[slot]]
            if not parts:
                raise RuntimeError(
                    f"no router calls recorded for MoE layer {self.layers[slot].index}"
                )
            if parts[0] is None:
                raise RuntimeError("router logits were not kept: capture with keep_logits=True")
            rows = torch.cat(parts, dim=0)
            per_layer.append(rows if self._order is None else rows[self._order.to(rows.device)])
        if layer is not None:
            return per_layer[0]
        if not per_layer:
            return torch.empty(0, 0, 0)
        return torch.stack(per_layer)

    def _slot_of(self, layer: int) -> int:
        if layer not in self._slot:
            raise ValueError(f"MoE layer {layer} was not captured")
        return self._slot[layer]

    def logits(self, layer: int | None = None) -> torch.Tensor:
        """Raw router logits: [L, N, E] over all captured layers, or [N, E] for MoE layer `layer`.

        N is the rows of every recorded call concatenated in call order. Empty [0, 0, 0] for a
        model without MoE layers.
        """
        return self._gather("logits", layer)

    def indices(self, layer: int | None = None) -> torch.Tensor:
        """Experts used, [L, N, K] (or [N, K] for one layer); the replayed ones under replay."""
        return self._gather("indices", layer)

    def own_indices(self, layer: int | None = None) -> torch.Tensor:
        """The routers' own top-k, [L, N, K] (or [N, K]); differs from `indices` under replay."""
        return self._gather("own_indices", layer)

    def call_sizes(self) -> list[int]:
        """Rows N of each recorded call of the first captured layer."""
        return [int(r.indices.shape[0]) for r in self.records[0]] if self.records else []


@contextmanager
def capture_routing(
    model: nn.Module, layers: Sequence[int] | None = None, *, keep_logits: bool = True
) -> Iterator[RouterCapture]:
    """Record every router call of `model` inside the block; see `RouterCapture`.

    `layers` picks MoE layers by their `MoELayerInfo.index`. A dense model yields an empty
    capture. Captures may nest (each gets every call).
    """
    capture = RouterCapture(_select(find_moe_layers(model), layers), keep_logits=keep_logits)
    states = [_attach(info) for info in capture.layers]
    for state in states:
        state.captures.append(capture)
    try:
        yield capture
    finally:
        for state in states:
            state.captures.remove(capture)
            _detach_if_idle(state.info.router)


class ReplaySource:
    """Routes to replay: `per_layer[l][c]` is the [N_c, K] index tensor for MoE layer l's c-th call.

    Each router consumes its own list in order, one entry per forward call. A recompute under
    gradient checkpointing takes back the entry of the latest not-yet-recomputed forward of that
    layer (last in, first out, which is the order backward visits micro-batches), so it replays
    exactly what the original forward used. With `repeat=True` every call gets entry 0 (one set
    of routes for any number of passes over the same tokens). Rows containing -1 are not replayed:
    the router keeps its own choice there (positions no route was recorded for).
    """

    def __init__(
        self, per_layer: Sequence[Sequence[torch.Tensor]], *, repeat: bool = False
    ) -> None:
        self.per_layer = [list(calls) for calls in per_layer]
        self.repeat = repeat
        if repeat and any(len(calls) != 1 for calls in self.per_layer):
            raise ValueError("ReplaySource(repeat=True) needs exactly one routes tensor per layer")
        self._cursor = [0] * len(self.per_layer)
        self._pending: list[list[torch.Tensor]] = [[] for _ in self.per_layer]

    @classmethod
    def single(cls, routes: torch.Tensor | Sequence[torch.Tensor]) -> ReplaySource:
        """One set of routes ([L, N, K] or L tensors [N, K]) reused by every forward call."""
        return cls([[r] for r in routes], repeat=True)

    @classmethod
    def from_capture(cls, capture: RouterCapture, *, repeat: bool = False) -> ReplaySource:
        """Replay the used indices of every call `capture` recorded, in the same order."""
        layer_calls = [[r.indices.detach() for r in records] for records in capture.records]
        if repeat:
            layer_calls = [[torch.cat(calls)] for calls in layer_calls]
        return cls(layer_calls, repeat=repeat)

    def rewind(self) -> None:
        """Start consuming from the first call again (e.g. the next epoch over the same batch)."""
        self._cursor = [0] * len(self.per_layer)
        self._pending = [[] for _ in self.per_layer]

    def remaining(self, layer: int) -> int:
        """Entries of `layer` not yet consumed by a forward call."""
        return len(self.per_layer[layer]) - self._cursor[layer]

    def _take(self, layer: int, *, recompute: bool) -> torch.Tensor | None:
        if layer >= len(self.per_layer):
            return None
        if self.repeat:
            return self.per_layer[layer][0]
        if recompute:
            if not self._pending[layer]:
                raise RuntimeError(
                    f"routing replay: MoE layer {layer} was recomputed (gradient checkpointing) "
                    "without a matching forward inside replay_routing"
                )
            return self._pending[layer].pop()
        cursor = self._cursor[layer]
        if cursor >= len(self.per_layer[layer]):
            raise RuntimeError(
                f"routing replay: MoE layer {layer} ran forward call {cursor + 1} but only "
                f"{len(self.per_layer[layer])} sets of routes were given"
            )
        self._cursor[layer] = cursor + 1
        routes = self.per_layer[layer][cursor]
        self._pending[layer].append(routes)
        return routes


@contextmanager
def replay_routing(
    model: nn.Module, routes: ReplaySource | torch.Tensor | Sequence[torch.Tensor]
) -> Iterator[ReplaySource]:
    """Inside the block every router of `model` uses the given experts instead of its own top-k.

    `routes`: a ReplaySource, or one set of routes ([L, N, K] tensor or L tensors [N, K]) used by
    every forward call. Gate weights are recomputed from the router's own logits at those
    indices (renormalised / scaled as the model does), so gradients reach the router. A dense
    model is a no-op.
    """
    source = routes if isinstance(routes, ReplaySource) else ReplaySource.single(routes)
    infos = find_moe_layers(model)
    if infos and len(source.per_layer) != len(infos):
        raise ValueError(
            f"routing replay: routes cover {len(source.per_layer)} MoE layers, "
            f"the model has {len(infos)}"
        )
    states = [_attach(info) for info in infos]
    for state in states:
        if state.replay is not None:
            raise RuntimeError(f"routing replay is already active on {state.info.name}")
    for state in states:
        state.replay = source
    try:
        yield source
    finally:
        for state in states:
            state.replay = None
            _detach_if_idle(state.info.router)


def assemble_generation_routes(
    capture: RouterCapture, batch_size: int, *, total_len: int | None = None
) -> torch.Tensor:
    """Per-token routes [L, B, T, K] from a capture around cached generation.

    Each recorded call holds B * t rows (batch-major: the prefill t = prompt_len, a decode step
    t = 1); calls are laid side by side along T in call order, so position p of row b is the p-th
    token fed to the model for that row: prompt (with its padding, as fed) then completion.
    The last generated token is never fed back, so its position (and anything up to `total_len`)
    is -1, which replay treats as "use the router's own choice". Positions that were padding
    hold the routes the padding got; mask them with the batch's attention mask. For a training
    batch laid out as [prompt as fed | completion] the result reshapes to [L, B*T, K] for replay.
    """
    per_layer = []
    for records in capture.records:
        parts = []
        for record in records:
            rows, top_k = record.indices.shape
            if rows % batch_size:
                raise ValueError(
                    f"a recorded call has {rows} rows, not a multiple of B={batch_size}"
                )
            parts.append(record.indices.reshape(batch_size, rows // batch_size, top_k))
        per_layer.append(torch.cat(parts, dim=1))
    routes = torch.stack(per_layer)
    if total_len is not None:
        fed = routes.shape[2]
        if total_len < fed:
            raise ValueError(f"total_len {total_len} is shorter than the {fed} tokens fed")
        pad = routes.new_full((*routes.shape[:2], total_len - fed, routes.shape[3]), -1)
        routes = torch.cat([routes, pad], dim=2)
    return routes
