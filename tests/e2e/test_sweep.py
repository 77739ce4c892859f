"""A 2-point sweep on a local Dask cluster: two child flow runs, two report folders, two cards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_grid_makes_named_validated_variants(write_recipe):
    from compress.errors import RecipeError
    from compress.recipe import load_recipe
    from compress.sweep import parse_sets, variants

    recipe = load_recipe(write_recipe([{"kind": "prune", "ffn": 0.5}, {"kind": "export"}]))
    grid = parse_sets(["stages[0].ffn=0.25,0.5", "stages[0].heads=0,0.25"])
    got = variants(recipe, grid)
    assert [v.name for v in got] == ["tiny-ffn-0p25-heads-0", "tiny-ffn-0p25-heads-0p25",
                                     "tiny-ffn-0p5-heads-0", "tiny-ffn-0p5-heads-0p25"]
    assert [(v.stages[0].ffn, v.stages[0].heads) for v in got] == \
        [(0.25, 0.0), (0.25, 0.25), (0.5, 0.0), (0.5, 0.25)]
    with pytest.raises(RecipeError, match=r"stages\[0\]\.hedas: unknown field"):
        variants(recipe, parse_sets(["stages[0].hedas=0.5"]))
    with pytest.raises(RecipeError, match=r"no item \[5\]"):
        variants(recipe, parse_sets(["stages[5].ffn=0.5"]))
    with pytest.raises(RecipeError, match="expected PATH=V1,V2"):
        parse_sets(["stages[0].ffn"])


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_sweep_runs_each_variant_as_its_own_flow_run(prefect_harness, write_recipe, tmp_path):
    from compress.recipe import load_recipe
    from compress.sweep import parse_sets
    from flows.sweep import run_sweep
    from tests.e2e.conftest import child_runs

    recipe = load_recipe(write_recipe([{"kind": "prune", "ffn": 0.5}]))
    reports = tmp_path / "reports"
    rows = run_sweep(recipe, parse_sets(["stages[0].ffn=0.25,0.5"]), reports)
    assert [r["recipe"] for r in rows] == ["tiny-ffn-0p25", "tiny-ffn-0p5"]
    assert all(r["status"] == "passed" for r in rows), rows
    folders = [Path(r["report"]) for r in rows]
    assert len(set(folders)) == 2 and folders[0].parent != folders[1].parent
    cards = [json.loads((f / "report.json").read_text()) for f in folders]
    assert [c["recipe"] for c in cards] == ["tiny-ffn-0p25", "tiny-ffn-0p5"]
    kept = [c["stages"][0]["info"] for c in cards]
    assert [c["stages"][0]["model"]["hash"] for c in cards][0] != \
        [c["stages"][0]["model"]["hash"] for c in cards][1], kept

    sweep_run, children = child_runs("compress-sweep", "compress-recipe")
    assert sweep_run.state.is_completed() and sweep_run.name.startswith("sweep-tiny-")
    assert len(children) == 2 and len({r.id for r in children}) == 2
    assert all(r.state.is_completed() for r in children)
    for r in children:  # the UI's name says recipe and date; tags name the recipe
        recipe_name = r.parameters["recipe"]["name"]
        assert r.name.startswith(f"{recipe_name}-20") and len(r.name) == len(recipe_name) + 14
        assert {"compress", recipe_name} <= set(r.tags)
