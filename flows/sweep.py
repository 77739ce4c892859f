"""A parameter sweep through Prefect: each grid point (compress.sweep) its own `compress-recipe`
flow run.

The variants run concurrently on a local Dask cluster (prefect-dask): one task per variant,
and that task calls the recipe flow, so each variant is a separate (child) flow run with its
own cards, artifacts and state in the UI. Variants are named `<recipe>-<key>-<value>...`, so their
reports, locks and artifacts never collide; stages they share (same lineage hash, e.g. a
finetune before the swept prune) are one output folder that every variant reuses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect_dask import DaskTaskRunner

from compress.errors import CompressError
from compress.recipe import Recipe
from compress.sweep import variants


@task(task_run_name="variant-{recipe.name}")
def run_variant(recipe: Recipe, reports_dir: str, keep_going: bool) -> dict[str, Any]:
    """One grid point: the recipe flow, called here, becomes a child flow run of the sweep."""
    import pickle

    # Imported here, in the Dask worker: a flow that travels pickled by value loses the module
    # globals its parameter model needs (Recipe).
    from flows.compress_flow import compress_recipe

    try:
        return {"recipe": recipe.name, **compress_recipe(recipe=recipe, reports_dir=reports_dir,
                                                         keep_going=keep_going)}
    except Exception as e:
        try:  # the error travels back to the sweep pickled; some (pydantic's) do not unpickle
            pickle.loads(pickle.dumps(e))
        except Exception:
            raise RuntimeError(f"{type(e).__name__}: {e}") from None
        raise


def _runner(processes: bool) -> DaskTaskRunner:
    # Processes by default: torch's seed and thread settings are per process, so two variants
    # in threads of one process would disturb each other's training and timings.
    return DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1,
                                          "processes": processes, "dashboard_address": None})


def _sweep_name() -> str:
    from datetime import datetime

    from prefect.runtime import flow_run

    recipe = flow_run.parameters.get("recipe")
    name = getattr(recipe, "name", None) or (recipe or {}).get("name", "recipe")
    return f"sweep-{name}-{datetime.now():%Y%m%d-%H%M}"


@flow(name="compress-sweep", flow_run_name=_sweep_name, task_runner=_runner(True))
def compress_sweep(recipe: Recipe, grid: dict[str, list[Any]], reports_dir: str = "reports",
                   keep_going: bool = False) -> list[dict[str, Any]]:
    """Run every variant of the recipe concurrently; one row per variant, failed ones too."""
    from prefect.artifacts import create_table_artifact

    points = variants(recipe, grid)
    futures = [run_variant.submit(v, reports_dir, keep_going) for v in points]
    rows = []
    for v, fut in zip(points, futures, strict=True):
        fut.wait()
        result = fut.result(raise_on_failure=False)
        if isinstance(result, BaseException):
            code = result.exit_code if isinstance(result, CompressError) else 1
            rows.append({"recipe": v.name, "status": "failed", "report": "",
                         "error": str(result).splitlines()[0] if str(result) else
                         type(result).__name__, "exit_code": code})
        else:
            rows.append({**result, "error": "", "exit_code": 0 if result["status"] == "passed"
                         else 3})
    create_table_artifact(key=f"{recipe.name}-sweep", table=rows,
                          description=f"{recipe.name}: sweep over {', '.join(grid)}")
    return rows


def run_sweep(recipe: Recipe, grid: dict[str, list[Any]], reports_dir: Path,
              keep_going: bool = False, processes: bool = True) -> list[dict[str, Any]]:
    """The sweep flow on a server that dies with this process (see flows.embedded)."""
    from flows.embedded import embedded_server

    variants(recipe, grid)  # a bad grid stops here, before a cluster starts
    with embedded_server():
        sweep = compress_sweep.with_options(task_runner=_runner(processes))
        return sweep(recipe=recipe, grid=grid, reports_dir=str(reports_dir),
                     keep_going=keep_going)
