"""Training rows read as a stream (`data.streaming: true`) for sources larger than memory.

Rows come from a Hugging Face `datasets.IterableDataset`: `load_dataset(builder, streaming=True)`
for local .jsonl / .json / .parquet / .csv files, `Dataset.to_iterable_dataset()` over the
memory-mapped Arrow files of a save_to_disk folder or of a hub dataset in the local cache.
On top of it: a seeded shuffle buffer, epochs (the source is re-opened at the end of each
pass), and a state (`state_dict`) that continues exactly where it stopped.

datasets' own `shuffle(seed, buffer_size)` does not save its buffer (a resumed stream refills
it with other rows, see `IterableDataset.state_dict`), so the buffer lives here: the state holds
the source position from datasets' `state_dict()`, the rows in the buffer and the shuffle RNG.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moepost.components.data.readers import (
    check_json_lines,
    check_utf8_lines,
    hub_offline,
    load_disk_dataset,
    load_hub_cached,
    read_json,
)
from moepost.config.schema import DataConfig, MiscConfig
from moepost.errors import UserError

_BUILDERS = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".parquet": "parquet"}
_BUILDERS[".csv"] = "csv"
NumberedRow = tuple[int, dict[str, Any]]  # (1-based row number in source order, row)


class _Empty(Exception):
    """The source yielded no row at all."""


@dataclass
class StreamSource:
    """Where streamed rows come from: `open()` gives a fresh IterableDataset at row 1."""

    key: str  # the config key, for errors
    where: str  # file, folder or dataset name, for errors
    open: Callable[[], Any]
    file: Path | None = None  # a local file, re-read line by line to locate a bad line


class _DropReaderErrors(logging.Filter):
    """datasets' file readers log a parse failure before raising it; the raise becomes our
    one-line error naming the line, so the log record (with the block's position) is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


_QUIET = _DropReaderErrors()
for _name in ("datasets.packaged_modules.json.json", "datasets.packaged_modules.csv.csv"):
    if _QUIET not in logging.getLogger(_name).filters:
        logging.getLogger(_name).addFilter(_QUIET)


def file_stream(path: Path, key: str) -> Callable[[], Any]:
    """An IterableDataset factory over one local file (builder chosen by its extension)."""
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UserError(
            f"{key}: {path}: unsupported file type for data.streaming; expected .jsonl, "
            ".json, .parquet, .csv or a datasets.save_to_disk folder"
        )

    def open_file() -> Any:
        import datasets

        with hub_offline():
            return datasets.load_dataset(
                builder, data_files=str(path), split="train", streaming=True
            )

    return open_file


def stream_source(cfg: DataConfig, misc: MiscConfig) -> StreamSource:
    """The training source of `cfg` as a stream (`data.train_file` or `data.dataset_name`)."""
    if cfg.train_file:
        p = Path(cfg.train_file).expanduser()
        if not p.exists():
            raise UserError(f"data.train_file: {cfg.train_file}: no such file or folder")
        if p.is_dir():
            split = cfg.split
            return StreamSource(
                "data.train_file",
                str(p),
                lambda: load_disk_dataset(p, "data.train_file", split).to_iterable_dataset(),
            )
        return StreamSource("data.train_file", str(p), file_stream(p, "data.train_file"), p)
    if cfg.dataset_name:
        where = f"{cfg.dataset_name!r} split {cfg.split!r}"
        return StreamSource(
            "data.dataset_name",
            where,
            lambda: load_hub_cached(cfg, misc, cfg.split).to_iterable_dataset(),
        )
    raise UserError("data: set data.train_file (a local file or folder) or data.dataset_name")


def stream_error(source: StreamSource, exc: Exception, number: int) -> UserError:
    """One-line error for a failure inside datasets' reader.

    Its JSON / UTF-8 errors name a byte position in a block, not a line, so a local text file
    is re-read line by line (only now, on the error path) to name the first bad line.
    """
    if source.file is not None:
        suffix = source.file.suffix.lower()
        try:
            if suffix in (".jsonl", ".ndjson"):
                check_json_lines(source.file, source.key)
            elif suffix == ".json":
                read_json(source.file, source.key)
            elif suffix == ".csv":
                check_utf8_lines(source.file, source.key)
        except UserError as located:
            return located
    if isinstance(exc, _Empty):
        return UserError(f"{source.key}: {source.where}: no rows to train on (it is empty)")
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return UserError(
        f"{source.key}: {source.where}: cannot read row {number} ({type(exc).__name__}: {message})"
    )


def read_stream(opener: Callable[[], Any], key: str, path: Path) -> Iterator[dict[str, Any]]:
    """Every row of a one-file stream, errors translated (the in-memory CSV reader uses it)."""
    rows = RowStream(StreamSource(key, str(path), opener, path), shuffle=False, buffer_size=0)
    while (item := rows.next()) is not None:
        yield item[1]


class RowStream:
    """Raw rows of one pass over a source, through a seeded shuffle buffer.

    `next()` returns (row number, row) or None at the end of the pass; `new_epoch()` starts the
    next pass (re-opened at row 1, shuffled with the next epoch's seed).
    """

    def __init__(
        self,
        source: StreamSource,
        *,
        shuffle: bool,
        buffer_size: int,
        seed: int = 0,
        max_rows: int | None = None,
    ) -> None:
        self.source, self.seed, self.max_rows = source, seed, max_rows
        self.buffer_size = buffer_size if shuffle else 0
        self.epoch = 0
        self._start_epoch(0)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._read = 0  # source rows consumed in this pass
        self._done = False  # source exhausted in this pass
        self._buffer: list[NumberedRow] = []
        self._rng = random.Random(self.seed * 1000003 + epoch)
        self._ds: Any = None  # opened at the first read
        self._it: Iterator[dict[str, Any]] | None = None
        self._resume_at: dict[str, Any] | None = None

    def new_epoch(self) -> None:
        self._start_epoch(self.epoch + 1)

    def _open(self) -> None:
        try:
            self._ds = self.source.open()
            if self._resume_at is not None:
                self._ds.load_state_dict(self._resume_at)
            self._it = iter(self._ds)
        except UserError:
            raise
        except Exception as e:  # datasets raises StopIteration for an empty JSON file here
            raise stream_error(self.source, e, self._read + 1) from None

    def _pull(self) -> NumberedRow | None:
        """The next source row, or None when the pass (or data.max_train_samples) is done."""
        if self._done or (self.max_rows is not None and self._read >= self.max_rows):
            self._done = True
            return None
        if self._it is None:
            self._open()
        try:
            row = next(self._it)  # type: ignore[arg-type]
        except StopIteration:
            row = None
        except Exception as e:  # a bad line or block surfaces here, mid-stream
            raise stream_error(self.source, e, self._read + 1) from None
        if row is None:
            self._done = True
            if self._read == 0:
                raise stream_error(self.source, _Empty(), 1)
            return None
        self._read += 1
        return self._read, row

    def next(self) -> NumberedRow | None:
        if self.buffer_size <= 1:
            return self._pull()
        while len(self._buffer) < self.buffer_size:
            item = self._pull()
            if item is None:
                break
            self._buffer.append(item)
        if not self._buffer:
            return None
        i = self._rng.randrange(len(self._buffer))
        out = self._buffer[i]
        self._buffer[i] = self._buffer[-1]
        self._buffer.pop()
        return out

    def first_row(self) -> dict[str, Any]:
        """Row 1 in source order (a fresh reader; format detection looks at it)."""
        peek = RowStream(self.source, shuffle=False, buffer_size=0)
        item = peek.next()
        assert item is not None  # an empty source raised already
        return item[1]

    def state_dict(self) -> dict[str, Any]:
        """Plain values only (ints, strings, lists, dicts, the rows): `torch.save`-able."""
        source = self._ds.state_dict() if self._ds is not None else self._resume_at
        return {
            "epoch": self.epoch,
            "read": self._read,
            "done": self._done,
            "source": source,
            "buffer": [[n, row] for n, row in self._buffer],
            "rng": self._rng.getstate(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._start_epoch(int(state["epoch"]))
        self._read, self._done = int(state["read"]), bool(state["done"])
        self._buffer = [(int(n), row) for n, row in state["buffer"]]
        rng = state["rng"]
        self._rng.setstate((rng[0], tuple(rng[1]), rng[2]))
        self._resume_at = state["source"]


class ExampleStream:
    """Training examples from a RowStream: `convert` turns a numbered row into an example or
    None (a counted skip); passes repeat for as long as the run asks."""

    def __init__(
        self, rows: RowStream, convert: Callable[[int, dict[str, Any]], Any], counts: dict[str, int]
    ) -> None:
        self.rows, self.convert, self.counts = rows, convert, counts
        self._kept_in_epoch = 0

    def take(self, count: int) -> list[Any]:
        out: list[Any] = []
        while len(out) < count:
            item = self.rows.next()
            if item is None:
                if not self._kept_in_epoch:
                    src = self.rows.source
                    raise UserError(
                        f"{src.key}: {src.where}: no row gives a training example "
                        f"(skipped: {self.counts})"
                    )
                self.rows.new_epoch()
                self._kept_in_epoch = 0
                continue
            example = self.convert(*item)
            if example is not None:
                self._kept_in_epoch += 1
                out.append(example)
        return out

    @property
    def epoch(self) -> int:
        return self.rows.epoch

    def state_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows.state_dict(),
            "counts": dict(self.counts),
            "kept_in_epoch": self._kept_in_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows.load_state_dict(state["rows"])
        self.counts.update(state["counts"])
        self._kept_in_epoch = int(state["kept_in_epoch"])
