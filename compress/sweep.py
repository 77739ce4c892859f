"""A parameter grid over a recipe: one validated recipe per grid point, and a plain runner.

`compress sweep --set 'stages[1].ffn=0.25,0.5'` makes one recipe variant per point of the grid
(the cartesian product of every --set), each validated like a recipe file and named
`<recipe>-<field>-<value>...` so reports, locks and artifacts never collide. Stages the variants
share (same lineage hash) are one output folder. `run_local` runs the variants one after another
without Prefect; flows/sweep.py runs them concurrently as Prefect flow runs on Dask.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import yaml

from compress.diagnose import on_gate_failure
from compress.errors import CompressError, RecipeError
from compress.pipeline import execute, make_plan, report_folder
from compress.recipe import Recipe, parse_recipe

_STEP = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


def parse_sets(sets: list[str]) -> dict[str, list[Any]]:
    """`stages[1].ffn=0.25,0.5` -> {"stages[1].ffn": [0.25, 0.5]}; values are YAML scalars."""
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


def run_local(recipe: Recipe, grid: dict[str, list[Any]], reports_dir: Path,
              keep_going: bool = False) -> list[dict[str, Any]]:
    """Without Prefect: the variants one after another, same names and report folders."""
    rows = []
    for v in variants(recipe, grid):
        try:
            report = execute(make_plan(v), reports_dir, keep_going=keep_going,
                             on_gate_failure=on_gate_failure)
            rows.append({"recipe": v.name, "status": report.status, "error": "",
                         "report": str(report_folder(reports_dir, report)),
                         "exit_code": 0 if report.status == "passed" else 3})
        except CompressError as e:
            rows.append({"recipe": v.name, "status": "failed", "report": "", "error": str(e),
                         "exit_code": e.exit_code})
    return rows
