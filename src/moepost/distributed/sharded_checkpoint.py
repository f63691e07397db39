"""Sharded checkpoints for FSDP2: exact resume through `torch.distributed.checkpoint` (DCP).

Every rank writes its own shards of the model and optimizer state (no gather to rank 0), and
its own RNG state; rank 0 adds what is the same on every rank. Layout of `checkpoint-<step>/`:

    dcp/                 DCP shards (`__<rank>_0.distcp`) + `.metadata`: {"model", "optim"}
    rng/rank-<r>.pt      rank r's python / numpy / torch RNG states
    config.json ...      the model config (full) or adapter_config.json (LoRA), tokenizer
    trainer_state.pt     data position, schedule, gradient pipeline, optimizer call count;
                         written last: the checkpoint's completeness marker

As for full checkpoints, everything goes to `.checkpoint-<step>.tmp` first and the folder is
renamed when complete (rank 0, after every rank has finished writing), so `--resume auto`
never picks up half a checkpoint. `moepost export` turns the shards into a Hugging Face folder
(`load_sharded_weights` runs on one process without a process group).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moepost.components.training import checkpoint as ckpt
from moepost.components.training.checkpoint_files import fresh_temp_dir, seal_dir
from moepost.distributed.context import DistContext

DCP_DIR = "dcp"
RNG_DIR = "rng"


def is_sharded(path: Path) -> bool:
    """A checkpoint written by `save_sharded` (DCP shards instead of HF weights)."""
    return (path / DCP_DIR / ".metadata").is_file()


def _model_and_optim_state(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """{"model", "optim"} as DTensor shards keyed by parameter names (the same on every rank)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _write_model_files(model: torch.nn.Module, tokenizer: Any, path: Path) -> None:
    """What `export` needs besides the shards: config (full) or adapter config (LoRA)."""
    inner: Any = ckpt.unwrap(model)  # a transformers / PEFT model: config, generation_config
    peft_config = getattr(inner, "peft_config", None)
    if peft_config:
        for name, config in peft_config.items():
            config.save_pretrained(path if name == "default" else path / name)
    else:
        inner.config.save_pretrained(path)
        generation = getattr(inner, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def save_sharded(
    output_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: Any,
    tokenizer: Any,
    trainer_state: dict[str, Any],
    ctx: DistContext,
    *,
    keep_last: int,
    config: dict[str, Any] | None = None,
) -> Path:
    """Write `checkpoint-<step>/` from every rank (all ranks call this) and prune old ones.

    Rank 0 seals the folder like a full checkpoint (`checkpoint_files.seal_dir`: fsync, a
    manifest of every rank's files with the step and `config`, rename)."""
    import torch.distributed.checkpoint as dcp

    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = final.with_name("." + final.name + ".tmp")
    if ctx.is_main:
        (fresh_temp_dir(final) / RNG_DIR).mkdir()
    ctx.barrier()
    dcp.save(_model_and_optim_state(model, optimizer), checkpoint_id=str(tmp / DCP_DIR))
    torch.save(ckpt.rng_state(), tmp / RNG_DIR / f"rank-{ctx.rank}.pt")
    ctx.barrier()  # every rank's shards and RNG are on disk
    if ctx.is_main:
        _write_model_files(model, tokenizer, tmp)
        torch.save({**trainer_state, "sharded": True}, tmp / ckpt.STATE_FILE)
        seal_dir(tmp, final, {"step": step, "config": config})
        ckpt.prune_checkpoints(Path(output_dir), keep_last)
    ctx.barrier()  # nobody runs ahead (or resumes) before the folder has its final name
    return final


def load_sharded(path: Path, model: torch.nn.Module, optimizer: Any, ctx: DistContext) -> None:
    """Restore this rank's model and optimizer shards and its RNG from `save_sharded`'s folder.

    The world size may not change between save and resume: the RNG files are per rank.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from moepost.errors import UserError

    rng = path / RNG_DIR / f"rank-{ctx.rank}.pt"
    if not rng.is_file():
        raise UserError(
            f"--resume {path}: no RNG state for rank {ctx.rank} ({rng.name}); a sharded "
            "checkpoint resumes with the world size it was written with"
        )
    state = _model_and_optim_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path / DCP_DIR))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    ckpt.set_rng_state(torch.load(rng, map_location="cpu", weights_only=True))


def load_sharded_weights(path: Path, model: torch.nn.Module) -> None:
    """One process, no process group: the model weights of a sharded checkpoint into `model`
    (built like the trained one: the same module names, PEFT wrapper included)."""
    import torch.distributed.checkpoint as dcp

    from moepost.errors import UserError

    state = {"model": model.state_dict()}
    try:
        dcp.load(state, checkpoint_id=str(path / DCP_DIR), no_dist=True)
    except (RuntimeError, KeyError) as err:
        raise UserError(f"{path / DCP_DIR}: shards do not match the model ({err})") from err
    model.load_state_dict(state["model"])
