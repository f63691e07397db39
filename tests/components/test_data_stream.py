"""The streamed row source (data.streaming): shuffle buffer, epochs, exact state, in-memory cap."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from moepost.components.data.files import read_rows
from moepost.components.data.loading import load_rows
from moepost.components.data.stream import ExampleStream, RowStream, stream_source
from moepost.config.schema import DataConfig, MiscConfig
from moepost.errors import UserError


def _numbers_file(tmp_path: Path, n: int, suffix: str = ".jsonl") -> Path:
    rows = [{"text": f"row {i}", "i": i} for i in range(1, n + 1)]
    path = tmp_path / f"rows{suffix}"
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)
    elif suffix == ".csv":
        path.write_text("text,i\n" + "".join(f"row {r['i']},{r['i']}\n" for r in rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(path: Path, **kw: Any) -> RowStream:
    return RowStream(stream_source(DataConfig(train_file=str(path)), MiscConfig()), **kw)


def _pass(rows: RowStream) -> list[int]:
    out = []
    while (item := rows.next()) is not None:
        number, row = item
        assert row["i"] == number  # row numbers are the 1-based position in the file
        out.append(number)
    return out


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_file_order_without_shuffle_and_epochs_restart(tmp_path: Path, suffix: str) -> None:
    rows = _rows(_numbers_file(tmp_path, 7, suffix), shuffle=False, buffer_size=4)
    assert _pass(rows) == list(range(1, 8))
    rows.new_epoch()
    assert rows.epoch == 1 and _pass(rows) == list(range(1, 8))


def test_shuffle_buffer_is_seeded_and_visits_every_row_once_per_epoch(tmp_path: Path) -> None:
    path = _numbers_file(tmp_path, 10)
    orders = []
    for seed in (3, 3, 4):
        rows = _rows(path, shuffle=True, buffer_size=4, seed=seed)
        first = _pass(rows)
        rows.new_epoch()
        orders.append((first, _pass(rows)))
    (a0, a1), (b0, b1), (c0, _) = orders
    assert sorted(a0) == sorted(a1) == list(range(1, 11))
    assert (a0, a1) == (b0, b1)  # same seed, same order
    assert a0 != list(range(1, 11)) and a0 != a1 and a0 != c0  # shuffled, per epoch, per seed
    # A buffer of 4 only reorders within a window: row k comes out among the first k + 3.
    assert all(a0.index(k) < k + 3 for k in range(1, 11))


@pytest.mark.parametrize("stop_after", [0, 1, 5, 9, 10, 13])
def test_state_dict_resumes_exactly(tmp_path: Path, stop_after: int) -> None:
    """Any point of a shuffled multi-epoch stream: a new reader loaded with the state (through
    torch.save / torch.load(weights_only=True), as in a checkpoint) continues identically."""
    path = _numbers_file(tmp_path, 10)

    def drive(rows: RowStream, count: int) -> list[tuple[int, int]]:
        out = []
        while len(out) < count:
            item = rows.next()
            if item is None:
                rows.new_epoch()
                continue
            out.append((rows.epoch, item[0]))
        return out

    straight = drive(_rows(path, shuffle=True, buffer_size=4, seed=1), 25)
    first = _rows(path, shuffle=True, buffer_size=4, seed=1)
    head = drive(first, stop_after)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    again = _rows(path, shuffle=True, buffer_size=4, seed=1)
    again.load_state_dict(state)
    assert head + drive(again, 25 - stop_after) == straight


def test_max_train_samples_ends_each_pass(tmp_path: Path) -> None:
    path = _numbers_file(tmp_path, 10)
    source = stream_source(DataConfig(train_file=str(path)), MiscConfig())
    rows = RowStream(source, shuffle=False, buffer_size=0, max_rows=3)
    assert _pass(rows) == [1, 2, 3]


def test_example_stream_counts_skips_and_stops_when_nothing_is_kept(tmp_path: Path) -> None:
    path = _numbers_file(tmp_path, 6)
    counts = {"skipped": 0}

    def even_only(number: int, row: dict[str, Any]) -> int | None:
        if number % 2:
            counts["skipped"] += 1
            return None
        return number

    stream = ExampleStream(_rows(path, shuffle=False, buffer_size=0), even_only, counts)
    assert stream.take(4) == [2, 4, 6, 2] and stream.epoch == 1 and counts["skipped"] == 4
    none = ExampleStream(_rows(path, shuffle=False, buffer_size=0), lambda n, r: None, {"s": 0})
    with pytest.raises(UserError, match=rf"^data.train_file: {path}: no row gives a training"):
        none.take(1)


def test_in_memory_cap_refuses_big_sources_and_names_the_key(tmp_path: Path) -> None:
    path = _numbers_file(tmp_path, 50)
    size = path.stat().st_size
    assert len(read_rows(str(path), "data.train_file", max_bytes=size)) == 50
    cfg = DataConfig(train_file=str(path), max_in_memory_bytes=size - 1)
    with pytest.raises(UserError) as err:
        load_rows(cfg, MiscConfig(), which="train")
    assert str(err.value) == (
        f"data.train_file: {path} holds {size} bytes, over data.max_in_memory_bytes={size - 1}; "
        "set data.streaming: true to read it as a stream (needs train.max_steps)"
    )
    (tmp_path / "small").mkdir()
    small = _numbers_file(tmp_path / "small", 2)
    cfg = DataConfig(train_file=str(small), eval_file=str(path), max_in_memory_bytes=size - 1)
    with pytest.raises(UserError, match="^data.eval_file: .* evaluation rows are always read"):
        load_rows(cfg, MiscConfig(), which="eval")


def test_csv_in_memory_equals_stream(tmp_path: Path) -> None:
    path = _numbers_file(tmp_path, 4, ".csv")
    assert read_rows(str(path), "data.train_file") == [
        {"text": f"row {i}", "i": i} for i in range(1, 5)
    ]


def test_save_to_disk_folder_and_hub_cache_stream(tmp_path: Path) -> None:
    """Arrow sources (a save_to_disk folder, a hub dataset in the local cache) stream through
    `to_iterable_dataset()` over their memory-mapped files, and resume like files do."""
    import datasets
    from test_data import _fake_hub_cache

    rows = [{"text": f"row {i}", "i": i} for i in range(1, 6)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "saved")
    )
    source = stream_source(DataConfig(train_file=str(tmp_path / "saved")), MiscConfig())
    stream = RowStream(source, shuffle=False, buffer_size=0)
    assert [stream.next() for _ in range(2)] == [(1, rows[0]), (2, rows[1])]
    again = RowStream(source, shuffle=False, buffer_size=0)
    again.load_state_dict(stream.state_dict())
    assert _pass(again) == [3, 4, 5]

    _fake_hub_cache(tmp_path / "cache")
    misc = MiscConfig(huggingface_cache_dir=str(tmp_path / "cache"))
    hub = stream_source(DataConfig(dataset_name="user/toy", dataset_config="main"), misc)
    hub_rows = RowStream(hub, shuffle=False, buffer_size=0)
    assert [hub_rows.next() for _ in range(4)] == [
        (1, {"text": "train0"}),
        (2, {"text": "train1"}),
        (3, {"text": "train2"}),
        None,
    ]


def test_bad_line_past_the_first_block_stops_the_stream_there(tmp_path: Path) -> None:
    """Read in small blocks, the rows before a bad line come out, then the error names the
    line (datasets' own error gives only a byte position in the block)."""
    import datasets

    from moepost.components.data.stream import StreamSource

    lines = [json.dumps({"text": f"row {i}", "i": i}) for i in range(1, 41)]
    lines[29] = '{"text": "row 30", "i": '
    path = tmp_path / "late.jsonl"
    path.write_text("\n".join(lines) + "\n")

    def small_blocks() -> Any:
        return datasets.load_dataset(
            "json", data_files=str(path), split="train", streaming=True, chunksize=256
        )

    rows = RowStream(
        StreamSource("data.train_file", str(path), small_blocks, path), shuffle=False, buffer_size=0
    )
    seen = []
    with pytest.raises(UserError) as err:
        while (item := rows.next()) is not None:
            seen.append(item[0])
    assert seen and seen == list(range(1, len(seen) + 1)) and len(seen) < 30
    assert str(err.value).startswith(f"data.train_file: {path} line 30: not valid JSON")


def test_csv_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"text,i\nrow 1,1\nr\xf6w 2,2\n")
    with pytest.raises(UserError, match=rf"^data.train_file: {path} line 3: not UTF-8 text"):
        _pass(_rows(path, shuffle=False, buffer_size=0))
    with pytest.raises(UserError, match=rf"^data.train_file: {path} line 3: not UTF-8 text"):
        read_rows(str(path), "data.train_file")
