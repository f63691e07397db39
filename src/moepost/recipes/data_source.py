"""The training examples of a run, in-memory list or stream, behind one `take` the loops call.

Both keep their position in `TrainState`, so a checkpoint continues the exact data: the list
in `epoch` / `cursor` (its order is recomputed from `train.seed`), the stream in
`extra['data_stream']` (datasets' source position, the shuffle buffer and its RNG).
Data parallel: every rank builds the same source and takes the same global batch; the loop
then keeps the rank's slice (`DistContext.shard`), as for the list.
"""

from __future__ import annotations

from typing import Any

from moepost.components.data.stream import ExampleStream
from moepost.config.schema import Config
from moepost.errors import UserError
from moepost.recipes.common import TrainState, take_examples

STREAM_KEY = "data_stream"


class ListData:
    """Examples in memory: a seeded permutation per epoch (file order with data.shuffle off)."""

    streaming = False

    def __init__(self, examples: list[Any], cfg: Config) -> None:
        self.examples, self.seed, self.shuffle = examples, cfg.train.seed, cfg.data.shuffle

    def __len__(self) -> int:
        return len(self.examples)

    def take(self, state: TrainState, count: int) -> list[Any]:
        idx = take_examples(state, len(self.examples), count, self.seed, shuffle=self.shuffle)
        return [self.examples[i] for i in idx]

    def epoch(self, state: TrainState) -> float:
        return state.epoch + state.cursor / max(1, len(self.examples))

    def all_examples(self) -> list[Any]:
        """RL --eval-only without an eval split evaluates the training prompts."""
        return self.examples

    def restore(self, state: TrainState) -> None:
        if STREAM_KEY in state.extra:
            raise UserError(
                "--resume: the checkpoint was written with data.streaming: true; resume with "
                "the same data settings"
            )

    def metrics(self) -> dict[str, float]:
        return {}


class StreamData:
    """Examples read as a stream; its state is written into `state.extra` after every take."""

    streaming = True

    def __init__(self, stream: ExampleStream) -> None:
        self.stream = stream

    def take(self, state: TrainState, count: int) -> list[Any]:
        out = self.stream.take(count)
        state.epoch = self.stream.epoch
        state.extra[STREAM_KEY] = self.stream.state_dict()
        return out

    def epoch(self, state: TrainState) -> float:
        return float(self.stream.epoch)  # passes started so far: a stream's length is unknown

    def all_examples(self) -> list[Any]:
        raise UserError(
            "--eval-only with data.streaming: true needs data.eval_file or data.eval_split "
            "(a stream is not evaluated whole)"
        )

    def restore(self, state: TrainState) -> None:
        if STREAM_KEY in state.extra:
            self.stream.load_state_dict(state.extra[STREAM_KEY])
        elif state.step > 0:
            raise UserError(
                "--resume: the checkpoint was written without data.streaming; resume with the "
                "same data settings"
            )

    def metrics(self) -> dict[str, float]:
        """Skip counters so far (each pass counts its skips again)."""
        return {f"data/{k}": float(v) for k, v in self.stream.counts.items()}


def sft_train_data(cfg: Config, tokenizer: Any) -> tuple[Any, list[Any], dict[str, float], str]:
    """(train data, eval examples, stats, startup line) of an SFT run."""
    from moepost.components.data.loading import load_sft_data, stream_sft_data

    if cfg.data.streaming:
        stream, evals, stats = stream_sft_data(cfg.data, cfg.misc, tokenizer, seed=cfg.train.seed)
        return StreamData(stream), evals, stats, _stream_line(cfg, len(evals))
    examples, evals, stats = load_sft_data(cfg.data, cfg.misc, tokenizer, seed=cfg.train.seed)
    train: list[Any] = examples
    if cfg.data.packing:
        from moepost.components.data.packing import pack_sft

        train = pack_sft(examples, cfg.data.max_seq_length)
    line = (
        f"data: {stats['num_train']} train / {stats['num_eval']} eval examples, "
        f"{stats['num_truncated']} truncated to data.max_seq_length={cfg.data.max_seq_length}, "
        f"{stats['num_dropped_no_target']} skipped (no assistant token to learn)"
    )
    return ListData(train, cfg), evals, stats, line


def rl_train_data(cfg: Config, tokenizer: Any) -> tuple[Any, list[Any], dict[str, float], str]:
    """(train data, eval prompts, stats, startup line) of an RL run."""
    from moepost.components.data.loading import load_rl_data, stream_rl_data

    if cfg.data.streaming:
        stream, evals, stats = stream_rl_data(cfg.data, cfg.misc, tokenizer, seed=cfg.train.seed)
        return StreamData(stream), evals, stats, _stream_line(cfg, len(evals))
    train, evals, stats = load_rl_data(cfg.data, cfg.misc, tokenizer, seed=cfg.train.seed)
    line = (
        f"data: {len(train)} train / {len(evals)} eval prompts, "
        f"{stats['num_dropped_too_long']} skipped (longer than "
        f"data.max_prompt_length={cfg.data.max_prompt_length})"
    )
    return ListData(train, cfg), evals, stats, line


def _stream_line(cfg: Config, num_eval: int) -> str:
    d = cfg.data
    order = f"shuffle buffer of {d.shuffle_buffer_size} rows" if d.shuffle else "file order"
    return (
        f"data: streaming {d.train_file or d.dataset_name} ({order}), {num_eval} eval examples "
        "in memory; skipped rows are counted as data/* in train_log.jsonl"
    )
