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


def _read_jsonl(path: Path, key: str) -> list[dict[str, Any]]:
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


def _read_json(path: Path, key: str) -> list[dict[str, Any]]:
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


def _read_csv(path: Path, key: str) -> list[dict[str, Any]]:
    """CSV rows as the streaming reader gives them (datasets' csv builder), so both agree."""
    from moepost.components.data.stream import file_stream, read_stream

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
        return _read_jsonl(p, key)
    if name.endswith(".json"):
        return _read_json(p, key)
    if name.endswith(".parquet"):
        return _read_parquet(p, key)
    if name.endswith(".csv"):
        return _read_csv(p, key)
    raise UserError(
        f"{key}: {path}: unsupported file type; expected .jsonl, .json, .parquet, .csv "
        "or a datasets.save_to_disk folder"
    )


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
