"""Expert parallelism (`distributed.expert_parallel_size`), composed with FSDP2.

The machinery is transformers' own (`transformers.distributed.expert_parallel`): its EP plan
(`base_model_ep_plan`: `grouped_gemm` on the experts' 3-D weights, `ep_dispatch_experts` on the
experts module) shards gate_up_proj [E, 2I, H] and down_proj [E, H, I] with `Shard(0)` over the
`ep` axis of a DeviceMesh (each rank holds E / ep whole experts), and its `AllToAllEP` sends every
(token, expert) pair to the expert's rank with an autograd all-to-all, runs the rank's experts on
what it received (the model's experts forward, top-1 with unit weights), sends the rows back and
applies the routing weights on the sender. The router, attention and everything else run as
without EP, so router capture, aux loss and expert-load statistics see the global expert ids.

Mesh (W ranks, ep = expert_parallel_size): the dense modules are FSDP2-sharded over all W ranks
(`wrap.shard_fsdp2`, as for `backend: fsdp`); the experts live on a 2-D mesh (efsdp = W / ep,
ep): the W / ep ranks holding the same experts FSDP2-shard them between each other.

Gradient scale: moepost multiplies each rank's loss by W (the dense gradients are averaged over
W ranks by FSDP2, see `context.py`). An expert's gradient already sums the tokens of all ranks of
its EP group (the all-to-all backward) and FSDP2 sums its efsdp copies, so it covers all W
batches, each scaled by W: its divide factor is W (what transformers sets for its FSDP plan).
"""

from __future__ import annotations

from typing import Any

import torch

from moepost.config.schema import Config
from moepost.errors import UserError

KEY = "distributed.expert_parallel_size"
DISPATCH_STYLE = "ep_dispatch_experts"


def check_expert_parallel(cfg: Config, world_size: int, *, active: bool) -> None:
    """Refuse what EP cannot run, before any model is loaded (no-op for size 1)."""
    ep = cfg.distributed.expert_parallel_size
    if ep == 1:
        return
    if not active:
        raise UserError(
            f"{KEY}={ep} needs a process group of {ep} or more ranks: launch with "
            f"torchrun --nproc_per_node {ep} (distributed.backend=fsdp)"
        )
    if world_size % ep:
        raise UserError(f"{KEY}={ep} must divide the world size ({world_size})")
    if cfg.distributed.backend != "fsdp":
        raise UserError(
            f"{KEY}={ep} with distributed.backend={cfg.distributed.backend}: expert parallelism "
            "composes with FSDP2 only; use distributed.backend=fsdp"
        )
    if cfg.distributed.fsdp_sharding_strategy == "HYBRID_SHARD":
        raise UserError(
            f"{KEY}={ep} with distributed.fsdp_sharding_strategy=HYBRID_SHARD is not supported; "
            "use FULL_SHARD, SHARD_GRAD_OP or NO_SHARD"
        )
    if cfg.model.lora.enabled:
        raise UserError(
            f"{KEY}={ep} with model.lora.enabled: LoRA adapters on expert-parallel weights are "
            f"not supported; set {KEY}=1 (LoRA under distributed.backend=fsdp works)"
        )
    if cfg.stage == "rl" and cfg.generation.backend != "hf":
        raise UserError(
            f"{KEY}={ep} with generation.backend={cfg.generation.backend}: every forward is an "
            "all-to-all, only the hf engine generates in lock-step; use generation.backend=hf"
        )


def _experts_modules(model: torch.nn.Module, ep_plan: dict[str, str]) -> list[torch.nn.Module]:
    modules = dict(model.named_modules())
    return [modules[name] for name, style in ep_plan.items() if style == DISPATCH_STYLE]


def _ep_plan(model: Any, world_size: int, ep: int) -> dict[str, str]:
    """The model's EP plan with the layer numbers filled in (transformers resolves it)."""
    from transformers.distributed import DistributedConfig

    num_experts = _num_experts(model)
    if num_experts is not None and num_experts % ep:
        raise UserError(f"{KEY}={ep} must divide the model's number of experts ({num_experts})")
    layout = DistributedConfig(fsdp_size=world_size, ep_size=ep)
    try:
        _, ep_plan, _ = model._resolve_parallel_plans(layout)
    except (ValueError, AttributeError) as err:
        raise UserError(
            f"{KEY}={ep}: {type(model).__name__} has no expert-parallel plan in transformers "
            f"({err}); set {KEY}=1"
        ) from err
    if DISPATCH_STYLE not in ep_plan.values():
        raise UserError(
            f"{KEY}={ep}: {type(model).__name__}'s expert-parallel plan has no token dispatch "
            f"({DISPATCH_STYLE}); set {KEY}=1"
        )
    return ep_plan


def _num_experts(model: Any) -> int | None:
    config = getattr(model, "config", None)
    for name in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def shard_experts(
    model: torch.nn.Module, ep: int, world_size: int, device_type: str, reshard: bool
) -> None:
    """Shard the experts over the EP axis and FSDP2-shard them over the efsdp axis. Call before
    the decoder layers are `fully_shard`-ed (FSDP2 shards a submodule before its parent)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers.distributed.expert_parallel import apply_expert_parallelism

    from moepost.components.moe.routers import unwrap_model

    inner = unwrap_model(model)
    ep_plan = _ep_plan(inner, world_size, ep)
    expert_mesh = init_device_mesh(
        device_type, (world_size // ep, ep), mesh_dim_names=("efsdp", "ep")
    )
    # transformers' dispatch takes the group of ranks that share one batch (tensor parallelism):
    # here every rank has its own batch, so that group is the rank alone.
    tp_mesh = init_device_mesh(device_type, (world_size, 1), mesh_dim_names=("dp", "tp"))["tp"]
    apply_expert_parallelism(
        inner, expert_mesh["ep"], tp_mesh, ep_plan, ep_implementation="all_to_all"
    )
    for experts in _experts_modules(inner, ep_plan):
        sharded = fully_shard(experts, mesh=expert_mesh["efsdp"], reshard_after_forward=reshard)
        sharded.set_gradient_divide_factor(float(world_size))
        if world_size // ep > 1:
            # gloo has no PREMUL_SUM: reduce with a sum and let FSDP2 divide locally.
            sharded.set_force_sum_reduction_for_comms(True)
