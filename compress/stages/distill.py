"""distill: the reference model teaches the input (pruned) model.

loss = alpha * KL(teacher_T || student_T) * T^2 + (1 - alpha) * CE(student, labels)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.artifact import ModelRef
from compress.errors import StageError
from compress.models import load_classifier, load_tokenizer, save_hf
from compress.recipe import DistillConfig
from compress.stages import StageContext


def apply(ref: ModelRef, cfg: DistillConfig, ctx: StageContext, out: Path) -> dict[str, Any]:
    from compress.losses import distillation_loss
    from compress.train import train

    teacher_ref = ctx.reference
    if teacher_ref.format != "hf":
        raise StageError("distill: the teacher must be a PyTorch model, not ONNX")
    trc = ctx.recipe.model.trust_remote_code
    n = ctx.data.num_labels
    student = load_classifier(ref.path, n, trust_remote_code=trc)
    teacher = load_classifier(teacher_ref.path, n, trust_remote_code=trc)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise StageError(f"distill: teacher vocabulary ({teacher.config.vocab_size}) and student "
                         f"vocabulary ({student.config.vocab_size}) differ")
    tok = load_tokenizer(ref.path, trust_remote_code=trc)

    def loss(s, t, y):
        return distillation_loss(s, t, y, alpha=cfg.alpha, temperature=cfg.temperature)

    student, stats = train(student, tok, ctx.data, cfg, loss, teacher=teacher,
                           desc=cfg.name or "distill", progress=ctx.progress)
    save_hf(student, tok, out)
    return {"training": stats, "teacher": teacher_ref.path, "teacher_hash": teacher_ref.hash}
