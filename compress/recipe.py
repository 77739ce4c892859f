"""The recipe: one YAML file parsed into one pydantic model, checked whole before any work starts.

Stage configs are a discriminated union on `kind`, built from the stage registry
(compress.stages): this module names no stage kind. Every model forbids unknown keys so a typo is
an error, not a silently ignored setting. Errors name the field path and the reason in one line.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from compress import search_spec
from compress.errors import RecipeError
from compress.metrics import CLASSIFICATION, LM_TEXT, default_metric
from compress.spec import DataSpec, DiagnoseSpec, EvaluationSpec, Gates, ModelSpec, Strict
from compress.stage import StageConfig
from compress.stages import registry

STAGES: dict[str, type[StageConfig]] = registry()
AnyStage = Annotated[typing.Union[tuple(STAGES.values())],  # noqa: UP007 - built at runtime
                     Field(discriminator="kind")]


class Recipe(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="Lowercase, digits, '-'.")
    model: ModelSpec
    data: DataSpec
    evaluation: EvaluationSpec = EvaluationSpec()
    gates: Gates = Gates()
    diagnose: DiagnoseSpec = DiagnoseSpec()
    stages: list[AnyStage] = Field(min_length=1)
    output_root: str = Field("outputs", description="Where stage outputs live, named by hash.")
    search: search_spec.SearchSpec | None = Field(None, description="Read by `compress search` "
                                                  "only.")

    @property
    def metric(self) -> str:
        return self.evaluation.metric or default_metric(self.model.task,
                                                        self.data.prompt_column is not None)

    @model_validator(mode="after")
    def _stage_order(self) -> Recipe:
        """The order rules every stage obeys (from its formats), then each stage's own."""
        onnx_at: int | None = None
        for i, st in enumerate(self.stages):
            where = st.where(i)
            st.check(self, i)
            if st.input_format == "hf" and onnx_at is not None:
                raise ValueError(f"{where}: works on PyTorch models but comes after export "
                                 f"(stages[{onnx_at}] makes an ONNX model); move it before that")
            if st.input_format == "onnx" and onnx_at is None:
                exporters = [k for k, c in STAGES.items()
                             if c.input_format == "hf" and c.output_format == "onnx"]
                raise ValueError(f"{where}: needs an ONNX model; add '- kind: {exporters[0]}' "
                                 "before it")
            if st.output_format == "onnx" and onnx_at is None:
                onnx_at = i
        if self.model.task == "causal-lm" and self.metric in CLASSIFICATION:
            raise ValueError(f"evaluation.metric: {self.metric} needs task "
                             "sequence-classification")
        if self.model.task == "sequence-classification" and self.metric not in CLASSIFICATION:
            raise ValueError(f"evaluation.metric: {self.metric} needs task causal-lm")
        self._lm_rules()
        return self

    def _lm_rules(self) -> None:
        """Prompt/response data, its metrics, the probe: what needs what."""
        d, ev, lm = self.data, self.evaluation, self.model.task == "causal-lm"
        pairs = d.prompt_column is not None
        if (d.prompt_column is None) != (d.response_column is None):
            raise ValueError("data.prompt_column and data.response_column go together: a pair "
                             "needs both")
        if pairs and not lm:
            raise ValueError("data.prompt_column: prompt/response pairs need model.task "
                             "causal-lm")
        if lm and pairs and self.metric == "perplexity":
            raise ValueError("evaluation.metric: perplexity scores plain text; on "
                             "prompt/response data use response_perplexity")
        if lm and not pairs and self.metric not in LM_TEXT:
            raise ValueError(f"evaluation.metric: {self.metric} needs prompt/response data "
                             "(data.prompt_column and data.response_column)")
        if ev.choices and not pairs:
            raise ValueError("evaluation.choices: needs prompt/response data "
                             "(data.prompt_column and data.response_column)")
        if self.metric == "choice_accuracy" and not ev.choices:
            raise ValueError("evaluation.metric: choice_accuracy needs evaluation.choices")
        if ev.probe_data and not lm:
            raise ValueError("evaluation.probe_data: the probe is a perplexity; it needs "
                             "model.task causal-lm")
        if (self.metric == "probe_perplexity" or self.gates.max_probe_increase is not None) \
                and not ev.probe_data:
            what = "gates.max_probe_increase" if self.gates.max_probe_increase is not None \
                else "evaluation.metric: probe_perplexity"
            raise ValueError(f"{what} needs evaluation.probe_data (a general text to probe)")


# ----------------------------------------------------------------------------- loading


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in STAGES and out.endswith("]"):
            continue  # the union's tag: the index already says which stage
        else:
            out += f".{part}" if out else str(part)
    return out


def _model_at(loc: tuple[Any, ...], raw: Any) -> type[BaseModel] | None:
    """The config class a pydantic error location points into (for 'did you mean')."""
    model: type[BaseModel] | None = Recipe
    node = raw
    for part in loc[:-1]:
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if isinstance(node, dict):
                model = STAGES.get(str(node.get("kind")))
            continue
        if part in STAGES:
            continue
        if model is None or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        node = node.get(part) if isinstance(node, dict) else None
        options = [ann, *typing.get_args(ann)]  # `X | None` names the model X
        model = next((a for a in options if isinstance(a, type) and issubclass(a, BaseModel)),
                     None)
    return model


def _format_error(err: dict[str, Any], raw: Any) -> str:
    loc = tuple(err["loc"])
    where = _loc(loc) or "recipe"
    if err["type"] == "extra_forbidden":
        model = _model_at(loc, raw)
        if model is not None:
            allowed = sorted(model.model_fields)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            return f"{where}: unknown field; {hint}allowed: {', '.join(allowed)}"
        return f"{where}: unknown field"
    if err["type"] == "union_tag_invalid":
        return f"{where}.kind: unknown stage kind {err['input'].get('kind')!r}; " \
               f"expected one of: {', '.join(STAGES)}"
    if err["type"] == "union_tag_not_found":
        return f"{where}: every stage needs a 'kind' ({', '.join(STAGES)})"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return msg if not loc else f"{where}: {msg}"  # a whole-recipe rule names its own place


def parse_recipe(raw: Any, source: str = "recipe") -> Recipe:
    """Validate already-parsed YAML; the first error becomes one RecipeError line."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a mapping (name, model, data, stages, ...)")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        errors = e.errors()
        first = _format_error(errors[0], raw)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise RecipeError(f"{source}: {first}{more}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read a YAML recipe; relative paths inside resolve against the recipe's own folder."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{p}: no such recipe file")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        reason = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{p}{at}: not valid YAML: {reason}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{p}: not a text file (a recipe is UTF-8 YAML)") from None
    recipe = parse_recipe(raw, str(p))
    return resolve_paths(recipe, p.parent)


def _resolve(value: str, base: Path) -> str:
    candidate = Path(value).expanduser()
    if candidate.is_absolute():
        return str(candidate)
    local = (base / candidate).resolve()
    # A hub id ("org/name") stays as written unless such a folder exists next to the recipe.
    if local.exists() or value.startswith((".", "~")) or not looks_like_hub_id(value):
        return str(local)
    return value


def looks_like_hub_id(value: str) -> bool:
    parts = value.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not value.startswith((".", "/", "~"))


def resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    def resolve(v: str) -> str:
        return _resolve(v, base)

    return recipe.model_copy(
        update={
            "model": recipe.model.model_copy(update={"path": resolve(recipe.model.path)}),
            "data": recipe.data.model_copy(update={"path": resolve(recipe.data.path)}),
            "evaluation": recipe.evaluation.model_copy(update={"probe_data": resolve(
                recipe.evaluation.probe_data)}) if recipe.evaluation.probe_data else
            recipe.evaluation,
            "stages": [st.resolve_paths(resolve) for st in recipe.stages],
            "output_root": str((Path.cwd() / recipe.output_root).resolve()),
        }
    )
