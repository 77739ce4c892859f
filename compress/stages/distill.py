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

from pydantic import Field, field_validator, model_validator

from compress.artifact import ModelRef
from compress.spec import Strict, has_prompt_placeholder
from compress.stage import StageContext, TrainingConfig


class HiddenMatch(Strict):
    """Match student hidden states to the teacher's (FitNets/TinyBERT), projected if widths
    differ."""

    weight: float = Field(1.0, gt=0)
    kind: Literal["mse", "nmse", "cosine"] = Field(
        "mse", description="mse; nmse: MSE over the teacher's mean square (scale-free: what "
        "`match_layers: auto` uses for causal LMs); cosine: 1 - cos.")
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


class SequenceLevel(Strict):
    """Sequence-level (hard-label) KD: the teacher answers every training prompt and the student
    learns those answers (prompt/response data). Works across tokenizers."""

    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0, description="0 = greedy (the teacher's best answer).")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0


class Rationale(Strict):
    """Rationale distillation (distilling step-by-step): the teacher explains each training
    example; the student learns the answer and, behind `prefix`, the rationale, as two tasks."""

    instruction: str = Field(
        "{prompt}\nExplain the answer in one short sentence.",
        description="What the teacher is asked; {prompt} is the training prompt.")
    prefix: str = Field("Explain: ", min_length=1, description="Marks the student's rationale "
                        "task; the answer task keeps the prompt as is (no rationale at "
                        "inference).")
    max_new_tokens: int = Field(48, ge=1)
    teacher: str | None = Field(None, description="A model folder that writes the rationales "
                                "(e.g. the instruct model before fine-tuning); default: the "
                                "distill teacher.")
    compare: bool = Field(True, description="Also train the same student without rationales; "
                          "the card shows both answer accuracies.")
    seed: int = 0

    @field_validator("instruction")
    @classmethod
    def _has_prompt(cls, v: str) -> str:
        return has_prompt_placeholder(v, "each training prompt")


# Options added after distill outputs existed: left out of the id while unset, so the ids of
# configs that do not use them stay as they were.
_LATER_OPTIONS = ("student", "sequence_level", "rationale", "mutual")


class DistillConfig(TrainingConfig):
    """Knowledge distillation from the reference model (the teacher) into the input (student)."""

    kind: Literal["distill"] = "distill"

    uses_reference: ClassVar[bool] = True
    version: ClassVar[int] = 2  # 2: auto layer matching of causal LMs uses nmse, not mse
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
    student: str | None = Field(
        None, description="Train this model (a folder; any family, any size) instead of the "
        "stage's input; with another tokenizer, use sequence_level and alpha 0.")
    sequence_level: SequenceLevel | None = None
    rationale: Rationale | None = None
    mutual: bool = Field(False, description="Co-distillation (deep mutual learning): the "
                         "teacher trains too, each model learning from the labels and the "
                         "other's soft targets; the teacher is a second output (peer/).")

    @model_validator(mode="after")
    def _cache_needs_logits_only(self) -> DistillConfig:
        if self.teacher_cache and (self.hidden or self.attention_weight or
                                   len(self.teachers) > 1):
            raise ValueError("teacher_cache keeps logits of one teacher only; hidden/attention "
                             "matching and several teachers need the live teachers")
        if self.teacher_cache and self.divergence != "kl":
            raise ValueError("teacher_cache: the top-k cache supports divergence 'kl' only "
                             "(reverse KL and JSD need the teacher's full distribution)")
        if self.mutual and (self.teacher_cache or self.hidden or self.attention_weight or
                            len(self.teachers) > 1 or self.teacher_dtype != "float32"):
            raise ValueError("mutual: the teacher trains with the student, so it cannot be "
                             "cached, one of several, in half or 8-bit precision, or matched "
                             "by hidden states/attention")
        return self

    def identity(self) -> dict[str, Any]:
        out = super().identity()
        for name in _LATER_OPTIONS:
            if not out.get(name):
                out.pop(name, None)
        if self.student:  # the student's content, not just its path
            out["student_id"] = _folder_id(self.student)
        if self.rationale and self.rationale.teacher:
            out["rationale_teacher_id"] = _folder_id(self.rationale.teacher)
        return out

    def check(self, recipe: Any, index: int) -> None:
        where = self.where(index)
        lm = recipe.model.task == "causal-lm"
        if lm and self.attention_weight:
            raise ValueError(f"{where}.attention_weight: attention-map matching is for "
                             "encoders; use hidden for causal LMs")
        if self.augment and not lm:
            raise ValueError(f"{where}.augment: teacher-generated text needs model.task "
                             "causal-lm")
        pairs = recipe.data.prompt_column is not None
        if self.augment and pairs:
            raise ValueError(f"{where}.augment: continues plain training text; on "
                             "prompt/response data use sequence_level")
        for name in ("sequence_level", "rationale"):
            if getattr(self, name) and not (lm and pairs):
                raise ValueError(f"{where}.{name}: the teacher answers prompts; it needs "
                                 "prompt/response data (data.prompt_column and "
                                 "data.response_column)")

    def check_model(self, model_config: dict[str, Any]) -> None:
        """The models it names besides the input exist (paths resolved by now)."""
        for name, path in (("student", self.student),
                           ("rationale.teacher", self.rationale and self.rationale.teacher)):
            if path and not (Path(path) / "config.json").is_file():
                raise ValueError(f"{name}: {path} is not a model folder")

    def resolve_paths(self, resolve: Any) -> DistillConfig:
        update: dict[str, Any] = {"teachers": [
            t.model_copy(update={"path": resolve(t.path)}) for t in self.teachers]}
        if self.student:
            update["student"] = resolve(self.student)
        if self.rationale and self.rationale.teacher:
            update["rationale"] = self.rationale.model_copy(
                update={"teacher": resolve(self.rationale.teacher)})
        return self.model_copy(update=update)

    def notes(self, info: dict[str, Any]) -> list[str]:
        how = info.get("layer_matching")
        out = [how] if how and how not in ("none", "explicit") else []
        if info.get("student"):
            out.append(f"student: {info['student']} (not the stage's input)")
        seq = info.get("sequence_level")
        if seq:
            out.append(f"sequence-level KD: the student learned {seq['count']} teacher answers "
                       f"({'generated now' if seq['generated_now'] else 'from the cache'})")
        r = info.get("rationale")
        if r:
            line = f"rationale distillation: {r['rows']} rationale rows"
            if r.get("answer_accuracy_without") is not None:
                line += (f"; answer accuracy {r['answer_accuracy_with']:.2f} with rationales, "
                         f"{r['answer_accuracy_without']:.2f} without (same steps)")
            out.append(line)
        if info.get("mutual"):
            out.append("co-distillation: the teacher trained too; it is the side output "
                       "peer/ with its own card")
        return out

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
        if self.teacher_cache or len(self.teachers) > 1 or self.mutual or self.student:
            why = ("the teacher cache keeps logits only" if self.teacher_cache else
                   "the peer trains on logits" if self.mutual else
                   "the student is a model of its own" if self.student else "several teachers")
            return None, 0.0, f"layer matching off: {why}"
        origin = student.get("compress_layer_origin")
        layer_map = [(i + 1, o + 1) for i, o in enumerate(origin)] \
            if isinstance(origin, list) and len(origin) == s_n and max(origin) < t_n else None
        from compress.losses import uniform_layer_map

        pairs = layer_map or uniform_layer_map(s_n, t_n)
        attention = 0.0
        if not lm and all(_heads(student, s - 1) == _heads(teacher, t - 1) for s, t in pairs):
            attention = 1.0
        how = "the layers they came from" if layer_map else "a uniform map"
        # Encoders' post-LayerNorm states are O(1); a decoder's residual stream is not (norms
        # grow with depth): plain MSE there outweighed the task loss ~1000:1.
        kind = "nmse" if lm else "mse"
        return (HiddenMatch(weight=1.0, kind=kind, layer_map=layer_map), attention,
                f"{s_n} of {t_n} layers: hidden states matched ({kind}) to {how}"
                + (", attention maps too" if attention else " (head counts differ: no "
                   "attention maps)"))

    def apply(self, ref: ModelRef, ctx: StageContext, out: Path) -> dict[str, Any]:
        import torch

        from compress import distillation as kd
        from compress.arch import attention_heads
        from compress.errors import StageError
        from compress.models import load_model, load_tokenizer, save_hf

        trc = ctx.recipe.model.trust_remote_code
        warnings: list[str] = []
        teacher_path = self.teachers[0].path if self.teachers else ctx.reference.path
        hidden, attention_weight, auto = self.matching(
            _config(ref.path), _config(teacher_path), ref.task == "causal-lm")
        attn = "eager" if attention_weight else None  # SDPA returns no attention maps
        kwargs = {"attn_implementation": attn} if attn else {}
        student_path = self.student or ref.path
        student = load_model(student_path, ref.task, ctx.data.num_labels, trust_remote_code=trc,
                             **kwargs)
        teachers, refs, weights = self._teachers(ctx, kwargs)
        soft = self.alpha > 0 or self.hidden or self.attention_weight or self.mutual
        tok = load_tokenizer(student_path, trust_remote_code=trc)
        for t, r in zip(teachers, refs, strict=True):
            # a student of its own (`student:`) may have a vocabulary of the same size and
            # other ids: compare the tokenizers themselves then
            if soft and (t.config.vocab_size != student.config.vocab_size or (
                    self.student and load_tokenizer(r.path, trust_remote_code=trc).get_vocab()
                    != tok.get_vocab())):
                way = "use sequence_level and alpha 0 (hard-label KD needs no shared " \
                    "vocabulary)" if ctx.data.instruct else "soft targets need one vocabulary"
                raise StageError(f"distill: the student (vocabulary "
                                 f"{student.config.vocab_size}) does not share the teacher's "
                                 f"tokenizer ({r.path}, vocabulary {t.config.vocab_size}); "
                                 + way)

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

        data, facts = ctx.data, {}
        if self.augment:
            a = self.augment
            data, facts["augmentation"] = kd.augment(
                teachers[0], tok, ctx.data, prompts=a.prompts, prompt_tokens=a.prompt_tokens,
                max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                seed=a.seed, settings=a.model_dump())
        if self.sequence_level:
            data, facts["sequence_level"] = self._sequence_level(data, teachers[0], refs[0], ctx,
                                                                 warnings)
        answers_only = data
        if self.rationale:
            data, facts["rationale"] = self._rationales(data, teachers[0], refs[0], ctx,
                                                        warnings)

        loss_fn = kd.kd_loss(self.terms(hidden, attention_weight), weights=weights, pairs=pairs,
                             proj=proj)
        fwd = {"output_hidden_states": bool(hidden), "output_attentions": bool(attention_weight)}

        def fit(model: Any, rows: Any, work: Path | None) -> tuple[Any, dict[str, Any], Any]:
            from compress.train import train

            provider = self._provider(teachers, refs, tok, rows, loss_fn, fwd, proj, ctx,
                                      warnings)
            model, stats = train(model, tok, rows, self, provider,
                                 evaluation=ctx.recipe.evaluation, desc=self.label,
                                 progress=ctx.progress, checkpoint_dir=work,
                                 quarantine_root=Path(ctx.recipe.output_root))
            return model, stats, provider

        student, stats, provider = fit(student, data, ctx.work_dir)
        save_hf(student, tok, out)
        warnings += stats.pop("warnings", [])
        if self.rationale and self.rationale.compare:
            control = load_model(student_path, ref.task, ctx.data.num_labels,
                                 trust_remote_code=trc, **kwargs)
            work = ctx.work_dir / "without-rationale" if ctx.work_dir else None
            control, _, _ = fit(control, answers_only, work)
            facts["rationale"].update(self._with_and_without(student, control, tok, ctx))
        if self.mutual:
            facts["side_outputs"] = {"peer": self._save_peer(provider, refs[0], ctx, out,
                                                             stats)}
        return {"warnings": warnings, "training": stats, "teachers": [r.path for r in refs],
                "teacher_hashes": [r.hash for r in refs], "layer_map": pairs,
                "layer_matching": auto or ("explicit" if pairs else "none"),
                "attention_weight": attention_weight, "projected": bool(len(proj)),
                "divergence": self.divergence,
                "teacher_dtype": self.teacher_dtype, "augmentation": None,
                "student": self.student, "mutual": self.mutual, **facts}

    def _provider(self, teachers: list, refs: list, tok: Any, data: Any, loss_fn: Any,
                  fwd: dict[str, Any], proj: Any, ctx: StageContext,
                  warnings: list[str]) -> Any:
        """Where the targets come from: a training peer (mutual), the labels alone (alpha 0:
        hard-label KD needs no teacher pass), the top-k cache, or the live teachers."""
        from compress import distillation as kd
        from compress.llm_distill import MutualPeer
        from compress.models import is_main_process, wait_for_everyone
        from compress.train import LabelLoss

        if self.mutual:
            return MutualPeer(teachers[0], loss_fn)
        if self.alpha == 0 and not any(fwd.values()):
            return LabelLoss()
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
            return provider
        return kd.LiveTeachers(teachers, loss_fn, fwd, proj)

    def _generate(self, teacher: Any, teacher_ref: ModelRef, prompts: list[str],
                  chats: list[bool], settings: dict[str, Any], ctx: StageContext,
                  warnings: list[str]) -> tuple[list[str], dict[str, Any]]:
        """The teacher's texts for these prompts, with its own tokenizer (cached; rank 0
        generates, the other ranks of a distributed launch then read the cache)."""
        from compress.llm_distill import teacher_texts
        from compress.models import (
            is_main_process,
            load_tokenizer,
            on_accelerator,
            wait_for_everyone,
        )

        t_tok = load_tokenizer(teacher_ref.path,
                               trust_remote_code=ctx.recipe.model.trust_remote_code)
        if not is_main_process():
            wait_for_everyone()
        with on_accelerator(teacher):
            texts, facts = teacher_texts(teacher, teacher_ref, t_tok, prompts, chats, settings,
                                         Path(ctx.recipe.output_root), self.batch_size,
                                         ctx.data.spec.max_length, warnings)
        if is_main_process():
            wait_for_everyone()
        return texts, facts

    def _sequence_level(self, data: Any, teacher: Any, teacher_ref: ModelRef,
                        ctx: StageContext, warnings: list[str]) -> tuple[Any, dict[str, Any]]:
        from compress.data import CHAT, PROMPT
        from compress.llm_distill import with_responses

        assert self.sequence_level is not None
        settings = self.sequence_level.model_dump()
        texts, facts = self._generate(teacher, teacher_ref, list(data.train[PROMPT]),
                                      list(data.train[CHAT]), settings, ctx, warnings)
        return with_responses(data, texts, "sequence-level"), facts

    def _rationales(self, data: Any, teacher: Any, teacher_ref: ModelRef, ctx: StageContext,
                    warnings: list[str]) -> tuple[Any, dict[str, Any]]:
        from compress.artifact import read_ref, source_ref
        from compress.llm_distill import rationale_prompts, with_rationales
        from compress.models import load_model

        r = self.rationale
        assert r is not None
        if r.teacher:
            teacher_ref = read_ref(Path(r.teacher)) or source_ref(r.teacher, "causal-lm")
            teacher = load_model(r.teacher, "causal-lm",
                                 trust_remote_code=ctx.recipe.model.trust_remote_code)
        settings = {"max_new_tokens": r.max_new_tokens, "temperature": 0.0, "top_p": 1.0,
                    "seed": r.seed, "instruction": r.instruction}
        prompts = rationale_prompts(data, r.instruction)  # asked as an instruction: through
        texts, facts = self._generate(teacher, teacher_ref, prompts,  # its chat template if any
                                      [True] * len(prompts), settings, ctx, warnings)
        rows = with_rationales(data, texts, r.prefix)
        return rows, {**facts, "rows": len(rows.train) - len(data.train),
                      "teacher": teacher_ref.path}

    def _with_and_without(self, student: Any, control: Any, tok: Any, ctx: StageContext
                          ) -> dict[str, Any]:
        """Answer accuracy of the student trained with rationales and of the control trained
        without, on the eval split, as the card scores it."""
        from compress.evaluate import TorchPredictor, task_scores
        from compress.measure import default_threads

        spec = ctx.recipe.evaluation
        out = {}
        for name, model in (("answer_accuracy_with", student),
                            ("answer_accuracy_without", control)):
            scores, _ = task_scores(TorchPredictor(model, default_threads()), ctx.data, tok,
                                    spec, spec.max_samples)
            out[name] = scores["answer_accuracy"]
        return out

    def _save_peer(self, provider: Any, teacher_ref: ModelRef, ctx: StageContext, out: Path,
                   stats: dict[str, Any]) -> dict[str, Any]:
        """The co-trained teacher, saved as the side output peer/ (pipeline gives it a lineage
        and a card of its own)."""
        from compress.models import load_tokenizer, save_hf

        peer = provider.peer.eval()
        save_hf(peer, load_tokenizer(teacher_ref.path,
                                     trust_remote_code=ctx.recipe.model.trust_remote_code),
                out / "peer")
        losses = provider.stats()
        stats.update(losses)
        shared = {k: v for k, v in stats.items() if k not in ("loss_curve", "final_loss")}
        return {"parent": teacher_ref.hash, "role": "the teacher, trained with the student "
                "(deep mutual learning)", "training": {**shared,  # one run trained both
                                                         "final_loss": losses["peer_final_loss"]}}

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


def _folder_id(path: str) -> str:
    """A model folder's id: its lineage id when a stage made it, else its content hash."""
    from compress.artifact import read_ref, source_ref

    made = read_ref(Path(path))
    return made.hash if made else source_ref(path, "causal-lm").hash
