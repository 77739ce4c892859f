"""Stages: a config (in compress.recipe) plus one `apply` function each.

`apply(ref, config, ctx, out_dir) -> info` reads the input model from `ref`, writes the new model
into `out_dir` (a staging folder the runner renames once complete) and returns facts for the
report card. It never writes into the input's folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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


@dataclass(frozen=True)
class StageDef:
    apply: Apply
    output_format: Literal["hf", "onnx"]
    uses_data: bool  # if so, the data fingerprint is part of the output's hash


def registry() -> dict[str, StageDef]:
    """Imported lazily: stage modules pull in torch, optimum and onnxruntime."""
    from compress.stages import distill, export, finetune, prune, quantize

    return {
        "finetune": StageDef(finetune.apply, "hf", uses_data=True),
        "prune": StageDef(prune.apply, "hf", uses_data=True),  # taylor importance reads data
        "distill": StageDef(distill.apply, "hf", uses_data=True),
        "export": StageDef(export.apply, "onnx", uses_data=False),
        "quantize": StageDef(quantize.apply, "onnx", uses_data=False),
    }
