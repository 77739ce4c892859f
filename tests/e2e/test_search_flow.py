"""A search on a 2-worker Dask cluster: two worker processes share one study, each trial its own
child flow run, the Pareto front published as artifacts."""

from __future__ import annotations

import os

import optuna
import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_two_workers_share_one_study(prefect_harness, write_recipe, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from compress.recipe import load_recipe
    from compress.search import Search, open_storage
    from flows.search import run_search
    from tests.e2e.conftest import child_runs

    path = write_recipe([{"kind": "prune", "ffn": 0.5}, {"kind": "export"}], search={
        "space": {"stages[prune].ffn": {"low": 0.1, "high": 0.8}}, "budget": {"trials": 4},
        "objectives": ["size", "metric"]})
    recipe = load_recipe(path)
    res = run_search(recipe, tmp_path / "reports", workers=2)
    assert res.status == "found" and [t.state for t in res.trials] == ["complete"] * 4

    s = Search(recipe, tmp_path / "reports")
    trials = optuna.load_study(study_name=s.study_name,
                               storage=open_storage(s.storage_url)).trials
    pids = {t.user_attrs["owner"]["pid"] for t in trials}
    assert len(pids) == 2 and os.getpid() not in pids  # two Dask worker processes
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))  # at once

    parent, runs = child_runs("compress-search", "compress-search-trial")
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tiny-search"])))
    assert parent.state.is_completed() and parent.name.startswith("search-tiny-")
    assert sorted(r.name for r in runs) == [f"tiny-t00{i}" for i in range(4)]
    assert all(r.state.is_completed() for r in runs)
    assert all({"compress", "search", "tiny"} <= set(r.tags) for r in runs)
    assert artifacts and "## Pareto front" in artifacts[0].data
