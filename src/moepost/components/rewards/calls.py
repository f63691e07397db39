"""Calling a reward function with a time limit (``reward.timeout_s``), sync or async.

A Python thread cannot be killed, so a sync call with a limit runs in a daemon worker thread
that the caller joins with a timeout. A call past its limit is abandoned: its result is thrown
away, but the thread keeps running until the function returns (daemon=True, so it never blocks
the process from exiting). Each reward keeps its abandoned threads; a reward with
``MAX_ABANDONED`` of them still running stops the run, since every further hang would leak
another thread (and its CPU time). Without a limit a sync call runs in the caller's thread.

Async functions (``async def`` or an async ``__call__``, as TRL allows) run on one event loop
in a daemon thread that lives as long as the process, like TRL's, so clients bound to a loop
keep working between calls. A call past its limit is cancelled; a coroutine that blocks the
loop with sync code cannot be interrupted that way and makes later async calls time out too.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from moepost.errors import UserError

MAX_ABANDONED = 4


def is_async_callable(fn: Callable[..., Any]) -> bool:
    """``async def`` functions, partials of them and instances with an async ``__call__``."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    # An instance with an async __call__: iscoroutinefunction(instance) alone says False.
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


@dataclass
class Outcome:
    """One call's end: its value, the exception it raised, or that it ran out of time."""

    value: Any = None
    error: BaseException | None = None
    timed_out: bool = False


class _Loop:
    """The process-wide event loop for async reward functions, started on first use."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="moepost-reward-loop", daemon=True
                )
                thread.start()
                cls._loop = loop
            return cls._loop


class PendingCall:
    """A started call; :meth:`outcome` waits for it until its deadline."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self._future: Future[Any] | None = None
        self._thread: threading.Thread | None = None
        self._box: dict[str, Any] = {}

    def _remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def outcome(self, abandoned: list[threading.Thread]) -> Outcome:
        """The call's Outcome; a sync thread past its deadline is appended to ``abandoned``."""
        if self._thread is not None:
            self._thread.join(self._remaining())
            if self._thread.is_alive():
                abandoned.append(self._thread)
                return Outcome(timed_out=True)
        elif self._future is not None:
            try:
                self._box["value"] = self._future.result(self._remaining())
            except FutureTimeout:
                if self._future.done():  # the coroutine's own TimeoutError, not our limit
                    self._box["error"] = self._future.exception()
                else:
                    self._future.cancel()
                    return Outcome(timed_out=True)
            except BaseException as exc:  # the coroutine's own exception
                self._box["error"] = exc
        error = self._box.get("error")
        if error is not None and not isinstance(error, Exception):
            raise error  # SystemExit / KeyboardInterrupt from the function: not a reward fault
        if error is None and inspect.isawaitable(self._box.get("value")):
            return _await(self._box["value"], self.deadline).outcome(abandoned)
        return Outcome(value=self._box.get("value"), error=error)


def _await(awaitable: Any, deadline: float | None) -> PendingCall:
    async def wrap() -> Any:
        return await awaitable

    pending = PendingCall(deadline)
    pending._future = asyncio.run_coroutine_threadsafe(wrap(), _Loop.get())
    return pending


def start_call(
    fn: Callable[..., Any],
    kwargs: Mapping[str, Any],
    timeout_s: float | None,
    abandoned: list[threading.Thread],
    name: str,
) -> PendingCall:
    """Start ``fn(**kwargs)``: on the event loop if async, else in a worker thread when there
    is a limit, else right here (the call is done when this returns)."""
    abandoned[:] = [t for t in abandoned if t.is_alive()]
    if len(abandoned) >= MAX_ABANDONED:
        raise UserError(
            f"reward {name!r}: {len(abandoned)} earlier calls ran past reward.timeout_s="
            f"{timeout_s} and are still running; stopping instead of leaking more threads "
            "(fix the hang, or raise reward.timeout_s)"
        )
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = PendingCall(deadline)
    box = pending._box
    if is_async_callable(fn):
        try:
            coroutine = fn(**kwargs)
        except Exception as exc:  # raised before the first await
            box["error"] = exc
            return pending
        return _await(coroutine, deadline)

    def target() -> None:
        try:
            box["value"] = fn(**kwargs)
        except BaseException as exc:  # handed to the caller's thread by outcome()
            box["error"] = exc

    if timeout_s is None:
        target()
        return pending
    pending._thread = threading.Thread(target=target, name=f"moepost-reward-{name}", daemon=True)
    pending._thread.start()
    return pending
