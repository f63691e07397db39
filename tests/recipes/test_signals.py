"""SIGTERM / SIGINT to a training run (real signals to a subprocess): the step finishes, a
checkpoint is written (`train.save_on_signal`), the exit code is 143 / 130 and `--resume auto`
continues with the losses of the uninterrupted run; a second signal exits at once."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from drill_support import assert_same_run, cli, drill_config, launch, logged_steps, wait_for

from moepost.components.training import checkpoint as ckpt

pytestmark = pytest.mark.slow
SLOW_STEPS = {"MOEPOST_STEP_DELAY_S": "0.5"}  # a window at the end of each step


@pytest.fixture(scope="module")
def straight(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for stage in ("sft", "rl"):
        tmp = tmp_path_factory.mktemp(f"straight6_{stage}")
        config = drill_config(stage, tiny_model, tmp, tmp / "run", max_steps=6, save_every=0)
        result = cli(["train", str(config)])
        assert result.returncode == 0, result.stderr[-2000:]
        out[stage] = tmp / "run"
    return out


def _signal_after_step_2(config: Path, run: Path, tmp_path: Path, signum: int, env: dict) -> int:
    proc = launch(["train", str(config)], tmp_path / "out.txt", {**SLOW_STEPS, **env})
    wait_for(lambda: len(logged_steps(run)) >= 2, proc)
    proc.send_signal(signum)
    return proc.wait(timeout=120)


@pytest.mark.parametrize(
    ("stage", "signum", "code"),
    [("sft", signal.SIGTERM, 143), ("sft", signal.SIGINT, 130), ("rl", signal.SIGTERM, 143)],
)
def test_signal_saves_and_resume_continues(
    stage: str,
    signum: int,
    code: int,
    tiny_model: Path,
    tmp_path: Path,
    straight: dict[str, Path],
) -> None:
    run = tmp_path / "run"
    config = drill_config(stage, tiny_model, tmp_path, run, max_steps=6, save_every=0)
    assert _signal_after_step_2(config, run, tmp_path, signum, {}) == code
    output = (tmp_path / "out.txt").read_text()
    step = logged_steps(run)[-1]
    assert 2 <= step < 6, output[-2000:]
    name = signal.Signals(signum).name
    assert f"{name}: finishing the current step" in output
    assert f"stopped by {name} after step {step}; latest checkpoint {run}/checkpoint-{step}" in (
        output
    )
    assert ckpt.list_checkpoints(run) == [run / f"checkpoint-{step}"]  # only the signal wrote
    assert not (run / "final").exists()
    resumed = cli(["train", str(config), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {run / f'checkpoint-{step}'} at step {step}" in resumed.stdout
    assert_same_run(run, straight[stage])


def test_second_signal_exits_at_once(tiny_model: Path, tmp_path: Path) -> None:
    """The second SIGTERM lands while the signal's checkpoint is being written (each write
    point sleeps 2 s): the process exits 143 at once, the partial folder is never listed."""
    run = tmp_path / "run"
    config = drill_config("sft", tiny_model, tmp_path, run, max_steps=6, save_every=0)
    env = {**SLOW_STEPS, "MOEPOST_SAVE_DELAY_S": "2"}
    proc = launch(["train", str(config)], tmp_path / "out.txt", env)
    wait_for(lambda: len(logged_steps(run)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: any(run.glob(".checkpoint-*.tmp")), proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert time.monotonic() - sent < 1.9  # before the write's next 2 s point
    assert "SIGTERM (second signal): exiting now" in (tmp_path / "out.txt").read_text()
    assert ckpt.list_checkpoints(run) == []
    assert ckpt.find_latest_checkpoint(run) == (None, [])


def test_no_save_on_signal(tiny_model: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = drill_config("sft", tiny_model, tmp_path, run, max_steps=6, save_every=0)
    args = ["train", str(config), "train.save_on_signal=false"]
    proc = launch(args, tmp_path / "o.txt", SLOW_STEPS)
    wait_for(lambda: len(logged_steps(run)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    step = logged_steps(run)[-1]
    output = (tmp_path / "o.txt").read_text()
    assert (
        f"stopped by SIGTERM after step {step} (train.save_on_signal: false); no checkpoint yet"
        in output
    )
    assert not any(run.glob("checkpoint-*")) and not (run / "final").exists()


def test_signal_while_loading_stops_at_once(tiny_model: Path, tmp_path: Path) -> None:
    """Before the training loop there is nothing to save: SIGTERM during the (slowed) model load
    ends the run at once, with the exit code and a line that says so."""
    run = tmp_path / "run"
    config = drill_config("sft", tiny_model, tmp_path, run, max_steps=6)
    log = tmp_path / "out.txt"
    proc = launch(["train", str(config)], log, {"MOEPOST_LOAD_DELAY_S": "30"})
    wait_for(lambda: "data: " in log.read_text(), proc)  # printed just before the model load
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert time.monotonic() - sent < 20  # not after the 30 s load
    output = log.read_text()
    assert "SIGTERM (before training started): exiting now" in output
    assert "moepost: stopped by SIGTERM before training started" in output
    assert "Traceback" not in output
    assert sorted(p.name for p in run.iterdir()) == ["resolved_config.yaml"]
