"""finetune: train the input on the task's labels, e.g. to turn an encoder into a teacher.

Its output is the recipe's reference: every later card is compared with it, and distillation
learns from it. So it may only come first (before anything compresses the model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from compress.artifact import ModelRef
from compress.stage import StageContext, TrainingConfig


class FinetuneConfig(TrainingConfig):
    """Train the input on the task's labels: prepares a teacher (e.g. a head on an encoder)."""

    kind: Literal["finetune"] = "finetune"

    makes_reference: ClassVar[bool] = True

    def check(self, recipe: Any, index: int) -> None:
        if any(not s.makes_reference for s in recipe.stages[:index]):
            raise ValueError(f"{self.where(index)}: finetune prepares the reference model and "
                             "must come before every stage that compresses it")

    def apply(self, ref: ModelRef, ctx: StageContext, out: Path) -> dict[str, Any]:
        import torch

        from compress.models import load_model, load_tokenizer, save_hf
        from compress.train import LabelLoss, train

        torch.manual_seed(self.seed)  # a fresh classification head is initialised from this seed
        spec = ctx.recipe.model
        model = load_model(ref.path, ref.task, ctx.data.num_labels,
                           trust_remote_code=spec.trust_remote_code, revision=spec.revision)
        tok = load_tokenizer(ref.path, trust_remote_code=spec.trust_remote_code,
                             revision=spec.revision)
        model, stats = train(model, tok, ctx.data, self, LabelLoss(),
                             evaluation=ctx.recipe.evaluation, desc=self.label,
                             progress=ctx.progress, checkpoint_dir=ctx.work_dir,
                             quarantine_root=Path(ctx.recipe.output_root))
        warnings = stats.pop("warnings", [])
        if ctx.data.label_names:
            model.config.id2label = dict(enumerate(ctx.data.label_names))
            model.config.label2id = {n: i for i, n in enumerate(ctx.data.label_names)}
        save_hf(model, tok, out)
        return {"training": stats, "warnings": warnings}
