"""kill -9 at chosen and at random points of a checkpoint write, then `--resume auto`: the
newest complete checkpoint is used, a partial one never, and the resumed run logs the losses
of the uninterrupted run. SFT and RL, real SIGKILLs in subprocesses."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest
from drill_support import assert_same_run, cli, drill_config, launch, wait_for
from fault_hooks import KILL_POINTS

from moepost.components.training import checkpoint as ckpt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def straight(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The uninterrupted 4-step run of each stage."""
    out = {}
    for stage in ("sft", "rl"):
        tmp = tmp_path_factory.mktemp(f"straight_{stage}")
        result = cli(["train", str(drill_config(stage, tiny_model, tmp, tmp / "run"))])
        assert result.returncode == 0, result.stderr[-2000:]
        out[stage] = tmp / "run"
    return out


def _resume_and_check(config: Path, run: Path, reference: Path, expect: str) -> None:
    # What is on disk is safe before anything is loaded: the partial checkpoint is not listed.
    latest, _ = ckpt.find_latest_checkpoint(run)
    assert latest is not None and latest.name == expect
    resumed = cli(["train", str(config), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {run / expect} at step {expect.split('-')[1]}" in resumed.stdout
    assert_same_run(run, reference)
    assert (run / "final").is_dir() and ckpt.checkpoint_problem(run / "checkpoint-4") is None


CASES = [("sft", p) for p in KILL_POINTS] + [("rl", "state-partial")]


@pytest.mark.parametrize(("stage", "point"), CASES)
def test_kill_at_a_point_of_the_write(
    stage: str, point: str, tiny_model: Path, tmp_path: Path, straight: dict[str, Path]
) -> None:
    run = tmp_path / "run"
    config = drill_config(stage, tiny_model, tmp_path, run)
    killed = cli(["train", str(config)], env={"MOEPOST_KILL_DURING_SAVE": f"{point}@4"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run / "final").exists()
    # Killed inside the write of checkpoint-4: before its rename only checkpoint-2 counts;
    # during the pruning after it, checkpoint-4 is complete and checkpoint-2 half deleted.
    expect = "checkpoint-4" if point == "prune" else "checkpoint-2"
    if point != "prune":
        assert ckpt.checkpoint_problem(run / "checkpoint-4") is not None
    _resume_and_check(config, run, straight[stage], expect)


@pytest.mark.parametrize(("stage", "seed"), [("sft", 0), ("rl", 1)])
def test_kill_at_a_random_time_of_the_write(
    stage: str, seed: int, tiny_model: Path, tmp_path: Path, straight: dict[str, Path]
) -> None:
    """Each write point of checkpoint-4 sleeps 0.25 s; SIGKILL from outside at a random offset
    after the write began (the offset is in the assertion message)."""
    run = tmp_path / "run"
    config = drill_config(stage, tiny_model, tmp_path, run)
    proc = launch(["train", str(config)], tmp_path / "out.txt", {"MOEPOST_SAVE_DELAY_S": "0.25"})
    tmp_dir = run / ".checkpoint-4.tmp"
    wait_for(tmp_dir.exists, proc)
    offset = random.Random(seed).uniform(0.0, 1.5)
    time.sleep(offset)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    latest, _ = ckpt.find_latest_checkpoint(run)
    assert latest is not None, f"offset {offset:.2f}s"
    _resume_and_check(config, run, straight[stage], latest.name)
