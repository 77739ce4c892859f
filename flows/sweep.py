"""A parameter sweep: one recipe variant per grid point, each its own `compress-recipe` flow run.

The variants run concurrently on a local Dask cluster (prefect-dask): one task per variant,
and that task calls the recipe flow, so each variant is a separate (child) flow run with its
own cards, artifacts and state in the UI. Variants are named `<recipe>-<key>-<value>...`, so their
reports, locks and artifacts never collide; stages they share (same lineage hash, e.g. a
finetune before the swept prune) are one output folder that every variant reuses.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect_dask import DaskTaskRunner

from compress.errors import CompressError, RecipeError
from compress.recipe import Recipe, parse_recipe

_STEP = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


def parse_sets(sets: list[str]) -> dict[str, list[Any]]:
    """`stages[1].ffn=0.25,0.5` -> {"stages[1].ffn": [0.25, 0.5]}; values are YAML scalars."""
    import yaml

    grid: dict[str, list[Any]] = {}
    for item in sets:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise RecipeError(f"--set {item!r}: expected PATH=V1,V2,... "
                              "(e.g. 'stages[1].ffn=0.25,0.5')")
        grid[key.strip()] = [yaml.safe_load(v) for v in values.split(",")]
    return grid


def _path(key: str) -> list[str | int]:
    steps: list[str | int] = []
    for part in key.split("."):
        found = list(_STEP.finditer(part))
        if not found or "".join(m.group(0) for m in found) != part:
            raise RecipeError(f"--set {key}: not a field path (like stages[1].ffn)")
        steps += [m.group(1) if m.group(1) else int(m.group(2)) for m in found]
    return steps


def _assign(raw: dict, key: str, value: Any) -> None:
    node: Any = raw
    steps = _path(key)
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        where = key if last else ".".join(str(s) for s in steps[:i + 1])
        if isinstance(step, int):
            if not isinstance(node, list) or step >= len(node):
                raise RecipeError(f"--set {key}: no item [{step}] at {where}")
        elif not isinstance(node, dict):
            raise RecipeError(f"--set {key}: {where} is not a mapping")
        if last:
            node[step] = value
        else:
            node = node[step] if isinstance(step, int) else node.setdefault(step, {})


def _label(key: str, value: Any) -> str:
    leaf = str(_path(key)[-1])
    text = f"{leaf}-{value}".lower().replace(".", "p")
    return re.sub(r"[^a-z0-9-]+", "-", text).strip("-")


def variants(recipe: Recipe, grid: dict[str, list[Any]]) -> list[Recipe]:
    """Every point of the grid (the cartesian product) as a validated recipe with its own name."""
    if not grid:
        raise RecipeError("a sweep needs at least one --set PATH=V1,V2")
    base = recipe.model_dump(mode="json")
    out, names = [], set()
    for point in itertools.product(*grid.values()):
        raw = {**base, "stages": [dict(s) for s in base["stages"]]}
        for key, value in zip(grid, point, strict=True):
            _assign(raw, key, value)
        name = "-".join([recipe.name, *(_label(k, v) for k, v in zip(grid, point, strict=True))])
        name = name[:63].rstrip("-")
        if name in names:
            name = f"{name[:58]}-{len(out)}"
        names.add(name)
        raw["name"] = name
        where = ", ".join(f"{k}={v}" for k, v in zip(grid, point, strict=True))
        out.append(parse_recipe(raw, f"sweep point {where}"))
    return out


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


def run_local(recipe: Recipe, grid: dict[str, list[Any]], reports_dir: Path,
              keep_going: bool = False) -> list[dict[str, Any]]:
    """Without Prefect: the variants one after another, same names and report folders."""
    from compress.pipeline import execute, make_plan, report_folder

    rows = []
    for v in variants(recipe, grid):
        try:
            report = execute(make_plan(v), reports_dir, keep_going=keep_going)
            rows.append({"recipe": v.name, "status": report.status, "error": "",
                         "report": str(report_folder(reports_dir, report)),
                         "exit_code": 0 if report.status == "passed" else 3})
        except CompressError as e:
            rows.append({"recipe": v.name, "status": "failed", "report": "", "error": str(e),
                         "exit_code": e.exit_code})
    return rows
