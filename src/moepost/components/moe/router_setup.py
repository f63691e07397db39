"""The router policy of a run as explicit values: aux / z loss, monitoring, freezing, replay mode.

`router_setup(model, cfg)` runs once per run (it points discovery at `moe.router_module` and
freezes the router when asked) and returns a frozen `RouterSetup`. Everything after that is a
call without hidden state:

- `capture_router(setup, replay)` around a training forward;
- `route_counts` / `reduce_route_counts` for the global-scope pre-pass, whose result the loop
  passes back in, as the policy losses take `num_global_tokens`;
- `aux_loss(setup, cap, mask, share=..., counts=...)`, which returns the loss and changes
  nothing;
- `record_load(monitor, setup, cap, mask)`, which adds expert load to the `ExpertMonitor` that
  the loop owns and flushes when it logs a step.

A dense model (no MoE layers) makes every call a no-op.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Literal

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
from moepost.components.moe.routers import MoELayerInfo
from moepost.config.schema import MoEConfig

ALL = slice(None)  # every column of a micro-batch's rows
# Which tokens of a micro-batch's rows [n, S] a forward saw, in router order: leading columns
# cut (a slice of columns, row-major), or a [n, S] bool mask (padding-free packing: the real
# tokens, row after row).
Tokens = slice | torch.Tensor
Replay = Literal["none", "r2", "r3"]


def select_tokens(x: torch.Tensor, tokens: Tokens) -> torch.Tensor:
    """x [L, n, S, ...] -> [L, N, ...]: the entries of the tokens a forward saw, router order."""
    if isinstance(tokens, slice):
        picked = x[:, :, tokens]
        return picked.reshape(x.shape[0], -1, *x.shape[3:])
    return x[:, tokens]


@dataclass(frozen=True)
class RouterSetup:
    """What a run does with its routers; fixed for the run (`router_setup`).

    `model` is the model as loaded (under any DDP / DeepSpeed wrapper the loop trains through):
    captures and replays hook its routers, whichever wrapper runs the forward.
    """

    model: torch.nn.Module = field(repr=False, compare=False)
    layers: tuple[MoELayerInfo, ...]
    aux_coef: float  # load-balancing coefficient (0 for a dense model)
    z_coef: float
    monitor: bool  # expert-load monitoring on (and the model has MoE layers)
    replay: Replay  # `moe.routing_replay`
    aux_scope: str  # `moe.aux_loss_scope`: "micro_batch" or "global"
    frozen: int  # router tensors frozen by `moe.freeze_router`

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_experts(self) -> int:
        return self.layers[0].num_experts if self.layers else 0

    @property
    def top_k(self) -> int:
        return self.layers[0].top_k if self.layers else 0

    @property
    def aux_enabled(self) -> bool:
        return self.aux_coef > 0 or self.z_coef > 0

    @property
    def global_scope(self) -> bool:
        """aux_loss_scope=global: the step needs a counting pre-pass (`route_counts`)."""
        return self.aux_enabled and self.aux_scope == "global"

    @property
    def replaying(self) -> bool:
        return bool(self.layers) and self.replay != "none"

    @property
    def active(self) -> bool:
        """A training forward needs a router capture."""
        return bool(self.layers) and (self.aux_enabled or self.monitor or self.replaying)

    @property
    def wants_generation_routes(self) -> bool:
        """The rollout's routes are needed: monitoring (drift) or R3 replay."""
        return bool(self.layers) and (self.monitor or self.replay == "r3")


def router_setup(model: torch.nn.Module, cfg: MoEConfig) -> RouterSetup:
    """Find the MoE layers (after pointing discovery at `moe.router_module`), resolve the aux
    coefficient (the model config's `router_aux_loss_coef` unless set) and freeze the router
    when `moe.freeze_router`. Call once per model, before wrapping it."""
    set_router_module(unwrap_model(model), cfg.router_module)
    layers = tuple(find_moe_layers(model))
    config = getattr(unwrap_model(model), "config", None)
    default_coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    coef = cfg.router_aux_loss_coef if cfg.router_aux_loss_coef is not None else default_coef
    return RouterSetup(
        model=model,
        layers=layers,
        aux_coef=coef if layers else 0.0,
        z_coef=cfg.router_z_loss_coef if layers else 0.0,
        monitor=bool(cfg.monitor_expert_utilization and layers),
        replay=cfg.routing_replay,
        aux_scope=cfg.aux_loss_scope,
        frozen=freeze_router(model) if cfg.freeze_router and layers else 0,
    )


def describe_router(setup: RouterSetup) -> str:
    """The run log's one-line summary of the router policy."""
    if not setup.layers:
        return "no MoE layers (dense model): router tools off"
    first = setup.layers[0]
    kind: str = first.kind
    if kind == "block_topk":  # the WARN of moe_discovery says more
        kind += f" at {first.name}, not verified: run moepost doctor"
    parts = [
        f"{setup.num_layers} MoE layers ({kind}, E={setup.num_experts}, K={setup.top_k})",
        f"aux coef {setup.aux_coef:g}",
    ]
    impl = experts_in_use(setup.model)
    if impl is not None:
        parts.append(f"experts {impl}")
    if setup.z_coef:
        parts.append(f"z coef {setup.z_coef:g}")
    if setup.frozen:
        parts.append(f"router frozen ({setup.frozen} tensors)")
    if setup.replay != "none":
        parts.append(f"routing replay {setup.replay}")
    return ", ".join(parts)


def new_monitor(setup: RouterSetup, cfg: MoEConfig) -> ExpertMonitor:
    """The run's `ExpertMonitor` (load and drift between two logged steps)."""
    return ExpertMonitor(setup.num_experts, cfg)


@contextmanager
def capture_router(
    setup: RouterSetup, replay: ReplaySource | None = None
) -> Iterator[RouterCapture | None]:
    """Capture the routing of the forwards inside (replaying `replay` routes if given); None
    when the run needs no capture."""
    if not setup.layers or not (setup.active or replay is not None):
        yield None
        return
    with ExitStack() as stack:
        if replay is not None:
            stack.enter_context(replay_routing(setup.model, replay))
        yield stack.enter_context(capture_routing(setup.model, keep_logits=setup.aux_enabled))


def _captured(cap: RouterCapture | None) -> bool:
    return cap is not None and cap.num_calls > 0


def record_load(
    monitor: ExpertMonitor, setup: RouterSetup, cap: RouterCapture | None, mask: torch.Tensor
) -> None:
    """Add the expert load of one training forward (`mask` [N]: the tokens that count)."""
    if setup.monitor and cap is not None and _captured(cap):
        monitor.add_load(cap.indices(), mask.to(cap.indices().device))


def aux_loss(
    setup: RouterSetup,
    cap: RouterCapture | None,
    mask: torch.Tensor,
    *,
    share: float,
    counts: GlobalRouteCounts | None = None,
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Aux (+ z) loss of one micro-batch from its captured raw logits; padding excluded.

    mask: [N] the tokens that count, router row order. `share` is this micro-batch's share of
    the step's tokens: the loss is scaled by it, so the micro-batches of a step add up to a
    token-weighted mean. `counts`: the step's global route counts (aux_loss_scope=global).
    """
    if not setup.aux_enabled or cap is None or not _captured(cap):
        return None, {}
    total, metrics = router_aux_loss(
        cap.logits(),
        mask.to(cap.indices().device),
        top_k=setup.top_k,
        aux_coef=setup.aux_coef,
        z_coef=setup.z_coef,
        global_counts=counts,
    )
    return total * share, metrics


def route_counts(
    setup: RouterSetup, cap: RouterCapture | None, mask: torch.Tensor
) -> GlobalRouteCounts | None:
    """Layer-pooled expert counts of one counting-pass forward (None: nothing captured).

    The counts are not differentiable, so a no-grad pass before the step's first backward
    gives the exact global-batch f_e at the cost of one extra forward per micro-batch."""
    if cap is None or not _captured(cap):
        return None
    mask = mask.to(cap.indices().device)
    counts = routing_counts(cap.indices(), setup.num_experts, mask)
    return GlobalRouteCounts(counts, float(mask.sum()))


def add_route_counts(
    a: GlobalRouteCounts | None, b: GlobalRouteCounts | None
) -> GlobalRouteCounts | None:
    if a is None or b is None:
        return a if b is None else b
    return GlobalRouteCounts(a.counts + b.counts, a.num_tokens + b.num_tokens)


def reduce_route_counts(
    counts: GlobalRouteCounts | None, reduce_sum: Callable[[torch.Tensor], torch.Tensor]
) -> GlobalRouteCounts | None:
    """Data parallel: the counts of all ranks' counting passes (one collective). Every rank
    calls it after its counting pass."""
    if counts is None:
        return None
    c = counts.counts
    tokens = torch.tensor([counts.num_tokens], dtype=torch.float64, device=c.device)
    packed = reduce_sum(torch.cat([c.double().flatten(), tokens]))
    return GlobalRouteCounts(packed[:-1].reshape(c.shape).to(c.dtype), float(packed[-1]))
