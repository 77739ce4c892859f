"""Sensitivity diagnosis: which layers cost the most when a stage compresses the model.

For an ONNX quantize stage (dynamic INT8), the stage's fp32 input is quantized one layer group at a
time (the MatMul/Gather nodes of `/bert/encoder/layer.3/...`, the embeddings, the head), each
probe scored on the same eval examples: the task metric and the output error (KL divergence of the
probe's logits from the fp32 logits, which still ranks layers when accuracy does not move). The
worst groups become `exclude` patterns for the quantize stage, and the model quantized without
them is measured too, so the suggestion says what it would recover.

Other stage kinds are refused with a clear message: pruning one layer at a time would need the
pruning internals, and a ranking that guesses would send users after the wrong layer.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel

from compress.errors import CompressError

if TYPE_CHECKING:
    from compress.pipeline import Plan
    from compress.report import RunReport

SUPPORTED = "quantize (method dynamic)"
_LAYER = re.compile(r"^(.*?/(?:layers?|h|blocks?)[._]\d+)(?:/|$)")
_WEIGHT_OPS = {"MatMul", "Gemm", "Conv", "Attention", "LSTM", "Gather", "EmbedLayerNormalization"}


class LayerRow(BaseModel):
    """One layer group compressed alone: its metric, change vs the uncompressed model, error."""

    group: str
    nodes: int
    metric: float | None  # task metric with only this group quantized (None: no labels)
    delta: float | None  # metric - baseline (accuracy: negative is worse)
    output_error: float  # mean KL(fp32 || probe) of the output distributions


class Diagnosis(BaseModel):
    stage: str
    stage_index: int
    kind: str
    method: str  # what ranks the rows: "accuracy" or "output error (KL vs fp32 logits)"
    metric: str  # the task metric the rows report
    samples: int = 0
    baseline: float | None = None  # the stage's input, on the same samples
    compressed: float | None = None  # every group quantized (what the stage does)
    rows: list[LayerRow] = []  # ranked, worst first
    top: int = 5
    exclude: list[str] = []  # suggested patterns for the stage's `exclude`
    recovered: float | None = None  # metric with `exclude` applied
    suggestion: str = ""
    error: str | None = None
    seconds: float = 0.0


# ----------------------------------------------------------------------------- grouping


def group_of(node_name: str) -> str:
    """`/bert/encoder/layer.3/attention/self/query/MatMul` -> `/bert/encoder/layer.3`;
    outside the layers, the first two name parts (`/bert/embeddings`, `/classifier`)."""
    m = _LAYER.match(node_name)
    if m:
        return m.group(1)
    parts = node_name.split("/")
    if len(parts) <= 2:  # unnamed or flat names: one group for all of them
        return "(other)"
    return "/".join(parts[:3]) if len(parts) > 3 else "/".join(parts[:2])


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
        groups.setdefault(group_of(n.name), []).append(n.name)
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
        from compress.data import encode, loader

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
        from compress.evaluate import OrtPredictor

        pred = OrtPredictor(str(onnx_path), self.threads)
        return np.concatenate([pred.logits(b) for b in self.batches])

    def metric(self, logits: np.ndarray) -> float | None:
        if not self.classify:
            return None
        return round(100.0 * float((logits.argmax(-1) == self.labels).mean()), 4)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's quantizer logs 'consider pre-processing' on the root logger for every probe."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _quantizer(cfg: Any) -> tuple[dict[str, Any], list[str]]:
    """quantize_dynamic arguments matching the stage's optimum preset (target, per_channel)."""
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    qc = getattr(AutoQuantizationConfig, cfg.target)(is_static=False, per_channel=cfg.per_channel)
    ops = [getattr(o, "value", o) for o in qc.operators_to_quantize]
    kwargs = {"per_channel": qc.per_channel, "reduce_range": qc.reduce_range,
              "weight_type": qc.weights_dtype, "op_types_to_quantize": ops,
              "extra_options": {"WeightSymmetric": qc.weights_symmetric,
                                "ActivationSymmetric": qc.activations_symmetric}}
    return kwargs, ops


def _cost(metric: float | None, baseline: float | None) -> float:
    """How much worse than the baseline (accuracy points lost); 0 without labels."""
    if metric is None or baseline is None:
        return 0.0
    return baseline - metric


def diagnose_quantize(onnx_path: Path, cfg: Any, data: Any, tokenizer: Any, *, stage: str,
                      index: int, max_samples: int = 128, top: int = 5, batch_size: int = 32,
                      threads: int = 1) -> Diagnosis:
    """Quantize one layer group at a time and rank the groups by what each one costs."""
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    t0 = time.perf_counter()
    if data.causal_lm:
        raise CompressError("diagnose: layer-by-layer probing covers classifiers; a causal LM's "
                            "per-layer perplexity probes are not built yet")
    if getattr(cfg, "method", "dynamic") != "dynamic":
        raise CompressError(f"diagnose: quantize method {cfg.method!r} is not supported (only "
                            "dynamic INT8 can be probed layer by layer without calibration)")
    kwargs, ops = _quantizer(cfg)
    exclude = list(getattr(cfg, "exclude", []) or [])
    model = onnx.load(str(onnx_path), load_external_data=False)
    groups = quantizable_groups(model, ops, exclude)
    del model
    if not groups:
        raise CompressError(f"diagnose: {onnx_path.name} has no nodes dynamic INT8 would quantize")
    ev = _Evaluator(data, tokenizer, max_samples, batch_size, threads)
    big = onnx_path.stat().st_size > 1_800_000_000

    def probe(nodes: list[str], tmp: Path) -> np.ndarray:
        out = tmp / "probe.onnx"
        with _quiet():
            quantize_dynamic(str(onnx_path), str(out), nodes_to_quantize=nodes,
                             use_external_data_format=big, **kwargs)
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
    dg = Diagnosis(
        stage=stage, stage_index=index, kind="quantize",
        method="accuracy" if by_metric else "output error (KL vs fp32 logits)",
        metric="accuracy" if ev.classify else "output error", samples=ev.samples,
        baseline=baseline, compressed=ev.metric(all_logits), rows=rows, top=top,
        exclude=[f"{g}/*" for g in worst], recovered=ev.metric(recovered_logits))
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


# ----------------------------------------------------------------------------- entry points


def _drop(before: Any, after: Any) -> float:
    """How much worse `after` is than `before` (accuracy points; relative for perplexity)."""
    if before.metric == "perplexity":
        return after.value / max(before.value, 1e-9) - 1
    return before.value - after.value


def _fmt_drop(metrics: Any, d: float) -> str:
    return f"perplexity {d:+.1%}" if metrics.metric == "perplexity" else f"-{d:.2f} points"


def _drops(plan: Plan, metrics_at: Any) -> list[tuple[float, Any]]:
    """How much each stage lost against its input, worst first. `metrics_at(index)` gives the
    metrics of that stage's output (None: the source model), or None when they are unknown."""
    out = []
    for ps in plan.stages:
        if ps.index == plan.reference_index:
            continue
        before, after = metrics_at(ps.index - 1 if ps.index else None), metrics_at(ps.index)
        if before is not None and after is not None:
            out.append((_drop(before, after), ps))
    return sorted(out, key=lambda x: -x[0])


def pick_stage(plan: Plan) -> int:
    """The stage whose output lost the most against its own input (metrics from the cache)."""
    from compress.pipeline import _evaluate

    def metrics_at(index: int | None) -> Any:
        ref = plan.source if index is None else _ref(plan.stages[index])
        return None if ref is None else _evaluate(plan, ref)

    drops = _drops(plan, metrics_at)
    if not drops:
        raise CompressError(f"diagnose: no stage of {plan.recipe.name!r} has an output yet: "
                            "run the recipe first")
    return drops[0][1].index


def _ref(ps: Any) -> Any:
    from compress.artifact import read_ref

    return read_ref(Path(ps.output_dir))


def diagnose(plan: Plan, stage_index: int | None = None, *, top: int | None = None,
             max_samples: int | None = None) -> Diagnosis:
    """Rank the layer groups of one stage (default: the one that lost the most) by sensitivity.
    The stage's input and output must be on disk: this reads them, it runs no stage."""
    from compress.measure import default_threads
    from compress.models import load_tokenizer
    from compress.pipeline import _data
    from compress.recipe import STAGE_CONFIGS

    spec = plan.recipe.diagnose
    if stage_index is None:
        stage_index = pick_stage(plan)
    if not 0 <= stage_index < len(plan.stages):
        raise CompressError(f"diagnose: --stage {stage_index}: the recipe has stages 0 to "
                            f"{len(plan.stages) - 1}")
    ps = plan.stages[stage_index]
    where = f"stages[{stage_index}] ({ps.name})"
    if ps.kind != "quantize":
        raise CompressError(f"diagnose: {where}: stage kind {ps.kind!r} is not supported yet "
                            f"(supported: {SUPPORTED})")
    inp = plan.source if stage_index == 0 else _ref(plan.stages[stage_index - 1])
    for what, ref, at in (("input", inp, plan.stages[stage_index - 1].output_dir
                           if stage_index else plan.source.path),
                          ("output", _ref(ps), ps.output_dir)):
        if ref is None:
            raise CompressError(f"diagnose: {where}: its {what} is not on disk ({at}): run the "
                                "recipe first")
    cfg = STAGE_CONFIGS[ps.kind].model_validate(ps.config)
    trc = plan.recipe.model.trust_remote_code
    threads = plan.recipe.evaluation.latency.threads or default_threads()
    return diagnose_quantize(inp.onnx_path, cfg, _data(plan), load_tokenizer(inp.path,
                             trust_remote_code=trc), stage=ps.name, index=stage_index,
                             max_samples=max_samples or spec.max_samples, top=top or spec.top,
                             batch_size=plan.recipe.evaluation.batch_size, threads=threads)


def on_gate_failure(plan: Plan, report: RunReport) -> dict[str, Any] | None:
    """The diagnosis for a failed run, as report data; never raises, so a diagnosis problem
    cannot hide the gate failure. None when no stage lost any of the metric."""
    try:
        return _on_gate_failure(plan, report)
    except Exception as e:  # noqa: BLE001 - picking the stage failed: say so, keep the gate
        return Diagnosis(stage="?", stage_index=-1, kind="?", method="", metric="",
                         error=f"{type(e).__name__}: {e}"[:400]).model_dump(mode="json")


def _on_gate_failure(plan: Plan, report: RunReport) -> dict[str, Any] | None:
    cards = {c.index: c for c in report.stages}
    if report.reference is not None:
        cards.setdefault(plan.reference_index, report.reference)
    drops = [(d, ps) for d, ps in _drops(plan, lambda i: cards[i].metrics if i in cards
                                         else None) if d > 0]
    if not drops:
        return None
    probed = [(d, ps) for d, ps in drops if ps.kind == "quantize"
              and ps.config.get("method", "dynamic") == "dynamic"]
    if not probed:  # say where the loss is, and that it cannot be probed layer by layer
        d, ps = drops[0]
        return Diagnosis(stage=ps.name, stage_index=ps.index, kind=ps.kind, method="",
                         metric="", error=f"the stage that lost the most is stages[{ps.index}] "
                         f"({ps.name}, {_fmt_drop(cards[ps.index].metrics, d)}); layer-by-layer "
                         "diagnosis covers dynamic INT8 quantize stages only"
                         ).model_dump(mode="json")
    best = probed[0][1]
    try:
        return diagnose(plan, best.index).model_dump(mode="json")
    except Exception as e:  # noqa: BLE001 - the gate failure is the story; this is a footnote
        msg = str(e) if isinstance(e, CompressError) else f"{type(e).__name__}: {e}"
        return Diagnosis(stage=best.name, stage_index=best.index, kind=best.kind, method="",
                         metric="", error=msg.strip().splitlines()[0][:400] if msg.strip()
                         else type(e).__name__).model_dump(mode="json")


# ----------------------------------------------------------------------------- rendering


def markdown_lines(d: dict[str, Any] | Diagnosis) -> list[str]:
    """The report section: a ranked table (top N) and the suggestion."""
    dg = d if isinstance(d, Diagnosis) else Diagnosis.model_validate(d)
    lines = [f"## Diagnosis: stages[{dg.stage_index}] ({dg.stage})", ""]
    if dg.error:
        return [*lines, f"No layer-by-layer diagnosis: {dg.error}", ""]
    cls = dg.baseline is not None
    lines.append(f"Each layer group quantized alone (dynamic INT8), {dg.samples} eval examples, "
                 f"ranked by {dg.method}" + (" then output error" if dg.method == "accuracy"
                                             else "") + "."
                 + (f" fp32 {dg.baseline:.2f} → all quantized {dg.compressed:.2f}."
                    if cls and dg.compressed is not None else ""))
    lines.append("")
    head = ["#", "layer group", "nodes"] + (["accuracy (Δ)"] if cls else []) + \
        ["output KL vs fp32"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(dg.rows[:dg.top], 1):
        cells = [str(i), f"`{r.group}`", str(r.nodes)]
        if cls:
            cells.append(f"{r.metric:.2f} ({r.delta:+.2f})")
        cells.append(f"{r.output_error:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, "", f"Suggestion: {dg.suggestion}", ""]


def html_section(d: dict[str, Any]) -> str:
    """The same section for report.html (escaped; no scripts)."""
    from html import escape

    dg = Diagnosis.model_validate(d)
    head = f"<h2>Diagnosis: stages[{dg.stage_index}] ({escape(dg.stage)})</h2>"
    if dg.error:
        return f'{head}<p class="err">No layer-by-layer diagnosis: {escape(dg.error)}</p>'
    cls = dg.baseline is not None
    cols = ["#", "layer group", "nodes"] + (["accuracy (Δ)"] if cls else []) + ["output KL"]
    rows = []
    for i, r in enumerate(dg.rows[:dg.top], 1):
        cells = [str(i), r.group, str(r.nodes)]
        if cls:
            cells.append(f"{r.metric:.2f} ({r.delta:+.2f})")
        cells.append(f"{r.output_error:.3g}")
        rows.append("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>")
    return (f"{head}<p>Each layer group quantized alone, {dg.samples} eval examples, ranked by "
            f"{escape(dg.method)}.</p><table><tr>"
            + "".join(f"<th>{escape(c)}</th>" for c in cols) + "</tr>" + "".join(rows)
            + f"</table><p>Suggestion: {escape(dg.suggestion)}</p>")
