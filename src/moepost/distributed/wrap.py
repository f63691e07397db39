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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from moepost.config.schema import Config, DistributedConfig
from moepost.distributed.context import DistContext
from moepost.errors import UserError

DEEPSPEED_HINT = "pip install 'moepost[deepspeed]'"


def require_deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError as err:
        raise UserError(
            f"distributed.backend=deepspeed needs the deepspeed package, which is not "
            f"installed: {DEEPSPEED_HINT} (or use distributed.backend=ddp or fsdp)"
        ) from err
    return deepspeed


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


@contextmanager
def gathered_parameters(model: torch.nn.Module, ctx: DistContext) -> Iterator[None]:
    """Whole parameters on every rank inside the block (all ranks must enter it)."""
    if not ctx.active:
        yield
        return
    if ctx.backend == "fsdp":
        with _fsdp2_full_state_for_save(model, ctx):
            yield
        return
    if ctx.engine is not None and ctx.engine.zero_optimization_stage() == 3:
        deepspeed = require_deepspeed()
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield
        return
    yield


@contextmanager
def _fsdp2_full_state_for_save(model: torch.nn.Module, ctx: DistContext) -> Iterator[None]:
    """FSDP2: every rank joins the all-gather of the full state dict (CPU, rank 0 only); inside
    the block rank 0's `save_pretrained` writes that dict instead of the sharded DTensors.

    FSDP2's state-dict hooks always return shards, even after `unshard()`, and
    `components.checkpoint` calls a plain `save_pretrained(dir)`, so the full dict is bound to
    the instance for the duration of the block (transformers and PEFT both take `state_dict=`).
    """
    import functools

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from moepost.components.training.checkpoint import unwrap

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    target = unwrap(model)
    if ctx.is_main:
        bound = functools.partial(type(target).save_pretrained, target, state_dict=full)
        target.__dict__["save_pretrained"] = bound
    try:
        yield
    finally:
        target.__dict__.pop("save_pretrained", None)


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
