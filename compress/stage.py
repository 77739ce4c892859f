"""The stage contract: what a stage declares about itself, and the registry it joins.

A stage is one module under compress/stages/: a config class deriving from `StageConfig` that
carries the stage's fields (pydantic, extra="forbid") *and* everything the runner needs to know
about it, as class facts and methods:

- `kind` (a Literal field: the recipe's `kind:` and the registry key);
- `input_format` / `output_format` ("hf" or "onnx"): which runtime it needs and makes; the
  recipe's order rules (nothing PyTorch after the model is ONNX; ONNX work needs an ONNX model)
  are derived from these, not from a list of kinds;
- `trains` (every rank of a distributed launch joins it), `makes_reference` (its output is the
  reference/teacher, like finetune), `uses_reference` (it reads the reference model alongside
  its input, like distill), `not_hashed` (fields that change how, not what, it makes),
  `version` (bump it when the same config starts making a different output: the id changes);
- `uses_data()` (is the data's fingerprint part of the id, as a function of the config),
  `check(recipe, index)` (its rules against the rest of the recipe), `check_model(config)`
  (whether it can handle the model's architecture, before any work), `notes(info)` (its lines
  on the report card), `search_hints(goal)` (its fields worth searching when a gate fails), and
  `apply(ref, ctx, out)` (the work: model reference in, files out).

Defining such a class registers it (Olive's passes and torchao's config-bound handlers work the
same way); compress.recipe builds the recipe's discriminated union from the registry, so adding
a stage is one new file under compress/stages/ plus its tests. Inputs are never mutated: `apply`
reads `ref` and writes only into `out`, a staging folder the runner renames when complete.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from compress.artifact import ModelRef, canonical_hash
from compress.data import TaskData
from compress.report import Diagnosis
from compress.spec import Strict

Format = Literal["hf", "onnx"]
Progress = Callable[[str, int, int], None]  # (label, done, total)

_REGISTRY: dict[str, type[StageConfig]] = {}


@dataclass
class StageContext:
    """What a stage may read besides its input model. `recipe` is the whole recipe
    (compress.recipe.Recipe, a layer above this contract, hence untyped here)."""

    recipe: Any
    data: TaskData
    reference: ModelRef  # the unpruned original (or the fine-tuned teacher): distill's teacher
    progress: Progress | None = None
    work_dir: Path | None = None  # survives a failed attempt (checkpoints); removed on success


class StageConfig(Strict):
    """Base of every stage: its config fields, plus the facts and hooks the runner reads."""

    kind: str
    name: str | None = Field(None, description="A label for reports; default: the kind.")

    version: ClassVar[int] = 1
    input_format: ClassVar[Format] = "hf"
    output_format: ClassVar[Format] = "hf"
    trains: ClassVar[bool] = False
    makes_reference: ClassVar[bool] = False
    uses_reference: ClassVar[bool] = False  # reads the reference model (a teacher) too
    not_hashed: ClassVar[frozenset[str]] = frozenset({"name"})
    diagnosis: ClassVar[str | None] = None  # what a layer-by-layer probe covers, if any
    architectures: ClassVar[tuple[str, ...] | None] = None  # model_types it handles (None: all)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        field = cls.model_fields.get("kind")
        args = typing.get_args(field.annotation) if field is not None else ()
        if len(args) == 1 and isinstance(args[0], str):  # a concrete stage, not a base class
            other = _REGISTRY.get(args[0])
            if other is not None and other.__qualname__ != cls.__qualname__:
                raise TypeError(f"stage kind {args[0]!r} is registered twice "
                                f"({other.__module__} and {cls.__module__})")
            _REGISTRY[args[0]] = cls

    # ------------------------------------------------------------------ identity

    @property
    def label(self) -> str:
        return self.name or self.kind

    def where(self, index: int) -> str:
        return f"stages[{index}] ({self.kind})"

    def uses_data(self) -> bool:
        """Whether the data's fingerprint is part of this stage's output id."""
        return False

    def identity(self) -> dict[str, Any]:
        """The config as it names the output: every field but `not_hashed`, and the version."""
        return {**self.model_dump(mode="json", exclude=set(self.not_hashed)),
                "version": self.version}

    def output_id(self, parent: str, data_fingerprint: str | None) -> str:
        """The lineage hash: parent id, kind, config (and data when it reads data). The one
        rule for every stage id (outputs, the reference's export, benchmark variants)."""
        return canonical_hash(parent, self.kind, self.identity(),
                              data_fingerprint if self.uses_data() else None)

    # ------------------------------------------------------------------ checks and work

    def check(self, recipe: Any, index: int) -> None:
        """Rules against the rest of the recipe; raise ValueError with a sentence a user acts
        on (start it with `self.where(index)`). Run when the recipe is parsed."""

    def check_model(self, model_config: dict[str, Any]) -> None:
        """Whether this stage can handle the model (its config.json); raise ValueError. Run at
        plan time, before any work, so an unsupported architecture costs seconds, not a run.
        By default: the model_type must be one of `architectures` (when the stage names any)."""
        mt = model_config.get("model_type", "?")
        if self.architectures is not None and mt not in self.architectures:
            raise ValueError(f"architecture {mt!r} is not supported "
                             f"(supported: {', '.join(self.architectures)})")

    def resolve_paths(self, resolve: Callable[[str], str]) -> StageConfig:
        """This config with its file paths resolved (relative to the recipe's folder)."""
        return self

    def notes(self, info: dict[str, Any]) -> list[str]:
        """This stage's lines in the card's notes, from what `apply` returned."""
        return []

    def apply(self, ref: ModelRef, ctx: StageContext, out: Path) -> dict[str, Any]:
        """Read the model at `ref`, write the new model into `out`; return facts for the card
        (`onnx_file` names the ONNX file for ONNX outputs; `warnings` go on the card)."""
        raise NotImplementedError

    def search_hints(self, goal: str) -> dict[str, Any]:
        """This stage's fields worth searching to move `goal` ("metric", "size" or "speed"):
        field -> choices (a list) or a range ({"low": .., "high": ..}) around this config.
        A failed gate's diagnosis turns them into a ready-to-paste `search:` block."""
        return {}

    def can_diagnose(self) -> bool:
        """Whether `diagnose` can probe this configuration layer by layer."""
        return False

    def diagnose(self, input_ref: ModelRef, data: TaskData, *, index: int, max_samples: int,
                 top: int, batch_size: int, threads: int, trust_remote_code: bool) -> Diagnosis:
        """Compress one layer group of `input_ref` at a time and rank them by cost."""
        raise NotImplementedError


def registered() -> dict[str, type[StageConfig]]:
    """Every stage class defined so far (compress.stages.registry() imports them all first)."""
    return dict(_REGISTRY)


class EarlyStopping(Strict):
    """Stop when the eval metric has not improved for `patience` evaluations; keep the best."""

    eval_every: int = Field(50, ge=1, description="Optimizer steps between evaluations.")
    patience: int = Field(3, ge=1)
    min_delta: float = Field(0.0, ge=0, description="Smaller improvements do not count.")
    max_samples: int = Field(256, ge=1, description="Eval examples per check (a fixed subset).")


class TrainingConfig(StageConfig):
    """Fields every training stage shares (finetune, distill): one loop runs them all."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Overrides epochs when set.")
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    seed: int = 0
    bf16: Literal["auto", "on", "off"] = Field("auto", description="auto: bf16 autocast on GPU.")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    compile: bool = Field(False, description="torch.compile the student (worth it on GPU).")
    early_stopping: EarlyStopping | None = None
    checkpoint_every: int | None = Field(
        None, ge=1, description="Save a resumable checkpoint every N steps (not part of the id)."
    )

    trains: ClassVar[bool] = True
    not_hashed: ClassVar[frozenset[str]] = frozenset({"name", "checkpoint_every"})

    def uses_data(self) -> bool:
        return True
