"""Checkpoints: Hugging Face weights (or a PEFT adapter) plus the trainer state for exact resume.

A checkpoint is written under a temporary name and renamed when complete, so a crash never
leaves a half checkpoint that `--resume auto` would pick up.
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moepost.errors import UserError

STATE_FILE = "trainer_state.pt"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / FSDP wrappers (PEFT models are kept: they save adapters)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model_dir(
    model: torch.nn.Module,
    tokenizer: Any,
    path: Path,
    trainer_state: dict[str, Any] | None = None,
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Weights (full or adapter) + tokenizer (+ trainer state) in HF format, written atomically.

    `extra_files(tmp)` adds more to the folder before the rename that completes it (the
    DeepSpeed engine state, `distributed.deepspeed_checkpoint`)."""
    tmp = path.with_name("." + path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    unwrap(model).save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if trainer_state is not None:
        torch.save({**trainer_state, "rng": rng_state()}, tmp / STATE_FILE)
    if extra_files is not None:
        extra_files(tmp)
    _replace_dir(tmp, path)
    return path


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    tokenizer: Any,
    trainer_state: dict[str, Any],
    *,
    keep_last: int,
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write `checkpoint-<step>/` (weights + `trainer_state.pt`) and prune old ones."""
    out = Path(output_dir)
    final = save_model_dir(model, tokenizer, out / f"checkpoint-{step}", trainer_state, extra_files)
    prune_checkpoints(out, keep_last)
    return final


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a directory without its state file is ignored)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def prune_checkpoints(output_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for p in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """`auto` -> newest complete checkpoint in the run dir (or None); a path must exist."""
    if resume is None:
        return None
    if resume == "auto":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    p = Path(resume)
    if not (p / STATE_FILE).is_file():
        raise UserError(f"--resume {resume}: not a complete checkpoint (no {STATE_FILE})")
    return p


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)


def load_weights_into(model: torch.nn.Module, ckpt: Path) -> None:
    """Load a checkpoint's weights (full model or adapter) into an already built model."""
    from safetensors.torch import load_file

    inner = unwrap(model)
    adapter = ckpt / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(inner, load_file(str(adapter)))
        return
    if not any(ckpt.glob("model*.safetensors")):
        raise UserError(f"{ckpt}: no model weights found")
    # transformers v5 converts fused expert tensors to its on-disk layout when saving and back
    # when loading, so the checkpoint is read through from_pretrained, not as a raw state dict.
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(ckpt, dtype=next(inner.parameters()).dtype)
    missing, unexpected = inner.load_state_dict(loaded.state_dict(), strict=False)
    if missing or unexpected:
        raise UserError(
            f"{ckpt}: weights do not match the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
