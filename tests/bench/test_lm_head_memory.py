"""Peak memory of one SFT micro-batch (forward + backward) on a tiny MoE with a 152k
vocabulary: the chunked LM head stays flat in T (it grows with T x hidden), full logits grow
with T x V. Each variant is measured in a fresh process (bench/lm_head_memory.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from lm_head_memory import measure  # noqa: E402

VOCAB = 151936


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_chunked_head_peak_memory_grows_with_hidden_not_vocab() -> None:
    full = {t: measure(t, VOCAB, chunk_rows=0) for t in (256, 512)}
    chunked = {t: measure(t, VOCAB, chunk_rows=64) for t in (256, 512)}
    for t in (256, 512):  # same loss either way
        assert chunked[t]["loss"] == pytest.approx(full[t]["loss"], rel=1e-5)
    logits_mb = 256 * VOCAB * 4 / 2**20  # one float32 [256, V] block: 148 MB
    full_growth = full[512]["peak_mb"] - full[256]["peak_mb"]
    chunked_growth = chunked[512]["peak_mb"] - chunked[256]["peak_mb"]
    # full logits: at least the extra [256, V] logits and their gradient
    assert full_growth > 2 * logits_mb, full
    # chunked: 256 more tokens cost [256, H] activations, a few MB, not [256, V]
    assert chunked_growth < 0.1 * logits_mb, chunked
    assert full[512]["peak_mb"] > 2.5 * chunked[512]["peak_mb"], (full, chunked)
