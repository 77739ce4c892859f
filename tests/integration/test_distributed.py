"""The distributed path on CPU: two processes (torchrun, gloo) run one recipe; rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compress.report import read_report
from compress.testing import free_port

pytestmark = pytest.mark.integration


def test_two_processes_train_one_recipe_and_only_rank_0_writes(write_recipe, tmp_path):
    recipe = write_recipe([
        {"kind": "finetune", "max_steps": 6, "batch_size": 8, "learning_rate": 1e-3},
        {"kind": "prune", "ffn": 0.5},
        {"kind": "distill", "max_steps": 6, "batch_size": 8, "teacher_cache": True,
         "checkpoint_every": 3},
    ])
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "compress.cli", "run",
         str(recipe), "--reports-dir", str(tmp_path / "reports")],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    [run] = [p for p in (tmp_path / "reports" / "tiny").iterdir()
             if p.name != "latest" and not p.name.startswith(".")]  # .lock: the recipe lock
    report = read_report(run)
    assert report.status == "passed"
    for card in (report.reference, report.stages[-1]):
        stats = card.info["training"]
        assert stats["processes"] == 2
        assert stats["samples"] == 6 * 8 * 2  # each rank trains its own 8 per step
    # one output folder per stage, one teacher cache: the second rank wrote nothing
    outs = sorted(p.name.split("-")[0] for p in (tmp_path / "out").iterdir()
                  if p.name.startswith(("finetune", "prune", "distill")))
    assert outs == ["distill", "finetune", "prune"]
    assert len(list((tmp_path / "out" / "teacher-cache").iterdir())) == 1
    assert not list((tmp_path / "out").glob(".tmp-*"))
    info = json.loads(next((tmp_path / "out").glob("distill-*/stage_info.json")).read_text())
    assert info["training"]["steps"] == 6
