"""Before a training run writes anything: is `logging.output_dir` free, and may it resume?

- A fresh run (no `--resume`) in a folder that holds an earlier run (a `checkpoint-*`,
  `final/`, `best/` or a non-empty `train_log.jsonl`) is refused, unless
  `logging.overwrite_output_dir: true`, which deletes that run's files first.
- `--resume` picks the checkpoint (newest complete one for `auto`, saying which incomplete ones
  it passed over) and compares the config stored in it with the current one: a changed key
  outside `RESUME_MAY_CHANGE` is refused unless `--allow-config-change`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from moepost.components.training import checkpoint as ckpt
from moepost.components.training.checkpoint_files import read_manifest
from moepost.config.load import config_to_dict
from moepost.config.schema import Config
from moepost.errors import UserError

# Keys a resumed run may change without --allow-config-change: how long it runs, where and
# how it logs, evaluates and saves, and which device it runs on. None of them changes the
# steps already taken or the data order (a longer train.max_steps does stretch a decaying LR
# schedule: that is what extending a run means).
RESUME_MAY_CHANGE = (
    "train.max_steps",
    "train.num_epochs",
    "train.eval_every",
    "train.save_every",
    "train.save_on_signal",
    "train.eval_metric",
    "data.eval_file",
    "data.eval_split",
    "data.max_eval_samples",
    "generation.eval_temperature",
    "generation.eval_max_new_tokens",
    "logging.",
    "misc.",
)
# What a training run writes into its folder (`overwrite_output_dir` deletes these).
RUN_FILES = (
    "final",
    "best",
    "train_log.jsonl",
    "expert_load.jsonl",
    "train_rollouts.jsonl",
    "eval_outputs.jsonl",
    "eval_log.jsonl",
    "resolved_config.yaml",
    "report.html",
    "plots",
    "tensorboard",
)


def _say(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)


def earlier_run(out: Path) -> list[str]:
    """Names in `out` showing that a training run already wrote there (empty: none)."""
    if not out.is_dir():
        return []
    found = sorted(p.name for p in out.glob("checkpoint-*") if p.is_dir())
    found += [n for n in ("final", "best") if (out / n).is_dir()]
    log = out / "train_log.jsonl"
    if log.is_file() and log.stat().st_size > 0:
        found.append(log.name)
    return found


def _clear(out: Path) -> list[str]:
    removed = []
    for p in sorted(out.iterdir()):
        ours = p.name in RUN_FILES or p.name.startswith(("checkpoint-", ".checkpoint-"))
        ours = ours or p.name.startswith((".final.", ".best."))
        if not ours:
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        removed.append(p.name)
    return removed


def prepare_run_dir(
    cfg: Config, resume: str | None, *, allow_config_change: bool = False
) -> Path | None:
    """Check (or clear) the run folder; the checkpoint to resume from (None: start fresh)."""
    out = Path(cfg.logging.output_dir)
    if resume is None:
        found = earlier_run(out)
        if found and not cfg.logging.overwrite_output_dir:
            shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            raise UserError(
                f"logging.output_dir {out} holds an earlier run ({shown}): continue it with "
                "--resume auto, choose a new logging.output_dir, or set "
                "logging.overwrite_output_dir=true to delete it first"
            )
        if found and int(os.environ.get("RANK", "0")) == 0:
            _say(f"logging.overwrite_output_dir: removed {', '.join(_clear(out))} from {out}")
        return None
    if resume == "auto":
        path, skipped = ckpt.find_latest_checkpoint(out)
        if path is None and skipped:
            raise UserError(
                f"--resume auto: no complete checkpoint in {out} ({'; '.join(skipped)})"
            )
        for problem in skipped:
            _say(f"resume: skipping an incomplete checkpoint: {problem}")
        if path is not None and skipped:
            _say(f"resume: using {path}, the newest complete checkpoint")
    else:
        path = ckpt.resolve_resume(out, resume)
    if path is not None:
        check_config_change(cfg, path, allow=allow_config_change)
    return path


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and key not in ("metricx", "xcomet"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every key that differs and may not change on resume."""
    a, b = flatten(old), flatten(new)
    changed = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key) and not key.startswith(RESUME_MAY_CHANGE):
            changed.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return changed


def check_config_change(cfg: Config, path: Path, *, allow: bool) -> None:
    manifest = read_manifest(path)
    stored = (manifest or {}).get("config")
    if not isinstance(stored, dict):
        _say(f"resume: {path} stores no config (written by an older moepost); not compared")
        return
    changed = config_changes(stored, config_to_dict(cfg))
    if not changed:
        return
    listed = "; ".join(changed)
    if not allow:
        raise UserError(
            f"--resume: the config differs from {path}'s in {listed}; resuming would not "
            "continue the same run: undo the change, or pass --allow-config-change"
        )
    _say(f"resume: config changed since {path}: {listed} (--allow-config-change)")
