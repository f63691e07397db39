"""Faults in the run directory, through the command line (in-process): corrupted latest
checkpoint (fallback that the log states, or a one-line error naming the file), a malicious
trainer state, a finished run's folder reused, a changed config on resume, a full disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from drill_support import assert_same_run, drill_config, logged_steps

from moepost.cli import main
from moepost.components.training import checkpoint as ckpt
from moepost.components.training.checkpoint_files import MANIFEST


def _run(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("moepost: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def base(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step SFT run keeping checkpoint-2, checkpoint-4 and final/."""
    tmp = tmp_path_factory.mktemp("base")
    config = drill_config("sft", tiny_model, tmp, tmp / "run")
    data = yaml.safe_load(config.read_text())
    data["logging"]["keep_last_checkpoints"] = 0
    config.write_text(yaml.safe_dump(data))
    assert main(["train", str(config)]) == 0
    return tmp / "run"


def _copy(base: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the base run and its config (only logging.output_dir differs)."""
    run = shutil.copytree(base, tmp_path / "run")
    data = yaml.safe_load((base.parent / "run.yaml").read_text())
    data["logging"]["output_dir"] = str(run)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    return run, config


def _truncate(path: Path) -> None:
    os.truncate(path, 1000)


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


CORRUPTIONS = {
    "truncated weights": ("model.safetensors", _truncate, "1000 bytes, the manifest says"),
    "missing state": ("trainer_state.pt", Path.unlink, "trainer_state.pt: missing"),
    "garbage state": ("trainer_state.pt", _garbage, "differs from the manifest's SHA-256"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupted_latest_falls_back_and_says_so(
    case: str, base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, corrupt, reason = CORRUPTIONS[case]
    run, config = _copy(base, tmp_path)
    corrupt(run / "checkpoint-4" / name)
    code, out, err = _run(capsys, ["train", str(config), "--resume", "auto"])
    assert code == 0, err
    assert f"resume: skipping an incomplete checkpoint: {run}/checkpoint-4/{name}" in out
    assert reason in out
    assert f"resume: using {run}/checkpoint-2" in out
    assert f"resumed from {run}/checkpoint-2 at step 2" in out
    assert_same_run(run, base)
    assert ckpt.checkpoint_problem(run / "checkpoint-4", hashes=True) is None  # rewritten


def test_corrupted_explicit_checkpoint_is_an_error_naming_the_file(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, config = _copy(base, tmp_path)
    _truncate(run / "checkpoint-4" / "model.safetensors")
    code, _, err = _run(capsys, ["train", str(config), "--resume", str(run / "checkpoint-4")])
    _one_line_error(code, err, f"{run}/checkpoint-4/model.safetensors: 1000 bytes")


def test_every_checkpoint_corrupted_is_an_error_not_a_fresh_start(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, config = _copy(base, tmp_path)
    for step in (2, 4):
        (run / f"checkpoint-{step}" / "trainer_state.pt").unlink()
    log_before = (run / "train_log.jsonl").read_text()
    code, _, err = _run(capsys, ["train", str(config), "--resume", "auto"])
    _one_line_error(code, err, f"--resume auto: no complete checkpoint in {run}", "checkpoint-2")
    assert (run / "train_log.jsonl").read_text() == log_before


def test_garbage_state_without_manifest_is_a_one_line_error(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint without manifest (as older moepost wrote them) is checked by loading."""
    run, config = _copy(base, tmp_path)
    (run / "checkpoint-4" / MANIFEST).unlink()
    _garbage(run / "checkpoint-4" / "trainer_state.pt")
    code, _, err = _run(capsys, ["train", str(config), "--resume", "auto"])
    _one_line_error(code, err, f"{run}/checkpoint-4/trainer_state.pt: unreadable trainer state")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


def _update_manifest(folder: Path, name: str) -> None:
    """What an attacker who hands out the whole folder would do."""
    import hashlib

    manifest = json.loads((folder / MANIFEST).read_text())
    data = (folder / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_malicious_trainer_state_is_refused(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, config = _copy(base, tmp_path)
    marker = tmp_path / "pwned"
    state = run / "checkpoint-4" / "trainer_state.pt"
    torch.save({"train": _Payload(marker), "optim": {}, "rng": {}}, state)
    _update_manifest(run / "checkpoint-4", "trainer_state.pt")
    code, _, err = _run(capsys, ["train", str(config), "--resume", "auto"])
    _one_line_error(code, err, f"{state}: refused to load", "posix.system")
    assert not marker.exists()


def test_fresh_run_in_a_finished_runs_folder_is_refused(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, config = _copy(base, tmp_path)
    before = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*")}
    code, _, err = _run(capsys, ["train", str(config)])
    _one_line_error(
        code,
        err,
        f"logging.output_dir {run} holds an earlier run (checkpoint-2, checkpoint-4, final,",
        "--resume auto",
        "logging.overwrite_output_dir=true",
    )
    assert {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_overwrite_output_dir_clears_the_earlier_run(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, config = _copy(base, tmp_path)
    args = ["train", str(config), "logging.overwrite_output_dir=true", "train.max_steps=2"]
    code, out, err = _run(capsys, args)
    assert code == 0, err
    assert "logging.overwrite_output_dir: removed checkpoint-2, checkpoint-4, " in out
    assert logged_steps(run) == [1, 2]
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-2"]
    # `--resume auto` now continues the new run (stored config: max_steps 2), not the old one.
    manifest = json.loads((run / "checkpoint-2" / MANIFEST).read_text())
    assert manifest["config"]["train"]["max_steps"] == 2


def test_changed_config_on_resume_is_refused_with_the_keys(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, config = _copy(base, tmp_path)
    log_before = (run / "train_log.jsonl").read_text()
    args = ["train", str(config), "--resume", "auto", "optim.learning_rate=1e-3"]
    code, _, err = _run(capsys, [*args, "data.max_seq_length=32"])
    _one_line_error(
        code,
        err,
        "data.max_seq_length: 64 -> 32; optim.learning_rate: 0.003 -> 0.001",
        "--allow-config-change",
    )
    assert (run / "train_log.jsonl").read_text() == log_before
    code, out, err = _run(capsys, [*args, "--allow-config-change"])
    assert code == 0, err
    assert "resume: config changed since" in out and "optim.learning_rate: 0.003 -> 0.001" in out


def test_extending_max_steps_on_resume_is_allowed(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, config = _copy(base, tmp_path)
    args = ["train", str(config), "--resume", "auto", "train.max_steps=6", "train.save_every=3"]
    code, out, err = _run(capsys, args)
    assert code == 0, err
    assert "config changed" not in out and "resumed from" in out
    assert logged_steps(run) == [1, 2, 3, 4, 5, 6]


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 2.5 MB tmpfs: room for one tiny checkpoint (1.7 MB) and the logs, not for two."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root); disk-full drill not run")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2500k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.fail(
            f"running as root but `mount -t tmpfs` failed ({result.stderr.strip()}): the "
            "disk-full drill needs CAP_SYS_ADMIN (a container started without it?)"
        )
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_is_a_clear_error_and_the_previous_checkpoint_is_intact(
    tiny_model: Path, tmp_path: Path, small_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = small_disk / "run"
    config = drill_config("sft", tiny_model, tmp_path, run)
    code, _, err = _run(capsys, ["train", str(config), "logging.keep_last_checkpoints=2"])
    _one_line_error(code, err, f"disk full while writing {run}/checkpoint-4", "--resume auto")
    assert ckpt.find_latest_checkpoint(run) == (run / "checkpoint-2", [])
    assert ckpt.checkpoint_problem(run / "checkpoint-2", hashes=True) is None
    assert sorted(p.name for p in run.iterdir() if p.name.startswith((".", "checkpoint"))) == [
        "checkpoint-2"
    ]


def test_disk_full_while_logging_is_a_clear_error(
    tiny_model: Path, tmp_path: Path, small_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tmpfs filled up to its last few pages: the logs run out of room mid-run."""
    run = small_disk / "run"
    run.mkdir()
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * (free - 3 * 4096))
    config = drill_config("sft", tiny_model, tmp_path, run, max_steps=40, save_every=0)
    code, _, err = _run(capsys, ["train", str(config), "logging.save_final=false"])
    line = _one_line_error(code, err, "disk full while appending to", "--resume auto")
    name = line.split("appending to ")[1].split(":")[0]
    assert Path(name).parent == run
    rows = [x for x in Path(name).read_text().splitlines()]
    assert rows and all(x.startswith("{") and x.endswith("}") for x in rows[:-1])
