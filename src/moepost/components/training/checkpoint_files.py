"""Crash-safe folders on disk: atomic write, completeness manifest, disk-full errors.

A folder is written under `.<name>.tmp`, every file is fsynced, a `manifest.json` listing each
file's size (and SHA-256 up to `HASH_LIMIT` bytes) is written last, the temporary folder is
fsynced, renamed to its final name, and the parent folder is fsynced. A folder whose manifest
is missing, unreadable or disagrees with the files on disk is incomplete: a kill (or a full
disk) at any point of the write leaves either the previous state or a complete new folder.

This module knows nothing about models; `components.checkpoint` (and the sharded formats in
`distributed/`) decide what goes into the folder through the `write` callback.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moepost.errors import UserError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# Files up to this size get a SHA-256 in the manifest (cheap to check); larger ones (sharded
# weights, optimizer state of big models) are checked by size, which catches truncation.
HASH_LIMIT = 1 << 30
_CHUNK = 1 << 20
# How torch.save / safetensors / tokenizers report a failed write on a full disk.
_DISK_FULL_MARKERS = ("No space left", "StorageFull", "unexpected pos", "file write failed")


class DiskFullError(UserError):
    """The disk filled up while writing; what was written before is intact."""


def write_dir_atomically(
    path: Path, write: Callable[[Path], None], meta: dict[str, Any] | None = None
) -> Path:
    """Create `path` with the files `write(tmp)` puts into a temporary folder, atomically.

    `meta` (JSON-able) is stored in the manifest next to the file list (step, config, ...).
    An existing `path` is replaced only once the new folder is complete.
    """
    tmp = fresh_temp_dir(path)
    try:
        write(tmp)
    except Exception as e:
        _abandon(tmp, path, e)
        raise
    return seal_dir(tmp, path, meta)


def fresh_temp_dir(path: Path) -> Path:
    """An empty `.<name>.tmp` beside `path` (one left by a killed writer is removed)."""
    tmp = path.with_name("." + path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def seal_dir(tmp: Path, path: Path, meta: dict[str, Any] | None = None) -> Path:
    """Finish a folder written into `tmp` (by one process or, for sharded checkpoints, by
    every rank): fsync its files, write the manifest last, rename it to `path`."""
    try:
        files = _sync_and_describe(tmp)
        manifest = {"format": MANIFEST_FORMAT, **(meta or {}), "files": files}
        _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        fsync_dir(tmp)
    except Exception as e:
        _abandon(tmp, path, e)
        raise
    _replace_dir(tmp, path)
    fsync_dir(path.parent)
    return path


def _abandon(tmp: Path, path: Path, error: Exception) -> None:
    """Remove the temporary folder of a failed write; a full disk becomes `DiskFullError`."""
    free = _free_bytes(path.parent)
    shutil.rmtree(tmp, ignore_errors=True)
    if is_disk_full(error):
        raise DiskFullError(
            f"disk full while writing {path} ({free} bytes left on the device of "
            f"{path.parent}): the folder was not written, everything written before is "
            "intact; free space (or lower logging.keep_last_checkpoints) and continue "
            "with --resume auto"
        ) from None


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(marker in str(error) for marker in _DISK_FULL_MARKERS)


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return -1


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sync_and_describe(folder: Path) -> dict[str, dict[str, Any]]:
    """fsync every file under `folder`; {relative path: {size, sha256?}}."""
    out: dict[str, dict[str, Any]] = {}
    for p in _files(folder):
        with p.open("rb") as f:
            os.fsync(f.fileno())
        size = p.stat().st_size
        entry: dict[str, Any] = {"size": size}
        if size <= HASH_LIMIT:
            entry["sha256"] = _sha256(p)
        out[p.relative_to(folder).as_posix()] = entry
    for d in sorted({p.parent for p in _files(folder)} | {folder}):
        fsync_dir(d)
    return out


def _write_synced(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (new files, renames) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, final: Path) -> None:
    if not final.exists():
        tmp.rename(final)
        return
    old = final.with_name("." + final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old)


def remove_dir(path: Path) -> None:
    """Delete a folder so that a kill half-way never leaves it looking like a checkpoint."""
    doomed = path.with_name("." + path.name + ".deleting")
    if doomed.exists():
        shutil.rmtree(doomed)
    path.rename(doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest, or None when it has none (written before manifests existed)."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise UserError(f"{path}: not a moepost manifest (no 'files' mapping)")
    return data


def manifest_problem(folder: Path, *, hashes: bool) -> str | None:
    """Why `folder` is not the complete folder its manifest describes (None: it is).

    Sizes are always compared (cheap); `hashes` also compares the recorded SHA-256s.
    """
    try:
        manifest = read_manifest(folder)
    except UserError as e:
        return str(e)
    if manifest is None:
        return f"{folder / MANIFEST}: missing (the write did not finish)"
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"{path}: {size} bytes, the manifest says {entry.get('size')} (truncated?)"
        if hashes and "sha256" in entry and _sha256(path) != entry["sha256"]:
            return f"{path}: content differs from the manifest's SHA-256 (corrupted)"
    return None
