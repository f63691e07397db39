"""Data files and datasets -> SFT examples (input_ids + labels) and RL prompts.

Rows are read by `data_files` (local JSONL / JSON / Parquet, a `datasets.save_to_disk` folder,
or a Hub dataset read only from the local Hugging Face cache). Formats are normalised by
`data_formats`; batching and packing live in `packing`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from moepost.components.data_files import read_hub_cached, read_rows
from moepost.components.data_formats import (
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
from moepost.config.schema import DataConfig, MiscConfig
from moepost.errors import UserError


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

    @classmethod
    def of(cls, source: str, rows: list[dict[str, Any]]) -> _Rows:
        return cls(source, rows, list(range(1, len(rows) + 1)))

    def take(self, indices: list[int]) -> _Rows:
        return _Rows(
            self.source, [self.rows[i] for i in indices], [self.numbers[i] for i in indices]
        )


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
    if cfg.train_file:
        if for_eval and not Path(cfg.train_file).expanduser().is_dir():
            raise UserError(
                f"data.eval_split: data.train_file {cfg.train_file} is a single file without "
                "splits; set data.eval_file or data.test_size instead"
            )
        return _Rows.of("data.train_file", read_rows(cfg.train_file, "data.train_file", split))
    if cfg.dataset_name:
        return _Rows.of("data.dataset_name", read_hub_cached(cfg, misc, split))
    raise UserError("data: set data.train_file (a local file or folder) or data.dataset_name")


def _load_split(cfg: DataConfig, misc: MiscConfig, seed: int) -> tuple[_Rows, _Rows | None]:
    train = _source_rows(cfg, misc, cfg.split, for_eval=False)
    eval_rows: _Rows | None = None
    if cfg.eval_file:
        eval_rows = _Rows.of(
            "data.eval_file", read_rows(cfg.eval_file, "data.eval_file", cfg.eval_split or "test")
        )
    elif cfg.eval_split:
        eval_rows = _source_rows(cfg, misc, cfg.eval_split, for_eval=True)
    elif cfg.test_size:
        train, eval_rows = _split_rows(train, cfg.test_size, seed)
    if not train.rows:
        raise UserError(f"{train.source}: no rows to train on")
    if cfg.max_train_samples is not None:
        train = train.take(list(range(min(cfg.max_train_samples, len(train.rows)))))
    if eval_rows is not None and cfg.max_eval_samples is not None:
        eval_rows = eval_rows.take(list(range(min(cfg.max_eval_samples, len(eval_rows.rows)))))
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
    fmt = detect_format(rows.rows[0], cfg, source=rows.source)
    return [
        normalize_row(row, fmt, cfg, source=rows.source, number=n, need_target=need_target)
        for row, n in zip(rows.rows, rows.numbers)
    ]


def _sft_examples(
    records: list[Record], tokenizer: Tokenizer, max_seq_length: int, stats: dict[str, int]
) -> list[SFTExample]:
    examples = []
    for rec in records:
        if rec.text is not None:
            ex = tokenize_text(tokenizer, rec.text)
        else:
            ex = tokenize_conversation(tokenizer, rec.messages)
        if len(ex.input_ids) > max_seq_length:
            stats["num_truncated"] += 1
            ex = SFTExample(ex.input_ids[:max_seq_length], ex.labels[:max_seq_length])
        # With unshifted labels the first position is never a target, so it cannot count.
        if all(label == IGNORE_INDEX for label in ex.labels[1:]):
            stats["num_dropped_no_target"] += 1
            continue
        examples.append(ex)
    return examples


def load_sft_data(
    cfg: DataConfig, misc: MiscConfig, tokenizer: Tokenizer, *, seed: int = 42
) -> tuple[list[SFTExample], list[SFTExample], dict[str, float]]:
    """Train and eval SFT examples, truncated to `data.max_seq_length`, and counts for the log.

    stats: num_train, num_eval, num_truncated, num_dropped_no_target (no assistant token left
    after truncation, or none to begin with), mean_length, max_length (of the train examples).
    """
    if cfg.max_seq_length < 2:
        raise UserError(f"data.max_seq_length: must be >= 2, got {cfg.max_seq_length}")
    train_rows, eval_rows = _load_split(cfg, misc, seed)
    counts = {"num_truncated": 0, "num_dropped_no_target": 0}
    train = _sft_examples(
        _records(train_rows, cfg, need_target=True), tokenizer, cfg.max_seq_length, counts
    )
    evals = _sft_examples(
        _records(eval_rows, cfg, need_target=True), tokenizer, cfg.max_seq_length, counts
    )
    if not train:
        raise UserError(f"{train_rows.source}: no training example has an assistant token to learn")
    lengths = [len(ex.input_ids) for ex in train]
    stats: dict[str, float] = {
        "num_train": len(train),
        "num_eval": len(evals),
        **counts,
        "mean_length": sum(lengths) / len(lengths),
        "max_length": max(lengths),
    }
    return train, evals, stats


def _prompt_examples(
    records: list[Record], tokenizer: Tokenizer, max_prompt_length: int, stats: dict[str, int]
) -> list[PromptExample]:
    examples = []
    for rec in records:
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
        if len(ids) > max_prompt_length:
            stats["num_dropped_too_long"] += 1
            continue
        examples.append(PromptExample(prompt_messages, text, ids, columns, rec.conversational))
    return examples


def load_rl_data(
    cfg: DataConfig, misc: MiscConfig, tokenizer: Tokenizer, *, seed: int = 42
) -> tuple[list[PromptExample], list[PromptExample], dict[str, float]]:
    """Train and eval prompts for RL; prompts over `data.max_prompt_length` tokens are dropped.

    A trailing assistant turn is removed from the prompt and kept as columns['answer'] when the
    row has no other reference. stats: num_train, num_eval, num_dropped_too_long,
    mean_prompt_length, max_prompt_length.
    """
    train_rows, eval_rows = _load_split(cfg, misc, seed)
    counts = {"num_dropped_too_long": 0}
    train = _prompt_examples(
        _records(train_rows, cfg, need_target=False), tokenizer, cfg.max_prompt_length, counts
    )
    evals = _prompt_examples(
        _records(eval_rows, cfg, need_target=False), tokenizer, cfg.max_prompt_length, counts
    )
    if not train:
        raise UserError(
            f"data.max_prompt_length: every training prompt is longer than "
            f"{cfg.max_prompt_length} tokens"
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
