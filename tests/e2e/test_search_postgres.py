"""Two `compress search --local` processes, one study in PostgreSQL: what workers on several
hosts do (docs/scaling.md). Skipped without the PostgreSQL server binaries or the psycopg2
driver (Optuna's RDB storage is synchronous: pip install psycopg2-binary, or psycopg for a
plain postgresql:// URL)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

pytestmark = pytest.mark.e2e


def test_two_processes_share_one_study_in_postgres(write_recipe, tmp_path):
    pytest.importorskip("psycopg2", reason="pip install psycopg2-binary")
    from compress.recipe import load_recipe
    from compress.search import Search
    from tests.e2e.test_postgres import postgres_cluster

    with postgres_cluster() as (url, _):
        url = url.replace("postgresql+asyncpg://", "postgresql+psycopg2://")
        path = write_recipe([{"kind": "prune", "ffn": 0.5}, {"kind": "export"}], search={
            "space": {"stages[prune].ffn": {"low": 0.1, "high": 0.8}}, "storage": url,
            "budget": {"trials": 4}})
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
        args = [sys.executable, "-m", "compress.cli", "search", str(path), "--local",
                "--reports-dir", str(tmp_path / "reports")]
        procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for _ in range(2)]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        s = Search(load_recipe(path), tmp_path / "reports")
        trials = optuna.load_study(study_name=s.study_name, storage=url).trials
        assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
        assert len({t.user_attrs["owner"]["pid"] for t in trials}) == 2
        assert not (tmp_path / "reports" / "tiny" / "search.db").exists()  # not SQLite
