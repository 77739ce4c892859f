"""Deployments of the nightly flow: `compress serve` (one machine) and `compress submit`.

Past one machine, use prefect.yaml (a process work pool, workers on the hosts that run it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.errors import CompressError, RecipeError
from compress.pipeline import make_plan
from compress.recipe import load_recipe
from flows.compress_flow import nightly

FLOW = "compress-nightly"


def deployments(recipes: list[Path], cron: str, timezone: str, reports_dir: Path) -> list[Any]:
    """One scheduled deployment per recipe, each checked before anything is registered."""
    from prefect.schedules import Cron

    try:
        schedule = Cron(cron, timezone=timezone)
    except ValueError as e:
        raise RecipeError(f"--cron {cron!r} / --timezone {timezone!r}: {e}") from None
    out = []
    for path in recipes:
        recipe = make_plan(load_recipe(path)).recipe  # a bad recipe stops here, not at 2 am
        out.append(nightly.to_deployment(
            name=recipe.name, schedules=[schedule], concurrency_limit=1,
            parameters={"recipe_path": str(Path(path).resolve()),
                        "reports_dir": str(Path(reports_dir).resolve())},
            tags=["compress", recipe.name], description=f"Nightly compression of {recipe.name}",
        ))
    return out


def serve_recipes(recipes: list[Path], cron: str, timezone: str, reports_dir: Path) -> None:
    from prefect import serve

    serve(*deployments(recipes, cron, timezone, reports_dir))


def submit(recipe_name: str, watch: bool) -> Any:
    """Trigger a run of a served or deployed recipe; with watch, wait for it to finish."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        return run_deployment(f"{FLOW}/{recipe_name}", timeout=None if watch else 0,
                              as_subflow=False, poll_interval=2)
    except ObjectNotFound:
        raise CompressError(f"no deployment {FLOW}/{recipe_name}: start `compress serve RECIPE` "
                            "or `prefect deploy` first") from None
