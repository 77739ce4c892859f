"""quantize: ONNX Runtime INT8 (dynamic, or static QDQ calibrated on the recipe's training data)
through optimum's ORTQuantizer and a target preset, or weight-only INT4 (MatMulNBits) for LMs.

The preset (avx2, avx512, avx512_vnni, arm64) picks the operators and int formats the target's
kernels are fast at; the quantization config travels with the model (ort_config.json), and the
graph optimization level to run it with in ort_session.json.

Static INT8 quantizes MatMul/Gemm and the embedding Gather (see STATIC_OPS); the card lists the
op types each model ended up quantized at. Causal LMs: lm_head and the
token-embedding Gather stay float by default (INT8 there costs the most perplexity for the least
time), and calibration feeds full training blocks with an empty KV cache: the prefill pass, whose
activation ranges the decode steps share (the model keeps its cache inputs; no second export).
"""

from __future__ import annotations

import fnmatch
import json
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

from compress.arch import graph_nodes, lm_head_and_embeddings
from compress.artifact import ModelRef, copy_side_files
from compress.data import TaskData
from compress.errors import StageError, first_line
from compress.evaluate import SESSION_FILE, session_options
from compress.logs import quiet
from compress.report import Diagnosis
from compress.stage import StageConfig, StageContext

# The CPU feature each preset's kernels are built for (names as in /proc/cpuinfo).
TARGET_FLAG = {"avx512_vnni": "avx512_vnni", "avx512": "avx512f", "avx2": "avx2",
               "arm64": "asimd"}
CALIB_BATCH = 8
# Static INT8 quantizes the matmuls, which carry nearly all the compute, and the embedding
# Gather, which carries half of a small encoder's bytes (without it a static INT8 MiniLM was
# 2.6x larger than a dynamic one). Elementwise ops in int8 save little and cost accuracy: the
# additive attention mask spans -3.4e38..0 (it breaks histogram calibration outright), and an
# LM's KV-cache Concat/Softmax would be requantized every step.
STATIC_OPS = ("MatMul", "Gemm", "Gather")
# Integer kernels, by the float op they replace: how the card counts what was quantized.
INTEGER_OPS = {"MatMulInteger": "MatMul", "DynamicQuantizeMatMul": "MatMul",
               "QLinearMatMul": "MatMul", "MatMulNBits": "MatMul", "QGemm": "Gemm",
               "QAttention": "Attention", "QEmbedLayerNormalization": "EmbedLayerNormalization",
               "GatherBlockQuantized": "Gather"}


class QuantizeConfig(StageConfig):
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
    algorithm: Literal["rtn", "hqq", "gptq"] = Field(
        "rtn", description="INT4: how weights are rounded. rtn: nearest (fast, the default); "
        "hqq: half-quadratic, float zero points (best perplexity, but ONNX Runtime's CPU kernel "
        "for float zero points ran 5x slower than fp32 on SmolLM2); gptq: calibrated on "
        "calibration_samples training blocks (slow to quantize; no better than rtn here).")
    accuracy_level: int = Field(
        4, ge=0, le=4, description="INT4: MatMulNBits' compute precision (0 unset, 1 fp32, 2 "
        "fp16, 3 bf16, 4 int8 activations): 4 decoded SmolLM2 18-26% faster than fp32 "
        "compute for +0.1 perplexity.")
    symmetric: bool = Field(False, description="INT4: symmetric blocks (no zero point); "
                            "asymmetric keeps more of small models' quality.")

    input_format: ClassVar[str] = "onnx"
    output_format: ClassVar[str] = "onnx"
    diagnosis: ClassVar[str | None] = "quantize (method dynamic)"

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"{v} is not a power of 2 (16, 32, 64, 128 work)")
        return v

    def uses_data(self) -> bool:
        """Static INT8 calibrates on the training data."""
        return self.method == "static"

    def check(self, recipe: Any, index: int) -> None:
        if self.method == "int4" and recipe.model.task != "causal-lm":
            raise ValueError(f"{self.where(index)}.method: int4 (MatMulNBits) is for causal "
                             "LMs; use dynamic or static INT8 for classifiers")

    def apply(self, ref: ModelRef, ctx: StageContext, out: Path) -> dict[str, Any]:
        return _apply(ref, self, ctx, out)

    def search_hints(self, goal: str) -> dict[str, Any]:
        """Per-channel scales cost little size and often win the metric back; layers kept in
        float (exclude) cost size and speed."""
        if goal == "metric" and self.method != "int4":
            return {"per_channel": [self.per_channel, not self.per_channel]}
        if goal != "metric" and self.exclude:
            return {"exclude": [self.exclude, []]}
        return {}

    def can_diagnose(self) -> bool:
        return self.method == "dynamic"

    def diagnose(self, input_ref: ModelRef, data: TaskData, *, index: int, max_samples: int,
                 top: int, batch_size: int, threads: int, trust_remote_code: bool) -> Diagnosis:
        from compress.models import load_tokenizer
        from compress.sensitivity import diagnose_dynamic_int8

        return diagnose_dynamic_int8(
            input_ref.onnx_path, _dynamic_kwargs(self), self.exclude, data,
            load_tokenizer(input_ref.path, trust_remote_code=trust_remote_code),
            stage=self.label, kind=self.kind, index=index, max_samples=max_samples, top=top,
            batch_size=batch_size, threads=threads)


def _dynamic_kwargs(cfg: QuantizeConfig) -> dict[str, Any]:
    """quantize_dynamic arguments matching the stage's optimum preset (target, per_channel)."""
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    qc = getattr(AutoQuantizationConfig, cfg.target)(is_static=False, per_channel=cfg.per_channel)
    ops = [getattr(o, "value", o) for o in qc.operators_to_quantize]
    return {"per_channel": qc.per_channel, "reduce_range": qc.reduce_range,
            "weight_type": qc.weights_dtype, "op_types_to_quantize": ops,
            "extra_options": {"WeightSymmetric": qc.weights_symmetric,
                              "ActivationSymmetric": qc.activations_symmetric}}


def resolve_exclude(model: Any, patterns: list[str]) -> tuple[list[str], dict[str, int]]:
    """fnmatch each pattern against node names; one that matches nothing is a typo: refuse."""
    names = [n.name for n in graph_nodes(model) if n.name]
    found: list[str] = []
    counts: dict[str, int] = {}
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            like = f" (node names look like {names[len(names) // 2]!r})" if names else ""
            raise StageError(f"quantize.exclude: pattern {pat!r} matches no node of the ONNX "
                             f"graph{like}")
        counts[pat] = len(hits)
        found.extend(h for h in hits if h not in found)
    return found, counts


def _uses_external_data(model: Any) -> bool:
    from onnx.external_data_helper import uses_external_data

    return any(uses_external_data(t) for t in model.graph.initializer)


def _cpu_check(cfg: QuantizeConfig) -> tuple[list[str], list[str]]:
    from compress.measure import cpu_info

    flags = cpu_info()["flags"]
    warns = []
    need = TARGET_FLAG[cfg.target]
    if cfg.method != "int4" and need not in flags:
        warns.append(f"the {cfg.target} preset on a CPU without {need}: ONNX Runtime runs "
                     "slower fallback kernels here, so latency measured on this machine is not "
                     "the target's")
    return flags, warns


def _apply(ref: ModelRef, cfg: QuantizeConfig, ctx: StageContext, out: Path) -> dict[str, Any]:
    import onnx

    if ref.format != "onnx":
        raise StageError("quantize: needs an ONNX model; add an export stage before it")
    lm = ref.task == "causal-lm"
    if cfg.method == "int4" and not lm:
        raise StageError("quantize: int4 (MatMulNBits) is for causal LMs; use dynamic or static "
                         "INT8 for classifiers")
    model = onnx.load(str(ref.onnx_path), load_external_data=False)
    user, counts = resolve_exclude(model, cfg.exclude)
    default = lm_head_and_embeddings(model, embeddings=cfg.method != "int4") if lm else []
    excluded = default + [n for n in user if n not in default]
    external = _uses_external_data(model)
    del model
    flags, warns = _cpu_check(cfg)

    try:
        with quiet(root=True, stdout=True):
            if cfg.method == "int4":
                written, detail = _int4(ref, cfg, ctx, excluded, external, out)
            else:
                written, detail = _int8(ref, cfg, ctx, excluded, external, lm, out)
    except StageError:
        raise
    except Exception as e:
        raise StageError(f"quantize: ONNX Runtime could not quantize {ref.onnx_path}: "
                         f"{first_line(e)}") from None
    _check_output(out / written, cfg.method)
    detail["quantized_ops"] = quantized_ops(out / written)
    copy_side_files(ref, out)
    (out / SESSION_FILE).write_text(json.dumps(
        {"graph_optimization_level": cfg.optimization_level}, indent=2) + "\n")
    info: dict[str, Any] = {
        "onnx_file": written,
        "quantization": {
            "method": cfg.method, "target": cfg.target, "per_channel": cfg.per_channel,
            **detail,
            "excluded_nodes": excluded, "excluded_count": len(excluded),
            "excluded_by_default": default, "exclude_patterns": counts,
            "optimization_level": cfg.optimization_level, "cpu_flags_present": flags,
            "external_data": external}}
    if warns:
        info["warnings"] = warns
    return info


def _int8(ref: ModelRef, cfg: QuantizeConfig, ctx: StageContext, excluded: list[str],
          external: bool, lm: bool, out: Path) -> tuple[str, dict[str, Any]]:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    static = cfg.method == "static"
    written = f"{Path(ref.onnx_file or 'model.onnx').stem}_int8.onnx"
    if not static and _fused(ref):  # optimum's quantizer cannot type the fused ops
        from compress.graph_opt import quantize_dynamic_fused

        quantize_dynamic_fused(ref.onnx_path, out / written, nodes_to_exclude=excluded,
                               use_external_data_format=external, **_dynamic_kwargs(cfg))
        return written, {"weights": "int8", "activations": "int8 (dynamic, per batch)",
                         "calibration": None, "graph": "fused (QAttention etc.)"}
    preset = getattr(AutoQuantizationConfig, cfg.target)
    kwargs: dict[str, Any] = {"is_static": static, "per_channel": cfg.per_channel,
                              "nodes_to_exclude": excluded}
    if static:
        kwargs["operators_to_quantize"] = list(STATIC_OPS)
    qconfig = preset(**kwargs)
    quantizer = ORTQuantizer.from_pretrained(ref.dir, file_name=ref.onnx_file)
    ranges, detail = None, {"weights": "int8", "activations": "int8 (dynamic, per batch)",
                            "calibration": None}
    if static:
        ranges, calib = _calibrate(ref, cfg, ctx, qconfig, external, lm)
        detail = {"weights": "int8", "activations": "int8 (static, calibrated)", **calib,
                  "format": "QDQ", "operators": [str(getattr(o, "value", o)) for o in
                                                 qconfig.operators_to_quantize]}
    quantizer.quantize(qconfig, save_dir=out, file_suffix="int8",
                       calibration_tensors_range=ranges, use_external_data_format=external)
    if not (out / written).is_file():
        raise StageError("quantize: the quantizer wrote no ONNX file")
    return written, detail


def _fused(ref: ModelRef) -> bool:
    """Whether the input went through the transformer fusions (contrib ops in the graph)."""
    import onnx

    model = onnx.load(str(ref.onnx_path), load_external_data=False)
    return any(n.domain == "com.microsoft" for n in model.graph.node)


def calibration_feeds(ref: ModelRef, ctx: StageContext, n: int, lm: bool,
                      input_meta: list[Any]) -> list[dict[str, np.ndarray]]:
    """Model-ready numpy batches from the training split. Classifiers: padded to max_length
    (the fixed shape served); LMs: full token blocks, position ids, and an empty KV cache."""
    from compress.data import calibration_batches
    from compress.models import load_tokenizer

    tok = load_tokenizer(ref.path, trust_remote_code=ctx.recipe.model.trust_remote_code)
    names = {i.name: i for i in input_meta}
    feeds = []
    if lm:
        for batch in calibration_batches(ctx.data, tok, n, CALIB_BATCH):
            ids = batch["input_ids"].numpy().astype(np.int64)
            b, s = ids.shape
            feed = {"input_ids": ids,
                    "attention_mask": batch["attention_mask"].numpy().astype(np.int64)}
            if "position_ids" in names:
                feed["position_ids"] = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()
            for name, meta in names.items():
                if name.startswith("past_key_values"):
                    feed[name] = np.zeros(_empty_past_shape(meta, b), dtype=np.float32)
            feeds.append({k: v for k, v in feed.items() if k in names})
        return feeds
    rows = ctx.data.train.select(range(min(n, len(ctx.data.train))))
    for i in range(0, len(rows), CALIB_BATCH):
        part = rows[i:i + CALIB_BATCH]
        enc = tok(part["text"], part.get("text_pair"), padding="max_length", truncation=True,
                  max_length=ctx.data.spec.max_length, return_tensors="np")
        feeds.append({k: v.astype(np.int64) for k, v in enc.items() if k in names})
    return feeds


def _empty_past_shape(meta: Any, batch: int) -> tuple[int, ...]:
    shape = []
    for d in meta.shape:
        if isinstance(d, int):
            shape.append(d)
        elif "batch" in str(d):
            shape.append(batch)
        elif "sequence" in str(d):
            shape.append(0)
        else:
            raise StageError(f"quantize: cannot build an empty cache for input {meta.name} "
                             f"(dimension {d!r})")
    return tuple(shape)


class _OneBatch:
    """A CalibrationDataReader over one batch: calibrating batch by batch keeps only running
    ranges/histograms in memory, not every intermediate tensor of every batch."""

    def __init__(self, feed: dict[str, np.ndarray]) -> None:
        self.feed: dict[str, np.ndarray] | None = feed

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed, self.feed = self.feed, None
        return feed

    def rewind(self) -> None:
        pass


def _calibrate(ref: ModelRef, cfg: QuantizeConfig, ctx: StageContext, qconfig: Any,
               external: bool, lm: bool) -> tuple[Any, dict[str, Any]]:
    import onnxruntime as ort
    from optimum.onnxruntime.configuration import AutoCalibrationConfig

    sample = ctx.data.train.select(range(min(cfg.calibration_samples, len(ctx.data.train))))
    if cfg.calibration == "minmax":
        calib = AutoCalibrationConfig.minmax(sample)
    elif cfg.calibration == "entropy":
        calib = AutoCalibrationConfig.entropy(sample)
    else:
        calib = AutoCalibrationConfig.percentiles(sample, percentile=cfg.percentile)
    meta = ort.InferenceSession(str(ref.onnx_path), session_options(1),
                                providers=["CPUExecutionProvider"]).get_inputs()
    feeds = calibration_feeds(ref, ctx, cfg.calibration_samples, lm, meta)
    if not feeds:
        raise StageError("quantize: no training examples to calibrate on")
    ops = [str(getattr(o, "value", o)) for o in qconfig.operators_to_quantize]
    base = ctx.work_dir  # the augmented model is as big as the model: keep it off /tmp
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="calib-", dir=base) as tmp:
        calibrator = calib.create_calibrator(
            onnx_model_path=ref.onnx_path.as_posix(), operators_to_quantize=ops,
            use_external_data_format=external,
            augmented_model_name=str(Path(tmp) / "augmented_model.onnx"))
        for feed in feeds:
            calibrator.collect_data(_OneBatch(feed))
        ranges = calibrator.compute_data()
        del calibrator
    examples = sum(len(f["input_ids"]) for f in feeds)
    info: dict[str, Any] = {"calibration": cfg.calibration,
                            "calibration_examples": examples,
                            "calibration_shape": "full blocks, empty KV cache (prefill)" if lm
                            else f"padded to {ctx.data.spec.max_length} tokens"}
    if cfg.calibration == "percentile":
        info["percentile"] = cfg.percentile
    return ranges, info


def _int4(ref: ModelRef, cfg: QuantizeConfig, ctx: StageContext, excluded: list[str],
          external: bool, out: Path) -> tuple[str, dict[str, Any]]:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    model = onnx.load(str(ref.onnx_path))  # with external data: the weights are what we quantize
    level = cfg.accuracy_level or None
    calib = None
    if cfg.algorithm == "hqq":
        q = mnb.MatMulNBitsQuantizer(model, bits=4, block_size=cfg.block_size,
                                     is_symmetric=cfg.symmetric, nodes_to_exclude=excluded,
                                     algo_config=mnb.HQQWeightOnlyQuantConfig(
                                         block_size=cfg.block_size, bits=4))
    elif cfg.algorithm == "gptq":
        import onnxruntime as ort

        meta = ort.InferenceSession(str(ref.onnx_path), session_options(1),
                                    providers=["CPUExecutionProvider"]).get_inputs()
        feeds = [{k: v[i:i + 1] for k, v in f.items()} for f in
                 calibration_feeds(ref, ctx, cfg.calibration_samples, True, meta)
                 for i in range(len(f["input_ids"]))]
        calib = len(feeds)
        q = _ExcludingQuantizer(model, bits=4, block_size=cfg.block_size,
                                is_symmetric=cfg.symmetric, nodes_to_exclude=excluded,
                                accuracy_level=level,
                                algo_config=mnb.GPTQWeightOnlyQuantConfig(
                                    calibration_data_reader=_Feeds(feeds),
                                    block_size=cfg.block_size))
    else:
        q = mnb.MatMulNBitsQuantizer(model, bits=4, block_size=cfg.block_size,
                                     is_symmetric=cfg.symmetric, nodes_to_exclude=excluded,
                                     accuracy_level=level)
    q.process()
    if level and cfg.algorithm == "hqq":  # HQQ's config never writes it: set it on the nodes
        for n in q.model.model.graph.node:
            if n.op_type == "MatMulNBits" and not any(a.name == "accuracy_level"
                                                      for a in n.attribute):
                n.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
    written = f"{Path(ref.onnx_file or 'model.onnx').stem}_int4.onnx"
    q.model.save_model_to_file(str(out / written), use_external_data_format=external)
    kind = "symmetric" if cfg.symmetric else "asymmetric"
    return written, {"weights": f"int4 ({kind}, block {cfg.block_size}, {cfg.algorithm})",
                     "calibration": f"{calib} blocks (gptq)" if calib else None,
                     "activations": "float (weight-only)", "block_size": cfg.block_size,
                     "algorithm": cfg.algorithm, "accuracy_level": cfg.accuracy_level}


class _Feeds:
    """A CalibrationDataReader that the GPTQ path can deep-copy and iterate."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds, self._i = feeds, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self.feeds):
            return None
        self._i += 1
        return self.feeds[self._i - 1]

    def __iter__(self):  # noqa: ANN204 - the INC dataloader iterates the reader
        return iter(self.feeds)

    def rewind(self) -> None:
        self._i = 0


def _excluding_quantizer() -> type:
    """MatMulNBitsQuantizer whose GPTQ path honours nodes_to_exclude (ORT 1.32's ignores it:
    lm_head would be quantized)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    class Excluding(MatMulNBitsQuantizer):
        def _generate_q4_node_config(self) -> dict[str, Any]:
            config = super()._generate_q4_node_config()
            for name in self.nodes_to_exclude:
                if name in config:
                    config[name] = "fp32"
            return config

    return Excluding


def _ExcludingQuantizer(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - a class, built late
    return _excluding_quantizer()(*args, **kwargs)


def quantized_ops(path: Path) -> dict[str, int]:
    """How many nodes of each op type run on integer weights: integer kernels, counted as the
    float op they replace, and float ops fed by a DequantizeLinear (QDQ, weight-only Gather)."""
    import onnx

    nodes = graph_nodes(onnx.load(str(path), load_external_data=False))
    producer = {o: n.op_type for n in nodes for o in n.output}
    counts: dict[str, int] = {}
    for n in nodes:
        kind = INTEGER_OPS.get(n.op_type)
        if kind is None and n.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(
                producer.get(i) == "DequantizeLinear" for i in n.input):
            kind = n.op_type
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def _check_output(path: Path, method: str) -> None:
    """The op types that prove the method took effect, and a session that loads."""
    import onnx
    import onnxruntime as ort

    ops = {n.op_type for n in graph_nodes(onnx.load(str(path), load_external_data=False))}
    need = {"static": {"QuantizeLinear", "DequantizeLinear"}, "int4": {"MatMulNBits"},
            "dynamic": set()}[method]
    if need - ops:
        raise StageError(f"quantize: the {method} model has no {' / '.join(sorted(need - ops))} "
                         "nodes: nothing was quantized (everything excluded?)")
    try:
        ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise StageError(f"quantize: ONNX Runtime cannot load the quantized model: "
                         f"{first_line(e)}") from None



