"""Stages: a config (in compress.recipe) plus one `apply` function each.

`apply(ref, config, ctx, out_dir) -> info` reads the input model from `ref`, writes the new model
into `out_dir` (a staging folder the runner renames once complete) and returns facts for the
report card. It never writes into the input's folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.artifact import ModelRef
from compress.data import TaskData
from compress.recipe import Recipe

Progress = Callable[[str, int, int], None]  # (label, done, total)


@dataclass
class StageContext:
    recipe: Recipe
    data: TaskData
    reference: ModelRef  # the unpruned original (or the fine-tuned teacher): distill's teacher
    progress: Progress | None = None
    work_dir: Path | None = None  # survives a failed attempt (checkpoints); removed on success


Apply = Callable[[ModelRef, Any, StageContext, Path], dict[str, Any]]


def registry() -> dict[str, Apply]:
    """Imported lazily: stage modules pull in torch, optimum and onnxruntime. What each stage
    outputs and whether it reads the data (for its id) lives in compress.pipeline, which plans
    without importing them."""
    from compress.stages import bnb, distill, export, finetune, prune, quantize

    return {"finetune": finetune.apply, "prune": prune.apply, "distill": distill.apply,
            "export": export.apply, "quantize": quantize.apply, "bnb": bnb.apply}
