"""File locks: one run of a recipe at a time, one builder of a stage output at a time.

flock dies with its process, so a killed run never leaves a stale lock. The lock file holds who
holds it (pid, host, since), for the message a waiting or refused run prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path


@contextlib.contextmanager
def exclusive(path: Path, *, wait: bool, on_wait: Callable[[str], None] | None = None,
              poll_s: float = 0.5) -> Iterator[None]:
    """Hold an exclusive lock on `path` for the block.

    wait=False: raise BlockingIOError (with the holder in its message) if another process holds
    it. wait=True: wait for it, calling `on_wait(holder)` once; waiting polls, so a signal
    (Ctrl-C) still stops the waiter.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        told = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                if not wait:
                    raise BlockingIOError(holder) from None
                if on_wait is not None and not told:
                    on_wait(holder)
                    told = True
                time.sleep(poll_s)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                f"{datetime.now(UTC).isoformat(timespec='seconds')}")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)
