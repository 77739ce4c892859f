"""prune: structured pruning that reloads with plain `from_pretrained` (no custom code).

Layers (by index, then by importance), then heads, then FFN channels: depth is scored on the
full-width model, and width scores see the layers that remain. Pruning is uniform (every layer
keeps the same sizes) so the pruned model's config describes it; global (per-layer) sizes are
refused by design and have no field. Families: compress.arch; the work: compress.pruning. The
saved model is reloaded and compared with the in-memory one (a decoder must also generate the
same tokens) before the stage succeeds; MACs before and after go on the card.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from compress.arch import SUPPORTED
from compress.artifact import ModelRef
from compress.stage import StageConfig, StageContext


class PruneConfig(StageConfig):
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

    architectures: ClassVar[tuple[str, ...] | None] = SUPPORTED

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

    def search_hints(self, goal: str) -> dict[str, Any]:
        """Less pruning wins the metric back; more makes the model smaller and faster."""
        if goal == "metric":
            out: dict[str, Any] = {}
            if self.ffn >= 0.1:
                out["ffn"] = {"low": round(max(self.ffn - 0.25, 0.0), 2), "high": self.ffn}
            if self.drop_layers:
                out["drop_layers"] = [self.drop_layers, self.drop_layers[:-1]]
            elif self.depth:
                out["depth"] = [self.depth - 1, self.depth]
            return out
        out = {"ffn": {"low": self.ffn, "high": round(min(self.ffn + 0.25, 0.85), 2)}}
        if self.heads:
            out["heads"] = {"low": self.heads, "high": round(min(self.heads + 0.25, 0.75), 2)}
        out["depth"] = [self.depth, self.depth + 1]
        return out

    def uses_data(self) -> bool:
        """taylor/activation importance and depth scoring read calibration data. (Every prune
        stage's id has always included the data: kept, so existing outputs keep their ids.)"""
        return True

    def notes(self, info: dict[str, Any]) -> list[str]:
        b, a = info["before"], info["after"]
        dropped = info.get("layers_dropped")
        return [f"layers {b['layers']}→{a['layers']}, heads/layer {max(b['heads_per_layer'])}→"
                f"{max(a['heads_per_layer'])}, FFN {b['ffn']}→{a['ffn']} "
                f"({info['importance']} importance)"
                + (f", layers dropped {dropped}" if dropped else "")]

    def apply(self, ref: ModelRef, ctx: StageContext, out: Path) -> dict[str, Any]:
        import torch

        from compress import pruning
        from compress.arch import DecoderLayout, EncoderLayout, layout_for
        from compress.data import calibration_batches
        from compress.models import load_model, load_tokenizer, save_hf

        trc = ctx.recipe.model.trust_remote_code
        model = load_model(ref.path, ref.task, ctx.data.num_labels, trust_remote_code=trc)
        tok = load_tokenizer(ref.path, trust_remote_code=trc)
        lay = layout_for(model)
        before = lay.shape()
        gen = torch.Generator().manual_seed(self.seed)
        length = min(ctx.data.spec.max_length,
                     getattr(model.config, "max_position_embeddings", None) or 10**9)
        macs_before, counted_by = pruning.count_macs(model, length)

        cache: list[list[dict[str, Any]]] = []

        def batches() -> list[dict[str, Any]]:
            """Calibration batches, made once and only if some importance needs data."""
            if not cache:
                cache.append(calibration_batches(ctx.data, tok, self.calibration_samples,
                                                 8 if lay.decoder else 16))
            return cache[0]

        original = list(range(len(lay.layers)))
        dropped: list[int] = []
        if self.drop_layers:
            pruning.drop_layers(lay, self.drop_layers)
            dropped = list(self.drop_layers)
            original = [i for i in original if i not in self.drop_layers]
        layer_scores: dict[str, float] = {}
        if self.depth:
            layer_scores, by_score = pruning.drop_by_importance(
                lay, self.depth, self.layer_importance, batches(), original,
                after_drop=bool(self.drop_layers))
            dropped = sorted(dropped + by_score)
            original = [i for i in original if i not in by_score]

        heads_removed: dict[int, list[int]] = {}
        groups_removed: dict[int, list[int]] = {}
        if self.heads:
            if self.importance == "taylor":
                pruning.calibrate_gradients(model, batches())
            if isinstance(lay, DecoderLayout):
                heads_removed, groups_removed = pruning.prune_decoder_heads(
                    lay, self.heads, self.importance, gen, batches)
            else:
                assert isinstance(lay, EncoderLayout)
                heads_removed = pruning.prune_encoder_heads(lay, self.heads, self.importance,
                                                            gen, batches)
        if self.ffn:
            example = {} if lay.ffn_block(lay.layers[0]) is not None else dict(
                tok(["a short example", "another one"], return_tensors="pt", padding=True))
            pruning.prune_ffn(lay, self.ffn, self.round_to, self.importance, example, gen,
                              batches)
        model.zero_grad(set_to_none=True)
        model.eval()
        if dropped:  # which layers of the first unpruned model each kept layer is (distill)
            before_origin = getattr(model.config, "compress_layer_origin", None)
            if not isinstance(before_origin, list) or len(before_origin) != before["layers"]:
                before_origin = list(range(before["layers"]))
            model.config.compress_layer_origin = [before_origin[i] for i in original]
        after = lay.shape()
        macs_after, _ = pruning.count_macs(model, length)

        save_hf(model, tok, out)
        diff, checks = pruning.reload_check(model, lay, tok, ctx.data, ref.task, out, trc)
        removed = 1 - after["parameters"] / before["parameters"]
        warnings = []
        if removed > 1 / 3:
            warnings.append(f"one prune step removed {removed:.0%} of the parameters; Minitron's "
                            "guidance is at most about a third per step, with distillation "
                            "between")
        info: dict[str, Any] = {
            "before": before, "after": after, "parameters_removed": round(removed, 4),
            "heads_removed": {str(k): v for k, v in heads_removed.items()},
            "importance": self.importance, "reload_max_diff": diff,
            "macs": {"before": macs_before, "after": macs_after, "sequence_length": length,
                     "counted_by": counted_by},
            "warnings": warnings, **checks}
        if groups_removed:
            info["kv_groups_removed"] = {str(k): v for k, v in groups_removed.items()}
        if dropped:
            info["layers_dropped"] = dropped
        if layer_scores:
            info["layer_scores"] = layer_scores
            info["layer_importance"] = self.layer_importance
        return info
