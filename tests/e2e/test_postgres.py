"""Prefect's server on PostgreSQL (what a shared, multi-worker setup uses instead of SQLite).

A throwaway cluster: initdb in a temp folder, postgres on a free loopback port with fsync off,
one database; then `prefect server start` on it, a recipe through the flow, and the card read
back through the API and the run found in Postgres's own `flow_run` table.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import api, flow_runs, free_port, prefect_server

pytestmark = pytest.mark.e2e
PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its tools as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def postgres_cluster() -> Iterator[tuple[str, Path]]:
    """A fresh cluster on 127.0.0.1; yields (SQLAlchemy URL for Prefect, its bin folder)."""
    if not PG_BINS:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    bin_dir = PG_BINS[-1].parent
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
    base = Path(tempfile.mkdtemp(prefix="compress-pg-"))  # not under pytest's root-only tmp
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
    port = free_port()
    proc = None
    try:
        subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(base / "data"), "-U",
                                     "prefect", "--auth=trust", "--no-sync", "-E", "UTF8"]),
                       check=True, capture_output=True, timeout=120)
        log = base / "postgres.log"
        proc = subprocess.Popen(
            _as_postgres([str(bin_dir / "postgres"), "-D", str(base / "data"), "-k", str(base),
                          "-p", str(port), "-h", "127.0.0.1", "-F"]),
            stdout=subprocess.DEVNULL, stderr=open(log, "wb"),  # noqa: SIM115
            start_new_session=True)
        deadline = time.monotonic() + 60
        while subprocess.run([str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                             capture_output=True).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.3)
        subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U",
                        "prefect", "prefect"], check=True, capture_output=True, timeout=60)
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect", bin_dir
    finally:
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)  # fast shutdown
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(base, ignore_errors=True)


def test_prefect_server_on_postgres_runs_a_recipe(write_recipe, tmp_path):
    pytest.importorskip("asyncpg")
    with postgres_cluster() as (db_url, bin_dir):
        home = tmp_path / "prefect-home"
        home.mkdir()
        with prefect_server(home, PREFECT_API_DATABASE_CONNECTION_URL=db_url,
                            PREFECT_UI_ENABLED="false") as (url, env):
            recipe = write_recipe([{"kind": "prune", "ffn": 0.5}, {"kind": "export"}])
            r = subprocess.run([sys.executable, "-m", "compress.cli", "run", str(recipe),
                                "--reports-dir", str(tmp_path / "reports")], env=env,
                               capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
            arts = api(f"{url}/artifacts/filter",
                       {"artifacts": {"key": {"any_": ["tiny-report-card"]}}, "limit": 1,
                        "sort": "CREATED_DESC"})
            assert arts and arts[0]["type"] == "table"
            data = arts[0]["data"]
            rows = json.loads(data) if isinstance(data, str) else data
            assert [row["stage"] for row in rows][-2:] == ["prune", "export"]
            [run] = flow_runs(url, "compress-recipe")
            assert run["state"]["type"] == "COMPLETED"
            assert {"compress", "tiny"} <= set(run["tags"])

        port = db_url.rsplit(":", 1)[1].split("/")[0]
        q = subprocess.run([str(bin_dir / "psql"), "-h", "127.0.0.1", "-p", port, "-U", "prefect",
                            "-d", "prefect", "-At", "-c",
                            "select name, state_type from flow_run"],
                           capture_output=True, text=True, timeout=60, check=True)
        assert q.stdout.strip() == f"{run['name']}|COMPLETED", q.stdout
