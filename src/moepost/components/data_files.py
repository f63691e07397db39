"""Reading and writing data files: the row sources of `data`, and `moepost data convert`.

Sources: local JSONL / JSON / Parquet, a `datasets.save_to_disk` folder, or a Hub dataset name
read only from the local Hugging Face cache (nothing is downloaded). Errors name the config key,
the file and, where there is one, the line.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moepost.config.schema import DataConfig, MiscConfig
from moepost.errors import UserError


def _read_jsonl(path: Path, key: str) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{key}: {path} line {line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{key}: {path} line {line_no}: expected a JSON object per line")
            rows.append(row)
    return rows


def _read_json(path: Path, key: str) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved with a .json name
            return _read_jsonl(path, key)
        raise UserError(f"{key}: {path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f'{key}: {path}: expected a list of objects or {{"data": [...]}}')
    return data


def _read_parquet(path: Path, key: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise UserError(f"{key}: {path}: not a readable Parquet file ({e})") from None


def _read_disk_dataset(path: Path, key: str, split: str) -> list[dict[str, Any]]:
    """Rows of `split` from a saved DatasetDict, or all rows of a saved Dataset."""
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(
            f"{key}: {path} is a folder but not a datasets.save_to_disk folder; "
            "point at a .jsonl/.json/.parquet file instead"
        ) from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise UserError(f"{key}: {path} has no split {split!r}; it has {sorted(data.keys())}")
        data = data[split]
    return data.to_list()


def read_rows(path: str, key: str, split: str = "train") -> list[dict[str, Any]]:
    """All rows of a local file or save_to_disk folder; `key` names the config key in errors."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{key}: {path}: no such file or folder")
    if p.is_dir():
        return _read_disk_dataset(p, key, split)
    name = p.name.lower()
    if name.endswith((".jsonl", ".ndjson")):
        return _read_jsonl(p, key)
    if name.endswith(".json"):
        return _read_json(p, key)
    if name.endswith(".parquet"):
        return _read_parquet(p, key)
    raise UserError(
        f"{key}: {path}: unsupported file type; expected .jsonl, .json, .parquet "
        "or a datasets.save_to_disk folder"
    )


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
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


def read_hub_cached(cfg: DataConfig, misc: MiscConfig, split: str) -> list[dict[str, Any]]:
    import datasets

    cache_dir = misc.huggingface_cache_dir
    if cache_dir and (Path(cache_dir).expanduser() / "datasets").is_dir():
        cache_dir = str(Path(cache_dir).expanduser() / "datasets")  # an HF_HOME-style folder
    try:
        with _hub_offline():
            data = datasets.load_dataset(
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
    return data.to_list()


# ---------------------------------------------------------------- train / eval rows


# ---------------------------------------------------------------- format conversion


def _write_rows(rows: list[dict[str, Any]], out_path: str) -> None:
    out = Path(out_path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.name.lower().endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), out)
        return
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def convert_gsm8k_to_chat(in_path: str, out_path: str) -> int:
    """GSM8K rows {question, answer} -> {messages: [user question], answer}; returns the count.

    Writes Parquet when out_path ends with .parquet, else JSON Lines. The answer keeps its
    '#### N' line: the GSM8K reward reads the number from it.
    """
    rows = read_rows(in_path, "data convert: input")
    out = []
    for number, row in enumerate(rows, start=1):
        for key in ("question", "answer"):
            if row.get(key) is None:
                raise UserError(
                    f"data convert: {in_path}: row {number}: missing field '{key}' "
                    "required by format 'gsm8k'"
                )
        out.append(
            {"messages": [{"role": "user", "content": row["question"]}], "answer": row["answer"]}
        )
    _write_rows(out, out_path)
    return len(out)


FORMAT_CONVERTERS = {"gsm8k": convert_gsm8k_to_chat}
