"""Atomic checkpoint folders: manifest sizes / hashes, fsync before the rename, cleanup on a
failed write, disk-full recognition, RNG state that loads with weights_only=True."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from moepost.components.training import checkpoint as ckpt
from moepost.components.training import checkpoint_files as cf
from moepost.errors import UserError


def _write(files: dict[str, bytes]) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)

    return write


def test_manifest_lists_sizes_and_hashes_and_no_temporary_is_left(tmp_path: Path) -> None:
    files = {"a.bin": b"abc", "sub/b.json": b"{}"}
    out = cf.write_dir_atomically(tmp_path / "checkpoint-3", _write(files), {"step": 3})
    manifest = json.loads((out / cf.MANIFEST).read_text())
    assert manifest["step"] == 3 and manifest["format"] == cf.MANIFEST_FORMAT
    assert manifest["files"] == {
        name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for name, data in files.items()
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]
    assert cf.manifest_problem(out, hashes=True) is None


def test_manifest_problems(tmp_path: Path) -> None:
    out = cf.write_dir_atomically(tmp_path / "c", _write({"a": b"12345", "b": b"xy"}))
    (out / "a").write_bytes(b"12")
    assert (
        cf.manifest_problem(out, hashes=False)
        == f"{out}/a: 2 bytes, the manifest says 5 (truncated?)"
    )
    (out / "a").write_bytes(b"54321")  # same size, other content
    assert cf.manifest_problem(out, hashes=False) is None
    assert "differs from the manifest's SHA-256" in str(cf.manifest_problem(out, hashes=True))
    (out / "b").unlink()
    (out / "a").write_bytes(b"12345")
    assert cf.manifest_problem(out, hashes=True) == f"{out}/b: missing"
    (out / cf.MANIFEST).write_text("{not json")
    assert "unreadable manifest" in str(cf.manifest_problem(out, hashes=True))


def test_files_and_folder_are_fsynced_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    fsync, rename = os.fsync, Path.rename

    def record_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def record_rename(self: Path, target: Path) -> Path:
        events.append(("rename", str(self)))
        return rename(self, target)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(Path, "rename", record_rename)
    cf.write_dir_atomically(tmp_path / "c", _write({"w.bin": b"1", "s.pt": b"2"}))
    tmp = str(tmp_path / ".c.tmp")
    at = events.index(("rename", tmp))
    before = {path for kind, path in events[:at] if kind == "fsync"}
    assert {f"{tmp}/w.bin", f"{tmp}/s.pt", f"{tmp}/{cf.MANIFEST}", tmp} <= before
    assert ("fsync", str(tmp_path)) in events[at:]  # the rename itself made durable


def test_failed_write_leaves_nothing_and_keeps_the_old_folder(tmp_path: Path) -> None:
    cf.write_dir_atomically(tmp_path / "final", _write({"a": b"old"}))

    def broken(tmp: Path) -> None:
        (tmp / "a").write_bytes(b"new")
        raise RuntimeError("writer crashed")

    with pytest.raises(RuntimeError, match="writer crashed"):
        cf.write_dir_atomically(tmp_path / "final", broken)
    assert (tmp_path / "final" / "a").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
        RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed"),
    ],
)
def test_disk_full_errors_become_one_line_errors(tmp_path: Path, error: Exception) -> None:
    def full(tmp: Path) -> None:
        raise error

    with pytest.raises(cf.DiskFullError, match=r"^disk full while writing .*/checkpoint-2 \("):
        cf.write_dir_atomically(tmp_path / "checkpoint-2", full)
    assert list(tmp_path.iterdir()) == []


def test_other_errors_are_not_called_disk_full() -> None:
    assert not cf.is_disk_full(RuntimeError("CUDA out of memory"))
    assert not cf.is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_rng_state_round_trips_through_weights_only(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # a cached Gaussian in numpy's state
    torch.save({"rng": ckpt.rng_state()}, tmp_path / "s.pt")
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(2))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_legacy_numpy_rng_state_still_loads(tmp_path: Path) -> None:
    """Checkpoints of older moepost versions pickled numpy's state tuple (an ndarray)."""
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    legacy = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    torch.save({"train": {}, "optim": {}, "rng": legacy}, folder / ckpt.STATE_FILE)
    expected = np.random.rand()
    np.random.seed(5)
    ckpt.set_rng_state(ckpt.load_trainer_state(folder)["rng"])
    assert np.random.rand() == expected


def test_non_moepost_state_is_a_one_line_error(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    torch.save({"weights": torch.zeros(2)}, folder / ckpt.STATE_FILE)
    with pytest.raises(UserError, match="not a moepost trainer state"):
        ckpt.load_trainer_state(folder)


def test_damaged_state_bytes_are_always_a_one_line_error(tmp_path: Path) -> None:
    """Random bytes fail at any point of the unpickler (IndexError, KeyError, ...): each must
    come out as a UserError naming the file, never a traceback. Seeded, so a failure repeats."""
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    path = folder / ckpt.STATE_FILE
    torch.save({"train": {"step": 1}, "optim": {}, "rng": ckpt.rng_state()}, path)
    good = path.read_bytes()
    gen = random.Random(0)
    blobs = [gen.randbytes(gen.randint(1, 4096)) for _ in range(300)]
    blobs += [good[: gen.randint(0, len(good) - 1)] for _ in range(100)]
    for blob in blobs:
        path.write_bytes(blob)
        with pytest.raises(UserError, match=f"{path}: (unreadable|refused|not a moepost)"):
            ckpt.load_trainer_state(folder)


def test_a_model_without_save_pretrained_is_a_one_line_error() -> None:
    from moepost.components.training.checkpoint import saveable
    from moepost.errors import UserError

    with pytest.raises(UserError) as err:
        saveable(torch.nn.DataParallel(torch.nn.Linear(2, 2)))
    assert str(err.value) == (
        "model: Linear has no save_pretrained; moepost saves transformers (or PEFT) models"
    )
