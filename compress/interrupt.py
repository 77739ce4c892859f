"""Stopping a run when asked: the first Ctrl-C (or SIGTERM) ends it, on every path.

A signal only reaches Python's main thread, and only between bytecodes: a run whose work happens
in another thread (Prefect's engine) or inside a long native call never sees it in time. So the
handler also records the request, and the long loops (training steps, evaluation batches) call
`check()`, which raises `Interrupted` in whatever thread runs them. The pipeline records the run
as interrupted, staging folders are removed on the way out, and finished stages stay.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

_requested: list[int] = []
_lock = threading.Lock()


class Interrupted(BaseException):
    """Raised where a stop was requested. A BaseException, like KeyboardInterrupt: generic
    `except Exception` handlers (retries, fallbacks) must not swallow it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def request(signum: int) -> None:
    with _lock:
        if not _requested:
            _requested.append(signum)


def requested() -> int | None:
    return _requested[0] if _requested else None


def clear() -> None:
    with _lock:
        _requested.clear()


def check() -> None:
    """Raise Interrupted if a stop was requested (call it in long loops)."""
    if _requested:
        raise Interrupted(_requested[0])


def _handler(signum: int, frame: FrameType | None) -> None:
    request(signum)
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals(*signals: int) -> Iterator[None]:
    """SIGINT/SIGTERM (default) request a stop and raise Interrupted in the main thread; the
    previous handlers come back after the block."""
    sigs = signals or (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, _handler) for s in sigs}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
