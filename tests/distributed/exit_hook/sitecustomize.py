"""Test-only kill switch, installed from outside moepost: with this folder on PYTHONPATH and
`MOEPOST_TEST_EXIT_AFTER_STEP=k`, every process of a moepost run calls `os._exit(17)` right
after it logged step k's training row (all of step k's work and collectives done, nothing of
step k+1 begun), the way a preempted job dies: no cleanup, no final save.

Python imports `sitecustomize` at start-up, so the launchers' own command lines
(`torchrun ... -m moepost`, `deepspeed ... --module moepost`) run unchanged. Nothing in
moepost knows about this hook.
"""

from __future__ import annotations

import os

_STEP = os.environ.get("MOEPOST_TEST_EXIT_AFTER_STEP")

if _STEP:
    from typing import Any

    from moepost.components.training.logging import RunLogger

    _log = RunLogger.log

    def _log_then_exit(self: RunLogger, row: dict[str, Any]) -> None:
        _log(self, row)  # rank 0 writes the row first; the other ranks' loggers are off
        if "loss" in row and str(row.get("step")) == _STEP:
            os._exit(17)

    RunLogger.log = _log_then_exit  # type: ignore[method-assign]
