"""Helpers for e2e tests that need a real `prefect server start` (UI on, or on PostgreSQL).

test_server.py keeps its own module-scoped server; these helpers let other tests start one with
the settings they need (UI enabled, another database) without copying the start/wait/stop dance.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compress.testing import free_port  # noqa: E402,F401  (tests import it from here)

BIN = Path(sys.executable).parent


def api(url: str, body: dict | None = None) -> Any:
    """GET (or POST a JSON body) and decode the JSON answer."""
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def prefect_server(home: Path, **settings: str) -> Iterator[tuple[str, dict[str, str]]]:
    """A `prefect server start` on a free loopback port; yields (api url, env for clients).

    The server runs in its own session so that stopping it also stops its workers; its log goes
    to home/server.log for a failing test to show.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    # The UI's scripts call the API at PREFECT_UI_API_URL, which defaults to port 4200.
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": url, **settings}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "wb")  # noqa: SIM115 - closed below, after the server
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=log,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                api(f"{url}/health")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("server did not start:\n" + (home / "server.log")
                                         .read_text(errors="replace")[-3000:]) from None
                time.sleep(0.5)
        yield url, {**env, "PREFECT_API_URL": url}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def flow_runs(url: str, flow_name: str, limit: int = 20) -> list[dict]:
    """The newest runs of a flow, by its name."""
    return api(f"{url}/flow_runs/filter", {"flows": {"name": {"any_": [flow_name]}},
                                          "limit": limit, "sort": "START_TIME_DESC"})


def child_runs(parent_flow: str, child_flow: str) -> tuple[Any, list[Any]]:
    """The newest run of `parent_flow` and the runs of `child_flow` its tasks started (a
    sweep's variants, a search's trials), read through the Prefect client."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        parent = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[parent_flow])))[0]
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[child_flow])))
        tasks = {t.id for t in client.read_task_runs() if t.flow_run_id == parent.id}
    return parent, [r for r in runs if r.parent_task_run_id in tasks]
