"""Data files and datasets -> SFT examples (input_ids + labels) and RL prompts.

Rows are read by `data_files` (local JSONL / JSON / Parquet, a `datasets.save_to_disk` folder,
or a Hub dataset read only from the local Hugging Face cache). Formats are normalised by
`data_formats`; batching and packing live in `packing`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from moepost.components.data.chat_formats import TextGuard, chat_format_name, check_chat_format
from moepost.components.data.files import read_hub_cached, read_rows
from moepost.components.data.formats import (
    IGNORE_INDEX,
    Conversation,
    Record,
    SFTExample,
    Tokenizer,
    detect_format,
    encode,
    normalize_row,
    render_chat,
    split_prompt,
    tokenize_conversation,
    tokenize_text,
)
from moepost.components.data.stream import ExampleStream, RowStream, stream_source
from moepost.config.schema import DataConfig, MiscConfig
from moepost.errors import UserError

logger = logging.getLogger("moepost.data")


@dataclass
class PromptExample:
    prompt_messages: Conversation
    prompt_text: str  # chat template applied with add_generation_prompt=True
    prompt_ids: list[int]
    columns: dict[str, Any]  # the row's other fields; 'answer' is the reward's reference
    conversational: bool = False  # prompt given as messages: rewards get messages (TRL's way)

    @property
    def reward_prompt(self) -> str | Conversation:
        """The prompt as TRL passes it to reward functions: the messages of conversational
        data, else the rendered prompt text the model saw."""
        return self.prompt_messages if self.conversational else self.prompt_text


@dataclass
class _Rows:
    """Raw rows plus where they came from, so errors can name the key and 1-based row number."""

    source: str
    rows: list[dict[str, Any]]
    numbers: list[int]
    file: str | None = None  # the file or dataset the rows came from, named in errors

    @classmethod
    def of(cls, source: str, rows: list[dict[str, Any]], file: str | None = None) -> _Rows:
        return cls(source, rows, list(range(1, len(rows) + 1)), file)

    def take(self, indices: list[int]) -> _Rows:
        return _Rows(
            self.source,
            [self.rows[i] for i in indices],
            [self.numbers[i] for i in indices],
            self.file,
        )


def in_file(error: UserError, file: str | None) -> UserError:
    """`error` with the file it is about appended, unless it names it already."""
    if not file or file in str(error):
        return error
    return UserError(f"{error} (in {file})")


def _eval_count(test_size: float, num_rows: int) -> int:
    """`data.test_size`: a fraction in (0, 1) (at least one row) or a whole number of rows."""
    if test_size < 0:
        raise UserError(f"data.test_size: must be >= 0, got {test_size}")
    if test_size < 1:
        count = max(int(round(test_size * num_rows)), 1)
    elif test_size == int(test_size):
        count = int(test_size)
    else:
        raise UserError(
            f"data.test_size: {test_size} is neither a fraction in (0, 1) nor a whole row count"
        )
    if count >= num_rows:
        raise UserError(
            f"data.test_size: {count} eval rows leave no training rows ({num_rows} rows in all)"
        )
    return count


def _split_rows(rows: _Rows, test_size: float, seed: int) -> tuple[_Rows, _Rows]:
    """Deterministic random split; both sides keep the file's order."""
    n_eval = _eval_count(test_size, len(rows.rows))
    order = list(range(len(rows.rows)))
    random.Random(seed).shuffle(order)
    eval_idx = sorted(order[:n_eval])
    train_idx = sorted(order[n_eval:])
    return rows.take(train_idx), rows.take(eval_idx)


def _source_rows(cfg: DataConfig, misc: MiscConfig, split: str, *, for_eval: bool) -> _Rows:
    cap = cfg.max_in_memory_bytes
    if cfg.train_file:
        if for_eval and not Path(cfg.train_file).expanduser().is_dir():
            raise UserError(
                f"data.eval_split: data.train_file {cfg.train_file} is a single file without "
                "splits; set data.eval_file or data.test_size instead"
            )
        rows = read_rows(cfg.train_file, "data.train_file", split, max_bytes=cap)
        return _Rows.of("data.train_file", rows, cfg.train_file)
    if cfg.dataset_name:
        where = f"{cfg.dataset_name} split {split}"
        return _Rows.of("data.dataset_name", read_hub_cached(cfg, misc, split), where)
    raise UserError("data: set data.train_file (a local file or folder) or data.dataset_name")


def _eval_rows(cfg: DataConfig, misc: MiscConfig) -> _Rows | None:
    """The rows of data.eval_file or data.eval_split (always read into memory), else None."""
    rows = None
    if cfg.eval_file:
        split = cfg.eval_split or "test"
        read = read_rows(cfg.eval_file, "data.eval_file", split, max_bytes=cfg.max_in_memory_bytes)
        rows = _Rows.of("data.eval_file", read, cfg.eval_file)
    elif cfg.eval_split:
        rows = _source_rows(cfg, misc, cfg.eval_split, for_eval=True)
    if rows is not None and not rows.rows:
        raise UserError(f"{rows.source}: {rows.file}: no evaluation rows (it is empty)")
    if rows is not None and cfg.max_eval_samples is not None:
        rows = rows.take(list(range(min(cfg.max_eval_samples, len(rows.rows)))))
    return rows


def _load_split(cfg: DataConfig, misc: MiscConfig, seed: int) -> tuple[_Rows, _Rows | None]:
    train = _source_rows(cfg, misc, cfg.split, for_eval=False)
    if not train.rows:
        raise UserError(f"{train.source}: {train.file}: no rows to train on (it is empty)")
    eval_rows = _eval_rows(cfg, misc)
    if eval_rows is None and cfg.test_size:
        train, eval_rows = _split_rows(train, cfg.test_size, seed)
        if cfg.max_eval_samples is not None:
            eval_rows = eval_rows.take(list(range(min(cfg.max_eval_samples, len(eval_rows.rows)))))
    if cfg.max_train_samples is not None:
        train = train.take(list(range(min(cfg.max_train_samples, len(train.rows)))))
    return train, eval_rows


def load_rows(
    cfg: DataConfig, misc: MiscConfig, *, which: Literal["train", "eval"], seed: int = 42
) -> list[dict[str, Any]]:
    """Raw rows of the train or eval side ([] for eval when no eval source is configured).

    seed: the `data.test_size` split's seed (pass `train.seed`); the same seed gives the same split.
    """
    train, eval_rows = _load_split(cfg, misc, seed)
    if which == "train":
        return train.rows
    return eval_rows.rows if eval_rows is not None else []


def _records(rows: _Rows | None, cfg: DataConfig, *, need_target: bool) -> list[Record]:
    if rows is None or not rows.rows:
        return []
    try:
        fmt = detect_format(rows.rows[0], cfg, source=rows.source)
        return [
            normalize_row(row, fmt, cfg, source=rows.source, number=n, need_target=need_target)
            for row, n in zip(rows.rows, rows.numbers)
        ]
    except UserError as e:
        raise in_file(e, rows.file) from None


def sft_example(
    rec: Record,
    tokenizer: Tokenizer,
    max_seq_length: int,
    stats: dict[str, int],
    guard: TextGuard,
) -> SFTExample | None:
    """Tokens + labels of one record, cut to `max_seq_length`; None (counted in
    stats['num_dropped_no_target']) when no assistant token is left to learn. The record's
    text is checked by `guard` (control tokens, unknown characters) before it is tokenised."""
    guard.check_text(_record_texts(rec), rec.where)
    if rec.text is None and not any(
        m["role"] == "assistant" and m["content"].strip() for m in rec.messages
    ):
        stats["num_dropped_no_target"] += 1  # no assistant text: only an end-of-turn to learn
        return None
    if rec.text is not None:
        ex = tokenize_text(tokenizer, rec.text)
    else:
        ex = tokenize_conversation(tokenizer, rec.messages)
    guard.check_ids(ex.input_ids, _record_texts(rec), rec.where)
    if rec.text is None:
        rendered = render_chat(tokenizer, rec.messages, add_generation_prompt=False)
        _note_changed(rec.where, _changed_turn(rec.messages, rendered), stats)
    if len(ex.input_ids) > max_seq_length:
        stats["num_truncated"] += 1
        ex = SFTExample(ex.input_ids[:max_seq_length], ex.labels[:max_seq_length])
    # With unshifted labels the first position is never a target, so it cannot count.
    if all(label == IGNORE_INDEX for label in ex.labels[1:]):
        stats["num_dropped_no_target"] += 1
        return None
    return ex


def _record_texts(rec: Record) -> list[str]:
    """Every text of the row that reaches the template (message keys besides content too)."""
    if rec.text is not None:
        return [rec.text]
    return [v for m in rec.messages for k, v in m.items() if k != "role" and isinstance(v, str)]


def _changed_turn(messages: Conversation, rendered: str) -> str | None:
    """The role of the first non-assistant turn whose text the chat template did not write as
    is (Llama 3's template trims every turn, some templates drop a system turn), else None."""
    for msg in messages:
        if msg["role"] != "assistant" and msg["content"] and msg["content"] not in rendered:
            return msg["role"]
    return None


def _note_changed(where: str, role: str | None, stats: dict[str, int]) -> None:
    """Count a row whose `role` turn the chat template changed; warn at the first one."""
    count = stats.setdefault("num_changed_by_template", 0)
    if role is None:
        return
    stats["num_changed_by_template"] = count + 1
    if count == 0:
        logger.warning(
            "data: the tokenizer's chat template does not write the text of a row as given "
            "(first: %s, its %s turn), e.g. it trims or drops a turn; the model sees the "
            "template's version (rows affected: num_changed_by_template in the data stats)",
            where, role,
        )  # fmt: skip


def _check_prompt_template(cfg: DataConfig, tokenizer: Tokenizer) -> None:
    name = chat_format_name(cfg.prompt_template)
    if name is not None:
        check_chat_format(tokenizer, name)


def _sft_examples(
    records: list[Record], tokenizer: Tokenizer, max_seq_length: int, stats: dict[str, int]
) -> list[SFTExample]:
    guard = TextGuard(tokenizer)
    stats.setdefault("num_changed_by_template", 0)
    examples = (sft_example(rec, tokenizer, max_seq_length, stats, guard) for rec in records)
    return [ex for ex in examples if ex is not None]


def load_sft_data(
    cfg: DataConfig, misc: MiscConfig, tokenizer: Tokenizer, *, seed: int = 42
) -> tuple[list[SFTExample], list[SFTExample], dict[str, float]]:
    """Train and eval SFT examples, truncated to `data.max_seq_length`, and counts for the log.

    stats: num_train, num_eval, num_truncated, num_dropped_no_target (no assistant token left
    after truncation, or none to begin with), num_changed_by_template (rows whose user / system
    text the chat template does not write as given; logged as a warning), mean_length,
    max_length (of the train examples).
    """
    if cfg.max_seq_length < 2:
        raise UserError(f"data.max_seq_length: must be >= 2, got {cfg.max_seq_length}")
    _check_prompt_template(cfg, tokenizer)
    train_rows, eval_rows = _load_split(cfg, misc, seed)
    counts = {"num_truncated": 0, "num_dropped_no_target": 0, "num_changed_by_template": 0}
    train = _sft_examples(
        _records(train_rows, cfg, need_target=True), tokenizer, cfg.max_seq_length, counts
    )
    evals = _sft_examples(
        _records(eval_rows, cfg, need_target=True), tokenizer, cfg.max_seq_length, counts
    )
    if not train:
        raise UserError(
            f"{train_rows.source}: {train_rows.file}: no training example has an assistant token "
            f"to learn ({counts['num_dropped_no_target']} rows skipped)"
        )
    lengths = [len(ex.input_ids) for ex in train]
    stats: dict[str, float] = {
        "num_train": len(train),
        "num_eval": len(evals),
        **counts,
        "mean_length": sum(lengths) / len(lengths),
        "max_length": max(lengths),
    }
    return train, evals, stats


def prompt_example(
    rec: Record,
    tokenizer: Tokenizer,
    max_prompt_length: int,
    stats: dict[str, int],
    guard: TextGuard,
) -> PromptExample | None:
    """The RL prompt of one record; None (counted in stats['num_dropped_too_long']) when it
    has more than `max_prompt_length` tokens. The text is checked by `guard` first."""
    guard.check_text(_record_texts(rec), rec.where)
    if rec.text is not None:
        prompt_messages: Conversation = [{"role": "user", "content": rec.text}]
        target = None
    else:
        prompt_messages, target = split_prompt(rec.messages)
    columns = dict(rec.columns)
    if target is not None:
        columns.setdefault("answer", target)
    text = render_chat(tokenizer, prompt_messages, add_generation_prompt=True)
    ids = encode(tokenizer, text)
    guard.check_ids(ids, [m["content"] for m in prompt_messages], rec.where)
    _note_changed(rec.where, _changed_turn(prompt_messages, text), stats)
    if len(ids) > max_prompt_length:
        stats["num_dropped_too_long"] += 1
        return None
    return PromptExample(prompt_messages, text, ids, columns, rec.conversational)


def _prompt_examples(
    records: list[Record], tokenizer: Tokenizer, max_prompt_length: int, stats: dict[str, int]
) -> list[PromptExample]:
    guard = TextGuard(tokenizer)
    stats.setdefault("num_changed_by_template", 0)
    examples = (prompt_example(rec, tokenizer, max_prompt_length, stats, guard) for rec in records)
    return [ex for ex in examples if ex is not None]


def load_rl_data(
    cfg: DataConfig, misc: MiscConfig, tokenizer: Tokenizer, *, seed: int = 42
) -> tuple[list[PromptExample], list[PromptExample], dict[str, float]]:
    """Train and eval prompts for RL; prompts over `data.max_prompt_length` tokens are dropped.

    A trailing assistant turn is removed from the prompt and kept as columns['answer'] when the
    row has no other reference. stats: num_train, num_eval, num_dropped_too_long,
    num_changed_by_template (see load_sft_data),
    mean_prompt_length, max_prompt_length.
    """
    _check_prompt_template(cfg, tokenizer)
    train_rows, eval_rows = _load_split(cfg, misc, seed)
    counts = {"num_dropped_too_long": 0, "num_changed_by_template": 0}
    train = _prompt_examples(
        _records(train_rows, cfg, need_target=False), tokenizer, cfg.max_prompt_length, counts
    )
    evals = _prompt_examples(
        _records(eval_rows, cfg, need_target=False), tokenizer, cfg.max_prompt_length, counts
    )
    if not train:
        raise UserError(
            f"data.max_prompt_length: every training prompt of {train_rows.file} is longer "
            f"than {cfg.max_prompt_length} tokens ({counts['num_dropped_too_long']} rows skipped)"
        )
    lengths = [len(ex.prompt_ids) for ex in train]
    stats: dict[str, float] = {
        "num_train": len(train),
        "num_eval": len(evals),
        **counts,
        "mean_prompt_length": sum(lengths) / len(lengths),
        "max_prompt_length": max(lengths),
    }
    return train, evals, stats


# ---------------------------------------------------------------- streaming (data.streaming)


def _stream(
    cfg: DataConfig,
    misc: MiscConfig,
    seed: int,
    counts: dict[str, int],
    make: Any,
    need_target: bool,
) -> ExampleStream:
    """An ExampleStream whose rows go through the same normalise / tokenise steps as the
    in-memory loader (`make(record) -> example | None`, counting skips in `counts`)."""
    source = stream_source(cfg, misc)
    rows = RowStream(
        source,
        shuffle=cfg.shuffle,
        buffer_size=cfg.shuffle_buffer_size,
        seed=seed,
        max_rows=cfg.max_train_samples,
    )
    try:
        fmt = detect_format(rows.first_row(), cfg, source=source.key)
    except UserError as e:
        raise in_file(e, source.where) from None

    def convert(number: int, row: dict[str, Any]) -> Any:
        try:
            rec = normalize_row(
                row, fmt, cfg, source=source.key, number=number, need_target=need_target
            )
        except UserError as e:
            raise in_file(e, source.where) from None
        return make(rec)

    return ExampleStream(rows, convert, counts)


def stream_sft_data(
    cfg: DataConfig, misc: MiscConfig, tokenizer: Tokenizer, *, seed: int = 42
) -> tuple[ExampleStream, list[SFTExample], dict[str, float]]:
    """`load_sft_data` for data.streaming: the train side as a stream; eval rows (data.eval_file
    or data.eval_split) are read into memory. stats: num_eval."""
    _check_prompt_template(cfg, tokenizer)
    guard = TextGuard(tokenizer)
    counts = {"num_truncated": 0, "num_dropped_no_target": 0, "num_changed_by_template": 0}
    stream = _stream(
        cfg,
        misc,
        seed,
        counts,
        lambda rec: sft_example(rec, tokenizer, cfg.max_seq_length, counts, guard),
        need_target=True,
    )
    eval_counts = {"num_truncated": 0, "num_dropped_no_target": 0}
    evals = _sft_examples(
        _records(_eval_rows(cfg, misc), cfg, need_target=True),
        tokenizer,
        cfg.max_seq_length,
        eval_counts,
    )
    return stream, evals, {"num_eval": len(evals)}


def stream_rl_data(
    cfg: DataConfig, misc: MiscConfig, tokenizer: Tokenizer, *, seed: int = 42
) -> tuple[ExampleStream, list[PromptExample], dict[str, float]]:
    """`load_rl_data` for data.streaming (see `stream_sft_data`)."""
    _check_prompt_template(cfg, tokenizer)
    guard = TextGuard(tokenizer)
    counts = {"num_dropped_too_long": 0, "num_changed_by_template": 0}
    stream = _stream(
        cfg,
        misc,
        seed,
        counts,
        lambda rec: prompt_example(rec, tokenizer, cfg.max_prompt_length, counts, guard),
        need_target=False,
    )
    evals = _prompt_examples(
        _records(_eval_rows(cfg, misc), cfg, need_target=False),
        tokenizer,
        cfg.max_prompt_length,
        {"num_dropped_too_long": 0},
    )
    return stream, evals, {"num_eval": len(evals)}
