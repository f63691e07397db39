"""SIGTERM / SIGINT during training: finish the step, save, exit with 128 + the signal number.

The command line (`cli.py`) installs the handlers around a training run; a recipe called as a
library function gets none (Python's defaults stay). Before the training loop starts (model
and data loading) a signal stops the run at once: there is nothing to save. Once the loop runs,
the first signal is recorded and the loop stops after the current step, writing a checkpoint
when `train.save_on_signal` (exit 143 for SIGTERM, 130 for SIGINT). A second signal exits at
once with the same code; the checkpoint being written then, if any, is left incomplete and is
never resumed from.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """The run stopped on a signal; `exit_code` is 128 + the signal number. A BaseException
    (like KeyboardInterrupt), so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class _State:
    installed = False
    deferred = False  # True once the training loop runs: finish the step first
    received: int | None = None


_state = _State()


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _handle(signum: int, _frame: FrameType | None) -> None:
    if _state.received is not None or not _state.deferred:
        when = "second signal" if _state.received is not None else "before training started"
        print(f"moepost: {signal_name(signum)} ({when}): exiting now", file=sys.stderr, flush=True)
        if _state.received is None:
            _state.received = signum
            raise Stopped(signum, f"stopped by {signal_name(signum)} before training started")
        os._exit(128 + signum)
    _state.received = signum
    print(
        f"moepost: {signal_name(signum)}: finishing the current step, then stopping "
        "(send it again to exit at once)",
        file=sys.stderr,
        flush=True,
    )


@contextmanager
def handle_stop_signals() -> Iterator[None]:
    """Install the handlers for the duration of a training run (main thread only)."""
    previous = {s: signal.getsignal(s) for s in HANDLED}
    for s in HANDLED:
        signal.signal(s, _handle)
    _state.installed, _state.deferred, _state.received = True, False, None
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _state.installed = _state.deferred = False


def defer_signals() -> None:
    """The training loop starts: from now on a signal ends the run after the current step."""
    _state.deferred = _state.installed


def requested(dist: Any = None) -> int | None:
    """The signal to stop on, agreed by all ranks (any rank's signal stops every rank)."""
    local = _state.received or 0
    agreed = dist.max_int(local) if dist is not None and dist.active else local
    return agreed or None
