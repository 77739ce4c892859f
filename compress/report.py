"""Report data: one card per stage, gathered in a run report; gates; reading reports back.

This is the bottom of the reporting layers: plain data and the rules over it. Renderers
(compress.render for Markdown, compress.html_report for HTML, compress.compare for night-to-
night comparison) sit above it, and compress.report_io writes all of them.

Every number is compared with the reference (the original model, or the fine-tuned teacher when
the recipe starts with finetune). Latency ratios are like for like: ONNX stages against the
reference timed in ONNX Runtime fp32, PyTorch stages against the reference in PyTorch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from compress.artifact import ModelRef
from compress.measure import Latency
from compress.metrics import METRICS, Metrics
from compress.spec import Gates

MB = 1e6
LATEST = "latest"  # reports/<recipe>/latest: the last good model, not a run


class StageCard(BaseModel):
    name: str
    kind: str  # "reference", or a stage kind
    index: int | None  # position in recipe.stages
    model: ModelRef
    metrics: Metrics
    info: dict[str, Any] = {}
    notes: list[str] = []  # the stage's own lines for the card (StageConfig.notes)
    reused: bool = False  # True when this run found the output already made
    seconds: float = 0.0  # how long the stage took when it ran
    warnings: list[str] = []
    # side outputs (a co-distilled peer): whole models of their own inside this stage's output
    # folder, carded beside it; never the next stage's input, never the final model
    side: list[StageCard] = []


class GateResult(BaseModel):
    gate: str
    passed: bool
    value: float
    threshold: float
    message: str


class LayerRow(BaseModel):
    """One layer group compressed alone: its metric, change vs the uncompressed model, error."""

    group: str
    nodes: int
    metric: float | None  # task metric with only this group quantized (None: no labels)
    delta: float | None  # metric - baseline (accuracy: negative is worse)
    output_error: float  # mean KL(fp32 || probe) of the output distributions


class Diagnosis(BaseModel):
    """Which layers of one stage cost the most (compress.sensitivity makes it)."""

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
    gate: str | None = None  # the failed gate this explains (a failed run's diagnosis)
    compressed_bytes: int | None = None  # on disk: every group quantized (what the stage does)
    recovered_bytes: int | None = None  # on disk: with `exclude` applied
    conflicts: list[str] = []  # gates the suggested `exclude` would break (so not suggested)
    search: str = ""  # a ready-to-paste `search:` block that explores the fix (YAML)


class RunReport(BaseModel):
    recipe: str
    run_id: str
    status: Literal["running", "passed", "failed", "interrupted"] = "running"
    started_at: str
    finished_at: str | None = None
    environment: dict[str, Any] = {}
    reference: StageCard | None = None
    reference_onnx: StageCard | None = None
    stages: list[StageCard] = []
    gates: list[GateResult] = []
    error: str | None = None
    diagnosis: Diagnosis | None = None  # on a failed gate
    warnings: list[str] = []  # run-level: dropped data rows, interrupted earlier runs, ...
    owner: dict[str, Any] | None = None  # the process running it (compress.atomic.owner_record)
    head_to_head: HeadToHead | None = None  # the final speed-up, timed in turns
    data: dict[str, dict[str, Any]] = {}  # rows read / kept / dropped and why, per split

    @property
    def final(self) -> StageCard | None:
        return self.stages[-1] if self.stages else self.reference

    def cards(self) -> list[StageCard]:
        """Reference, reference in ONNX Runtime, then every stage: the table's rows."""
        return [c for c in (self.reference, self.reference_onnx) if c] + \
            [x for c in self.stages for x in (c, *c.side)]

    def like_for_like(self, card: StageCard) -> StageCard | None:
        """The reference card measured in the same runtime as `card`."""
        if card.metrics.runtime == "onnxruntime" and self.reference_onnx is not None:
            return self.reference_onnx
        return self.reference


def latency(card: StageCard, batch: int = 1, length: str = "max") -> Latency | None:
    """The card's latency entry at this batch size and length ("max", "median", "p95")."""
    return next((x for x in card.metrics.latency
                 if x.batch_size == batch and x.length == length), None)


def p50(card: StageCard, batch: int = 1, length: str = "max") -> float:
    x = latency(card, batch, length)
    return x.p50_ms if x is not None else card.metrics.latency[0].p50_ms


class HeadToHead(BaseModel):
    """The final speed-up, timed fairly: reference and final model in turns in one window."""

    reference: str
    candidate: str
    runtime: str
    batch_size: int
    sequence_length: int
    rounds: int
    reference_ms: list[float]  # each round's median
    candidate_ms: list[float]
    ratios: list[float]  # per round: reference / candidate
    speedup: float  # the median ratio
    low: float
    high: float
    noisy: bool  # the rounds' ratios disagree by more than 20%
    measure: Literal["forward", "decode"] = "forward"  # decode: ms per generated token
    new_tokens: int | None = None  # decode: tokens generated per round (after a prompt of
    #                                 sequence_length tokens)

    @property
    def what(self) -> str:
        """What was timed, in words, for the card and the gate message."""
        if self.measure == "decode":
            return (f"decode tokens/s, batch 1, {self.sequence_length}-token prompt, "
                    f"{self.new_tokens} new tokens")
        return f"p50 of a forward pass, batch {self.batch_size}, {self.sequence_length} tokens"


def deltas(report: RunReport, card: StageCard) -> dict[str, float | None]:
    """Changes against the reference. The speed-up is like for like or nothing: a card timed in
    another runtime than any reference card gets no speed-up (None), and the final card's is
    the head-to-head measurement when there is one."""
    ref = report.reference
    if ref is None:
        return {}
    lfl = report.like_for_like(card) or ref
    m, r = card.metrics, ref.metrics
    speed: float | None = None
    if lfl.metrics.runtime == m.runtime:
        speed = round(p50(lfl, 1) / max(p50(card, 1), 1e-9), 3)
    h2h = report.head_to_head
    if h2h is not None and card is report.final and card is not report.reference:
        speed = h2h.speedup
    return {
        "metric_change": round(m.value - r.value, 4),
        "size_ratio": round(r.size_bytes / max(m.size_bytes, 1), 3),
        "params_ratio": round(r.parameters / max(m.parameters, 1), 3),
        "speedup_b1": speed,
    }


def _points_gate(gate: str, name: str, ref: Metrics, final: Metrics, allowed: float
                 ) -> GateResult | None:
    """A drop in points of metric `name` (accuracy, F1): None when the card lacks it."""
    before, after = ref.all_scores().get(name), final.all_scores().get(name)
    if before is None or after is None:
        return None
    drop = round(METRICS[name].loss(before, after), 4) + 0.0  # no "-0.00"
    return GateResult(gate=gate, passed=drop <= allowed, value=drop, threshold=allowed,
                      message=f"{name} {before:.2f} -> {after:.2f}: drop {drop:.2f} points "
                              f"(allowed {allowed:g})")


def check_gates(report: RunReport, gates: Gates) -> list[GateResult]:
    """Every gate the recipe sets, on the final card against the reference. A gate about a
    metric the card does not have (accuracy for a causal LM) is not applicable, not passed."""
    final, ref = report.final, report.reference
    if final is None or ref is None or final is ref:
        return []
    d = deltas(report, final)
    out: list[GateResult | None] = []
    if gates.max_accuracy_drop is not None:
        out.append(_points_gate("max_accuracy_drop", "accuracy", ref.metrics, final.metrics,
                                gates.max_accuracy_drop))
    if gates.max_metric_drop is not None and METRICS[final.metrics.metric].change == "points":
        out.append(_points_gate("max_metric_drop", final.metrics.metric, ref.metrics,
                                final.metrics, gates.max_metric_drop))
    if gates.max_p50_ms is not None:
        ms = round(p50(final, 1), 3)
        out.append(GateResult(gate="max_p50_ms", passed=ms <= gates.max_p50_ms, value=ms,
                              threshold=gates.max_p50_ms,
                              message=f"p50 {ms:.2f} ms at batch 1 on this machine "
                                      f"(allowed {gates.max_p50_ms:g} ms)"))
    if gates.max_perplexity_increase is not None and final.metrics.metric == "perplexity":
        rise = METRICS["perplexity"].loss(ref.metrics.value, final.metrics.value)
        out.append(GateResult(gate="max_perplexity_increase",
                              passed=rise <= gates.max_perplexity_increase, value=round(rise, 4),
                              threshold=gates.max_perplexity_increase,
                              message=f"perplexity {ref.metrics.value:.2f} -> "
                                      f"{final.metrics.value:.2f}: {rise:+.1%} "
                                      f"(allowed +{gates.max_perplexity_increase:.1%})"))
    if gates.max_probe_increase is not None:
        out.append(_probe_gate(ref.metrics, final.metrics, gates.max_probe_increase))
    if gates.min_size_reduction is not None:
        out.append(GateResult(gate="min_size_reduction",
                              passed=d["size_ratio"] >= gates.min_size_reduction,
                              value=d["size_ratio"], threshold=gates.min_size_reduction,
                              message=f"{d['size_ratio']:.2f}x smaller on disk "
                                      f"(required {gates.min_size_reduction:g}x)"))
    if gates.min_speedup is not None:
        speed = d["speedup_b1"]
        h2h = report.head_to_head
        how = (f"head to head, {h2h.rounds} rounds {h2h.low:.2f}-{h2h.high:.2f}x"
               + (", noisy" if h2h.noisy else "")) if h2h is not None else "separate timings"
        if speed is None:
            out.append(GateResult(gate="min_speedup", passed=False, value=0.0,
                                  threshold=gates.min_speedup,
                                  message="no like-for-like reference to time against (the "
                                          "final model runs in another runtime)"))
        else:
            out.append(GateResult(gate="min_speedup", passed=speed >= gates.min_speedup,
                                  value=speed, threshold=gates.min_speedup,
                                  message=f"{speed:.2f}x faster, "
                                          + (h2h.what if h2h is not None else "p50 at batch 1")
                                          + f" ({how}; required {gates.min_speedup:g}x)"))
    return [g for g in out if g is not None]


def _probe_gate(ref: Metrics, final: Metrics, allowed: float) -> GateResult | None:
    before, after = ref.scores.get(PROBE), final.scores.get(PROBE)
    if before is None or after is None:
        return None
    rise = METRICS[PROBE].loss(before, after)
    return GateResult(gate="max_probe_increase", passed=rise <= allowed, value=round(rise, 4),
                      threshold=allowed, message=f"probe perplexity {before:.2f} -> {after:.2f}:"
                      f" {rise:+.1%} (allowed +{allowed:.1%})")


PROBE = "probe_perplexity"
# "The task metric holds": it lost at most this much (points, or a share for relative metrics)
HOLDS = {"points": 2.0, "relative": 0.05}


def over_distillation(ref: StageCard, card: StageCard, warn_share: float) -> str | None:
    """A warning when the probe's perplexity rose by more than `warn_share` over the reference
    while the card's task metric held: the student kept the task and lost general language,
    which a task benchmark alone would never show."""
    before, after = ref.metrics.scores.get(PROBE), card.metrics.scores.get(PROBE)
    task = METRICS[card.metrics.metric]
    if before is None or after is None or card.metrics.metric == PROBE or \
            card.metrics.metric not in ref.metrics.all_scores():
        return None
    rise = METRICS[PROBE].loss(before, after)
    lost = task.loss(ref.metrics.all_scores()[task.name], card.metrics.value)
    if rise <= warn_share or lost > HOLDS[task.change]:
        return None
    return (f"over-distillation: probe perplexity {before:.2f} -> {after:.2f} ({rise:+.0%}, "
            f"warned above +{warn_share:.0%}) while {task.name} held "
            f"({task.describe_change(ref.metrics.all_scores()[task.name], card.metrics.value)}):"
            " the task was kept at the cost of general language")


def run_folders(recipe_dir: Path) -> list[Path]:
    """A recipe's run folders (those with a report), oldest first; `latest` is not a run."""
    return sorted(f.parent for f in Path(recipe_dir).glob("*/report.json")
                  if f.parent.name != LATEST)


def read_report(path: Path) -> RunReport:
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    return RunReport.model_validate_json(p.read_text())
