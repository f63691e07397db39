"""Reading and writing data files: the row sources of `data`, and `moepost data convert`.

Sources: local JSONL / JSON / Parquet / CSV, a `datasets.save_to_disk` folder, or a Hub dataset
name read only from the local Hugging Face cache (nothing is downloaded). Errors name the config
key, the file and, where there is one, the line. The per-format readers are in `readers`; CSV
goes through the streaming reader (`stream`) so that both read a CSV file alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moepost.components.data.readers import (
    load_disk_dataset,
    load_hub_cached,
    read_json,
    read_jsonl,
    read_parquet,
)
from moepost.components.data.stream import file_stream, read_stream
from moepost.config.schema import DataConfig, MiscConfig
from moepost.errors import UserError


def _read_csv(path: Path, key: str) -> list[dict[str, Any]]:
    """CSV rows as the streaming reader gives them (datasets' csv builder), so both agree."""
    return list(read_stream(file_stream(path, key), key, path))


STREAM_HINT = "set data.streaming: true to read it as a stream (needs train.max_steps)"


def check_in_memory_size(nbytes: int, where: str, key: str, cap: int | None) -> None:
    """`data.max_in_memory_bytes`: refuse to read more than the cap into memory."""
    if cap is None or nbytes <= cap:
        return
    hint = STREAM_HINT if key != "data.eval_file" else "evaluation rows are always read whole"
    raise UserError(
        f"{key}: {where} holds {nbytes} bytes, over data.max_in_memory_bytes={cap}; {hint}"
    )


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def read_rows(
    path: str, key: str, split: str = "train", *, max_bytes: int | None = None
) -> list[dict[str, Any]]:
    """All rows of a local file or save_to_disk folder; `key` names the config key in errors.

    max_bytes: `data.max_in_memory_bytes`; a file (or folder) larger than this is refused.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{key}: {path}: no such file or folder")
    check_in_memory_size(_folder_bytes(p) if p.is_dir() else p.stat().st_size, path, key, max_bytes)
    if p.is_dir():
        return load_disk_dataset(p, key, split).to_list()
    name = p.name.lower()
    if name.endswith((".jsonl", ".ndjson")):
        return read_jsonl(p, key)
    if name.endswith(".json"):
        return read_json(p, key)
    if name.endswith(".parquet"):
        return read_parquet(p, key)
    if name.endswith(".csv"):
        return _read_csv(p, key)
    raise UserError(
        f"{key}: {path}: unsupported file type; expected .jsonl, .json, .parquet, .csv "
        "or a datasets.save_to_disk folder"
    )


def read_hub_cached(cfg: DataConfig, misc: MiscConfig, split: str) -> list[dict[str, Any]]:
    data = load_hub_cached(cfg, misc, split)
    where = f"{cfg.dataset_name!r} split {split!r}"
    check_in_memory_size(data.data.nbytes, where, "data.dataset_name", cfg.max_in_memory_bytes)
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
