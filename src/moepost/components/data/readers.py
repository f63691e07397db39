"""Opening the row sources of `data`: one local file, a save_to_disk folder, the Hub cache.

The readers here name the config key, the file and the line in every error. Both the in-memory
reader (`files.read_rows`) and the streaming reader (`stream`) build on them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moepost.config.schema import DataConfig, MiscConfig
from moepost.errors import UserError


def _decode_line(raw: bytes, path: Path, key: str, line_no: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{key}: {path} line {line_no}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
            f"column {e.start + 1}); re-encode the file as UTF-8"
        ) from None


def _parse_line(line: str, path: Path, key: str, line_no: int) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{key}: {path} line {line_no}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise UserError(f"{key}: {path} line {line_no}: expected a JSON object per line")
    return row


def check_utf8_lines(path: Path, key: str) -> None:
    """Raise the error of the first line of a text file that is not UTF-8."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            _decode_line(raw, path, key, line_no)


def read_jsonl(path: Path, key: str) -> list[dict[str, Any]]:
    rows = []
    with path.open("rb") as f:  # bytes: a line that is not UTF-8 is reported with its number
        for line_no, raw in enumerate(f, start=1):
            line = _decode_line(raw, path, key, line_no)
            if line.strip():
                rows.append(_parse_line(line, path, key, line_no))
    return rows


def check_json_lines(path: Path, key: str) -> None:
    """Raise the error of the first undecodable / invalid line of a JSON Lines file (the
    streaming reader's own errors name no line), or that the file has no row at all."""
    with path.open("rb") as f:
        rows = 0
        for line_no, raw in enumerate(f, start=1):
            line = _decode_line(raw, path, key, line_no)
            if line.strip():
                _parse_line(line, path, key, line_no)
                rows += 1
    if not rows:
        raise UserError(f"{key}: {path}: no rows to train on (it is empty)")


def read_json(path: Path, key: str) -> list[dict[str, Any]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = raw.count(b"\n", 0, e.start) + 1
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        raise UserError(
            f"{key}: {path} line {line_no}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
            f"column {e.start - line_start + 1}); re-encode the file as UTF-8"
        ) from None
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved with a .json name
            return read_jsonl(path, key)
        raise UserError(f"{key}: {path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f'{key}: {path}: expected a list of objects or {{"data": [...]}}')
    return data


def read_parquet(path: Path, key: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise UserError(f"{key}: {path}: not a readable Parquet file ({e})") from None


def load_disk_dataset(path: Path, key: str, split: str) -> Any:
    """`split` of a saved DatasetDict, or a saved Dataset (memory-mapped, not yet in memory)."""
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(
            f"{key}: {path} is a folder but not a datasets.save_to_disk folder; "
            "point at a .jsonl/.json/.parquet/.csv file instead"
        ) from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise UserError(f"{key}: {path} has no split {split!r}; it has {sorted(data.keys())}")
        data = data[split]
    return data


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Turn datasets / huggingface_hub offline for the duration: cached data only, no download.

    Both libraries read HF_HUB_OFFLINE into a module constant at import, so setting the
    environment variable now would be too late.
    """
    import datasets.config
    import huggingface_hub.constants

    saved = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def load_hub_cached(cfg: DataConfig, misc: MiscConfig, split: str) -> Any:
    """`split` of a hub dataset from the local cache (memory-mapped Arrow files); never downloads."""
    import datasets

    cache_dir = misc.huggingface_cache_dir
    if cache_dir and (Path(cache_dir).expanduser() / "datasets").is_dir():
        cache_dir = str(Path(cache_dir).expanduser() / "datasets")  # an HF_HOME-style folder
    try:
        with hub_offline():
            return datasets.load_dataset(
                cfg.dataset_name, cfg.dataset_config, split=split, cache_dir=cache_dir
            )
    except Exception as e:  # datasets raises ConnectionError/ValueError/FileNotFoundError here
        where = cache_dir or datasets.config.HF_DATASETS_CACHE
        raise UserError(
            f"data.dataset_name: {cfg.dataset_name!r} (config {cfg.dataset_config!r}, split "
            f"{split!r}) is not in the local Hugging Face cache {where} (misc.huggingface_cache_dir);"
            f" moepost never downloads: fetch it beforehand or set data.train_file "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
