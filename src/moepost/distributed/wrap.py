"""Wrapping the policy for data-parallel training: DDP, FSDP2 or a DeepSpeed engine.

The recipes keep two handles on the policy: the *raw* model (a transformers or PEFT model) for
everything without gradient (generation, log-prob and counting passes, evaluation, saving,
router hooks) and the *wrapped* one for the training forwards, whose backward the wrapper
synchronises. FSDP2 shards the model in place, so there both handles are the same object.
PEFT models and router hooks keep working: wrappers expose the original module as `.module`
and `find_moe_layers` / `checkpoint.unwrap` look through it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moepost.config.schema import Config, DistributedConfig
from moepost.distributed.context import DistContext, require_deepspeed
from moepost.errors import UserError


def prepare_model(model: torch.nn.Module, cfg: Config, ctx: DistContext) -> torch.nn.Module:
    """The module training forwards go through. Call before building the optimizer (FSDP2
    replaces the parameters by sharded ones); DeepSpeed's engine comes in `attach_optimizer`."""
    if not ctx.active:
        ctx.wrapped = model
        return model
    backend = cfg.distributed.backend
    if backend == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ctx.wrapped = DistributedDataParallel(
            model,
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            # Buffers (rotary tables) are identical on every rank: no per-forward sync.
            forward_sync_buffers=False,
        )
    elif backend == "fsdp":
        shard_fsdp2(model, cfg.distributed, ctx)
        ctx.wrapped = model
    else:  # deepspeed: the engine needs the optimizer, see attach_optimizer
        ctx.wrapped = model
    return ctx.wrapped


def attach_optimizer(opt: Any, cfg: Config, ctx: DistContext) -> torch.nn.Module:
    """DeepSpeed only: build the engine around the model and our optimizer / schedule, so
    `ctx.backward` / `ctx.optimizer_step` drive it. Returns the module to train through."""
    assert ctx.wrapped is not None, "prepare_model first"
    if not ctx.active or cfg.distributed.backend != "deepspeed":
        return ctx.wrapped
    deepspeed = require_deepspeed()
    model = ctx.wrapped
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=opt.optimizer,
        lr_scheduler=opt.scheduler,
        config=deepspeed_config(cfg, ctx, dtype=next(model.parameters()).dtype),
    )
    ctx.engine = engine
    ctx.wrapped = engine
    return engine


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks (the classes transformers never splits across devices)."""
    from moepost.components.moe.routers import unwrap_model

    inner = unwrap_model(model)
    names = set(getattr(inner, "_no_split_modules", None) or [])
    layers = [m for m in inner.modules() if type(m).__name__ in names]
    if not layers:
        for module in inner.modules():
            if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
                return list(module)
    return layers


def fsdp_mesh(strategy: str, ctx: DistContext) -> Any:
    """Device mesh for `distributed.fsdp_sharding_strategy` (FSDP1 names mapped to FSDP2).

    FULL_SHARD / SHARD_GRAD_OP: one shard dimension over all ranks. HYBRID_SHARD: replicate
    across nodes, shard within a node (LOCAL_WORLD_SIZE ranks). NO_SHARD: replicate everywhere
    (a shard dimension of size 1), i.e. DDP-like memory with FSDP2's machinery.
    """
    import os

    from torch.distributed.device_mesh import init_device_mesh

    world = ctx.world_size
    if strategy in ("FULL_SHARD", "SHARD_GRAD_OP"):
        return init_device_mesh(ctx.device.type, (world,), mesh_dim_names=("shard",))
    shard = 1 if strategy == "NO_SHARD" else int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % shard:
        raise UserError(
            f"distributed.fsdp_sharding_strategy=HYBRID_SHARD: world size {world} is not a "
            f"multiple of the ranks per node ({shard})"
        )
    return init_device_mesh(
        ctx.device.type, (world // shard, shard), mesh_dim_names=("replicate", "shard")
    )


def shard_fsdp2(model: torch.nn.Module, dcfg: DistributedConfig, ctx: DistContext) -> None:
    """`fully_shard` every decoder layer, then the root (embeddings, final norm, lm_head)."""
    from torch.distributed.fsdp import fully_shard

    mesh = fsdp_mesh(dcfg.fsdp_sharding_strategy, ctx)
    # SHARD_GRAD_OP keeps the gathered weights from forward to backward (FSDP1 semantics).
    reshard = dcfg.fsdp_sharding_strategy != "SHARD_GRAD_OP"
    layers = _decoder_layers(model)
    if not layers:
        raise UserError(
            "distributed.backend=fsdp: found no decoder layers to shard in the model "
            f"({type(model).__name__}); use distributed.backend=ddp"
        )
    if dcfg.expert_parallel_size > 1:  # the experts first: FSDP2 shards children before parents
        from moepost.distributed.expert_parallel import shard_experts

        shard_experts(model, dcfg.expert_parallel_size, ctx.world_size, ctx.device.type, reshard)
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)


def deepspeed_config(cfg: Config, ctx: DistContext, *, dtype: torch.dtype) -> dict[str, Any]:
    """DeepSpeed's JSON config: `distributed.deepspeed_config_path` if given ("auto" values
    filled from our config), else one generated from zero_stage / offload_*.

    Accumulation is ours (`gradient_accumulation_steps: 1`, the boundary set per micro-batch),
    clipping is `optim.max_grad_norm`, precision follows the loaded weights.
    """
    d = cfg.distributed
    ours: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.train.micro_batch_size * ctx.world_size,
        "gradient_clipping": float(cfg.optim.max_grad_norm or 0.0),
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        # Our AdamW (or SR-AdamW) is a client optimizer DeepSpeed has not vetted.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
    }
    if d.deepspeed_config_path:
        path = Path(d.deepspeed_config_path)
        try:
            user = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(
                f"distributed.deepspeed_config_path: cannot read {path} as JSON ({err})"
            ) from err
        return {k: (ours.get(k, v) if v == "auto" else v) for k, v in {**ours, **user}.items()}
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": ctx.device.type == "cuda"}
    if d.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": ctx.device.type == "cuda"}
    return {**ours, "zero_optimization": zero}
