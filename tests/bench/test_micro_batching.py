"""bench/micro_batching.py must not rot; its first-step losses must agree across groupings."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_micro_batching_bench_quick_run() -> None:
    result = subprocess.run(
        [sys.executable, "bench/micro_batching.py", "--quick", "--runs", "1", "--threads", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "| real tokens/s" in out, out[-2000:]
    first = re.search(r"loss difference \(run 1 of each\): ([0-9.e+-]+) at step 1", out)
    assert first is not None, out[-2000:]
    # One step of the same batch, only grouped differently: float summation order alone.
    assert float(first.group(1)) < 1e-5
