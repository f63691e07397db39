"""Joining the launcher's process group, and the combinations refused before any model loads.

`init_distributed` returns the run's `DistContext` (see `context`); `check_supported` names the
combinations the loops cannot run correctly; `generation_lockstep` says whether the HF rollout
engine must generate in lock-step (sharded weights).
"""

from __future__ import annotations

import atexit
import os
import socket

import torch
import torch.distributed as dist

from moepost.config.schema import Config
from moepost.distributed.context import DistContext, require_deepspeed
from moepost.errors import UserError


def shards_weights(cfg: Config, ctx: DistContext) -> bool:
    """Every forward is a collective (per-layer all-gathers of sharded weights): FSDP2 or
    DeepSpeed ZeRO-3 on more than one rank."""
    if not ctx.active or ctx.world_size == 1:
        return False
    backend = cfg.distributed.backend
    return backend == "fsdp" or (backend == "deepspeed" and cfg.distributed.zero_stage == 3)


def generation_lockstep(cfg: Config, ctx: DistContext) -> DistContext | None:
    """What the HF rollout engine's `lockstep` takes: the context when the weights are sharded
    (all ranks must run the same forwards, see `components.rollout.LockStep`), else None."""
    return ctx if shards_weights(cfg, ctx) else None


def check_supported(cfg: Config, ctx: DistContext, *, resume: str | None) -> None:
    """Combinations the loops cannot run correctly, refused before any model is loaded."""
    from moepost.distributed.expert_parallel import check_expert_parallel

    check_expert_parallel(cfg, ctx.world_size, active=ctx.active)
    if not ctx.active:
        return
    backend = cfg.distributed.backend
    if cfg.stage == "rl" and shards_weights(cfg, ctx) and cfg.generation.backend != "hf":
        raise UserError(
            f"generation.backend={cfg.generation.backend} with sharded weights "
            f"(distributed.backend={backend}): only the hf engine generates in lock-step; "
            "use generation.backend=hf or distributed.backend=ddp"
        )
    if backend == "fsdp" and cfg.optim.master_weights == "fp32" and cfg.train.save_every:
        raise UserError(
            "optim.master_weights=fp32 with distributed.backend=fsdp and train.save_every: "
            "sharded checkpoints do not hold fp32 master weights yet; set "
            "optim.master_weights: none or use distributed.backend=ddp"
        )
    if backend == "deepspeed":
        require_deepspeed()
        if cfg.optim.master_weights == "fp32":
            raise UserError(
                "optim.master_weights=fp32 with distributed.backend=deepspeed: DeepSpeed keeps "
                "its own fp32 master weights (bf16/fp16 config); set optim.master_weights: none"
            )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(
    cfg: Config, device: torch.device, *, resume: str | None = None
) -> DistContext:
    """The run's `DistContext`, joining (or creating) the process group when needed.

    A group is used when a launcher started several processes (`WORLD_SIZE` > 1: torchrun,
    `accelerate launch`, `deepspeed`) or when `distributed.enabled` is true (a single process
    then forms a group of one, which runs the distributed code path on one device).
    Backend: nccl for CUDA devices, gloo for CPU. Unsupported combinations (see
    `check_supported`) fail here, before any model is loaded.
    """
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    backend = cfg.distributed.backend
    if world == 1 and not cfg.distributed.enabled:
        return DistContext(device=device, backend=backend)
    if device.type == "cuda":
        # One GPU per process: under a launcher the local rank picks it.
        index = local_rank if world > 1 or device.index is None else device.index
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    ctx = DistContext(rank, world, local_rank, device, backend, active=True)
    ctx.expert_parallel = cfg.distributed.expert_parallel_size
    if dist.is_initialized():  # a launcher helper (or a test) already set it up
        ctx.rank, ctx.world_size = dist.get_rank(), dist.get_world_size()
        check_supported(cfg, ctx, resume=resume)
        return ctx
    check_supported(cfg, ctx, resume=resume)
    pg_backend = "nccl" if device.type == "cuda" else "gloo"
    if "MASTER_ADDR" in env and "WORLD_SIZE" in env:
        dist.init_process_group(pg_backend, device_id=device if device.type == "cuda" else None)
    else:  # not launched: a group of one on a private port
        dist.init_process_group(
            pg_backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
    ctx.owns_group = True
    atexit.register(ctx.close)
    return ctx


def describe(ctx: DistContext) -> str:
    if not ctx.active:
        return "single process"
    experts = f", experts split over {ctx.expert_parallel} ranks" if ctx.expert_parallel > 1 else ""
    return (
        f"data parallel: rank {ctx.rank}/{ctx.world_size} ({ctx.backend}{experts}, "
        f"{dist.get_backend()} on {ctx.device})"
    )
