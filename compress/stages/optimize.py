"""optimize: ONNX Runtime's transformer fusions on an exported encoder, parity-checked.

`onnxruntime.transformers.optimizer` rewrites the exported graph into EmbedLayerNormalization,
Attention, SkipLayerNormalization and BiasGelu contrib ops (MiniLM: 529 nodes to 50), which ONNX
Runtime's session-time optimizer does not do for optimum's export (compress.graph_opt has the
details and the pitfalls). The fused graph must match its input on real eval examples within
`atol`, like an export, or the stage fails and keeps nothing; the card shows the level and what
was fused. A dynamic INT8 quantize stage after it quantizes the fused graph (QAttention,
QEmbedLayerNormalization).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from compress.artifact import ONNX_FILE, ModelRef, copy_side_files
from compress.graph_opt import ENCODERS
from compress.stage import StageConfig, StageContext


class OptimizeConfig(StageConfig):
    """Transformer graph fusions (attention, layer norm, GELU, embeddings) for ONNX encoders."""

    kind: Literal["optimize"] = "optimize"
    level: Literal["disabled", "basic", "extended"] = Field(
        "basic", description="ONNX Runtime graph level run before the fusions ('all' would bake "
        "CPU-specific layouts into the file; sessions apply it when the model loads).")
    mask: Literal["raw", "index"] = Field(
        "raw", description="raw: the 0/1 attention mask, right for any padding; index: a "
        "valid-length index, faster on GPU, right-padding only.")
    atol: float = Field(1e-4, gt=0, description="Max abs difference of logits vs the input.")
    parity_samples: int = Field(32, ge=1)

    input_format: ClassVar[str] = "onnx"
    output_format: ClassVar[str] = "onnx"
    architectures: ClassVar[tuple[str, ...] | None] = tuple(ENCODERS)

    def check(self, recipe: Any, index: int) -> None:
        if recipe.model.task != "sequence-classification":
            raise ValueError(f"{self.where(index)}: the transformer fusions are for encoder "
                             "classifiers (causal LMs: quantize method int4 instead)")
        later = [s for s in recipe.stages[index + 1:] if s.input_format == "onnx"]
        if any(getattr(s, "method", None) == "static" for s in later):
            raise ValueError(f"{self.where(index)}: static INT8 cannot follow the fusions "
                             "(ONNX Runtime's static quantizer cannot type the fused ops); use "
                             "method dynamic, or drop this stage")

    def notes(self, info: dict[str, Any]) -> list[str]:
        f = info["fusion"]
        fused = ", ".join(f"{k} ×{v}" for k, v in f["fused_ops"].items() if v) or "nothing"
        return [f"level {f['level_name']}, {f['nodes_before']} → {f['nodes_after']} nodes: "
                f"{fused}" + ("" if f["fully_fused"] else " (not every layer's attention fused)")]

    def apply(self, ref: ModelRef, ctx: StageContext, out: Path) -> dict[str, Any]:
        import json

        from compress.errors import StageError
        from compress.evaluate import OrtPredictor, logit_parity
        from compress.graph_opt import fuse
        from compress.measure import default_threads
        from compress.models import load_tokenizer

        config = json.loads((ref.dir / "config.json").read_text())
        facts = fuse(ref.onnx_path, out / ONNX_FILE, config, level=self.level, mask=self.mask,
                     atol=self.atol)
        copy_side_files(ref, out)
        threads = default_threads()
        tok = load_tokenizer(ref.path, trust_remote_code=ctx.recipe.model.trust_remote_code)
        p = logit_parity(OrtPredictor(str(ref.onnx_path), threads),
                         OrtPredictor(str(out / ONNX_FILE), threads), ctx.data, tok,
                         self.parity_samples)
        if not p["max_abs_diff"] <= self.atol:
            raise StageError(f"optimize: the fused graph differs from its input by "
                             f"{p['max_abs_diff']:.3g} (atol {self.atol:g}) on "
                             f"{p['samples']} eval examples")
        facts["level_name"] = self.level
        return {"onnx_file": ONNX_FILE, "fusion": facts,
                "parity": {**p, "atol": self.atol, "against": "the unfused ONNX input"}}
