"""ONNX Runtime transformer fusions for an exported encoder (BERT, RoBERTa, DistilBERT, ...).

Why offline: ONNX Runtime's own session-time optimizer does not recognise the attention that
optimum's export writes (transformers 4.57), so an exported MiniLM still runs as 293 nodes (529
in the file) with ORT_ENABLE_ALL. `onnxruntime.transformers.optimizer` pattern-matches it into
EmbedLayerNormalization, Attention, SkipLayerNormalization and BiasGelu (51 nodes), and a graph
quantized *after* fusion gets QAttention / QEmbedLayerNormalization instead of dozens of
MatMulInteger + glue ops.

Choices, each for a failure seen on this stack:
- The head count comes from config.json (pruned heads subtracted) and must be the same in every
  layer: the fusion writes one `num_heads` into every Attention node. Mixed counts are refused.
  (ORT prefers the count it reads off the graph's Reshape shapes; ours is the fallback.)
- The attention mask stays a raw 0/1 mask (`mask="raw"`). ORT's BERT default turns it into a
  1-D "valid length" index, which silently gives wrong logits for left-padded batches (0.07 max
  abs diff on MiniLM); `mask="index"` keeps that faster-on-GPU form for right padding only.
- Level "all" (99) is refused: it bakes CPU-specific layouts into the file. Sessions apply it
  at load time anyway.
- Every fused file is checked against the unfused one on synthetic inputs at two batch sizes and
  sequence lengths, right- and left-padded, so a wrong head count or a lost dynamic axis fails
  here rather than in the report.
- Quantizing a fused graph: contrib ops (SkipLayerNormalization, ...) have no ONNX shape
  inference, so `quantize_dynamic` cannot type their outputs and fails ("Unable to find data
  type for weight_name=..."). `quantize_dynamic_fused` passes `DefaultTensorType=FLOAT`. optimum's
  ORTQuantizer builds its own extra_options without it and fails on fused graphs.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import StageError

# HF model_type -> config keys (heads, hidden, layers). ORT optimizes all of them as "bert".
ENCODERS: dict[str, tuple[str, str, str]] = {
    "bert": ("num_attention_heads", "hidden_size", "num_hidden_layers"),
    "roberta": ("num_attention_heads", "hidden_size", "num_hidden_layers"),
    "xlm-roberta": ("num_attention_heads", "hidden_size", "num_hidden_layers"),
    "camembert": ("num_attention_heads", "hidden_size", "num_hidden_layers"),
    "electra": ("num_attention_heads", "hidden_size", "num_hidden_layers"),
    "distilbert": ("n_heads", "dim", "n_layers"),
}
LEVELS = {"disabled": 0, "basic": 1, "extended": 2}
FUSED_OPS = ("EmbedLayerNormalization", "Attention", "MultiHeadAttention",
             "SkipLayerNormalization", "LayerNormalization", "BiasGelu", "FastGelu", "Gelu",
             "QAttention", "QEmbedLayerNormalization")
# What quantize_dynamic needs on a fused graph (see the module docstring).
FUSED_QUANT_OPTIONS = {"DefaultTensorType": 1}  # onnx.TensorProto.FLOAT


def attention_shape(config: dict[str, Any]) -> dict[str, int]:
    """Heads per layer, head size and layers from an HF config dict, pruned heads subtracted.

    Refuses model types ORT's BERT fusions do not cover and per-layer head counts that differ."""
    mt = config.get("model_type")
    if mt not in ENCODERS:
        raise StageError(f"fuse: model_type {mt!r} is not an encoder ORT's BERT fusions cover "
                         f"({', '.join(ENCODERS)})")
    hk, dk, lk = ENCODERS[mt]
    heads, hidden, layers = int(config[hk]), int(config[dk]), int(config[lk])
    if hidden % heads:
        raise StageError(f"fuse: hidden size {hidden} is not a multiple of {heads} heads")
    pruned = {int(k): len(v) for k, v in (config.get("pruned_heads") or {}).items()}
    per_layer = [heads - pruned.get(i, 0) for i in range(layers)]
    if len(set(per_layer)) > 1:
        raise StageError(f"fuse: attention heads differ by layer {per_layer}; ORT's fusion writes "
                         "one head count into every Attention node, so this model cannot be "
                         "fused (prune heads uniformly)")
    return {"num_heads": per_layer[0], "head_size": hidden // heads, "hidden_size": hidden,
            "layers": layers}


def fused_op_counts(onnx_path: Path) -> dict[str, int]:
    """How many nodes of each fused (or fused-and-quantized) kind the graph holds."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    counts = collections.Counter(n.op_type for n in model.graph.node)
    return {op: counts.get(op, 0) for op in FUSED_OPS}


def dynamic_axes(onnx_path: Path) -> dict[str, list[str | int]]:
    """Each graph input's shape: symbolic names (dynamic) or ints (fixed)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input}


def session(onnx_path: Path, threads: int = 2) -> Any:
    """A CPU session as we time and compare models: ORT_ENABLE_ALL, `threads` intra-op."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def synthetic_feeds(sess: Any, vocab_size: int, batch: int, length: int, *, left: bool = False,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids with ragged padding (row 0 full length) for every input the graph has."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, (batch, length), dtype=np.int64)
    mask = np.ones((batch, length), dtype=np.int64)
    for r in range(1, batch):
        n = int(rng.integers(1, length + 1))
        if left:
            mask[r, : length - n] = 0
        else:
            mask[r, n:] = 0
    ids[mask == 0] = 0
    known = {"input_ids": ids, "attention_mask": mask,
             "token_type_ids": np.zeros_like(ids)}
    feeds = {}
    for i in sess.get_inputs():
        if i.name not in known:
            raise StageError(f"fuse: cannot feed graph input {i.name!r}")
        feeds[i.name] = known[i.name]
    return feeds


def max_abs_diff(onnx_a: Path, onnx_b: Path, feeds: list[dict[str, np.ndarray]],
                 threads: int = 2) -> float:
    """Largest |a - b| over the first output of two graphs on the same inputs."""
    a, b = session(onnx_a, threads), session(onnx_b, threads)
    return max(float(np.abs(a.run(None, f)[0] - b.run(None, f)[0]).max()) for f in feeds)


def _level(level: int | str) -> int:
    if isinstance(level, str):
        if level not in LEVELS:
            raise StageError(f"fuse: level {level!r}: use one of {', '.join(LEVELS)} "
                             "('all' bakes CPU-specific layouts into the file)")
        return LEVELS[level]
    if level not in LEVELS.values():
        raise StageError(f"fuse: level {level}: use 0, 1 or 2 (99 bakes CPU-specific layouts "
                         "into the file)")
    return level


def fuse(onnx_in: Path, onnx_out: Path, config: dict[str, Any], *, level: int | str = "basic",
         mask: str = "raw", use_gpu: bool = False, atol: float | None = 1e-4) -> dict[str, Any]:
    """Fuse `onnx_in` into `onnx_out`; returns the facts for a report card.

    `config` is the HF config.json dict of the exported model. `level` is the ORT graph level run
    before the Python fusions (0/"disabled", 1/"basic", 2/"extended"). With `atol` set, the fused
    graph must match the unfused one within it on synthetic inputs at (1, 8) and (3, 19), right-
    and left-padded (right only with mask="index"), or StageError."""
    from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    if mask not in ("raw", "index"):
        raise StageError(f"fuse: mask {mask!r}: use 'raw' (any padding) or 'index' (right only)")
    shape = attention_shape(config)
    opts = FusionOptions("bert")
    opts.attention_mask_format = (AttentionMaskFormat.AttentionMask if mask == "raw"
                                  else AttentionMaskFormat.MaskIndexEnd)
    lvl = _level(level)
    try:
        model = optimize_model(str(onnx_in), model_type="bert", num_heads=shape["num_heads"],
                               hidden_size=shape["num_heads"] * shape["head_size"],
                               opt_level=lvl, optimization_options=opts, use_gpu=use_gpu)
    except Exception as e:  # the optimizer asserts and raises many kinds
        raise StageError(f"fuse: ONNX Runtime's optimizer failed on {onnx_in}: "
                         f"{str(e).strip().splitlines()[0][:300] if str(e) else type(e).__name__}"
                         ) from None
    onnx_out = Path(onnx_out)
    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    model.save_model_to_file(str(onnx_out))

    counts = fused_op_counts(onnx_out)
    attn = counts["Attention"] + counts["MultiHeadAttention"]
    facts: dict[str, Any] = {
        "level": lvl, "mask": mask, **shape, "fused_ops": counts,
        "fully_fused": attn == shape["layers"] and counts["SkipLayerNormalization"] > 0,
        "nodes_before": _node_count(onnx_in), "nodes_after": _node_count(onnx_out),
        "dynamic_axes": dynamic_axes(onnx_out),
    }
    if atol is not None:
        probe = session(onnx_in)
        vocab = int(config.get("vocab_size", 100))
        feeds = [synthetic_feeds(probe, vocab, 1, 8, seed=1),
                 synthetic_feeds(probe, vocab, 3, 19, seed=2)]
        if mask == "raw":
            feeds.append(synthetic_feeds(probe, vocab, 3, 19, left=True, seed=3))
        try:
            diff = max_abs_diff(onnx_in, onnx_out, feeds)
        except Exception as e:  # a fused graph that cannot run at these shapes
            raise StageError(f"fuse: the fused graph does not run at batch 1/3, lengths 8/19: "
                             f"{str(e).strip().splitlines()[0][:300]}") from None
        if not diff <= atol:
            raise StageError(f"fuse: fused graph differs from the unfused one by {diff:.3g} "
                             f"(atol {atol:g}); heads {shape['num_heads']} may be wrong")
        facts["parity"] = {"max_abs_diff": diff, "atol": atol,
                           "shapes": [list(f["input_ids"].shape) for f in feeds]}
    return facts


def _node_count(onnx_path: Path) -> int:
    import onnx

    return len(onnx.load(str(onnx_path), load_external_data=False).graph.node)


def quantize_dynamic_fused(onnx_in: Path, onnx_out: Path, *,
                           extra_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """`onnxruntime.quantization.quantize_dynamic` that also works on fused graphs.

    Adds DefaultTensorType=FLOAT (contrib-op outputs have no inferred type); other keyword
    arguments (weight_type, per_channel, op_types_to_quantize, ...) pass through."""
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(onnx_in), str(onnx_out),
                     extra_options={**FUSED_QUANT_OPTIONS, **(extra_options or {})}, **kwargs)
