"""Tonight against the last good night: every number on two runs' cards, stage by stage.

A regression is caught the night it lands, not when someone next reads a report: every metric
on the card (accuracy, F1, perplexity: each judged in its own direction and unit, declared in
compress.metrics), p50 latency at every timed batch size, size on disk and MACs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compress.metrics import METRICS
from compress.report import RunReport, StageCard, p50


@dataclass(frozen=True)
class Tolerances:
    metric_drop_points: float = 0.5  # accuracy / F1 points
    metric_rise_relative: float = 0.02  # perplexity: +2%
    latency_rise: float = 0.10  # p50: +10%
    size_rise: float = 0.01  # bytes on disk and MACs: +1%


@dataclass
class Row:
    label: str
    metric: tuple[float | None, float | None]
    p50_b1: tuple[float | None, float | None]
    size_bytes: tuple[int | None, int | None]


@dataclass
class Comparison:
    rows: list[Row] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _pairs(a: RunReport, b: RunReport) -> list[tuple[str, StageCard | None, StageCard | None]]:
    same_last = bool(a.stages and b.stages and a.stages[-1].name == b.stages[-1].name)
    by_a = {c.name: c for c in a.stages}
    pairs: list[tuple[str, StageCard | None, StageCard | None]] = [
        ("reference", a.reference, b.reference)]
    if a.reference_onnx or b.reference_onnx:
        pairs.append(("reference-onnx", a.reference_onnx, b.reference_onnx))
    for c in b.stages:
        last = same_last and c is b.stages[-1]
        pairs.append((f"final ({c.name})" if last else c.name, by_a.get(c.name), c))
    names_b = {c.name for c in b.stages}
    pairs += [(c.name, c, None) for c in a.stages if c.name not in names_b]
    if not same_last and (a.stages or b.stages) and a.final and b.final:
        pairs.append((f"final ({b.final.name})", a.final, b.final))
    return pairs


def _problems(label: str, ca: StageCard, cb: StageCard, tol: Tolerances) -> list[str]:
    out = []
    ma, mb = ca.metrics, cb.metrics
    sa, sb = ma.all_scores(), mb.all_scores()
    for name in [n for n in sa if n in sb]:
        d = METRICS[name]
        loss = round(d.loss(sa[name], sb[name]), 6)
        allowed = tol.metric_drop_points if d.change == "points" else tol.metric_rise_relative
        if loss > allowed:
            limit = (f"allowed -{allowed:.2f} points" if d.change == "points"
                     else f"allowed {'+' if not d.higher_is_better else '-'}{allowed:.1%}")
            out.append(f"{label}: {name} {sa[name]:.2f} -> {sb[name]:.2f} "
                       f"({d.describe_change(sa[name], sb[name])}, {limit})")
    timed = sorted({(x.batch_size, x.length) for x in ma.latency}
                   & {(x.batch_size, x.length) for x in mb.latency})
    for bs, length in timed:
        la, lb = p50(ca, bs, length), p50(cb, bs, length)
        where = f"batch-{bs}" + ("" if length == "max" else f" {length}-length")
        if la and lb and round(lb / la - 1, 6) > tol.latency_rise:
            out.append(f"{label}: p50 {where} {la:.2f} -> {lb:.2f} ms "
                       f"({lb / la - 1:+.1%}, allowed +{tol.latency_rise:.0%})")
    for what, va, vb, unit in (("size", ma.size_bytes, mb.size_bytes, 1e6),
                               ("MACs", ma.macs, mb.macs, 1e9)):
        if va and vb and round(vb / va - 1, 6) > tol.size_rise:
            name = "MB" if what == "size" else "GMACs"
            out.append(f"{label}: {what} {va / unit:.3g} -> {vb / unit:.3g} {name} "
                       f"({vb / va:.2f}x, allowed +{tol.size_rise:.0%})")
    return out


def compare(a: RunReport, b: RunReport, tol: Tolerances = Tolerances()) -> Comparison:
    """Run b (tonight) against run a (the baseline)."""
    result = Comparison()
    for label, ca, cb in _pairs(a, b):
        if ca is None and cb is None:
            continue
        ma, mb = (ca.metrics if ca else None), (cb.metrics if cb else None)
        result.rows.append(Row(
            label=label, metric=(ma.value if ma else None, mb.value if mb else None),
            p50_b1=(p50(ca, 1) if ca and ma.latency else None,
                    p50(cb, 1) if cb and mb.latency else None),
            size_bytes=(ma.size_bytes if ma else None, mb.size_bytes if mb else None)))
        if ca is not None and cb is not None:
            result.problems += _problems(label, ca, cb, tol)
    return result
