"""The CLI: one clear line and exit 2 for a bad recipe; gates fail a run; kill and resume."""

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
from typer.testing import CliRunner

from compress.cli import app

pytestmark = pytest.mark.e2e
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def one_error_line(result) -> str:
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    return lines[0]


def test_validate_prints_the_plan(write_recipe):
    r = invoke("validate", str(write_recipe([{"kind": "prune", "ffn": 0.5}, {"kind": "export"}])))
    assert r.exit_code == 0, r.output
    assert "ok tiny: 2 stages" in r.output and "prune-" in r.output and "(to run)" in r.output


@pytest.mark.parametrize(("edit", "expect"), [
    (lambda d: d["stages"][0].update(heds=0.5), "stages[0].heds: unknown field; did you mean "
                                                "'heads'?"),
    (lambda d: d["stages"].reverse(), "needs an ONNX model"),
    (lambda d: d["model"].update(path="/nonexistent/model"), "model.path: /nonexistent/model: "
                                                             "no such folder"),
    (lambda d: d["data"].update(label_column="sentiment"), "data.label_column: column "
                                                           "'sentiment' not in the data "
                                                           "(columns: text, label)"),
])
def test_validate_bad_recipes_exit_2_with_one_line(write_recipe, edit, expect):
    path = write_recipe([{"kind": "prune", "heads": 0.5}, {"kind": "export"},
                         {"kind": "quantize"}])
    d = yaml.safe_load(path.read_text())
    edit(d)
    path.write_text(yaml.safe_dump(d))
    r = invoke("validate", str(path))
    assert r.exit_code == 2
    assert expect in one_error_line(r)


def test_not_a_model_folder(write_recipe, tmp_path):
    (tmp_path / "empty").mkdir()
    path = write_recipe([{"kind": "export"}])
    d = yaml.safe_load(path.read_text())
    d["model"]["path"] = str(tmp_path / "empty")
    path.write_text(yaml.safe_dump(d))
    r = invoke("validate", str(path))
    assert r.exit_code == 2 and "is not a model folder (no config.json)" in one_error_line(r)


def test_failed_gate_fails_the_run_after_writing_the_card(write_recipe, tmp_path):
    path = write_recipe([{"kind": "prune", "ffn": 0.5}], gates={"min_size_reduction": 100})
    r = invoke("run", "--local", str(path), "--reports-dir", str(tmp_path / "reports"))
    assert r.exit_code == 3
    assert "gate failed: min_size_reduction" in r.output
    [report] = (tmp_path / "reports" / "tiny").glob("*/report.json")
    card = json.loads(report.read_text())
    assert card["status"] == "failed" and card["gates"][0]["passed"] is False
    assert [s["kind"] for s in card["stages"]] == ["prune"]
    assert "FAIL `min_size_reduction`" in (report.parent / "report.md").read_text()
    shown = invoke("report", str(tmp_path / "reports" / "tiny"))
    assert shown.exit_code == 0 and "min_size_reduction" in shown.output


def test_killed_during_distill_then_rerun_does_not_redo_prune(write_recipe, tmp_path):
    path = write_recipe([{"kind": "prune", "ffn": 0.5},
                         {"kind": "distill", "max_steps": 600, "batch_size": 8}])
    out, reports = tmp_path / "out", tmp_path / "reports"
    cmd = [sys.executable, "-m", "compress.cli", "run", "--local", str(path),
           "--reports-dir", str(reports)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while not list(out.glob(".tmp-distill-*")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before distill started"
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [prune_dir] = out.glob("prune-*")
    assert not list(out.glob("distill-*")), "a killed distill must not look finished"
    made = (prune_dir / "model.safetensors").stat().st_mtime_ns

    # The same recipe again: prune is found done by its hash; distill starts over and finishes.
    r = invoke("run", "--local", str(path), "--reports-dir", str(reports))
    assert r.exit_code == 0, r.output
    latest = sorted(p for p in reports.glob("tiny/*/report.json") if p.parent.name != "latest")[-1]
    cards = {c["kind"]: c for c in json.loads(latest.read_text())["stages"]}
    assert cards["prune"]["reused"] is True and cards["distill"]["reused"] is False
    assert (prune_dir / "model.safetensors").stat().st_mtime_ns == made
    assert not list(out.glob(".tmp-*")) or all(p.name.startswith(".tmp-distill")
                                               for p in out.glob(".tmp-*"))


def test_report_on_missing_path_is_one_line(tmp_path):
    r = invoke("report", str(tmp_path))
    assert r.exit_code == 1 and "no report here" in one_error_line(r)


def test_cli_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "compress.cli", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "validate" in r.stdout and "run" in r.stdout
    assert Path(sys.executable).exists()


def test_html_report_and_compare(write_recipe, tmp_path):
    path = write_recipe([{"kind": "prune", "ffn": 0.5}, {"kind": "export"}])
    reports = tmp_path / "reports"
    for _ in range(2):
        assert invoke("run", "--local", str(path), "--reports-dir", str(reports)).exit_code == 0
    first, second = sorted(p for p in (reports / "tiny").glob("*/report.json")
                           if p.parent.name != "latest")
    page = (second.parent / "report.html").read_text()
    assert page.count("<svg") >= 3 and "prune" in page and first.parent.name in page
    same = invoke("report", str(second.parent), "--compare", str(first.parent))
    assert same.exit_code == 0 and "prune" in same.output

    worse = json.loads(second.read_text())
    worse["stages"][-1]["metrics"]["value"] -= 5.0
    (second.parent / "report.json").write_text(json.dumps(worse))
    r = invoke("report", str(second.parent), "--compare", str(first.parent))
    assert r.exit_code == 3 and "regression:" in r.output and "-5.00 points" in r.output


def test_a_second_run_of_the_same_recipe_refuses_while_one_runs(write_recipe, tmp_path):
    from compress.pipeline import recipe_lock

    path = write_recipe([{"kind": "prune", "ffn": 0.5}])
    with recipe_lock(tmp_path / "reports", "tiny"):
        r = invoke("run", "--local", str(path), "--reports-dir", str(tmp_path / "reports"))
    assert r.exit_code == 1
    assert "recipe 'tiny' is already running (pid" in r.output.strip().splitlines()[-1]
    assert not list((tmp_path / "out").glob("prune-*"))  # it refused before doing anything
    r = invoke("run", "--local", str(path), "--reports-dir", str(tmp_path / "reports"))
    assert r.exit_code == 0  # the lock went with its holder


def test_latest_holds_the_last_passing_model_only(write_recipe, tmp_path):
    reports = tmp_path / "reports"
    good = write_recipe([{"kind": "prune", "ffn": 0.5}, {"kind": "export"}], "good.yaml")
    assert invoke("run", "--local", str(good), "--reports-dir", str(reports)).exit_code == 0
    latest = reports / "tiny" / "latest"
    assert (latest / "model" / "model.onnx").is_file()
    passed = json.loads((latest / "report.json").read_text())["run_id"]

    bad = write_recipe([{"kind": "prune", "ffn": 0.25}], "bad.yaml",
                       gates={"min_size_reduction": 100})
    assert invoke("run", "--local", str(bad), "--reports-dir", str(reports)).exit_code == 3
    kept = invoke("run", "--local", str(bad), "--reports-dir", str(reports), "--keep-going")
    assert kept.exit_code == 0 and "FAIL" in kept.output
    assert json.loads((latest / "report.json").read_text())["run_id"] == passed
    assert (latest / "model" / "model.onnx").is_file()
    assert not list((reports / "tiny").glob(".*latest-*"))
    listed = invoke("runs", "--reports-dir", str(reports))
    assert listed.exit_code == 0
    assert [ln.split()[2] for ln in listed.output.splitlines()[1:]] == \
        ["failed", "failed", "passed"]  # newest first
