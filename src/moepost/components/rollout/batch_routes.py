"""The routes of one RL batch, as a value the loop passes to its passes and drops with the batch.

- `capture_generation` records the routes of the rollout's forwards; `generation_routes` turns
  them into per-row routes (`routes.rollout_row_routes`).
- `batch_routes` lays them out like the step's training tensors ([L, N, S, K]).
- The old-policy pass returns the routes it took (R2 replays them: `with_recorded`); every
  training pass returns its own routes (drift against the previous update: `with_previous`).
- `replay_for` says which routes a pass must use; `observe_drift` adds the drift figures of a
  training pass to the run's `ExpertMonitor`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from moepost.components.moe.capture import ReplaySource, RouterCapture, capture_routing
from moepost.components.moe.expert_monitor import ExpertMonitor
from moepost.components.moe.router_setup import ALL, Replay, RouterSetup, Tokens, select_tokens
from moepost.components.rollout.routes import rollout_row_routes
from moepost.components.rollout.shared_prefix import PrefixShare

SliceKey = tuple[int, int]  # (start, stop) of a micro-batch's rows


def slice_key(sl: slice) -> SliceKey:
    return (int(sl.start or 0), int(sl.stop))


def _replay_source(routes: torch.Tensor, share: PrefixShare | None) -> ReplaySource:
    """Padded-order routes [L, N, K] for one forward, or split over a shared-prefix forward's
    two calls."""
    if share is None:
        return ReplaySource.single(routes)
    return ReplaySource(share.split_routes(routes))


@dataclass(frozen=True)
class BatchRoutes:
    """Routes of the batch being trained on; a new value for each batch, never changed."""

    replay: Replay = "none"
    rollout: torch.Tensor | None = None  # [L, N, S, K] from the rollout (-1: none recorded)
    recorded: Mapping[SliceKey, torch.Tensor] = field(default_factory=dict)  # old-policy pass
    previous: Mapping[SliceKey, torch.Tensor] = field(default_factory=dict)  # last update's own

    def with_recorded(self, recorded: Mapping[SliceKey, torch.Tensor]) -> BatchRoutes:
        return replace(self, recorded=dict(recorded))

    def with_previous(self, previous: Mapping[SliceKey, torch.Tensor]) -> BatchRoutes:
        return replace(self, previous=dict(previous))

    def rollout_replay(
        self, sl: slice, cols: Tokens = ALL, share: PrefixShare | None = None
    ) -> ReplaySource | None:
        """R3: the rollout's routes for rows `sl` (columns `cols`; `share`: shared prefixes)."""
        if self.replay != "r3" or self.rollout is None:
            return None
        return _replay_source(select_tokens(self.rollout[:, sl], cols), share)

    def replay_for(
        self, sl: slice, cols: Tokens = ALL, share: PrefixShare | None = None
    ) -> ReplaySource | None:
        """Routes the training pass of rows `sl` must use (None: the router decides)."""
        if self.replay == "r3":
            return self.rollout_replay(sl, cols, share)
        recorded = self.recorded.get(slice_key(sl))
        if self.replay == "r2" and recorded is not None:
            return _replay_source(recorded, share)
        return None


def batch_routes(
    setup: RouterSetup,
    routes: list[torch.Tensor] | None,
    prompt_ids: list[list[int]],
    width: int,
    p_len: int,
) -> BatchRoutes:
    """Per-row routes laid out like the training tensors: [L, N, S, K], prompts ending at P."""
    if routes is None or not setup.layers:
        return BatchRoutes(setup.replay if setup.layers else "none")
    out = torch.full((setup.num_layers, len(routes), width, setup.top_k), -1, dtype=torch.long)
    for r, (row_routes, prompt) in enumerate(zip(routes, prompt_ids)):
        start = p_len - len(prompt)
        n = min(row_routes.shape[1], width - start)
        out[:, r, start : start + n] = row_routes[:, :n]
    return BatchRoutes(setup.replay, out.to(setup.layers[0].weight.device))


def observe_drift(
    monitor: ExpertMonitor,
    routes: BatchRoutes,
    cap: RouterCapture | None,
    sl: slice,
    token_mask: torch.Tensor,
    update_index: int,
    cols: Tokens = ALL,
) -> torch.Tensor | None:
    """Drift of training pass `sl` against the rollout (first update) and against the previous
    update; returns the pass's own routes [L, N, K] (detached) for the next update."""
    if cap is None or cap.num_calls == 0:
        return None
    used, own = cap.indices(), cap.own_indices()
    if routes.rollout is not None and update_index == 0:
        ref = select_tokens(routes.rollout[:, sl], cols)
        mask = token_mask & (ref[0, :, 0] >= 0)
        monitor.add_drift("moe/route_flip_rate_rollout_train", ref, used, mask)
        monitor.add_drift("moe/route_flip_rate_rollout_train_own", ref, own, mask)
    previous = routes.previous.get(slice_key(sl))
    if update_index > 0 and previous is not None:
        monitor.add_drift("moe/route_flip_rate_update", previous, own, token_mask)
    return own.detach()


@contextmanager
def capture_generation(setup: RouterSetup, engine: Any) -> Iterator[list[Any]]:
    """Capture the routes of every forward of `engine.generate` (phase-tagged).

    Yields a list that, after the block, holds (capture, phases) for `generation_routes`; it
    stays empty when the run needs no rollout routes or the engine reports no steps.
    """
    holder: list[Any] = []
    if not setup.wants_generation_routes or not hasattr(engine, "step_callback"):
        yield holder
        return
    phases: list[tuple[str, torch.Tensor | None]] = []  # (phase, chunk rows of the call)
    previous = engine.step_callback

    def callback(step: int, phase: str) -> None:
        phases.append((phase, getattr(engine, "batch_rows", None)))
        if previous is not None:
            previous(step, phase)

    engine.step_callback = callback
    try:
        with capture_routing(setup.model, keep_logits=False) as cap:
            yield holder
    finally:
        engine.step_callback = previous
    holder.extend([cap, phases])


def generation_routes(
    setup: RouterSetup,
    holder: list[Any],
    prompts: list[list[int]],
    batch: Any,
    micro_batch_size: int,
) -> list[torch.Tensor] | None:
    """Per-row routes [L, len(prompt)+len(completion), K] from a generation capture; None
    without one."""
    if not holder:
        return None
    cap, phases = holder
    return rollout_row_routes(
        cap, phases, prompts, batch, micro_batch_size, setup.num_layers, setup.top_k
    )


@contextmanager
def recording_routes(
    setup: RouterSetup | None, share: PrefixShare | None
) -> Iterator[list[torch.Tensor]]:
    """R2's old-policy pass of one micro-batch: yields a list that holds, after the block, the
    routes [L, N, K] the pass took in padded row order (empty: no recording, not R2)."""
    out: list[torch.Tensor] = []
    if setup is None or not setup.layers or setup.replay != "r2":
        yield out
        return
    with capture_routing(setup.model, keep_logits=False) as cap:
        yield out
    if share is not None:
        cap.reorder(share.to_padded)
    out.append(cap.indices())
