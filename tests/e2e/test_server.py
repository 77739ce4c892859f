"""Against a real `prefect server start` on loopback: serve a recipe, submit it, read artifacts.

Also checks the checked-in prefect.yaml: its entrypoint, recipe and schedule are valid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import api, free_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home")),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while True:
        try:
            api(f"{url}/health")
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.5)
    yield url, env
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def test_serve_submit_and_read_the_card_through_the_api(server, write_recipe, tmp_path):
    url, env = server
    env = {**env, "PREFECT_API_URL": url}
    recipe = write_recipe([{"kind": "prune", "ffn": 0.5}, {"kind": "export"}])
    reports = tmp_path / "reports"
    served = subprocess.Popen([str(BIN / "compress"), "serve", str(recipe), "--cron", "0 3 * * *",
                               "--reports-dir", str(reports)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                dep = api(f"{url}/deployments/name/compress-nightly/tiny")
                break
            except OSError:
                assert served.poll() is None and time.monotonic() < deadline, "not served"
                time.sleep(1)
        assert dep["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
        r = subprocess.run([str(BIN / "compress"), "submit", str(recipe), "--watch"], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Completed" in r.stdout
    finally:
        os.killpg(served.pid, signal.SIGTERM)
        served.wait(timeout=30)
    arts = api(f"{url}/artifacts/filter",
                {"artifacts": {"key": {"any_": ["tiny-report-card"]}}, "limit": 5,
                 "sort": "CREATED_DESC"})
    assert arts and arts[0]["type"] == "table"
    rows = json.loads(arts[0]["data"]) if isinstance(arts[0]["data"], str) else arts[0]["data"]
    assert [row["stage"] for row in rows][-2:] == ["prune", "export"]
    assert (reports / "tiny" / "latest" / "model" / "model.onnx").is_file()


def test_serve_without_a_server_says_how_to_start_one(write_recipe):
    from typer.testing import CliRunner

    from compress.cli import app

    os.environ.pop("PREFECT_API_URL", None)
    r = CliRunner().invoke(app, ["serve", str(write_recipe([{"kind": "export"}]))])
    assert r.exit_code == 1 and "needs a Prefect server" in r.output


def test_prefect_yaml_names_a_real_flow_recipe_and_schedule():
    from prefect.schedules import Cron

    from compress.recipe import load_recipe
    from flows import compress_flow

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for dep in spec["deployments"]:
        path, func = dep["entrypoint"].split(":")
        assert (ROOT / path).is_file() and getattr(compress_flow, func).name == "compress-nightly"
        recipe = load_recipe(ROOT / dep["parameters"]["recipe_path"])
        assert recipe.name == dep["name"]
        for s in dep["schedules"]:
            Cron(s["cron"], timezone=s["timezone"])
        assert dep["work_pool"]["name"] and dep["concurrency_limit"] == 1
