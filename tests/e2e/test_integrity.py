"""Trust nothing on disk: each kind of artifact truncated or overwritten, and what a run does then.

Every case checks the same promise: no traceback, nothing damaged reused or published, the
damaged thing moved to quarantine/ (never deleted) and named on the card, and the result
rebuilt (or one clear line when it cannot be).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from compress.cli import app
from compress.manifest import MANIFEST_FILE, verify

pytestmark = pytest.mark.e2e
CLI = [sys.executable, "-m", "compress.cli"]
PIPE = [{"kind": "prune", "ffn": 0.5}, {"kind": "export"}, {"kind": "quantize"}]


def run(path: Path, reports: Path, *extra: str):
    r = CliRunner().invoke(app, ["run", "--local", str(path), "--reports-dir", str(reports),
                                 *extra], catch_exceptions=False)
    assert "Traceback" not in r.output, r.output
    return r


def last_card(reports: Path, recipe: str = "tiny") -> dict:
    runs = sorted(p for p in (reports / recipe).glob("*/report.json")
                  if p.parent.name != "latest")
    return json.loads(runs[-1].read_text())


def truncate(p: Path, keep: int = 1000) -> None:
    with open(p, "r+b") as f:
        f.truncate(keep)


def overwrite_same_size(p: Path) -> None:
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(64)
    p.write_bytes(bytes(data))


def warnings_of(card: dict) -> list[str]:
    cards = [card.get("reference") or {}, card.get("reference_onnx") or {}, *card["stages"]]
    return [w for c in cards for w in c.get("warnings", [])]


@pytest.fixture
def done(write_recipe, tmp_path):
    """A finished run of prune -> export -> quantize, published to latest/."""
    path = write_recipe(PIPE)
    reports = tmp_path / "reports"
    assert run(path, reports).exit_code == 0
    return path, reports, tmp_path / "out"


@pytest.mark.parametrize("damage", [truncate, overwrite_same_size], ids=["truncated", "same-size"])
def test_a_damaged_final_onnx_is_rebuilt_and_never_published(done, damage):
    path, reports, out = done
    [q] = out.glob("quantize-*")
    onnx = q / "model_int8.onnx"
    good = onnx.read_bytes()
    damage(onnx)
    r = run(path, reports)
    assert r.exit_code == 0, r.output
    card = last_card(reports)
    assert [s["reused"] for s in card["stages"]] == [True, True, False]
    assert any("failed verification" in w and "quarantine" in w for w in warnings_of(card))
    assert onnx.read_bytes() == good  # rebuilt: quantization is deterministic
    [moved] = (out / "quarantine").glob("quantize-*")
    assert (moved / "model_int8.onnx").stat().st_size == \
        (1000 if damage is truncate else len(good))  # kept, never deleted
    latest = reports / "tiny" / "latest"
    assert (latest / "model" / "model_int8.onnx").read_bytes() == good
    assert verify(latest) == [] and verify(latest / "model") == []


def test_a_truncated_pruned_model_is_named_in_the_plan_and_rebuilt(done):
    path, reports, out = done
    [p] = out.glob("prune-*")
    truncate(p / "model.safetensors")
    v = CliRunner().invoke(app, ["validate", str(path)], catch_exceptions=False)
    assert "damaged: will be set aside and rebuilt" in v.output
    r = run(path, reports)
    assert r.exit_code == 0, r.output
    card = last_card(reports)
    assert [s["reused"] for s in card["stages"]] == [False, True, True]  # same id downstream
    assert verify(p) == []


def test_an_output_without_a_manifest_is_not_trusted(done):
    path, reports, out = done
    e = Path(last_card(reports)["stages"][1]["model"]["path"])
    (e / MANIFEST_FILE).unlink()
    assert run(path, reports).exit_code == 0
    card = last_card(reports)
    assert [s["reused"] for s in card["stages"]] == [True, False, True]
    assert any("no readable manifest.json" in w for w in warnings_of(card))


def test_a_damaged_metric_cache_is_measured_again(done):
    path, reports, out = done
    caches = sorted((out / "metrics").glob("*.json"))
    assert caches
    for c in caches:
        c.write_text(c.read_text()[:200])
    r = run(path, reports)
    assert r.exit_code == 0, r.output
    card = last_card(reports)
    assert sum("metric cache" in w for w in warnings_of(card)) == len(caches)
    assert len(list((out / "quarantine").glob("*.json"))) == len(caches)


def test_a_damaged_latest_is_replaced_by_a_verified_copy(done):
    path, reports, out = done
    latest = reports / "tiny" / "latest"
    truncate(latest / "model" / "model_int8.onnx")
    assert verify(latest) != []
    assert run(path, reports).exit_code == 0
    assert verify(latest) == [] and verify(latest / "model") == []


def test_publish_refuses_a_final_model_that_does_not_verify(done):
    from compress.pipeline import PublishError, publish_latest
    from compress.report import read_report, run_folders

    _, reports, out = done
    latest = reports / "tiny" / "latest"
    before = (latest / "model" / "model_int8.onnx").read_bytes()
    report = read_report(run_folders(reports / "tiny")[-1])
    truncate(Path(report.final.model.path) / "model_int8.onnx")
    with pytest.raises(PublishError, match="does not verify"):
        publish_latest(report, reports)
    assert (latest / "model" / "model_int8.onnx").read_bytes() == before  # last good one
    assert not list(latest.parent.glob(".tmp-*"))


def test_the_published_package_can_be_handed_over(done):
    _, reports, _ = done
    latest = reports / "tiny" / "latest"
    names = sorted(p.name for p in latest.iterdir())
    assert names == ["README.md", "manifest.json", "model", "recipe.yaml", "report.json"]
    card = (latest / "README.md").read_text()
    for part in ("base_model:", "## Against the original", "## Lineage", "## Target",
                 "onnxruntime as ort", "model/model_int8.onnx"):
        assert part in card
    recipe = yaml.safe_load((latest / "recipe.yaml").read_text())
    assert recipe["name"] == "tiny" and [s["kind"] for s in recipe["stages"]] == \
        ["prune", "export", "quantize"]
    snippet = card.split("```python\n")[1].split("```")[0]
    r = subprocess.run([sys.executable, "-c", snippet], cwd=latest, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().startswith("["), r.stderr[-2000:]


def test_a_damaged_teacher_cache_is_rebuilt(write_recipe, tmp_path):
    stages = [{"kind": "prune", "ffn": 0.5},
              {"kind": "distill", "max_steps": 4, "batch_size": 16, "teacher_cache": True}]
    path, reports = write_recipe(stages), tmp_path / "reports"
    assert run(path, reports).exit_code == 0
    [cache] = (tmp_path / "out" / "teacher-cache").iterdir()
    truncate(cache / "values.npy", 100)
    shutil.rmtree(next((tmp_path / "out").glob("distill-*")))  # so distill runs again
    r = run(path, reports)
    assert r.exit_code == 0, r.output
    card = last_card(reports)
    assert any("teacher cache" in w and "failed verification" in w for w in warnings_of(card))
    assert verify(cache) == []


def test_a_damaged_checkpoint_is_not_resumed_from(write_recipe, tmp_path):
    from compress.pipeline import make_plan, run_stage
    from compress.recipe import load_recipe

    class Stop(Exception):
        pass

    distill = {"kind": "distill", "max_steps": 30, "batch_size": 8, "checkpoint_every": 10}
    plan = make_plan(load_recipe(write_recipe([{"kind": "prune", "ffn": 0.5}, distill])))
    pruned = run_stage(plan, 0, plan.source).model

    def stop(label, step, total):
        if step >= 25:
            raise Stop

    with pytest.raises(Stop):
        run_stage(plan, 1, pruned, progress=stop)
    work = tmp_path / "out" / "work" / Path(plan.stages[1].output_dir).name
    steps = sorted(work.glob("step-*"))
    assert [p.name for p in steps] == ["step-00000010", "step-00000020"]
    truncate(steps[-1] / "model.safetensors", 100)
    card = run_stage(plan, 1, pruned)
    tr = card.info["training"]
    assert tr["resumed_from_step"] == 10  # the damaged step-20 was passed over
    assert any("checkpoint step-00000020 failed verification" in w for w in card.warnings)
    assert list((tmp_path / "out" / "quarantine").glob("step-00000020-*"))


def test_cleanup_never_touches_what_is_not_ours(done):
    path, reports, out = done
    foreign = out / ".tmp-foreign-data"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("mine")
    old = time.time() - 7 * 24 * 3600
    os.utime(foreign, (old, old))
    from compress.atomic import write_owner

    live = out / ".tmp-prune-live"
    live.mkdir()
    write_owner(live)  # this very process: alive
    os.utime(live, (old, old))
    from compress.testing import dead_owner_folder

    dead = dead_owner_folder(out / ".tmp-export-dead")
    shutil.rmtree(next(out.glob("export-*")))
    assert run(path, reports).exit_code == 0
    assert (foreign / "precious.txt").read_text() == "mine"
    assert live.is_dir()
    assert not dead.exists()


def test_two_runs_that_share_a_stage_build_it_once(write_recipe, tmp_path):
    """Two recipes share a checkpointed distill stage (same id) and run at once into one root:
    the second waits for the first and reuses its output."""
    shared = [{"kind": "prune", "ffn": 0.5},
              {"kind": "distill", "max_steps": 40, "batch_size": 8, "checkpoint_every": 5}]
    paths = []
    for name, extra in (("share-a", []), ("share-b", [{"kind": "export"}])):
        p = write_recipe(shared + extra, f"{name}.yaml")
        d = yaml.safe_load(p.read_text())
        d["name"] = name
        p.write_text(yaml.safe_dump(d))
        paths.append(p)
    reports = tmp_path / "reports"
    procs = [subprocess.Popen([*CLI, "run", "--local", str(p), "--reports-dir", str(reports)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for p in paths]
    outputs = [proc.communicate(timeout=900)[0] for proc in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-3000:]
        assert "Traceback" not in output
    cards = [last_card(reports, n) for n in ("share-a", "share-b")]
    distills = [next(s for s in c["stages"] if s["kind"] == "distill") for c in cards]
    assert sorted(d["reused"] for d in distills) == [False, True]
    assert distills[0]["model"]["hash"] == distills[1]["model"]["hash"]
    assert len(list((tmp_path / "out").glob("distill-*"))) == 1
    assert any("waiting for distill-" in o for o in outputs)


def _wait_for(pattern_dir: Path, glob: str, proc: subprocess.Popen, within: float = 240) -> None:
    deadline = time.monotonic() + within
    while not list(pattern_dir.glob(glob)):
        assert proc.poll() is None and time.monotonic() < deadline, "never got there"
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_a_local_run_as_interrupted(write_recipe, tmp_path, sig):
    path = write_recipe([{"kind": "prune", "ffn": 0.5},
                         {"kind": "distill", "max_steps": 5000, "batch_size": 8}])
    reports = tmp_path / "reports"
    proc = subprocess.Popen([*CLI, "run", "--local", str(path), "--reports-dir", str(reports)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "out", ".tmp-distill-*", proc)
    time.sleep(2)  # well into training
    proc.send_signal(sig)  # once
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err
    [line] = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert f"interrupted by {signal.Signals(sig).name}" in line
    card = last_card(reports)
    assert card["status"] == "interrupted" and card["finished_at"]
    assert [s["kind"] for s in card["stages"]] == ["prune"]
    assert not list((tmp_path / "out").glob(".tmp-*"))  # the staging folder went with it


def test_a_killed_run_is_shown_interrupted_and_named_by_the_next(write_recipe, tmp_path):
    path = write_recipe([{"kind": "prune", "ffn": 0.5},
                         {"kind": "distill", "max_steps": 5000, "batch_size": 8}])
    reports = tmp_path / "reports"
    proc = subprocess.Popen([*CLI, "run", "--local", str(path), "--reports-dir", str(reports)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(tmp_path / "out", ".tmp-distill-*", proc)
    proc.kill()
    proc.wait(timeout=30)
    killed = last_card(reports)
    assert killed["status"] == "running"  # it could not say otherwise
    r = CliRunner().invoke(app, ["runs", "--reports-dir", str(reports)])
    assert "interrupted" in r.output.splitlines()[1]
    quick = write_recipe([{"kind": "prune", "ffn": 0.5}], "quick.yaml")
    assert run(quick, reports).exit_code == 0
    card = last_card(reports)
    assert any(f"run {killed['run_id']} was interrupted" in w for w in card["warnings"])
    [old] = [p for p in (reports / "tiny").glob("*/report.json")
             if killed["run_id"] in str(p)]
    assert json.loads(old.read_text())["status"] == "interrupted"
    assert not list((tmp_path / "out").glob(".tmp-*"))  # the dead run's staging folder too


def test_a_recipe_runs_once_at_a_time_across_output_roots(write_recipe, tmp_path):
    from compress.pipeline import recipe_lock

    path = write_recipe([{"kind": "prune", "ffn": 0.5}])
    with recipe_lock(tmp_path / "reports", "tiny"):
        r = CliRunner().invoke(app, ["run", "--local", str(path), "--reports-dir",
                                     str(tmp_path / "reports"), "--output-root",
                                     str(tmp_path / "elsewhere")])
    assert r.exit_code == 1 and "recipe 'tiny' is already running" in r.output


def test_user_text_is_never_read_as_markup(write_recipe, tmp_path):
    path = write_recipe([{"kind": "prune", "ffn": 0.5, "name": "[/oops]"},
                         {"kind": "export", "name": "[bold]review[/bold]"}])
    v = CliRunner().invoke(app, ["validate", str(path)], catch_exceptions=False)
    assert v.exit_code == 0 and "[/oops]" in v.output and "[bold]review[/bold]" in v.output
    r = run(path, tmp_path / "reports")
    assert r.exit_code == 0 and "[bold]review[/bold]" in r.output
    bad = write_recipe([{"kind": "prune", "ffn": 0.5}], "bad.yaml")
    d = yaml.safe_load(bad.read_text())
    d["name"] = "Bad Name"
    bad.write_text(yaml.safe_dump(d))
    e = CliRunner().invoke(app, ["validate", str(bad)])
    assert "^[a-z0-9][a-z0-9-]{0,62}$" in e.output


def test_prefect_reads_no_result_file(write_recipe, tmp_path):
    """A result file planted where Prefect keeps results is never read: nothing is persisted,
    so a crafted pickle there cannot run."""
    import pickle

    storage = tmp_path / "prefect-results"
    storage.mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (storage / "planted").write_bytes(pickle.dumps(Evil()))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"),
           "PREFECT_LOCAL_STORAGE_PATH": str(storage)}
    env.pop("PREFECT_API_URL", None)
    path = write_recipe([{"kind": "prune", "ffn": 0.5}])
    for _ in range(2):
        r = subprocess.run([*CLI, "run", str(path), "--reports-dir", str(tmp_path / "r")],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    assert not marker.exists()
    assert sorted(p.name for p in storage.iterdir()) == ["planted"]  # nothing written there
