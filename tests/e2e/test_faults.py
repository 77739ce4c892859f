"""Faults: a full disk mid-save, two recipes at once in one output root, transient I/O retries,
and a killed `compress run` that must not leave Prefect's embedded server behind."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from compress.artifact import read_ref

pytestmark = pytest.mark.e2e
CLI = [sys.executable, "-m", "compress.cli"]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _small_disk(limit: int):
    """A process whose files cannot grow past `limit` bytes: writes fail with EFBIG, as on a
    full disk, instead of the default SIGXFSZ that would kill it without a word."""

    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_files


def test_full_disk_during_save_fails_in_one_line_and_keeps_earlier_outputs(write_recipe,
                                                                            tmp_path):
    out, reports = tmp_path / "out", tmp_path / "reports"
    first = write_recipe([{"kind": "prune", "ffn": 0.5}], "first.yaml")
    r = subprocess.run([*CLI, "run", "--local", str(first), "--reports-dir", str(reports)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    [prune_dir] = out.glob("prune-*")
    before = _digest(prune_dir)

    both = write_recipe([{"kind": "prune", "ffn": 0.5}, {"kind": "export"}], "both.yaml")
    cmd = [*CLI, "run", "--local", str(both), "--reports-dir", str(reports)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       preexec_fn=_small_disk(150_000))  # the ONNX file is ~4x that
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]  # not warnings
    assert len(lines) == 1, r.stderr
    assert lines[0] == f"error: disk full while writing {out}: File too large", r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert all(read_ref(p) is None for p in out.glob("export-*")), "half an export looks done"
    assert not [p for p in out.iterdir() if p.name.startswith("export-")]
    assert _digest(prune_dir) == before  # the earlier stage is byte for byte what it was

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    latest = sorted(p for p in reports.glob("tiny/*/report.json") if p.parent.name != "latest")
    card = json.loads(latest[-1].read_text())
    assert card["status"] == "passed"
    assert [(s["kind"], s["reused"]) for s in card["stages"]] == [("prune", True),
                                                                  ("export", False)]
    assert _digest(prune_dir) == before


def test_two_recipes_into_one_output_root_at_once(write_recipe, tmp_path, tiny_model):
    source = _digest(tiny_model)
    reports = tmp_path / "reports"
    paths = []
    for name, stages in (("tiny-a", [{"kind": "prune", "ffn": 0.5}, {"kind": "export"}]),
                         ("tiny-b", [{"kind": "prune", "ffn": 0.25, "heads": 0.5}])):
        p = write_recipe(stages, f"{name}.yaml")
        d = yaml.safe_load(p.read_text())
        d["name"] = name
        p.write_text(yaml.safe_dump(d))
        paths.append(p)
    procs = [subprocess.Popen([*CLI, "run", "--local", str(p), "--reports-dir", str(reports)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for p in paths]
    for proc in procs:
        output = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, output[-3000:]

    out = tmp_path / "out"
    owned: dict[str, set[str]] = {}
    for name in ("tiny-a", "tiny-b"):
        [run] = [p.parent for p in (reports / name).glob("*/report.json")
                 if p.parent.name != "latest"]
        card = json.loads((run / "report.json").read_text())
        assert card["status"] == "passed" and card["error"] is None
        owned[name] = {Path(s["model"]["path"]).name for s in card["stages"]}
        for s in card["stages"]:  # complete, and made by this recipe's stage config
            ref = read_ref(Path(s["model"]["path"]))
            assert ref is not None and ref.hash == s["model"]["hash"]
        assert (reports / name / "latest" / "report.json").is_file()
    assert not owned["tiny-a"] & owned["tiny-b"]
    assert {p.name for p in out.iterdir() if "-" in p.name and not p.name.startswith(".")} \
        >= owned["tiny-a"] | owned["tiny-b"]
    assert not list(out.glob(".tmp-*")), "a staging folder was left behind"
    assert _digest(tiny_model) == source


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_only_transient_io_errors_are_retried(prefect_harness, write_recipe, monkeypatch):
    from compress import pipeline
    from compress.errors import StageError
    from compress.recipe import load_recipe
    from flows import compress_flow
    from flows.compress_flow import is_transient, stage_task

    assert is_transient(OSError(errno.EIO, "Input/output error"))
    assert is_transient(TimeoutError())
    assert not is_transient(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_transient(FileNotFoundError(errno.ENOENT, "gone"))
    assert not is_transient(StageError("parity failed"))

    plan = pipeline.make_plan(load_recipe(write_recipe([{"kind": "prune", "ffn": 0.5}])))
    fast = stage_task.with_options(retry_delay_seconds=0)
    calls: list[str] = []
    real_run_stage = pipeline.run_stage

    def flaky(plan, index, input_ref, progress=None):
        calls.append("call")
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        return real_run_stage(plan, index, input_ref)

    monkeypatch.setattr(compress_flow.pipeline, "run_stage", flaky)
    card = fast(plan, 0, plan.source)
    assert card.kind == "prune" and len(calls) == 2  # the transient error was retried once

    calls.clear()

    def broken(plan, index, input_ref, progress=None):
        calls.append("call")
        raise StageError("stages[0]: ffn 0.5 removes too much")

    monkeypatch.setattr(compress_flow.pipeline, "run_stage", broken)
    plan2 = pipeline.make_plan(load_recipe(write_recipe([{"kind": "prune", "ffn": 0.25}],
                                                        "other.yaml")))
    state = fast(plan2, 0, plan2.source)  # ours end as a Failed state with the one line
    assert state.is_failed() and state.message == "stages[0]: ffn 0.5 removes too much"
    assert isinstance(state.result(raise_on_failure=False), StageError)
    assert len(calls) == 1  # a stage error would fail again: no retry


def _uvicorn_children(pid: int) -> list[psutil.Process]:
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [k for k in kids if "uvicorn" in " ".join(k.cmdline())]


def _gone(procs: list[psutil.Process], within: float) -> list[psutil.Process]:
    deadline = time.monotonic() + within
    alive = procs
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    return alive


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_killed_run_leaves_no_embedded_server(write_recipe, tmp_path, sig):
    """Through the Prefect flow: the first SIGINT/SIGTERM stops the run (recorded as
    interrupted), and nothing of the embedded server outlives it, SIGKILL included."""
    recipe = write_recipe([{"kind": "prune", "ffn": 0.5},
                           {"kind": "distill", "max_steps": 5000, "batch_size": 8}])
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([*CLI, "run", str(recipe), "--reports-dir", str(tmp_path / "r")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list((tmp_path / "out").glob(".tmp-distill-*")):
        assert proc.poll() is None and time.monotonic() < deadline, "distill never started"
        time.sleep(0.3)
    servers = _uvicorn_children(proc.pid)
    assert servers, "no embedded server was started"
    everything = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(sig)  # once
    proc.wait(timeout=60)
    assert proc.returncode == (-sig if sig == signal.SIGKILL else 128 + sig)
    left = _gone(everything, within=20)
    assert not left, [" ".join(p.cmdline()) for p in left]
    [report] = (tmp_path / "r" / "tiny").glob("*/report.json")
    status = json.loads(report.read_text())["status"]
    assert status == ("running" if sig == signal.SIGKILL else "interrupted")
