"""The router policy of a run: aux / z loss, expert-utilisation monitoring, drift, replay, freezing.

Both recipes talk to the router through one `RouterTools` object, so the loops stay readable:
`capture()` around a training forward, `losses()` after it, `flush()` when a step is logged.
A dense model (no MoE layers) makes every method a no-op.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from moepost.algorithms.moe import routing_counts
from moepost.components.moe.capture import (
    ReplaySource,
    RouterCapture,
    capture_routing,
    find_moe_layers,
    freeze_router,
    replay_routing,
    unwrap_model,
)
from moepost.components.moe.discovery import set_router_module
from moepost.components.moe.expert_monitor import ExpertMonitor
from moepost.components.moe.experts import experts_in_use
from moepost.components.moe.router_loss import GlobalRouteCounts, router_aux_loss
from moepost.components.rollout.routes import rollout_row_routes
from moepost.components.rollout.shared_prefix import PrefixShare
from moepost.config.schema import MoEConfig

ALL = slice(None)  # every column of a micro-batch's rows
# Which tokens of a micro-batch's rows [n, S] a forward saw, in router order: leading columns
# cut (a slice of columns, row-major), or a [n, S] bool mask (padding-free packing: the real
# tokens, row after row).
Tokens = slice | torch.Tensor


def select_tokens(x: torch.Tensor, tokens: Tokens) -> torch.Tensor:
    """x [L, n, S, ...] -> [L, N, ...]: the entries of the tokens a forward saw, router order."""
    if isinstance(tokens, slice):
        picked = x[:, :, tokens]
        return picked.reshape(x.shape[0], -1, *x.shape[3:])
    return x[:, tokens]


def _replay_source(routes: torch.Tensor, share: PrefixShare | None) -> ReplaySource:
    """Padded-order routes [L, N, K] for one forward, or split over a shared-prefix forward's
    two calls."""
    return (
        ReplaySource.single(routes) if share is None else ReplaySource(share.split_routes(routes))
    )


class RouterTools:
    def __init__(self, model: torch.nn.Module, cfg: MoEConfig) -> None:
        self.model = model
        self.cfg = cfg
        set_router_module(unwrap_model(model), cfg.router_module)
        self.layers = find_moe_layers(model)
        self.num_layers = len(self.layers)
        self.num_experts = self.layers[0].num_experts if self.layers else 0
        self.top_k = self.layers[0].top_k if self.layers else 0
        config = getattr(unwrap_model(model), "config", None)
        default_coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
        coef = cfg.router_aux_loss_coef if cfg.router_aux_loss_coef is not None else default_coef
        self.aux_coef = coef if self.layers else 0.0
        self.z_coef = cfg.router_z_loss_coef if self.layers else 0.0
        self.aux_enabled = self.aux_coef > 0 or self.z_coef > 0
        self.monitor = bool(cfg.monitor_expert_utilization and self.layers)
        self.frozen = freeze_router(model) if cfg.freeze_router and self.layers else 0
        self.expert_monitor = ExpertMonitor(self.num_experts, cfg)
        # Routing replay / drift state of the current RL batch, keyed by micro-batch slice.
        self.rollout_routes: torch.Tensor | None = None  # [L, N, S, K] (-1 = none recorded)
        self._recorded: dict[tuple[int, int], torch.Tensor] = {}
        # aux_loss_scope=global: expert counts of the whole step (all micro-batches, all ranks).
        self._step_counts: torch.Tensor | None = None
        self._step_tokens = 0.0
        self._last_update: dict[tuple[int, int], torch.Tensor] = {}

    def describe(self) -> str:
        if not self.layers:
            return "no MoE layers (dense model): router tools off"
        kind = self.layers[0].kind
        if kind == "block_topk":  # the WARN of moe_discovery says more
            kind += f" at {self.layers[0].name}, not verified: run moepost doctor"
        parts = [
            f"{self.num_layers} MoE layers ({kind}, E={self.num_experts}, K={self.top_k})",
            f"aux coef {self.aux_coef:g}",
        ]
        impl = experts_in_use(self.model)
        if impl is not None:
            parts.append(f"experts {impl}")
        if self.z_coef:
            parts.append(f"z coef {self.z_coef:g}")
        if self.frozen:
            parts.append(f"router frozen ({self.frozen} tensors)")
        if self.cfg.routing_replay != "none":
            parts.append(f"routing replay {self.cfg.routing_replay}")
        return ", ".join(parts)

    @property
    def active(self) -> bool:
        return bool(self.layers) and (self.aux_enabled or self.monitor or self.replaying)

    @property
    def replaying(self) -> bool:
        return bool(self.layers) and self.cfg.routing_replay != "none"

    @contextmanager
    def capture(self, replay: ReplaySource | None = None) -> Iterator[RouterCapture | None]:
        """Capture routing of the forward passes inside (and replay `replay` routes if given)."""
        if not self.layers or not (self.active or replay is not None):
            yield None
            return
        with ExitStack() as stack:
            if replay is not None:
                stack.enter_context(replay_routing(self.model, replay))
            yield stack.enter_context(capture_routing(self.model, keep_logits=self.aux_enabled))

    def losses(
        self, cap: RouterCapture | None, token_mask: torch.Tensor, *, share: float
    ) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Aux (+ z) loss of one micro-batch from the captured raw logits; padding excluded.

        token_mask: [N] real tokens in router row order. `share` is this micro-batch's share of
        the step's tokens: the returned loss is scaled by it, so the micro-batches of a step add
        up to a token-weighted mean of their aux losses.
        """
        if cap is None or cap.num_calls == 0:
            return None, {}
        mask = token_mask.to(cap.indices().device)
        if self.monitor:
            self.expert_monitor.add_load(cap.indices(), mask)
        if not self.aux_enabled:
            return None, {}
        counts = None
        if self._step_counts is not None:
            counts = GlobalRouteCounts(self._step_counts, self._step_tokens)
        total, metrics = router_aux_loss(
            cap.logits(),
            mask,
            top_k=self.top_k,
            aux_coef=self.aux_coef,
            z_coef=self.z_coef,
            global_counts=counts,
        )
        return total * share, metrics

    def flush(
        self, step: int, *, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> tuple[dict[str, float], dict[str, Any] | None]:
        """`moe/*` metrics since the last flush, and the `expert_load.jsonl` row
        (`ExpertMonitor.flush`)."""
        return self.expert_monitor.flush(step, reduce_sum=reduce_sum)

    # ---- aux_loss_scope=global ----------------------------------------------------------------

    @property
    def global_scope(self) -> bool:
        return self.aux_enabled and self.cfg.aux_loss_scope == "global"

    def add_step_counts(self, cap: RouterCapture | None, token_mask: torch.Tensor) -> None:
        """Counting pre-pass of one micro-batch: add its (layer-pooled) expert counts.

        The counts are not differentiable, so a no-grad pass before the step's first backward
        gives the exact global-batch f_e at the cost of one extra forward per micro-batch.
        """
        if cap is None or cap.num_calls == 0:
            return
        mask = token_mask.to(cap.indices().device)
        counts = routing_counts(cap.indices(), self.num_experts, mask)
        self._step_counts = counts if self._step_counts is None else self._step_counts + counts
        self._step_tokens += float(mask.sum())

    def reduce_step_counts(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Data parallel: sum the counting passes of all ranks (one collective), so f_e and
        the token count are the global batch's. Call on every rank after the counting pass."""
        if self._step_counts is None:
            return
        counts = self._step_counts
        tokens = torch.tensor([self._step_tokens], dtype=torch.float64, device=counts.device)
        packed = reduce_sum(torch.cat([counts.double().flatten(), tokens]))
        self._step_counts = packed[:-1].reshape(counts.shape).to(counts.dtype)
        self._step_tokens = float(packed[-1])

    def end_step(self) -> None:
        self._step_counts = None
        self._step_tokens = 0.0

    # ---- RL: routing replay and drift -------------------------------------------------------

    @contextmanager
    def record_routes(
        self, sl: slice, cols: Tokens = ALL, share: PrefixShare | None = None
    ) -> Iterator[None]:
        """Old-policy pass of micro-batch `sl` (columns `cols` of the step's rows; `share`: a
        shared-prefix forward): record its routes (R2 replays them)."""
        if not self.layers or self.cfg.routing_replay != "r2":
            yield None
            return
        replay = self._rollout_replay(sl, cols, share)
        with ExitStack() as stack:
            if replay is not None:
                stack.enter_context(replay_routing(self.model, replay))
            cap = stack.enter_context(capture_routing(self.model, keep_logits=False))
            yield None
        if share is not None:
            cap.reorder(share.to_padded)
        self._recorded[(sl.start, sl.stop)] = cap.indices()

    def _rollout_replay(
        self, sl: slice, cols: Tokens, share: PrefixShare | None
    ) -> ReplaySource | None:
        if self.cfg.routing_replay != "r3" or self.rollout_routes is None:
            return None
        return _replay_source(select_tokens(self.rollout_routes[:, sl], cols), share)

    def replay_for(
        self, sl: slice, update_index: int, cols: Tokens = ALL, share: PrefixShare | None = None
    ) -> ReplaySource | None:
        """Routes the training pass of micro-batch `sl` (columns `cols`; `share`: a
        shared-prefix forward) must use (None: the router decides)."""
        if not self.layers:
            return None
        if self.cfg.routing_replay == "r3":
            return self._rollout_replay(sl, cols, share)
        recorded = self._recorded.get((sl.start, sl.stop))
        if self.cfg.routing_replay == "r2" and recorded is not None:
            return _replay_source(recorded, share)
        return None

    def observe_training_routes(
        self,
        cap: RouterCapture | None,
        sl: slice,
        token_mask: torch.Tensor,
        update_index: int,
        cols: Tokens = ALL,
    ) -> None:
        """Drift of this training pass against the rollout routes and the previous update."""
        if cap is None or cap.num_calls == 0:
            return
        used = cap.indices()
        own = cap.own_indices()
        if self.rollout_routes is not None and update_index == 0:
            ref = select_tokens(self.rollout_routes[:, sl], cols)
            mask = token_mask & (ref[0, :, 0] >= 0)
            self.expert_monitor.add_drift("moe/route_flip_rate_rollout_train", ref, used, mask)
            self.expert_monitor.add_drift("moe/route_flip_rate_rollout_train_own", ref, own, mask)
        key = (sl.start, sl.stop)
        if update_index > 0 and key in self._last_update:
            prev = self._last_update[key]
            self.expert_monitor.add_drift("moe/route_flip_rate_update", prev, own, token_mask)
        self._last_update[key] = own.detach()

    @property
    def wants_generation_routes(self) -> bool:
        return bool(self.layers) and (self.monitor or self.cfg.routing_replay == "r3")

    @contextmanager
    def capture_generation(self, engine: Any) -> Iterator[list[Any]]:
        """Capture the routes of every forward of `engine.generate` (phase-tagged).

        Yields a list that, after the block, holds (capture, phases) for `generation_routes`.
        """
        holder: list[Any] = []
        if not self.wants_generation_routes or not hasattr(engine, "step_callback"):
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
            with capture_routing(self.model, keep_logits=False) as cap:
                yield holder
        finally:
            engine.step_callback = previous
        holder.extend([cap, phases])

    def generation_routes(
        self, holder: list[Any], prompts: list[list[int]], batch: Any, micro_batch_size: int
    ) -> list[torch.Tensor] | None:
        """Per-row routes [L, len(prompt)+len(completion), K] from a generation capture
        (`rollout_routes.rollout_row_routes`); None without one."""
        if not holder:
            return None
        cap, phases = holder
        return rollout_row_routes(
            cap, phases, prompts, batch, micro_batch_size, self.num_layers, self.top_k
        )

    def set_rollout_routes(
        self, routes: list[torch.Tensor] | None, prompt_ids: list[list[int]], width: int, p_len: int
    ) -> None:
        """Lay per-row routes out like the training tensors: [L, N, S, K], prompt ending at P."""
        if routes is None:
            self.rollout_routes = None
            return
        out = torch.full((self.num_layers, len(routes), width, self.top_k), -1, dtype=torch.long)
        for r, (row_routes, prompt) in enumerate(zip(routes, prompt_ids)):
            start = p_len - len(prompt)
            n = min(row_routes.shape[1], width - start)
            out[:, r, start : start + n] = row_routes[:, :n]
        self.rollout_routes = out.to(self.layers[0].weight.device)

    def end_batch(self) -> None:
        """Forget the routes of the batch just trained on."""
        self._recorded.clear()
        self._last_update.clear()
        self.rollout_routes = None
