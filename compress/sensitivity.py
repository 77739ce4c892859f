"""Layer sensitivity: which layer groups cost the most when a stage compresses a model.

For dynamic INT8, the stage's fp32 input is quantized one layer group at a time (the MatMul/Gather
nodes of `/bert/encoder/layer.3/...`, the embeddings, the head; compress.arch groups them), each
probe scored on the same eval examples: the task metric and the output error (KL divergence of
the probe's logits from the fp32 logits, which still ranks layers when accuracy does not move).
The worst groups become `exclude` patterns for the stage, and the model quantized without them
is measured too, so the suggestion says what it would recover.

This engine takes a model, the stage's quantizer arguments and data; compress.diagnose decides
which stage of a run to probe.
"""

from __future__ import annotations

import fnmatch
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from compress.arch import onnx_layer_group
from compress.data import TaskData, encode, loader
from compress.errors import CompressError
from compress.evaluate import OrtPredictor
from compress.logs import quiet
from compress.report import Diagnosis, LayerRow

_WEIGHT_OPS = {"MatMul", "Gemm", "Conv", "Attention", "LSTM", "Gather", "EmbedLayerNormalization"}


def quantizable_groups(model: Any, op_types: list[str], exclude: list[str] = ()
                       ) -> dict[str, list[str]]:
    """Nodes a dynamic quantizer would turn into integer ops, by layer group, in graph order.
    Nodes the stage already excludes are left out: they stay float whatever the probe."""
    inits = {t.name for t in model.graph.initializer}
    groups: dict[str, list[str]] = {}
    for n in model.graph.node:
        if n.op_type not in op_types or n.op_type not in _WEIGHT_OPS or not n.name:
            continue
        if n.op_type == "Gather" and (not n.input or n.input[0] not in inits):
            continue  # shape arithmetic, not an embedding table
        if any(fnmatch.fnmatchcase(n.name, p) for p in exclude):
            continue
        groups.setdefault(onnx_layer_group(n.name), []).append(n.name)
    return groups


# ----------------------------------------------------------------------------- scoring


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def output_error(ref: np.ndarray, probe: np.ndarray) -> float:
    """Mean KL(ref || probe) over examples (and positions, for a language model)."""
    lp, lq = _log_softmax(ref), _log_softmax(probe)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return max(float(kl.mean()), 0.0)  # float noise can make an identical output -1e-9


class _Evaluator:
    """The same eval batches for every probe: logits, and accuracy when there are labels."""

    def __init__(self, data: Any, tokenizer: Any, max_samples: int, batch_size: int,
                 threads: int) -> None:
        ev = data.eval.select(range(min(max_samples, len(data.eval))))
        enc = encode(ev, tokenizer, data.spec.max_length)
        self.batches, labels = [], []
        for b in loader(enc, tokenizer, batch_size, tensors="np"):
            b = dict(b)
            labels.append(np.asarray(b.pop("labels")))
            self.batches.append(b)
        self.labels = np.concatenate(labels) if labels else np.zeros(0)
        self.classify = self.labels.ndim == 1
        self.samples = len(ev)
        self.threads = threads

    def logits(self, onnx_path: Path) -> np.ndarray:
        pred = OrtPredictor(str(onnx_path), self.threads)
        return np.concatenate([pred.logits(b) for b in self.batches])

    def metric(self, logits: np.ndarray) -> float | None:
        if not self.classify:
            return None
        return round(100.0 * float((logits.argmax(-1) == self.labels).mean()), 4)


def _cost(metric: float | None, baseline: float | None) -> float:
    """How much worse than the baseline (accuracy points lost); 0 without labels."""
    if metric is None or baseline is None:
        return 0.0
    return baseline - metric


def diagnose_dynamic_int8(onnx_path: Path, kwargs: dict[str, Any], exclude: list[str],
                          data: TaskData, tokenizer: Any, *, stage: str, kind: str, index: int,
                          max_samples: int = 128, top: int = 5, batch_size: int = 32,
                          threads: int = 1) -> Diagnosis:
    """Quantize one layer group at a time (`kwargs`: quantize_dynamic's arguments, as the
    stage would call it) and rank the groups by what each one costs."""
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    t0 = time.perf_counter()
    if data.causal_lm:
        raise CompressError("diagnose: layer-by-layer probing covers classifiers; a causal LM's "
                            "per-layer perplexity probes are not built yet")
    ops = list(kwargs["op_types_to_quantize"])
    model = onnx.load(str(onnx_path), load_external_data=False)
    groups = quantizable_groups(model, ops, exclude)
    del model
    if not groups:
        raise CompressError(f"diagnose: {onnx_path.name} has no nodes dynamic INT8 would quantize")
    ev = _Evaluator(data, tokenizer, max_samples, batch_size, threads)
    big = onnx_path.stat().st_size > 1_800_000_000

    sizes: list[int] = []  # bytes on disk of each probe, in order

    def probe(nodes: list[str], tmp: Path) -> np.ndarray:
        out = tmp / "probe.onnx"
        with quiet(root=True):
            quantize_dynamic(str(onnx_path), str(out), nodes_to_quantize=nodes,
                             use_external_data_format=big, **kwargs)
        sizes.append(sum(f.stat().st_size for f in tmp.iterdir()))
        try:
            return ev.logits(out)
        finally:
            for f in tmp.iterdir():
                f.unlink()

    base_logits = ev.logits(onnx_path)
    baseline = ev.metric(base_logits)
    rows: list[LayerRow] = []
    everything = [n for nodes in groups.values() for n in nodes]
    with tempfile.TemporaryDirectory(prefix="diagnose-") as d:
        tmp = Path(d)
        all_logits = probe(everything, tmp)
        all_bytes = sizes[-1]
        for name, nodes in groups.items():
            lg = probe(nodes, tmp)
            m = ev.metric(lg)
            rows.append(LayerRow(group=name, nodes=len(nodes), metric=m,
                                 delta=None if m is None else round(m - baseline, 4),
                                 output_error=round(output_error(base_logits, lg), 6)))
        rows.sort(key=lambda r: (-_cost(r.metric, baseline), -r.output_error))
        by_metric = any(_cost(r.metric, baseline) > 0 for r in rows)
        worst = _worst(rows, baseline, by_metric)
        keep = [n for g in worst for n in groups[g]]
        recovered_logits = probe([n for n in everything if n not in set(keep)], tmp) \
            if len(worst) < len(groups) else base_logits
        recovered_bytes = sizes[-1] if len(worst) < len(groups) else onnx_path.stat().st_size
    dg = Diagnosis(
        stage=stage, stage_index=index, kind=kind,
        method="accuracy" if by_metric else "output error (KL vs fp32 logits)",
        metric="accuracy" if ev.classify else "output error", samples=ev.samples,
        baseline=baseline, compressed=ev.metric(all_logits), rows=rows, top=top,
        exclude=[f"{g}/*" for g in worst], recovered=ev.metric(recovered_logits),
        compressed_bytes=all_bytes, recovered_bytes=recovered_bytes)
    dg.suggestion = _suggest(dg, output_error(base_logits, all_logits),
                             output_error(base_logits, recovered_logits))
    dg.seconds = round(time.perf_counter() - t0, 2)
    return dg


def _worst(rows: list[LayerRow], baseline: float | None, by_metric: bool) -> list[str]:
    """The groups to exclude: the worst one, and any within half of its cost (at most 3)."""
    def cost(r: LayerRow) -> float:
        return _cost(r.metric, baseline) if by_metric else r.output_error

    top = cost(rows[0])
    return [r.group for r in rows[:3] if cost(r) > 0 and cost(r) >= 0.5 * top] or \
        [rows[0].group]


def _suggest(d: Diagnosis, all_error: float, recovered_error: float) -> str:
    patterns = "[" + ", ".join(f"'{p}'" for p in d.exclude) + "]"
    where = f"stages[{d.stage_index}] ({d.stage})"
    if d.baseline is not None and d.compressed is not None and d.recovered is not None:
        effect = (f"{d.metric} {d.recovered:.2f} on these {d.samples} examples (fp32 "
                  f"{d.baseline:.2f}, everything quantized {d.compressed:.2f})")
    else:
        effect = (f"output error (KL vs fp32) {recovered_error:.3g} instead of "
                  f"{all_error:.3g}")
    return f"{where}: add `exclude: {patterns}` (kept in float); with it, {effect}"
