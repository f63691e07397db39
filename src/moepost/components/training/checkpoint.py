"""Checkpoints: Hugging Face weights (or a PEFT adapter) plus the trainer state for exact resume.

Three entry points, one per job:
- `save_checkpoint` / `save_model_dir` write a folder atomically (`checkpoint_files`):
  temporary name, fsync, `manifest.json` with every file's size and hash, rename.
- `find_latest_checkpoint` picks the newest *complete* `checkpoint-<step>/` of a run dir and
  says which newer ones it passed over and why (truncated, missing file, no manifest).
- `load_trainer_state` / `load_weights_into` read one back; the trainer state is loaded with
  `torch.load(weights_only=True)`, so a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import pickle
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch

from moepost.components.training.checkpoint_files import (
    MANIFEST,
    manifest_problem,
    remove_dir,
    write_dir_atomically,
)
from moepost.errors import UserError

STATE_FILE = "trainer_state.pt"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / FSDP wrappers (PEFT models are kept: they save adapters)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


class SavesPretrained(Protocol):
    """A transformers or PEFT model: it writes itself (weights or adapters) to a folder."""

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> Any: ...


def saveable(model: torch.nn.Module) -> SavesPretrained:
    """The model under its DDP / FSDP wrappers, as something that has `save_pretrained`."""
    inner = unwrap(model)
    if not callable(getattr(inner, "save_pretrained", None)):
        raise UserError(
            f"model: {type(inner).__name__} has no save_pretrained; moepost saves transformers "
            "(or PEFT) models"
        )
    return cast(SavesPretrained, inner)


def rng_state() -> dict[str, Any]:
    """RNG streams as tensors and plain Python values (loadable with weights_only=True)."""
    key, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": str(key),
            "state": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    if isinstance(npy, dict):
        keys = npy["state"].numpy().astype(np.uint32)
        npy = (npy["key"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model_dir(
    model: torch.nn.Module,
    tokenizer: Any,
    path: Path,
    trainer_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Weights (full or adapter) + tokenizer (+ trainer state) in HF format, written atomically.

    `meta` (step, resolved config) goes into the folder's manifest; `extra_files(tmp)` adds more
    to the folder before it is sealed (the DeepSpeed engine state,
    `distributed.deepspeed_checkpoint`), so those files are in the manifest too.
    """

    def write(tmp: Path) -> None:
        saveable(model).save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if trainer_state is not None:
            torch.save({**trainer_state, "rng": rng_state()}, tmp / STATE_FILE)
        if extra_files is not None:
            extra_files(tmp)

    return write_dir_atomically(path, write, meta)


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    tokenizer: Any,
    trainer_state: dict[str, Any],
    *,
    keep_last: int,
    config: dict[str, Any] | None = None,
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write `checkpoint-<step>/` (weights + `trainer_state.pt`) and prune old ones."""
    out = Path(output_dir)
    meta = {"step": step, "config": config}
    final = save_model_dir(
        model, tokenizer, out / f"checkpoint-{step}", trainer_state, meta, extra_files
    )
    prune_checkpoints(out, keep_last)
    return final


def _numbered(output_dir: Path) -> list[tuple[int, Path]]:
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def checkpoint_problem(ckpt: Path, *, hashes: bool = False) -> str | None:
    """Why `ckpt` cannot be resumed from (None: complete). A folder without a manifest was
    written before manifests existed (always renamed complete): its trainer state suffices."""
    if not (ckpt / MANIFEST).exists():
        if (ckpt / STATE_FILE).is_file():
            return None
        return f"{ckpt / MANIFEST}: missing (the write did not finish)"
    problem = manifest_problem(ckpt, hashes=hashes)
    if problem is None and not (ckpt / STATE_FILE).is_file():
        return f"{ckpt / STATE_FILE}: missing (not a training checkpoint)"
    return problem


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (sizes checked against each manifest)."""
    return [p for _, p in _numbered(Path(output_dir)) if checkpoint_problem(p) is None]


def find_latest_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint (hashes checked) and the reasons newer ones were skipped."""
    skipped: list[str] = []
    for _, p in reversed(_numbered(Path(output_dir))):
        problem = checkpoint_problem(p, hashes=True)
        if problem is None:
            return p, skipped
        skipped.append(problem)
    return None, skipped


def prune_checkpoints(output_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for p in list_checkpoints(output_dir)[:-keep_last]:
        remove_dir(p)


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """`auto` -> newest complete checkpoint in the run dir (or None); a path must be complete.

    `auto` passes over incomplete newer checkpoints (use `find_latest_checkpoint` to report
    them); a run dir whose checkpoints are all incomplete is an error, not a fresh start.
    """
    if resume is None:
        return None
    if resume == "auto":
        path, skipped = find_latest_checkpoint(output_dir)
        if path is None and skipped:
            raise UserError(
                f"--resume auto: no complete checkpoint in {output_dir} ({'; '.join(skipped)})"
            )
        return path
    p = Path(resume)
    if not p.is_dir():
        raise UserError(f"--resume {resume}: no such checkpoint folder")
    problem = checkpoint_problem(p, hashes=True)
    if problem is not None:
        raise UserError(f"--resume {resume}: not a complete checkpoint: {problem}")
    return p


# numpy's RNG state as torch.save pickles it (checkpoints written before it was stored as a
# tensor, and DeepSpeed's engine state): data-only types, allowed with weights_only=True.
NUMPY_PICKLE_TYPES = [
    np.dtype,
    np.ndarray,
    np.dtypes.UInt32DType,
    np._core.multiarray._reconstruct,  # type: ignore[attr-defined]  # numpy 2 private, no stub
]


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """`trainer_state.pt` with weights_only=True: tensors and plain data only, no code."""
    path = ckpt / STATE_FILE
    try:
        with torch.serialization.safe_globals(NUMPY_PICKLE_TYPES):
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise UserError(
                f"{path}: refused to load: it holds Python objects other than tensors and "
                f"plain data ({', '.join(unsafe[:3])}); moepost checkpoints never do, so the "
                "file is not one or was tampered with - do not resume from a file you do not trust"
            ) from None
        raise UserError(f"{path}: unreadable trainer state ({_unpickler_detail(str(e))})") from None
    except Exception as e:  # damaged bytes fail anywhere in the unpickler (IndexError, KeyError...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: unreadable trainer state ({first})") from None
    # A sharded (FSDP2) checkpoint keeps each rank's RNG in rng/rank-<r>.pt instead.
    if not isinstance(blob, dict) or not {"train", "optim"} <= set(blob):
        raise UserError(f"{path}: not a moepost trainer state (expected train/optim/rng)")
    if "rng" not in blob and not blob.get("sharded"):
        raise UserError(f"{path}: not a moepost trainer state (expected train/optim/rng)")
    return blob


def _unsafe_globals(path: Path) -> list[str]:
    """The code a torch file would import (`module.name`), read without running anything."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a torch zip file at all: nothing to name
        return []


def _unpickler_detail(message: str) -> str:
    """The reason inside torch's long weights_only error."""
    lines = [x.strip() for x in message.splitlines() if x.strip()]
    reasons = [x for x in lines if "nsupported" in x and not x.startswith("Please file")]
    return reasons[0] if reasons else (lines[0] if lines else "not a torch file")


def load_weights_into(model: torch.nn.Module, ckpt: Path) -> None:
    """Load a checkpoint's weights (full model or adapter) into an already built model."""
    try:
        _load_weights(model, ckpt)
    except UserError:
        raise
    except (OSError, RuntimeError, ValueError) as e:  # safetensors / transformers read errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{ckpt}: weights unreadable ({first})") from None


def _load_weights(model: torch.nn.Module, ckpt: Path) -> None:
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
