"""A parameter grid over a recipe: one validated recipe per grid point, and a plain runner.

`compress sweep --set 'stages[1].ffn=0.25,0.5'` (or `stages[prune].ffn`: a stage by name, or by
kind when one stage has it) makes one recipe variant per point of the grid (the cartesian
product of every --set), each validated like a recipe file and named
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

_STEP = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)|\[([^\[\]]+)\]")


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


class Select(str):
    """A list item picked by its `name`, or by its `kind` when exactly one item has that kind:
    `stages[prune]` keeps meaning the prune stage when stages are added before it."""


def field_path(key: str, label: str | None = None) -> list[str | int]:
    """`stages[1].ffn` -> ["stages", 1, "ffn"]; `stages[kd].epochs` -> ["stages",
    Select("kd"), "epochs"]. `label` starts error messages (default: `--set KEY`)."""
    label = label or f"--set {key}"
    steps: list[str | int] = []
    for part in key.split("."):
        found = list(_STEP.finditer(part))
        if not found or "".join(m.group(0) for m in found) != part or not found[0].group(1):
            raise RecipeError(f"{label}: not a field path (like stages[1].ffn or "
                              "stages[prune].ffn)")
        for m in found:
            item = (m.group(2) or "").strip()
            steps.append(m.group(1) if m.group(1) else int(item) if item.isdigit()
                         else Select(item))
    return steps


def _select(items: list, sel: Select, where: str, label: str) -> int:
    named = [i for i, it in enumerate(items) if isinstance(it, dict) and it.get("name") == sel]
    kinds = [i for i, it in enumerate(items) if isinstance(it, dict) and it.get("kind") == sel]
    found = named or kinds
    if len(found) == 1:
        return found[0]
    if found:
        at = ", ".join(f"{where}[{i}]" for i in found)
        raise RecipeError(f"{label}: {len(found)} items of {where} match {sel!r} ({at}); give "
                          "each a name (name: ...) and use it, or use the index")
    have = ", ".join(str(it.get("name") or it.get("kind")) for it in items
                     if isinstance(it, dict))
    raise RecipeError(f"{label}: no item of {where} is named or of kind {sel!r} "
                      f"(have: {have or 'none'})")


def resolve(raw: dict, key: str, label: str | None = None) -> list[str | int]:
    """The path with every selector replaced by its index in `raw` (plain recipe data)."""
    label = label or f"--set {key}"
    node: Any = raw
    out: list[str | int] = []
    for step in field_path(key, label):
        where = path_text(out)
        if isinstance(step, Select):
            if not isinstance(node, list):
                raise RecipeError(f"{label}: {where or 'the recipe'} is not a list")
            step = _select(node, step, where, label)
        out.append(step)
        if isinstance(step, int):
            node = node[step] if isinstance(node, list) and step < len(node) else None
        else:
            node = node.get(step) if isinstance(node, dict) else None
    return out


def path_text(steps: list[str | int]) -> str:
    """["stages", 1, "ffn"] -> "stages[1].ffn"."""
    return "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps).lstrip(".")


def assign(raw: dict, key: str, value: Any, label: str | None = None) -> None:
    """Set the field at `key` (indices or selectors) in plain recipe data, in place."""
    label = label or f"--set {key}"
    node: Any = raw
    steps = resolve(raw, key, label)
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        where = key if last else path_text(steps[:i + 1])
        if isinstance(step, int):
            if not isinstance(node, list) or step >= len(node):
                raise RecipeError(f"{label}: no item [{step}] at {where}")
        elif not isinstance(node, dict):
            raise RecipeError(f"{label}: {where} is not a mapping")
        if last:
            node[step] = value
        else:
            if isinstance(step, str) and node.get(step) is None:
                node[step] = {}  # an unset optional block (early_stopping: null) gets its field
            node = node[step]


def _label(key: str, value: Any) -> str:
    leaf = str(field_path(key)[-1])
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
            assign(raw, key, value)
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
