"""distill: the reference model (or several teachers) teaches the input (pruned) model.

The loss, the live/cached teacher signal and teacher-generated data are compress.distillation's;
this module holds the stage's config, its rules, and how a run is put together: load the student
and teachers, check they can be matched (vocabulary, layers, heads), pick live teachers or the
top-k cache, train with compress.train's loop, save. The teacher is the reference model unless
`teachers` lists others; self-distillation is a teacher list naming the student's own earlier
output folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from compress.artifact import ModelRef
from compress.spec import Strict
from compress.stage import StageContext, TrainingConfig


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


class DistillConfig(TrainingConfig):
    """Knowledge distillation from the reference model (the teacher) into the input (student)."""

    kind: Literal["distill"] = "distill"

    uses_reference: ClassVar[bool] = True
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
    match_layers: Literal["auto", "off"] = Field(
        "auto", description="auto: when the student has fewer layers than its teacher and "
        "neither hidden nor attention_weight is set, match each kept layer's hidden states to "
        "the teacher layer it came from (and attention maps where head counts match), as "
        "TinyBERT does: deeper pruning recovers much more than from logits alone. Needs the "
        "live teacher (off with teacher_cache).")
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

    def check(self, recipe: Any, index: int) -> None:
        where = self.where(index)
        lm = recipe.model.task == "causal-lm"
        if lm and self.attention_weight:
            raise ValueError(f"{where}.attention_weight: attention-map matching is for "
                             "encoders; use hidden for causal LMs")
        if self.augment and not lm:
            raise ValueError(f"{where}.augment: teacher-generated text needs model.task "
                             "causal-lm")

    def notes(self, info: dict[str, Any]) -> list[str]:
        how = info.get("layer_matching")
        return [how] if how and how not in ("none", "explicit") else []

    def resolve_paths(self, resolve: Any) -> DistillConfig:
        return self.model_copy(update={"teachers": [
            t.model_copy(update={"path": resolve(t.path)}) for t in self.teachers]})

    def terms(self, hidden: HiddenMatch | None = None, attention_weight: float | None = None
              ) -> Any:
        """The loss's terms; `hidden`/`attention_weight` override the fields (auto matching)."""
        from compress.distillation import KDTerms

        hidden = hidden or self.hidden
        return KDTerms(alpha=self.alpha, temperature=self.temperature,
                       divergence=self.divergence, jsd_beta=self.jsd_beta,
                       hidden_weight=hidden.weight if hidden else 0.0,
                       hidden_kind=hidden.kind if hidden else "mse",
                       attention_weight=self.attention_weight if attention_weight is None
                       else attention_weight)

    def matching(self, student: dict[str, Any], teacher: dict[str, Any], lm: bool
                 ) -> tuple[HiddenMatch | None, float, str | None]:
        """(hidden matching, attention weight, what auto decided) from the two config.json
        dicts. Explicit settings win; `auto` maps kept layers to the layers they came from (the
        prune stage records them as `compress_layer_origin`), else uniformly."""
        if self.hidden or self.attention_weight or self.match_layers == "off":
            return self.hidden, self.attention_weight, None
        s_n, t_n = _layers(student), _layers(teacher)
        if not (isinstance(s_n, int) and isinstance(t_n, int) and s_n < t_n):
            return None, 0.0, None
        if self.teacher_cache or len(self.teachers) > 1:
            return None, 0.0, ("layer matching off: the teacher cache keeps logits only"
                               if self.teacher_cache else "layer matching off: several "
                               "teachers")
        origin = student.get("compress_layer_origin")
        layer_map = [(i + 1, o + 1) for i, o in enumerate(origin)] \
            if isinstance(origin, list) and len(origin) == s_n and max(origin) < t_n else None
        from compress.losses import uniform_layer_map

        pairs = layer_map or uniform_layer_map(s_n, t_n)
        attention = 0.0
        if not lm and all(_heads(student, s - 1) == _heads(teacher, t - 1) for s, t in pairs):
            attention = 1.0
        how = "the layers they came from" if layer_map else "a uniform map"
        return (HiddenMatch(weight=1.0, kind="mse", layer_map=layer_map), attention,
                f"{s_n} of {t_n} layers: hidden states matched to {how}"
                + (", attention maps too" if attention else " (head counts differ: no "
                   "attention maps)"))

    def apply(self, ref: ModelRef, ctx: StageContext, out: Path) -> dict[str, Any]:
        import torch

        from compress import distillation as kd
        from compress.arch import attention_heads
        from compress.errors import StageError
        from compress.models import (
            is_main_process,
            load_model,
            load_tokenizer,
            save_hf,
            wait_for_everyone,
        )
        from compress.train import train

        trc = ctx.recipe.model.trust_remote_code
        warnings: list[str] = []
        teacher_path = self.teachers[0].path if self.teachers else ctx.reference.path
        hidden, attention_weight, auto = self.matching(
            _config(ref.path), _config(teacher_path), ref.task == "causal-lm")
        attn = "eager" if attention_weight else None  # SDPA returns no attention maps
        kwargs = {"attn_implementation": attn} if attn else {}
        student = load_model(ref.path, ref.task, ctx.data.num_labels, trust_remote_code=trc,
                             **kwargs)
        teachers, refs, weights = self._teachers(ctx, kwargs)
        for t, r in zip(teachers, refs, strict=True):
            if t.config.vocab_size != student.config.vocab_size:
                raise StageError(f"distill: teacher {r.path} has a vocabulary of "
                                 f"{t.config.vocab_size}, the student "
                                 f"{student.config.vocab_size}; their tokenizers must match")
        tok = load_tokenizer(ref.path, trust_remote_code=trc)

        given = hidden.layer_map if hidden else None
        pairs = kd.layer_map(student, teachers[0], given) \
            if hidden or attention_weight else []
        proj = torch.nn.ModuleDict()
        if hidden:
            s_w, t_w = student.config.hidden_size, teachers[0].config.hidden_size
            if s_w != t_w:  # a learned projection per mapped layer, trained, never saved
                proj = torch.nn.ModuleDict({str(s): torch.nn.Linear(s_w, t_w)
                                            for s, _ in pairs})
        if attention_weight:
            for s, t in pairs:
                hs = attention_heads(student, s - 1)
                ht = attention_heads(teachers[0], t - 1)
                if hs != ht:
                    raise StageError(f"distill.attention_weight: student layer {s} has {hs} "
                                     f"heads, teacher layer {t} has {ht}; attention maps need "
                                     "equal heads")

        data, augmented = ctx.data, None
        if self.augment:
            a = self.augment
            data, augmented = kd.augment(
                teachers[0], tok, ctx.data, prompts=a.prompts, prompt_tokens=a.prompt_tokens,
                max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                seed=a.seed, settings=a.model_dump())

        loss_fn = kd.kd_loss(self.terms(hidden, attention_weight), weights=weights, pairs=pairs,
                             proj=proj)
        fwd = {"output_hidden_states": bool(hidden), "output_attentions": bool(attention_weight)}
        if self.teacher_cache:
            k = self.top_k if data.causal_lm else min(self.top_k, data.num_labels)
            if not is_main_process():
                wait_for_everyone()  # rank 0 builds the cache; the others then read it
            cache = kd.build_teacher_cache(teachers[0], refs[0], tok, data,
                                           Path(ctx.recipe.output_root), k, self.batch_size,
                                           warnings)
            if is_main_process():
                wait_for_everyone()
            provider: Any = kd.CachedTeacher(cache, loss_fn)
            provider.forward_kwargs = fwd
        else:
            provider = kd.LiveTeachers(teachers, loss_fn, fwd, proj)
        student, stats = train(student, tok, data, self, provider,
                               evaluation=ctx.recipe.evaluation, desc=self.label,
                               progress=ctx.progress, checkpoint_dir=ctx.work_dir,
                               quarantine_root=Path(ctx.recipe.output_root))
        save_hf(student, tok, out)
        warnings += stats.pop("warnings", [])
        return {"warnings": warnings, "training": stats, "teachers": [r.path for r in refs],
                "teacher_hashes": [r.hash for r in refs], "layer_map": pairs,
                "layer_matching": auto or ("explicit" if pairs else "none"),
                "attention_weight": attention_weight,
                "projected": bool(len(proj)), "divergence": self.divergence,
                "teacher_dtype": self.teacher_dtype, "augmentation": augmented}

    def search_hints(self, goal: str) -> dict[str, Any]:
        """Longer training and the soft-target settings recover what pruning cost (and let a
        size or speed search prune more)."""
        out: dict[str, Any] = {"epochs": {"low": self.epochs, "high": self.epochs * 2}}
        if goal == "metric":
            out["temperature"] = {"low": 1.0, "high": 8.0, "log": True}
            out["alpha"] = {"low": 0.2, "high": 0.9}
        return out

    def _teacher_kwargs(self) -> dict[str, Any]:
        """Load options for the teacher's weights: half precision, or bitsandbytes 8-bit."""
        import torch

        from compress.errors import StageError

        if self.teacher_dtype == "float32":
            return {}
        if self.teacher_dtype == "int8":
            if not torch.cuda.is_available():
                raise StageError("distill.teacher_dtype: int8 (bitsandbytes) needs a CUDA GPU; "
                                 "use bfloat16 or float32 on this machine")
            from transformers import BitsAndBytesConfig

            return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True),
                    "device_map": {"": 0}}
        return {"dtype": getattr(torch, self.teacher_dtype)}

    def _teachers(self, ctx: StageContext, load_kwargs: dict[str, Any]
                  ) -> tuple[list, list, list]:
        """(models, refs, weights): the recipe's teachers, or the reference model alone."""
        from compress.artifact import source_ref
        from compress.errors import StageError
        from compress.models import load_model

        specs = [(t.path, t.weight) for t in self.teachers] or [(ctx.reference.path, 1.0)]
        models, refs = [], []
        for path, _ in specs:
            ref = ctx.reference if path == ctx.reference.path else \
                source_ref(path, ctx.reference.task)
            if ref.format != "hf":
                raise StageError(f"distill: teacher {path} must be a PyTorch model, not ONNX")
            model = load_model(path, ref.task, ctx.data.num_labels,
                               trust_remote_code=ctx.recipe.model.trust_remote_code,
                               **load_kwargs, **self._teacher_kwargs())
            models.append(model)
            refs.append(ref)
        return models, refs, [w for _, w in specs]


def _config(path: str) -> dict[str, Any]:
    """A model's config.json as a dict (a hub id through transformers' cache)."""
    import json

    p = Path(path) / "config.json"
    if p.is_file():
        return json.loads(p.read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).to_dict()


def _layers(config: dict[str, Any]) -> int | None:
    n = config.get("num_hidden_layers", config.get("n_layers"))
    return n if isinstance(n, int) else None


def _heads(config: dict[str, Any], layer: int) -> int:
    """Attention heads of one layer (0-based) from a config dict, encoders' pruned heads out."""
    heads = config.get("num_attention_heads") or config.get("n_heads") or 0
    pruned = (config.get("pruned_heads") or {}).get(str(layer), [])
    return int(heads) - len(pruned)
