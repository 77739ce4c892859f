"""finetune: train the input on the task's labels, e.g. to turn an encoder into a teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compress.artifact import ModelRef
from compress.models import load_model, load_tokenizer, save_hf
from compress.recipe import FinetuneConfig
from compress.stages import StageContext


def label_loss(s: Any, _teacher: Any, y: torch.Tensor, batch: dict) -> torch.Tensor:
    """Plain cross-entropy in `train`'s loss signature (no teacher); next-token for an LM."""
    from compress.losses import hard_label_loss, shift_for_causal_lm

    if s.logits.dim() == 3:
        logits, y, mask = shift_for_causal_lm(s.logits, y, batch.get("attention_mask"))
        return hard_label_loss(logits, y if mask is None else y.masked_fill(~mask, -100))
    return hard_label_loss(s.logits, y)


def apply(ref: ModelRef, cfg: FinetuneConfig, ctx: StageContext, out: Path) -> dict[str, Any]:
    from compress.train import train

    torch.manual_seed(cfg.seed)  # a fresh classification head is initialised from this seed
    spec = ctx.recipe.model
    model = load_model(ref.path, ref.task, ctx.data.num_labels,
                       trust_remote_code=spec.trust_remote_code, revision=spec.revision)
    tok = load_tokenizer(ref.path, trust_remote_code=spec.trust_remote_code,
                         revision=spec.revision)
    model, stats = train(model, tok, ctx.data, cfg, label_loss, desc=cfg.name or "finetune",
                         progress=ctx.progress, checkpoint_dir=ctx.work_dir)
    if ctx.data.label_names:
        model.config.id2label = dict(enumerate(ctx.data.label_names))
        model.config.label2id = {n: i for i, n in enumerate(ctx.data.label_names)}
    save_hf(model, tok, out)
    return {"training": stats}
