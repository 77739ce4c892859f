"""The shipped recipes stay valid as the stages change, and the search recipe stays the demo plus
a search: block (same lineage ids, so `make demo` builds what trial 0 reuses)."""

from __future__ import annotations

from pathlib import Path

import pytest

from compress.pipeline import make_plan
from compress.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
ASSETS = RECIPES.parent / "assets"


def _plan(name: str):
    needs = {"demo-sentiment": "movie-snippets.csv", "search-sentiment": "movie-snippets.csv",
             "demo-smollm2": "smollm2/config.json", "demo-llm-task": "movie-instruct.csv"}
    if not (ASSETS / needs.get(name, "movie-snippets.csv")).exists():
        pytest.skip("assets not laid out (python -m compress.assets assets [--lm])")
    return make_plan(load_recipe(RECIPES / f"{name}.yaml"))


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.yaml")))
def test_every_shipped_recipe_plans(name):
    plan = _plan(name)
    assert plan.stages and all(s.hash for s in plan.stages)


def test_the_search_recipe_is_the_demo_plus_a_search_block():
    demo, search = _plan("demo-sentiment"), _plan("search-sentiment")
    assert [s.hash for s in search.stages] == [s.hash for s in demo.stages]
    assert search.recipe.gates == demo.recipe.gates and search.recipe.search is not None
