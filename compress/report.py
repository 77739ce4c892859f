"""Report cards: one per stage, gathered in a run report, written atomically as JSON and Markdown.

Every number is compared with the reference (the original model, or the fine-tuned teacher when
the recipe starts with finetune). Latency ratios are like for like: ONNX stages against the
reference timed in ONNX Runtime fp32, PyTorch stages against the reference in PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from compress.artifact import ModelRef, atomic_write_text
from compress.evaluate import Metrics
from compress.recipe import Gates

MB = 1e6


class StageCard(BaseModel):
    name: str
    kind: str  # "reference", "reference-onnx", or a stage kind
    index: int | None  # position in recipe.stages
    model: ModelRef
    metrics: Metrics
    info: dict[str, Any] = {}
    reused: bool = False  # True when this run found the output already made
    seconds: float = 0.0  # how long the stage took when it ran
    warnings: list[str] = []


class GateResult(BaseModel):
    gate: str
    passed: bool
    value: float
    threshold: float
    message: str


class RunReport(BaseModel):
    recipe: str
    run_id: str
    status: Literal["running", "passed", "failed"] = "running"
    started_at: str
    finished_at: str | None = None
    environment: dict[str, Any] = {}
    reference: StageCard | None = None
    reference_onnx: StageCard | None = None
    stages: list[StageCard] = []
    gates: list[GateResult] = []
    error: str | None = None
    diagnosis: dict[str, Any] | None = None  # compress.diagnose.Diagnosis, on a failed gate

    @property
    def final(self) -> StageCard | None:
        return self.stages[-1] if self.stages else self.reference

    def like_for_like(self, card: StageCard) -> StageCard | None:
        """The reference card measured in the same runtime as `card`."""
        if card.metrics.runtime == "onnxruntime" and self.reference_onnx is not None:
            return self.reference_onnx
        return self.reference


def p50(card: StageCard, batch: int = 1) -> float:
    return next((x.p50_ms for x in card.metrics.latency if x.batch_size == batch),
                card.metrics.latency[0].p50_ms)


def deltas(report: RunReport, card: StageCard) -> dict[str, float]:
    ref = report.reference
    if ref is None:
        return {}
    lfl = report.like_for_like(card) or ref
    m, r = card.metrics, ref.metrics
    return {
        "metric_change": round(m.value - r.value, 4),
        "size_ratio": round(r.size_bytes / max(m.size_bytes, 1), 3),
        "params_ratio": round(r.parameters / max(m.parameters, 1), 3),
        "speedup_b1": round(p50(lfl, 1) / max(p50(card, 1), 1e-9), 3),
    }


def check_gates(report: RunReport, gates: Gates) -> list[GateResult]:
    final, ref = report.final, report.reference
    if final is None or ref is None or final is ref:
        return []
    d = deltas(report, final)
    out = []
    if gates.max_accuracy_drop is not None and final.metrics.metric == "accuracy":
        drop = round(-d["metric_change"], 4) + 0.0  # no "-0.00"
        out.append(GateResult(gate="max_accuracy_drop", passed=drop <= gates.max_accuracy_drop,
                              value=drop, threshold=gates.max_accuracy_drop,
                              message=f"accuracy {ref.metrics.value:.2f} -> "
                                      f"{final.metrics.value:.2f}: drop {drop:.2f} points "
                                      f"(allowed {gates.max_accuracy_drop:g})"))
    if gates.max_perplexity_increase is not None and final.metrics.metric == "perplexity":
        rise = final.metrics.value / ref.metrics.value - 1
        out.append(GateResult(gate="max_perplexity_increase",
                              passed=rise <= gates.max_perplexity_increase, value=round(rise, 4),
                              threshold=gates.max_perplexity_increase,
                              message=f"perplexity {ref.metrics.value:.2f} -> "
                                      f"{final.metrics.value:.2f}: {rise:+.1%} "
                                      f"(allowed +{gates.max_perplexity_increase:.1%})"))
    if gates.min_size_reduction is not None:
        out.append(GateResult(gate="min_size_reduction",
                              passed=d["size_ratio"] >= gates.min_size_reduction,
                              value=d["size_ratio"], threshold=gates.min_size_reduction,
                              message=f"{d['size_ratio']:.2f}x smaller on disk "
                                      f"(required {gates.min_size_reduction:g}x)"))
    if gates.min_speedup is not None:
        out.append(GateResult(gate="min_speedup", passed=d["speedup_b1"] >= gates.min_speedup,
                              value=d["speedup_b1"], threshold=gates.min_speedup,
                              message=f"{d['speedup_b1']:.2f}x faster at batch 1, p50 "
                                      f"(required {gates.min_speedup:g}x)"))
    return out


def _row(report: RunReport, card: StageCard, batch: int) -> list[str]:
    m = card.metrics
    d = deltas(report, card)
    metric = f"{m.value:.2f}" if m.metric == "accuracy" else f"{m.value:.2f} ppl"
    if d and card is not report.reference:
        metric += f" ({d['metric_change']:+.2f})"
    b1 = next((x for x in m.latency if x.batch_size == 1), m.latency[0])
    bn = next((x for x in m.latency if x.batch_size == batch), b1)
    speed = f" ({d['speedup_b1']:.2f}x)" if d and card is not report.reference else ""
    size = f"{m.size_bytes / MB:.1f}" + (f" ({d['size_ratio']:.2f}x)" if d and
                                          card is not report.reference else "")
    return [
        card.name + (" ♻" if card.reused else ""), m.runtime, metric,
        f"{b1.p50_ms:.2f}{speed}", f"{b1.p90_ms:.2f} / {b1.p99_ms:.2f}", f"{bn.p50_ms:.1f}",
        f"{m.parameters / 1e6:.2f}M", "–" if m.macs is None else f"{m.macs / 1e9:.3g}", size,
        f"{m.peak_rss_mb:.0f}",
    ]


def table(report: RunReport) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the stage-by-stage table (also used for Prefect table artifacts)."""
    cards = [c for c in (report.reference, report.reference_onnx) if c] + report.stages
    batch = max((x.batch_size for c in cards for x in c.metrics.latency), default=1)
    metric = cards[0].metrics.metric if cards else "accuracy"
    head = ["stage", "runtime", f"{metric} (Δ)", "p50 b1 ms (speed-up)", "p90 / p99 b1 ms",
            f"p50 b{batch} ms", "params", "GMACs", "size MB (smaller)", "peak RSS MB"]
    return head, [_row(report, c, batch) for c in cards]


def render_markdown(report: RunReport) -> str:
    head, rows = table(report)
    lines = [f"# {report.recipe} — run {report.run_id}", "",
             f"Status: **{report.status}**  ·  started {report.started_at}"
             + (f"  ·  finished {report.finished_at}" if report.finished_at else ""), ""]
    if report.error:
        lines += [f"> Error: {report.error}", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Deltas and ratios are against the reference (first row); ONNX rows compare "
              "with the reference timed in ONNX Runtime fp32. ♻ = reused from an earlier run. "
              "GMACs: weight matmuls for one sequence of the timed length.", ""]
    if report.gates:
        lines += ["## Gates", ""]
        lines += [f"- {'PASS' if g.passed else 'FAIL'} `{g.gate}`: {g.message}"
                  for g in report.gates]
        lines.append("")
    if report.diagnosis:
        from compress.diagnose import markdown_lines

        lines += markdown_lines(report.diagnosis)
    notes = []
    for c in report.stages:
        parity = c.info.get("parity")
        if parity:
            notes.append(f"- {c.name}: ONNX vs PyTorch max |Δlogit| = "
                         f"{parity['max_abs_diff']:.2e} (atol {parity['atol']:g}) on "
                         f"{parity['samples']} examples")
        tr = c.info.get("training")
        if tr:
            tokens = f", {tr['tokens_per_s']} tokens/s" if tr.get("tokens_per_s") else ""
            notes.append(f"- {c.name}: {tr['steps']} steps, final loss {tr['final_loss']}, "
                         f"{tr['samples_per_s']} samples/s{tokens} on {tr['device']} "
                         f"({tr['precision']}, "
                         f"{tr.get('processes', 1)} process(es))")
        if c.kind == "prune":
            b, a = c.info["before"], c.info["after"]
            notes.append(f"- {c.name}: layers {b['layers']}→{a['layers']}, heads/layer "
                         f"{max(b['heads_per_layer'])}→{max(a['heads_per_layer'])}, FFN "
                         f"{b['ffn']}→{a['ffn']} ({c.info['importance']} importance)"
                         + (f", layers dropped {c.info['layers_dropped']}"
                            if c.info.get("layers_dropped") else ""))
        notes += [f"- ⚠ {c.name}: {w}" for w in c.warnings]
    if report.reference:
        notes += [f"- ⚠ {report.reference.name}: {w}" for w in report.reference.warnings]
    if notes:
        lines += ["## Stage notes", "", *notes, ""]
    env = report.environment
    if env:
        cpu = env.get("cpu", {})
        pk = env.get("packages", {})
        lines += ["## Environment", "",
                  f"- CPU: {cpu.get('model')} ({cpu.get('arch')}, {cpu.get('logical_cores')} "
                  f"logical cores), flags: {', '.join(cpu.get('flags', [])) or 'none'}",
                  f"- threads: {env.get('threads')}  ·  python {env.get('python')}  ·  "
                  f"git {env.get('git_commit')}" + (f"  ·  GPU {env['gpu']}" if 'gpu' in env
                                                    else ""),
                  "- " + ", ".join(f"{k} {v}" for k, v in pk.items() if v), ""]
    return "\n".join(lines)


LATEST = "latest"  # reports/<recipe>/latest: the last good model, not a run


def run_folders(recipe_dir: Path) -> list[Path]:
    """A recipe's run folders (those with a report), oldest first; `latest` is not a run."""
    return sorted(f.parent for f in Path(recipe_dir).glob("*/report.json")
                  if f.parent.name != LATEST)


def earlier_runs(folder: Path, limit: int = 30) -> list[RunReport]:
    """The recipe's earlier passed runs (siblings of this run's folder), oldest first."""
    out = []
    for d in [d for d in run_folders(Path(folder).parent) if d != Path(folder)][-limit:]:
        try:
            r = read_report(d)
        except (OSError, ValueError):
            continue  # a run being written right now, or not ours
        if r.status == "passed":
            out.append(r)
    return out


def write_report(report: RunReport, folder: Path,
                 history: Sequence[RunReport] = ()) -> Path:
    """JSON (the record), Markdown and a self-contained HTML page; each replaced atomically."""
    from compress.html_report import write_html

    folder = Path(folder)
    atomic_write_text(folder / "report.json", report.model_dump_json(indent=2))
    atomic_write_text(folder / "report.md", render_markdown(report))
    if report.reference is not None:
        write_html(report, folder, history)
    return folder


def read_report(path: Path) -> RunReport:
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    return RunReport.model_validate_json(p.read_text())
