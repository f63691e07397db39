"""data.streaming under data parallelism: every rank reads the same stream and keeps its slice
of each global batch, so two processes train on exactly the one-process examples."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_ddp_gloo import assert_same_run, log_rows, torchrun

from moepost.config.load import load_config
from moepost.recipes.sft import run_sft

# A shuffle buffer of 5 rows over the first 10 rows of the file: 3 steps x 4 examples start
# a second, differently shuffled pass in step 3.
STREAM = ["data.streaming=true", "data.shuffle_buffer_size=5", "data.max_train_samples=10"]


@pytest.mark.slow
def test_sft_streamed_two_ranks_match_one_process(sft_cfg: Path, workdir: Path) -> None:
    one, two = workdir / "stream_one", workdir / "stream_ddp"
    run_sft(load_config(sft_cfg, [*STREAM, f"logging.output_dir={one}"]))
    torchrun(["-m", "moepost", "train", str(sft_cfg), *STREAM, f"logging.output_dir={two}"])
    assert [r["epoch"] for r in log_rows(one)] == [0, 0, 1]
    assert_same_run(one, two)
