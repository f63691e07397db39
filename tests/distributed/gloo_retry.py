"""One retry for a 2-process launch whose gloo worker thread aborted while a rank tore down."""

from __future__ import annotations

import subprocess
import warnings
from collections.abc import Callable

TEARDOWN_ABORT = "terminate called without an active"


def retry_teardown_abort(
    launch: Callable[[], subprocess.CompletedProcess[str]],
) -> subprocess.CompletedProcess[str]:
    """`launch()`, and once more if it failed with the gloo teardown abort (SIGABRT after the
    work is done, seen on a loaded 2-core machine). Loud, and only once, so a real failure
    still fails the test."""
    proc = launch()
    if proc.returncode != 0 and TEARDOWN_ABORT in proc.stdout + proc.stderr:
        warnings.warn("torchrun: gloo aborted at teardown (SIGABRT); retrying once", stacklevel=2)
        proc = launch()
    return proc
