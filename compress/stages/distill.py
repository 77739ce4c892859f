"""distill: the reference model (or several teachers) teaches the input (pruned) model.

loss = alpha * KL(teacher_T || student_T) * T^2 + (1 - alpha) * CE(student, labels)
     + hidden.weight * sum over mapped layers of MSE/cosine(proj(student_h), teacher_h)
     + attention_weight * sum over mapped layers of KL(teacher attention || student attention)

Causal LMs: the same terms per token (position t against token t + 1, padding masked), and
`divergence` picks forward KL, reverse KL or GKD's generalized JSD for the soft term. `augment`
has the teacher continue prompts from the training text; its continuations become extra
training text (the student then also learns from what the teacher would write).

Several teachers: their T-softmaxes are averaged with the given weights. With `teacher_cache`,
the teacher runs once over the training set and its top-k logits are kept in a memory-mapped cache
keyed by (teacher id, data fingerprint, k, max length); every epoch, and every later run with the
same teacher and data, reads them instead of running the teacher. For a classifier k covers every
class, so the cached loss is the exact one; for an LM it is the exact KL over the kept top-k
(both distributions renormalised over those k tokens).

The teacher is the reference model unless `teachers` lists others; self-distillation is a
teacher list naming the student's own earlier output folder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from compress.artifact import ModelRef, source_ref
from compress.errors import StageError
from compress.models import (
    is_main_process,
    load_model,
    load_tokenizer,
    save_hf,
    wait_for_everyone,
)
from compress.recipe import DistillConfig
from compress.stages import StageContext


def build_teacher_cache(teacher: Any, teacher_ref: ModelRef, tokenizer: Any, ctx: StageContext,
                        k: int, batch_size: int) -> Any:
    """Open the cache for this teacher and data, filling it first if it does not exist."""
    from compress.data import loader
    from compress.teacher_cache import TopKCache, TopKCacheWriter, cache_key
    from compress.train import encode_indexed

    key = cache_key(teacher_ref.hash, ctx.data.fingerprint, k, ctx.data.spec.max_length)
    folder = Path(ctx.recipe.output_root) / "teacher-cache" / key[:16]
    cache = TopKCache.open(folder)
    if cache is not None:
        return cache
    enc = encode_indexed(ctx.data, tokenizer)
    writer = TopKCacheWriter(folder, len(enc), k)
    device = next(teacher.parameters()).device
    with torch.inference_mode():
        for batch in loader(enc, tokenizer, batch_size * 2):
            batch.pop("labels")
            idx = batch.pop("idx")
            batch = {k_: v.to(device) for k_, v in batch.items()}
            logits = teacher(**batch).logits.float().cpu()
            mask = batch["attention_mask"].cpu() if logits.dim() == 3 else None
            writer.add(idx.tolist(), logits, mask)
    writer.finish()
    return TopKCache.open(folder)


def _teacher_kwargs(cfg: DistillConfig) -> dict[str, Any]:
    """Load options for the teacher's weights: half precision, or bitsandbytes 8-bit on GPU."""
    if cfg.teacher_dtype == "float32":
        return {}
    if cfg.teacher_dtype == "int8":
        if not torch.cuda.is_available():
            raise StageError("distill.teacher_dtype: int8 (bitsandbytes) needs a CUDA GPU; "
                             "use bfloat16 or float32 on this machine")
        from transformers import BitsAndBytesConfig

        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True),
                "device_map": {"": 0}}
    return {"dtype": getattr(torch, cfg.teacher_dtype)}


def _teachers(cfg: DistillConfig, ctx: StageContext, load_kwargs: dict[str, Any]
              ) -> tuple[list, list, list]:
    """(models, refs, weights): the recipe's teachers, or the reference model alone."""
    specs = [(t.path, t.weight) for t in cfg.teachers] or [(ctx.reference.path, 1.0)]
    models, refs = [], []
    for path, _ in specs:
        ref = ctx.reference if path == ctx.reference.path else \
            source_ref(path, ctx.reference.task)
        if ref.format != "hf":
            raise StageError(f"distill: teacher {path} must be a PyTorch model, not ONNX")
        model = load_model(path, ref.task, ctx.data.num_labels,
                           trust_remote_code=ctx.recipe.model.trust_remote_code,
                           **load_kwargs, **_teacher_kwargs(cfg))
        models.append(model)
        refs.append(ref)
    return models, refs, [w for _, w in specs]


def _layer_map(cfg: DistillConfig, student: Any, teacher: Any) -> list[tuple[int, int]]:
    from compress.losses import uniform_layer_map

    s_n, t_n = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    pairs = (cfg.hidden.layer_map if cfg.hidden and cfg.hidden.layer_map else
             uniform_layer_map(s_n, t_n))
    for s, t in pairs:
        if not (0 <= s <= s_n and 0 <= t <= t_n):
            raise StageError(f"distill.hidden.layer_map: ({s}, {t}) is out of range: the student "
                             f"has layers 1-{s_n}, the teacher 1-{t_n} (0 = embeddings)")
    return [tuple(p) for p in pairs]


def kd_loss(cfg: DistillConfig, *, weights: Sequence[float] = (1.0,),
            pairs: Sequence[tuple[int, int]] = (),
            proj: torch.nn.ModuleDict | None = None) -> Any:
    """The stage's loss as `train` calls it: (student out, teacher signal, labels, batch).

    The signal is the teachers' outputs (live) or (values, indices) from the top-k cache.
    """
    from compress.losses import (
        attention_kl_loss,
        hard_label_loss,
        hidden_state_loss,
        mix_teacher_logits,
        shift_for_causal_lm,
        soft_target_loss,
        topk_kd_kl_loss,
    )

    proj = proj if proj is not None else torch.nn.ModuleDict()

    def mixed(soft: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
              pos: torch.Tensor | None) -> torch.Tensor:
        if cfg.alpha == 1:
            return soft
        y = y if pos is None else y.masked_fill(~pos, -100)
        return cfg.alpha * soft + (1 - cfg.alpha) * hard_label_loss(logits, y)

    def loss(s: Any, t: Any, y: torch.Tensor, batch: dict) -> torch.Tensor:
        mask = batch.get("attention_mask")
        logits, pos = s.logits, None
        lm = logits.dim() == 3
        if lm:  # position t predicts token t + 1; padding never counts
            logits, y, pos = shift_for_causal_lm(logits, y, mask)
        if isinstance(t, tuple):  # cached top-k logits: (values, indices, rows present)
            values, indices, present = t
            if lm:
                values, indices = values[:, :-1], indices[:, :-1]
                pos = present[:, :-1] & pos
            else:
                values, indices = values.squeeze(1), indices.squeeze(1)
            soft = topk_kd_kl_loss(logits, values, indices, temperature=cfg.temperature,
                                   mask=pos)
            return mixed(soft, logits, y, pos)
        t_logits = t[0].logits if len(t) == 1 else mix_teacher_logits(
            [o.logits for o in t], list(weights), cfg.temperature)
        if lm:
            t_logits = t_logits[:, :-1]
        soft = soft_target_loss(logits, t_logits.float(), divergence=cfg.divergence,
                                temperature=cfg.temperature, beta=cfg.jsd_beta, mask=pos)
        total = mixed(soft, logits, y, pos)
        for si, ti in pairs:
            if cfg.hidden:
                h = s.hidden_states[si]
                h = proj[str(si)](h) if len(proj) else h
                total = total + cfg.hidden.weight * hidden_state_loss(
                    h, t[0].hidden_states[ti].float(), kind=cfg.hidden.kind, mask=mask)
            if cfg.attention_weight and si >= 1 and ti >= 1:
                total = total + cfg.attention_weight * attention_kl_loss(
                    s.attentions[si - 1], t[0].attentions[ti - 1], mask=mask)
        return total

    return loss


def apply(ref: ModelRef, cfg: DistillConfig, ctx: StageContext, out: Path) -> dict[str, Any]:
    from compress.train import train

    trc = ctx.recipe.model.trust_remote_code
    attn = "eager" if cfg.attention_weight else None  # SDPA does not return attention maps
    kwargs = {"attn_implementation": attn} if attn else {}
    student = load_model(ref.path, ref.task, ctx.data.num_labels, trust_remote_code=trc,
                         **kwargs)
    teachers, refs, weights = _teachers(cfg, ctx, kwargs)
    for t, r in zip(teachers, refs, strict=True):
        if t.config.vocab_size != student.config.vocab_size:
            raise StageError(f"distill: teacher {r.path} has a vocabulary of "
                             f"{t.config.vocab_size}, the student {student.config.vocab_size}; "
                             "their tokenizers must match")
    tok = load_tokenizer(ref.path, trust_remote_code=trc)

    pairs = _layer_map(cfg, student, teachers[0]) if cfg.hidden or cfg.attention_weight else []
    proj = torch.nn.ModuleDict()
    if cfg.hidden:
        s_w, t_w = student.config.hidden_size, teachers[0].config.hidden_size
        if s_w != t_w:  # a learned projection per mapped layer, trained, never saved
            proj = torch.nn.ModuleDict({str(s): torch.nn.Linear(s_w, t_w) for s, _ in pairs})
    if cfg.attention_weight:
        for s, t in pairs:
            hs = student.config.num_attention_heads - len(student.config.pruned_heads.get(s - 1,
                                                                                          []))
            ht = teachers[0].config.num_attention_heads
            if hs != ht:
                raise StageError(f"distill.attention_weight: student layer {s} has {hs} heads, "
                                 f"teacher layer {t} has {ht}; attention maps need equal heads")

    data, augmented = ctx.data, None
    if cfg.augment:
        data, augmented = augment(teachers[0], tok, ctx.data, cfg)

    cache = None
    if cfg.teacher_cache:
        k = cfg.top_k if data.causal_lm else min(cfg.top_k, data.num_labels)
        aug_ctx = ctx if augmented is None else dataclasses.replace(ctx, data=data)
        if not is_main_process():
            wait_for_everyone()  # rank 0 builds the cache; the others then read it
        cache = build_teacher_cache(teachers[0], refs[0], tok, aug_ctx, k, cfg.batch_size)
        if is_main_process():
            wait_for_everyone()
        teachers = []  # training never runs it

    loss = kd_loss(cfg, weights=weights, pairs=pairs, proj=proj)

    fwd = {"output_hidden_states": bool(cfg.hidden), "output_attentions": bool(
        cfg.attention_weight)}
    student, stats = train(student, tok, data, cfg, loss, teachers=teachers,
                           teacher_cache=cache, desc=cfg.name or "distill",
                           progress=ctx.progress, checkpoint_dir=ctx.work_dir,
                           forward_kwargs=fwd, extra=proj)
    save_hf(student, tok, out)
    return {"training": stats, "teachers": [r.path for r in refs],
            "teacher_hashes": [r.hash for r in refs], "layer_map": pairs,
            "projected": bool(len(proj)), "divergence": cfg.divergence,
            "teacher_dtype": cfg.teacher_dtype, "augmentation": augmented}


def augment(teacher: Any, tokenizer: Any, data: Any, cfg: DistillConfig) -> tuple[Any, dict]:
    """The teacher continues `prompts` prompts cut from the training text; the data gains one
    row per continuation. Seeded, so the same recipe writes the same text (and cache key)."""
    import datasets

    from compress.artifact import canonical_hash
    from compress.data import encode

    spec = cfg.augment
    assert spec is not None
    blocks = encode(data.train, tokenizer, data.spec.max_length)
    gen = torch.Generator().manual_seed(spec.seed)
    order = torch.randperm(len(blocks), generator=gen)[: spec.prompts].tolist()
    device = next(teacher.parameters()).device
    texts: list[str] = []
    new_tokens = 0
    torch.manual_seed(spec.seed)
    with torch.inference_mode():
        for i in order:
            prompt = torch.tensor([blocks[i]["input_ids"][: spec.prompt_tokens]], device=device)
            sample = spec.temperature > 0
            out = teacher.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=spec.max_new_tokens,
                do_sample=sample, temperature=spec.temperature if sample else None,
                top_p=spec.top_p if sample else None, pad_token_id=tokenizer.pad_token_id)
            new_tokens += out.shape[1] - prompt.shape[1]
            texts.append(tokenizer.decode(out[0], skip_special_tokens=True))
    extra = datasets.Dataset.from_dict({"text": texts})
    train = datasets.concatenate_datasets([data.train, extra])
    fp = canonical_hash(data.fingerprint, "augment", spec.model_dump(), texts)
    info = {"prompts": len(texts), "generated_tokens": new_tokens,
            "example": texts[0][:300] if texts else ""}
    return dataclasses.replace(data, train=train, fingerprint=fp), info
