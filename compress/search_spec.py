"""The recipe's `search:` block: what to optimise, over which fields, for how long.

Plain data, like every other part of a recipe: unknown keys are errors and the values round-trip
through JSON (the Prefect flow takes the recipe as its parameter). The constraints are not here:
they are the recipe's own `gates:`, so a search looks for models that would pass a plain run of
the recipe. The block only says what the recipe does not: objectives, the space, the budget and
where the study lives. How a space key maps onto the recipe (and what counts as a bad one) is
compress.search's job; this module checks what needs no recipe.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from compress.metrics import METRICS
from compress.spec import Strict

# Objectives measured on the final card besides the task metric; all are minimised.
COSTS = {"latency": "p50 latency at batch 1 (ms)", "size": "weights on disk (bytes)",
         "macs": "multiply-accumulates of the weight matmuls, one sequence"}
ENABLED = "enabled"  # the pseudo-field that says whether an optional stage runs


class Range(Strict):
    """A numeric range; integers or floats as the field is. `log` samples on a log scale (for
    learning rates and temperatures); `step` quantises it (int ranges step 1 by default)."""

    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g}); for one "
                             "value, set the field in the recipe instead")
        if self.log and self.low <= 0:
            raise ValueError(f"log: a log-scale range needs low > 0 (got {self.low:g})")
        if self.log and self.step is not None:
            raise ValueError("log: a log-scale range cannot have a step")
        return self


class Budget(Strict):
    """When to stop starting trials: after `trials` trials (counted in the study, so a resumed
    search runs only the rest) and/or after `minutes` of this invocation (a trial is not
    started if the trials so far say it would not finish in time)."""

    trials: int | None = Field(None, ge=1)
    minutes: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _something(self) -> Budget:
        if self.trials is None and self.minutes is None:
            raise ValueError("set trials, minutes or both (e.g. budget: {trials: 12})")
        return self


class SearchSpec(Strict):
    """`compress search` reads this; `compress run` runs the recipe as written and ignores it."""

    objectives: list[str] = Field(
        default_factory=lambda: ["metric", "latency"],
        description="metric (the recipe's, in its own direction) or a metric name, and any of "
        "latency, size, macs (minimised). The first one picks the best feasible trial.")
    space: dict[str, list[Any] | Range] = Field(
        description="Recipe field path -> choices (a list) or a range ({low, high, log, step}). "
        "Stages by index or by name/kind: stages[1].ffn, stages[prune].ffn; "
        "stages[NAME].enabled: [true, false] makes a stage optional.")
    budget: Budget
    storage: str | None = Field(
        None, description="An Optuna storage URL: sqlite:///path.db or postgresql://...; "
        "default: sqlite next to the reports (reports/<recipe>/search.db).")
    study: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$",
        description="Study name; default: <recipe>-<hash of the recipe and this block>. Name "
        "it to share one study between hosts whose paths differ.")
    seed: int = 0
    sampler: Literal["tpe", "nsga2", "gp", "random"] = Field(
        "tpe", description="tpe: good from a dozen trials; nsga2: large budgets; gp: few, "
        "costly trials on numeric spaces; random: a baseline.")
    startup_trials: int = Field(
        4, ge=1, description="Random trials before the sampler models the results.")
    baseline: bool = Field(
        True, description="Trial 0 is the recipe as written (its values that lie in the "
        "space): the search starts from what is known to work and reports against it.")
    pruner: Literal["gates", "median", "none"] = Field(
        "gates", description="gates: stop a trial once a metric gate fails after its last "
        "training stage (no later stage wins it back); median: also stop trials whose metric "
        "is below the median of earlier trials at the same stage (single-minded: it prunes "
        "the small, fast models a multi-objective search is looking for); none.")

    @field_validator("objectives")
    @classmethod
    def _known_objectives(cls, v: list[str]) -> list[str]:
        allowed = ["metric", *METRICS, *COSTS]
        if not v:
            raise ValueError(f"name at least one objective ({', '.join(allowed)})")
        for name in v:
            if name not in allowed:
                raise ValueError(f"{name!r} is not an objective; use {', '.join(allowed)}")
        if len(set(v)) != len(v):
            raise ValueError("an objective is listed twice")
        return v

    @field_validator("space", mode="before")
    @classmethod
    def _choices_or_ranges(cls, v: Any) -> Any:
        """One line per bad entry, naming its key (pydantic's own union errors name neither
        the key nor what was meant)."""
        if not isinstance(v, dict):
            return v
        if not v:
            raise ValueError("empty: name at least one field to search, e.g. "
                             "'stages[prune].ffn: {low: 0.25, high: 0.75}'")
        for key, values in v.items():
            if isinstance(values, dict):
                extra = sorted(set(values) - set(Range.model_fields))
                if extra:
                    close = difflib.get_close_matches(extra[0], list(Range.model_fields), n=1)
                    hint = f"did you mean '{close[0]}'? " if close else ""
                    raise ValueError(f"{key}: {extra[0]!r} is not a range key; {hint}a range "
                                     f"has {', '.join(Range.model_fields)}")
                try:
                    Range.model_validate(values)
                except ValidationError as e:
                    err = e.errors()[0]
                    at = ".".join(str(x) for x in err["loc"])
                    msg = str(err["msg"]).removeprefix("Value error, ")
                    raise ValueError(f"{key}: {at + ': ' if at else ''}{msg}") from None
            elif not isinstance(values, list):
                raise ValueError(f"{key}: give a list of choices ([a, b]) or a range "
                                 "({low: a, high: b}), not a single value")
            elif not values:
                raise ValueError(f"{key}: an empty choice list; give at least one value")
            elif any(isinstance(x, float) and not math.isfinite(x) for x in values):
                raise ValueError(f"{key}: choices must be finite numbers")
        return v

    def storage_url(self, default_path: str) -> str:
        return self.storage or f"sqlite:///{default_path}"
