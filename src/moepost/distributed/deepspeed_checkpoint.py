"""Exact resume under DeepSpeed: the engine's own sharded state inside moepost's checkpoints.

A DeepSpeed checkpoint folder `checkpoint-<step>/` holds what every checkpoint holds (full HF
weights or the adapter, gathered under ZeRO-3 and written by rank 0, and `trainer_state.pt`:
step, epoch, data cursor, best metric) plus `deepspeed/`:

    deepspeed/latest, deepspeed/state/...    engine.save_checkpoint: every rank's ZeRO
                                             partitions of the fp32 master weights and Adam
                                             moments, the LR schedule, the engine's counters
    deepspeed/rng_rank<r>.pt                 each rank's Python / NumPy / torch RNG streams

Every rank first writes its part into a staging folder `.checkpoint-<step>.deepspeed.tmp`
next to the checkpoints; rank 0 then moves that folder into the checkpoint's temporary folder
before the rename that completes it (`components.checkpoint`'s `extra_files` hook), so a kill
at any moment leaves either a complete checkpoint, engine state included, or none.

Resuming rebuilds the engine as usual and then loads its state: the weights come from the
engine's fp32 masters (ZeRO-3 parameters are partitions, a plain `load_state_dict` could not
fill them), the optimizer and schedule from the partitions of the same world size.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from moepost.components.training import checkpoint as ckpt
from moepost.config.load import config_to_dict
from moepost.config.schema import Config
from moepost.distributed.context import DistContext
from moepost.errors import UserError


# What this module reads of the recipe's objects (`recipes.common.Run`, `Optimization`,
# `TrainState`), as structural types: the recipes call down into this layer, not the reverse.
class Run(Protocol):
    cfg: Config
    output_dir: Path
    dist: DistContext


class Optimization(Protocol):
    calls: int  # optimizer steps attempted; the rest of the optimizer is in the engine state


class TrainState(Protocol):
    __dataclass_fields__: ClassVar[dict[str, Any]]  # a dataclass: saved with dataclasses.asdict
    step: int


ENGINE_DIR = "deepspeed"
TAG = "state"  # one engine checkpoint per folder: a fixed tag, no "global_stepN" names


def _has_frozen(model: torch.nn.Module) -> bool:
    """LoRA: the frozen base is not part of the engine state (it is reloaded from the base
    checkpoint, as for every adapter resume)."""
    return any(not p.requires_grad for p in model.parameters())


def save(
    run: Run, model: torch.nn.Module, tokenizer: Any, opt: Optimization, state: TrainState
) -> Path | None:
    """Write `checkpoint-<step>/` with the engine state; every rank must call it."""
    ctx = run.dist
    staging = run.output_dir / f".checkpoint-{state.step}.{ENGINE_DIR}.tmp"
    if ctx.is_main and staging.exists():  # left by a run killed while saving
        shutil.rmtree(staging)
    ctx.barrier()
    ctx.engine.save_checkpoint(str(staging), tag=TAG, exclude_frozen_parameters=_has_frozen(model))
    torch.save(ckpt.rng_state(), staging / f"rng_rank{ctx.rank}.pt")
    ctx.barrier()  # every rank's partitions are on disk
    path = None
    with ctx.full_weights(model):
        if ctx.is_main:
            trainer_state = {
                "train": dataclasses.asdict(state),
                "optim": {"calls": opt.calls},  # optimizer + schedule: in the engine state
                "deepspeed": {
                    "world_size": ctx.world_size,
                    "zero_stage": ctx.engine.zero_optimization_stage(),
                },
            }
            path = ckpt.save_checkpoint(
                run.output_dir,
                state.step,
                model,
                tokenizer,
                trainer_state,
                keep_last=run.cfg.logging.keep_last_checkpoints,
                config=config_to_dict(run.cfg),  # compared on --resume, as for full checkpoints
                extra_files=lambda tmp: _move(staging, tmp / ENGINE_DIR),
            )
    ctx.barrier()  # nobody runs ahead (or reads the folder) before it is complete
    return path


def load(run: Run, path: Path, model: torch.nn.Module, opt: Optimization) -> dict[str, Any]:
    """Restore the engine (weights, ZeRO optimizer partitions, schedule) and this rank's RNG
    from `path`; returns the trainer state blob. Every rank must call it."""
    ctx = run.dist
    engine_dir = path / ENGINE_DIR
    if not (engine_dir / "latest").is_file():
        raise UserError(
            f"--resume {path}: no DeepSpeed engine state ({ENGINE_DIR}/) in this checkpoint "
            "(written with another distributed.backend); resume with the backend that wrote "
            f"it, or continue from its weights with model.policy_name_or_path={path}"
        )
    blob = ckpt.load_trainer_state(path)
    saved = blob.get("deepspeed", {})
    stage = ctx.engine.zero_optimization_stage()
    if saved.get("world_size") != ctx.world_size or saved.get("zero_stage") != stage:
        raise UserError(
            f"--resume {path}: written by {saved.get('world_size')} ranks with ZeRO stage "
            f"{saved.get('zero_stage')}, this run has {ctx.world_size} ranks and stage {stage}; "
            "DeepSpeed's partitions only load into the same layout (or continue from the "
            f"weights with model.policy_name_or_path={path})"
        )
    loaded, _ = ctx.engine.load_checkpoint(
        str(engine_dir),
        tag=TAG,
        load_module_strict=not _has_frozen(model),
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if loaded is None:
        raise UserError(f"--resume {path}: DeepSpeed could not load {engine_dir}")
    opt.calls = int(blob["optim"]["calls"])
    rng_file = engine_dir / f"rng_rank{ctx.rank}.pt"
    with torch.serialization.safe_globals(ckpt.NUMPY_PICKLE_TYPES):
        ckpt.set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return blob


def refuse_engine_state(path: Path, blob: dict[str, Any]) -> None:
    """A DeepSpeed checkpoint resumed without DeepSpeed: its optimizer state is partitions in
    the engine's format, which no other backend reads."""
    saved = blob["deepspeed"]
    raise UserError(
        f"--resume {path}: written by distributed.backend=deepspeed (ZeRO stage "
        f"{saved.get('zero_stage')}, {saved.get('world_size')} ranks); resume it with the same "
        f"backend, stage and world size, or continue from its weights with "
        f"model.policy_name_or_path={path}"
    )


def _move(src: Path, dst: Path) -> None:
    """`save_checkpoint`'s extra_files: the staged engine state moves into the sealed folder."""
    src.rename(dst)
