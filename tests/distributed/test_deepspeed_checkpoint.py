"""The DeepSpeed resume refusals, on one process without an engine: a checkpoint without
engine state, one written with another world size or ZeRO stage, and a DeepSpeed checkpoint
resumed by another backend. (Saving and resuming themselves run in test_deepspeed_gloo.py.)"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from moepost.components.training import checkpoint as ckpt
from moepost.distributed import deepspeed_checkpoint as dsc
from moepost.errors import UserError


class FakeEngine:
    """Only what `load` asks before DeepSpeed would read anything."""

    def __init__(self, stage: int) -> None:
        self.stage = stage
        self.loaded = False

    def zero_optimization_stage(self) -> int:
        return self.stage

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> tuple[None, None]:
        self.loaded = True
        return None, None  # what DeepSpeed returns when it found nothing to load


def _run(world: int, stage: int) -> SimpleNamespace:
    ctx = SimpleNamespace(rank=0, world_size=world, engine=FakeEngine(stage))
    return SimpleNamespace(dist=ctx)


def _checkpoint(tmp_path: Path, saved: dict[str, int] | None, *, engine_dir: bool) -> Path:
    path = tmp_path / "checkpoint-2"
    path.mkdir()
    blob: dict[str, Any] = {"train": {"step": 2}, "optim": {"calls": 2}, "rng": ckpt.rng_state()}
    if saved is not None:
        blob["deepspeed"] = saved
    torch.save(blob, path / ckpt.STATE_FILE)
    if engine_dir:
        (path / dsc.ENGINE_DIR).mkdir()
        (path / dsc.ENGINE_DIR / "latest").write_text(dsc.TAG)
    return path


def test_checkpoint_without_engine_state_is_refused(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, None, engine_dir=False)  # e.g. written under ddp
    with pytest.raises(UserError, match=r"no DeepSpeed engine state \(deepspeed/\)"):
        dsc.load(_run(2, 3), path, torch.nn.Linear(2, 2), SimpleNamespace(calls=0))


@pytest.mark.parametrize(("world", "stage"), [(4, 3), (2, 2)])
def test_other_world_size_or_stage_is_refused(tmp_path: Path, world: int, stage: int) -> None:
    path = _checkpoint(tmp_path, {"world_size": 2, "zero_stage": 3}, engine_dir=True)
    run = _run(world, stage)
    with pytest.raises(UserError, match="written by 2 ranks with ZeRO stage 3, this run has"):
        dsc.load(run, path, torch.nn.Linear(2, 2), SimpleNamespace(calls=0))
    assert not run.dist.engine.loaded  # refused before DeepSpeed reads a partition


def test_nothing_loaded_is_an_error(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, {"world_size": 2, "zero_stage": 3}, engine_dir=True)
    run = _run(2, 3)
    with pytest.raises(UserError, match="DeepSpeed could not load"):
        dsc.load(run, path, torch.nn.Linear(2, 2), SimpleNamespace(calls=0))
    assert run.dist.engine.loaded


def test_deepspeed_checkpoint_under_another_backend_is_refused(tmp_path: Path) -> None:
    from moepost.recipes.common import Optimization, Run, maybe_resume

    path = _checkpoint(tmp_path, {"world_size": 2, "zero_stage": 2}, engine_dir=True)
    run = Run(cfg=None, output_dir=tmp_path, device=torch.device("cpu"), logger=None)  # type: ignore[arg-type]
    with pytest.raises(UserError, match=r"written by distributed.backend=deepspeed \(ZeRO stage 2"):
        maybe_resume(run, str(path), torch.nn.Linear(2, 2), Optimization.__new__(Optimization))
