"""The recipe: one YAML file parsed into one pydantic model, checked whole before any work starts.

Stage configs are a discriminated union on `kind`; every model forbids unknown keys so a typo is
an error, not a silently ignored setting. Errors name the field path and the reason in one line.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compress.errors import RecipeError

Task = Literal["sequence-classification", "causal-lm"]


class Strict(BaseModel):
    """Base for every config: unknown keys are errors, values are plain data (JSON round-trips)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------- inputs


class ModelSpec(Strict):
    path: str = Field(description="Local model directory (save_pretrained layout) or a hub id.")
    task: Task = "sequence-classification"
    num_labels: int | None = Field(None, ge=2, description="Classes; default: from the model/data.")
    revision: str | None = None
    trust_remote_code: bool = False


class DataSpec(Strict):
    """Classification: a text (and label) column. Causal LM: the text column only; the text is
    tokenized, concatenated and cut into blocks of `max_length` tokens."""

    path: str = Field(description="Local CSV/TSV/JSON(L)/Parquet/text file, or a hub dataset id.")
    format: Literal["auto", "csv", "json", "parquet", "text"] = "auto"
    delimiter: str | None = Field(None, description="CSV delimiter; default ',' ('\\t' for .tsv).")
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    train_split: str = "train"
    eval_split: str | None = Field(None, description="Named eval split; default: eval_fraction.")
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    max_length: int = Field(128, ge=8, le=8192)
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)
    seed: int = 0


class LatencySpec(Strict):
    batch_size: int = Field(32, ge=1, description="Timed at batch 1 and at this batch size.")
    sequence_length: int | None = Field(None, ge=1, description="Default: data.max_length.")
    warmup: int = Field(5, ge=0)
    runs: int = Field(30, ge=1)
    threads: int | None = Field(None, ge=1, description="Default: all cores of this machine.")


class EvaluationSpec(Strict):
    metric: Literal["accuracy", "perplexity"] | None = Field(None, description="Default: by task.")
    batch_size: int = Field(64, ge=1)
    max_samples: int | None = Field(None, ge=1, description="Cap on eval examples (same for all).")
    latency: LatencySpec = LatencySpec()
    reference_onnx: bool = Field(
        True, description="Also time the original in ONNX Runtime fp32, for like-for-like ratios."
    )


class Gates(Strict):
    """Checked on the final model against the reference (the original, or the fine-tuned one)."""

    max_accuracy_drop: float | None = Field(None, ge=0, description="In accuracy points (0-100).")
    max_perplexity_increase: float | None = Field(None, ge=0, description="Relative, 0.1 = +10%.")
    min_size_reduction: float | None = Field(None, gt=0, description="Reference bytes / final.")
    min_speedup: float | None = Field(None, gt=0, description="Reference p50 / final p50, batch 1.")


# ----------------------------------------------------------------------------- stages


class _Stage(Strict):
    name: str | None = Field(None, description="A label for reports; default: the kind.")


class EarlyStopping(Strict):
    """Stop when the eval metric has not improved for `patience` evaluations; keep the best."""

    eval_every: int = Field(50, ge=1, description="Optimizer steps between evaluations.")
    patience: int = Field(3, ge=1)
    min_delta: float = Field(0.0, ge=0, description="Smaller improvements do not count.")
    max_samples: int = Field(256, ge=1, description="Eval examples per check (a fixed subset).")


class _Training(_Stage):
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


class FinetuneConfig(_Training):
    """Train the input on the task's labels: prepares a teacher (e.g. a head on an encoder)."""

    kind: Literal["finetune"] = "finetune"


class PruneConfig(_Stage):
    """Structured pruning: attention heads and FFN channels by importance, whole layers by index
    or by importance. Pruning is uniform (every layer keeps the same sizes) so the pruned model's
    config describes it and `from_pretrained` reloads it; global (per-layer) sizes are refused."""

    kind: Literal["prune"] = "prune"
    heads: float = Field(0.0, ge=0, lt=1, description="Fraction of attention heads removed in "
                         "every layer; with GQA, whole key/value groups with their query heads.")
    ffn: float = Field(0.0, ge=0, lt=1, description="Fraction of FFN channels removed per layer.")
    drop_layers: list[int] = Field(default_factory=list, description="Layer indices to remove.")
    depth: int = Field(0, ge=0, description="Layers to remove, chosen by layer_importance on "
                       "calibration data (instead of, or after, drop_layers).")
    layer_importance: Literal["angular", "block_influence"] = Field(
        "angular", description="angular: angular distance between a layer's input and output "
        "hidden states (Gromov et al.); block_influence: 1 - cosine (ShortGPT).")
    importance: Literal["l1", "l2", "taylor", "activation", "random"] = "l2"
    round_to: int = Field(8, ge=1, description="Kept FFN channels rounded to a multiple of this.")
    calibration_samples: int = Field(64, ge=1, description="Examples for the taylor importance.")
    seed: int = 0

    @field_validator("drop_layers")
    @classmethod
    def _unique_layers(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("layer indices must be unique")
        if any(i < 0 for i in v):
            raise ValueError("layer indices must be >= 0")
        return sorted(v)

    @model_validator(mode="after")
    def _does_something(self) -> PruneConfig:
        if not (self.heads or self.ffn or self.drop_layers or self.depth):
            raise ValueError("prunes nothing: set heads, ffn, drop_layers or depth")
        return self


class HiddenMatch(Strict):
    """Match student hidden states to the teacher's (FitNets/TinyBERT), projected if widths
    differ."""

    weight: float = Field(1.0, gt=0)
    kind: Literal["mse", "cosine"] = "mse"
    layer_map: list[tuple[int, int]] | None = Field(
        None, description="(student layer, teacher layer) pairs, 1-based; default: uniform."
    )


class TeacherSpec(Strict):
    path: str = Field(description="A model folder or hub id with the same vocabulary.")
    weight: float = Field(1.0, gt=0)


class Augment(Strict):
    """Teacher-generated data (causal LMs): the teacher continues prompts taken from the training
    text; the continuations become extra training text."""

    prompts: int = Field(32, ge=1, description="Prompts drawn from the training blocks.")
    prompt_tokens: int = Field(32, ge=4)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.8, ge=0, description="0 = greedy.")
    top_p: float = Field(0.95, gt=0, le=1)
    seed: int = 0


class DistillConfig(_Training):
    """Knowledge distillation from the reference model (the teacher) into the input (student)."""

    kind: Literal["distill"] = "distill"
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the soft (KL) term; 1 = pure KD.")
    divergence: Literal["kl", "reverse_kl", "jsd"] = Field(
        "kl", description="Soft-target divergence: forward KL (Hinton), reverse KL, or GKD's "
        "generalized JSD (beta).")
    jsd_beta: float = Field(0.5, ge=0, le=1)
    teacher_dtype: Literal["float32", "bfloat16", "float16", "int8"] = Field(
        "float32", description="The teacher's weights: half precision or bitsandbytes 8-bit "
        "(GPU) to save memory; the student trains in float32 (bf16 autocast on GPU).")
    augment: Augment | None = None
    learning_rate: float = Field(1e-4, gt=0)
    teacher_cache: bool = Field(
        False, description="Run the teacher once and train from its cached top-k logits."
    )
    top_k: int = Field(64, ge=1, description="Logits kept per position in the teacher cache.")
    hidden: HiddenMatch | None = None
    attention_weight: float = Field(0.0, ge=0, description="Weight of attention-map KL.")
    teachers: list[TeacherSpec] = Field(
        default_factory=list, description="Several teachers (weighted soft targets); default: "
        "the reference model alone."
    )

    @model_validator(mode="after")
    def _cache_needs_logits_only(self) -> DistillConfig:
        if self.teacher_cache and (self.hidden or self.attention_weight or
                                   len(self.teachers) > 1):
            raise ValueError("teacher_cache keeps logits of one teacher only; hidden/attention "
                             "matching and several teachers need the live teachers")
        if self.teacher_cache and self.divergence != "kl":
            raise ValueError("teacher_cache: the top-k cache supports divergence 'kl' only "
                             "(reverse KL and JSD need the teacher's full distribution)")
        return self


class ExportConfig(_Stage):
    """ONNX export through optimum, checked against PyTorch on real eval inputs."""

    kind: Literal["export"] = "export"
    opset: int | None = Field(None, ge=11)
    atol: float = Field(1e-4, gt=0, description="Max abs difference of logits vs PyTorch.")
    parity_samples: int = Field(32, ge=1)


class QuantizeConfig(_Stage):
    """ONNX Runtime quantization of an exported model: INT8 dynamic, INT8 static (QDQ, calibrated
    on the recipe's data), or weight-only INT4 (MatMulNBits) for causal LMs."""

    kind: Literal["quantize"] = "quantize"
    method: Literal["dynamic", "static", "int4"] = "dynamic"
    target: Literal["avx2", "avx512", "avx512_vnni", "arm64"] = "avx512_vnni"
    per_channel: bool = False
    calibration: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="Static only: how activation ranges are found.")
    percentile: float = Field(99.999, gt=90, lt=100, description="For calibration: percentile.")
    calibration_samples: int = Field(128, ge=1, description="Static only: training examples.")
    exclude: list[str] = Field(
        default_factory=list, description="Node names (fnmatch patterns, e.g. '*lm_head*') left "
        "in float; for causal LMs lm_head and embeddings are excluded by default.")
    optimization_level: Literal["disabled", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimizations applied when the model runs. "
        "Below 'extended', static INT8's QDQ pairs are not fused into integer kernels and the "
        "model runs slower than fp32 (measured: 0.2x at batch 1).")
    block_size: int = Field(32, ge=16, description="INT4: weights per scale (a power of 2).")
    symmetric: bool = Field(False, description="INT4: symmetric blocks (no zero point); "
                            "asymmetric keeps more of small models' quality.")

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"{v} is not a power of 2 (16, 32, 64, 128 work)")
        return v


class BnbConfig(_Stage):
    """bitsandbytes 8-bit or 4-bit weights for PyTorch GPU targets (saved with save_pretrained)."""

    kind: Literal["bnb"] = "bnb"
    bits: Literal[8, 4] = 8
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit only.")
    double_quant: bool = Field(True, description="4-bit only: quantize the scales too.")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    skip_modules: list[str] = Field(default_factory=list, description="Modules kept in float "
                                    "(the classifier head / lm_head always are).")


StageConfig = Annotated[
    FinetuneConfig | PruneConfig | DistillConfig | ExportConfig | QuantizeConfig | BnbConfig,
    Field(discriminator="kind"),
]
STAGE_CONFIGS: dict[str, type[_Stage]] = {
    "finetune": FinetuneConfig,
    "prune": PruneConfig,
    "distill": DistillConfig,
    "export": ExportConfig,
    "quantize": QuantizeConfig,
    "bnb": BnbConfig,
}
TORCH_STAGES = {"finetune", "prune", "distill", "bnb"}
NOT_HASHED = {"name", "checkpoint_every"}  # change how a stage runs, not what it makes
ONNX_STAGES = {"quantize"}


class DiagnoseSpec(Strict):
    """When a gate fails, find which layers cost the most (see `compress diagnose`)."""

    on_gate_failure: bool = True
    max_samples: int = Field(128, ge=1, description="Eval examples per sensitivity probe.")
    top: int = Field(5, ge=1, description="Layers listed.")


class Recipe(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="Lowercase, digits, '-'.")
    model: ModelSpec
    data: DataSpec
    evaluation: EvaluationSpec = EvaluationSpec()
    gates: Gates = Gates()
    diagnose: DiagnoseSpec = DiagnoseSpec()
    stages: list[StageConfig] = Field(min_length=1)
    output_root: str = Field("outputs", description="Where stage outputs live, named by hash.")

    @property
    def metric(self) -> str:
        default = "accuracy" if self.model.task == "sequence-classification" else "perplexity"
        return self.evaluation.metric or default

    @model_validator(mode="after")
    def _stage_order(self) -> Recipe:
        exported_at: int | None = None
        compressing = False
        for i, st in enumerate(self.stages):
            where = f"stages[{i}] ({st.kind})"
            if st.kind == "finetune" and compressing:
                raise ValueError(
                    f"{where}: finetune prepares the reference model and must come before any "
                    "prune/distill/export/quantize stage"
                )
            if st.kind != "finetune":
                compressing = True
            if st.kind == "bnb" and i != len(self.stages) - 1:
                raise ValueError(f"{where}: bitsandbytes weights are a final, GPU-only format; "
                                 "bnb must be the last stage")
            if st.kind in TORCH_STAGES and exported_at is not None:
                raise ValueError(
                    f"{where}: works on PyTorch models but comes after export "
                    f"(stages[{exported_at}]); move it before the export"
                )
            if st.kind == "export":
                if exported_at is not None:
                    raise ValueError(f"{where}: the model is already exported at "
                                     f"stages[{exported_at}]")
                exported_at = i
            if st.kind in ONNX_STAGES and exported_at is None:
                raise ValueError(
                    f"{where}: ONNX Runtime quantization needs an exported model; "
                    "add '- kind: export' before it"
                )
        if self.model.task == "causal-lm" and self.metric == "accuracy":
            raise ValueError("evaluation.metric: accuracy needs task sequence-classification")
        if self.model.task == "sequence-classification" and self.metric == "perplexity":
            raise ValueError("evaluation.metric: perplexity needs task causal-lm")
        for i, st in enumerate(self.stages):
            if self.model.task == "causal-lm" and isinstance(st, DistillConfig) and (
                    st.attention_weight):
                raise ValueError(f"stages[{i}] (distill).attention_weight: attention-map "
                                 "matching is for encoders; use hidden for causal LMs")
            if isinstance(st, DistillConfig) and st.augment and self.model.task != "causal-lm":
                raise ValueError(f"stages[{i}] (distill).augment: teacher-generated text needs "
                                 "model.task causal-lm")
            if isinstance(st, QuantizeConfig) and st.method == "int4" and (
                    self.model.task != "causal-lm"):
                raise ValueError(f"stages[{i}] (quantize).method: int4 (MatMulNBits) is for "
                                 "causal LMs; use dynamic or static INT8 for classifiers")
        return self


# ----------------------------------------------------------------------------- loading


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in STAGE_CONFIGS and out.endswith("]"):
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
                model = STAGE_CONFIGS.get(str(node.get("kind")))
            continue
        if part in STAGE_CONFIGS:
            continue
        if model is None or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        node = node.get(part) if isinstance(node, dict) else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
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
               f"expected one of: {', '.join(STAGE_CONFIGS)}"
    if err["type"] == "union_tag_not_found":
        return f"{where}: every stage needs a 'kind' ({', '.join(STAGE_CONFIGS)})"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{where}: {msg}"


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
    stages = [
        st.model_copy(update={"teachers": [t.model_copy(update={"path": _resolve(t.path, base)})
                                           for t in st.teachers]})
        if isinstance(st, DistillConfig) else st
        for st in recipe.stages
    ]
    return recipe.model_copy(
        update={
            "model": recipe.model.model_copy(update={"path": _resolve(recipe.model.path, base)}),
            "data": recipe.data.model_copy(update={"path": _resolve(recipe.data.path, base)}),
            "stages": stages,
            "output_root": str((Path.cwd() / recipe.output_root).resolve()),
        }
    )
