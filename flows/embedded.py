"""Prefect's embedded server, tied to the life of the `compress` process that started it.

Without PREFECT_API_URL, Prefect starts a temporary API server (uvicorn, a child process) and
stops it from an `atexit` hook. A SIGTERM kills Python without running atexit hooks, and SIGKILL
runs nothing at all, so the server outlived a killed `compress run`. Here we start that same
server ourselves, turn SIGTERM/SIGHUP into a normal exit (atexit hooks and `finally` blocks run:
Prefect marks the run crashed, the server stops), and leave a small watchdog process that stops
the server if its parent dies without a chance to clean up (SIGKILL, OOM killer).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from types import FrameType

# Runs in its own session (a signal to our process group must not take it first): waits for its
# parent to go, then stops the server with SIGTERM, and SIGKILL after 5 s. Checking the command
# line first keeps a recycled pid safe.
_WATCHDOG = """
import os, signal, sys, time
parent, server = int(sys.argv[1]), int(sys.argv[2])
while os.getppid() == parent:
    time.sleep(0.5)
def alive():
    try:
        with open(f"/proc/{server}/cmdline", "rb") as f:
            return b"uvicorn" in f.read()
    except OSError:
        return False
for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
    if not alive():
        break
    os.kill(server, sig)
    end = time.monotonic() + wait
    while alive() and time.monotonic() < end:
        time.sleep(0.1)
"""


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def embedded_server() -> Iterator[str | None]:
    """Yield the API URL of a server that dies with this process: the configured one (not ours,
    yields None), or the embedded one, set as PREFECT_API_URL for this block so that every
    client, Dask workers included, reaches the same one.

    The embedded server is stopped by Prefect's own exit hook, after Prefect has flushed its logs
    and events to it (stopping it here, earlier, leaves those flushes retrying a dead server).
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield None
        return
    from prefect.server.api.server import SubprocessASGIServer

    previous = {s: signal.signal(s, _exit_on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        server = SubprocessASGIServer()  # the instance Prefect's clients would start themselves
        # Prefect's 20 s default is the measured start-up time with a fresh PREFECT_HOME on 2
        # cores: a busy machine (CI, a training run beside it) needs more.
        server.start(timeout=180)
        assert server.server_process is not None
        _watch(server.server_process.pid)
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _watch(server_pid: int) -> None:
    """The watchdog outlives us by at most half a second; nothing waits for it."""
    subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(server_pid)],
                     start_new_session=True, stdin=subprocess.DEVNULL)
