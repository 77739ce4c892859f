"""One self-contained HTML page per run.

The page must open from a CI artifact or an e-mail attachment with no network, so everything is
inline: CSS in a <style> block, charts as SVG drawn here (no plotting library, no scripts).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence

from compress.metrics import METRICS
from compress.render import table
from compress.report import MB, Diagnosis, RunReport, StageCard, p50

W, ROW, LEFT = 640, 22, 170  # chart width, bar height, room for labels
CSS = """body{font:14px system-ui,sans-serif;margin:2em auto;max-width:960px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}
.badge{color:#fff;border-radius:4px;padding:2px 8px;font-size:.8em;vertical-align:middle}
.passed{background:#2e7d32}.failed{background:#c62828}.running{background:#777}
.pass{color:#2e7d32}.fail{color:#c62828}svg{display:block;margin:1em 0}
svg text{font:11px system-ui,sans-serif}.err{background:#fdecea;padding:.5em}"""


def _e(x: object) -> str:
    return html.escape(str(x))


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the non-dominated (latency, metric) points, by increasing latency: the models
    worth shipping, since every other one is beaten on both speed and quality by one of these."""
    sign = 1.0 if higher_is_better else -1.0
    ok = [i for i, (x, y) in enumerate(points) if math.isfinite(x) and math.isfinite(y)]
    order = sorted(ok, key=lambda i: (points[i][0], -sign * points[i][1]))
    front: list[int] = []
    best = -math.inf
    for i in order:
        if sign * points[i][1] > best:
            front.append(i)
            best = sign * points[i][1]
    return front


def _p50(card: StageCard | None) -> float | None:
    return p50(card, 1) if card is not None and card.metrics.latency else None


def _axis(lo: float, hi: float, n: int = 5) -> tuple[float, float, list[float]]:
    """Round limits and 'nice' ticks (1, 2, 5 x 10^k) so the numbers on an axis read easily."""
    if not hi > lo:
        lo, hi = lo - max(abs(lo) * 0.1, 0.5), hi + max(abs(hi) * 0.1, 0.5)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    lo, hi = math.floor(lo / step) * step, math.ceil(hi / step) * step
    return lo, hi, [round(lo + k * step, 10) for k in range(round((hi - lo) / step) + 1)]


def _x_grid(ticks: list[float], sx: Callable[[float], float], top: float, bottom: float,
            label_y: float) -> list[str]:
    """Vertical grid lines with their tick values underneath."""
    return [f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top}" y2="{bottom}" '
            f'stroke="#e5e5e5"/><text x="{sx(t):.1f}" y="{label_y}" '
            f'text-anchor="middle">{t:g}</text>' for t in ticks]


def _hbar(title: str, unit: str, labels: list[str], values: list[float]) -> str:
    """Horizontal bars, one per stage: names stay readable however long they are."""
    lo, hi, ticks = _axis(0.0, max(values, default=1.0) or 1.0)
    plot = W - LEFT - 60
    top, h = 24, ROW * len(values) + 50
    sx = lambda v: LEFT + plot * (v - lo) / (hi - lo)  # noqa: E731
    out = [f'<svg width="{W}" height="{h}" role="img" aria-label="{_e(title)}">',
           f'<text x="{LEFT}" y="14" font-weight="bold">{_e(title)}</text>']
    out += _x_grid(ticks, sx, top, h - 26, h - 12)
    for k, (name, v) in enumerate(zip(labels, values, strict=True)):
        y = top + k * ROW
        out.append(f'<text x="{LEFT - 6}" y="{y + 15}" text-anchor="end">{_e(name)}</text>'
                   f'<rect x="{LEFT}" y="{y + 3}" width="{sx(v) - LEFT:.1f}" height="{ROW - 6}" '
                   f'fill="#4a78b5"><title>{_e(name)}: {v:.2f} {_e(unit)}</title></rect>'
                   f'<text x="{sx(v) + 4:.1f}" y="{y + 15}">{v:.2f}</text>')
    out.append(f'<text x="{LEFT + plot / 2:.0f}" y="{h}" text-anchor="middle">{_e(unit)}</text>')
    return "\n".join(out + ["</svg>"])


Scale = Callable[[float], float]


def plot_frame(xs: list[float], ys: list[float], title: str, xlabel: str, ylabel: str
               ) -> tuple[list[str], Scale, Scale, tuple[float, float]]:
    """The start of a quality-vs-cost scatter plot (a run's page, a search's page): the SVG
    element, title, grid with nice ticks (x from 0) and axis labels. Returns its lines, the x
    and y scales, and where a legend goes (top right)."""
    x0, x1, xt = _axis(0.0, max(xs) * 1.05)
    pad = (max(ys) - min(ys)) * 0.08
    y0, y1, yt = _axis(min(ys) - pad, max(ys) + pad)
    L, T, H = 70, 30, 380
    pw, ph = W - L - 30, H - T - 50

    def sx(v: float) -> float:
        return L + pw * (v - x0) / (x1 - x0)

    def sy(v: float) -> float:
        return T + ph * (1 - (v - y0) / (y1 - y0))

    out = [f'<svg width="{W}" height="{H}" role="img" aria-label="{_e(title)}">',
           f'<text x="{L}" y="16" font-weight="bold">{_e(title)}</text>']
    out += _x_grid(xt, sx, T, T + ph, T + ph + 16)
    for t in yt:
        out.append(f'<line x1="{L}" x2="{L + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" '
                   f'stroke="#e5e5e5"/><text x="{L - 6}" y="{sy(t) + 4:.1f}" '
                   f'text-anchor="end">{t:g}</text>')
    out.append(f'<text x="{L + pw / 2:.0f}" y="{H - 6}" text-anchor="middle">{_e(xlabel)}'
               f'</text><text transform="translate(14 {T + ph / 2:.0f}) rotate(-90)" '
               f'text-anchor="middle">{_e(ylabel)}</text>')
    return out, sx, sy, (L + pw - 4, T + 12)


def front_path(front: list[tuple[float, float]], sx: Scale, sy: Scale) -> str:
    """The Pareto front (points by increasing x) as a dashed staircase; "" when empty."""
    if not front:
        return ""
    fx, fy = [sx(x) for x, _ in front], [sy(y) for _, y in front]
    d = f"M{fx[0]:.1f},{fy[0]:.1f}" + "".join(
        f" H{fx[k]:.1f} V{fy[k]:.1f}" for k in range(1, len(front)))
    return f'<path class="pareto" d="{d}" fill="none" stroke="#c62828" stroke-dasharray="4 3"/>'


def _scatter(report: RunReport, history: Sequence[RunReport]) -> str:
    """Metric vs batch-1 latency for this run's cards and earlier nights' finals, Pareto front
    drawn as a staircase: shows at a glance whether tonight moved the trade-off or fell off it."""
    cards = report.cards()
    metric = cards[0].metrics.metric if cards else "accuracy"
    pts: list[tuple[float, float, str, bool]] = []  # x, y, label, from this run
    pts += [(x, c.metrics.value, c.name, True) for c in cards if (x := _p50(c)) is not None]
    for r in history:
        f = r.final
        if f is not None and f.metrics.metric == metric and (x := _p50(f)) is not None:
            pts.append((x, f.metrics.value, r.run_id, False))
    if not pts:
        return "<p>No latency measured: nothing to plot.</p>"
    better = "higher" if METRICS[metric].higher_is_better else "lower"
    out, sx, sy, legend = plot_frame([p[0] for p in pts], [p[1] for p in pts],
                                     f"{metric} vs p50 batch-1 latency ({better} {metric} is "
                                     "better)", "p50 batch-1 latency (ms)", metric)
    front = pareto_front([(p[0], p[1]) for p in pts], METRICS[metric].higher_is_better)
    out.append(front_path([(pts[i][0], pts[i][1]) for i in front], sx, sy))
    for i, (x, y, label, mine) in enumerate(pts):
        cx, cy = sx(x), sy(y)
        tip = f"<title>{_e(label)}: {y:.2f} {_e(metric)}, {x:.2f} ms</title>"
        out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="#4a78b5">{tip}</circle>'
                   if mine else f'<rect x="{cx - 4:.1f}" y="{cy - 4:.1f}" width="8" height="8" '
                   f'fill="#e08a1e">{tip}</rect>')
        if i in front:
            out.append(f'<circle class="front" cx="{cx:.1f}" cy="{cy:.1f}" r="9" fill="none" '
                       f'stroke="#c62828"/>')
        out.append(f'<text x="{cx + 8:.1f}" y="{cy - 8:.1f}">{_e(label)}</text>')
    out.append(f'<text x="{legend[0]}" y="{legend[1]}" text-anchor="end">● this run  '
               f'■ earlier runs (final)  ○ Pareto front</text>')
    return "\n".join(out + ["</svg>"])


def _environment(env: dict) -> str:
    if not env:
        return "<p>Not recorded.</p>"
    cpu, pk = env.get("cpu", {}), env.get("packages", {})
    items = [f"CPU: {cpu.get('model')} ({cpu.get('arch')}, {cpu.get('logical_cores')} "
             f"logical cores), flags: {', '.join(cpu.get('flags', [])) or 'none'}",
             f"threads: {env.get('threads')} · python {env.get('python')} · "
             f"{env.get('platform')} · git {env.get('git_commit')}",
             ", ".join(f"{k} {v}" for k, v in pk.items() if v) or "packages: n/a"]
    if "gpu" in env:
        items.insert(1, f"GPU: {env['gpu']}")
    return "<ul>" + "".join(f"<li>{_e(x)}</li>" for x in items) + "</ul>"


def render_html(report: RunReport, history: Sequence[RunReport] = ()) -> str:
    """The whole run on one page a reviewer can open anywhere, offline."""
    head, rows = table(report)
    cards = report.cards()
    title = f"{report.recipe} — run {report.run_id}"
    gates = ("<ul>" + "".join(
        f'<li class="{"pass" if g.passed else "fail"}">{"PASS" if g.passed else "FAIL"} '
        f"<code>{_e(g.gate)}</code>: {_e(g.message)}</li>" for g in report.gates) + "</ul>"
        if report.gates else "<p>No gates checked.</p>")
    timed = [c for c in cards if _p50(c) is not None]
    parts = [
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}'
        f"</title><style>{CSS}</style></head><body>",
        f'<h1>{_e(title)} <span class="badge {_e(report.status)}">{_e(report.status)}</span>'
        f"</h1><p>started {_e(report.started_at)}"
        + (f" · finished {_e(report.finished_at)}" if report.finished_at else "") + "</p>",
        f'<p class="err">Error: {_e(report.error)}</p>' if report.error else "",
        "".join(f'<p class="err">⚠ {_e(w)}</p>' for w in report.warnings),
        "<h2>Gates</h2>", gates, _diagnosis(report), "<h2>Stages</h2><table><tr>"
        + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in r) + "</tr>" for r in rows)
        + "</table><p>Deltas and ratios are against the reference (first row); ♻ = reused.</p>",
        "<h2>Size</h2>", _hbar("weights on disk per stage", "MB", [c.name for c in cards],
                               [c.metrics.size_bytes / MB for c in cards]),
        "<h2>Latency</h2>", _hbar("p50 latency at batch 1", "ms", [c.name for c in timed],
                                  [_p50(c) or 0.0 for c in timed]),
        "<h2>Quality vs speed</h2>", _scatter(report, history),
        "<h2>Environment</h2>", _environment(report.environment), "</body></html>\n",
    ]
    return "\n".join(p for p in parts if p)


def _diagnosis(report: RunReport) -> str:
    dg: Diagnosis | None = report.diagnosis
    if dg is None:
        return ""
    search = (f"<p>To explore the fix, add this block to the recipe and run <code>compress "
              f"search RECIPE</code>:</p><pre>{_e(dg.search)}</pre>" if dg.search else "")
    if dg.method in ("size", "speed"):
        return f"<h2>Diagnosis: {_e(dg.gate)}</h2><p>{_e(dg.suggestion)}</p>{search}"
    head = f"<h2>Diagnosis: stages[{dg.stage_index}] ({_e(dg.stage)})</h2>"
    if dg.error:
        return f'{head}<p class="err">No layer-by-layer diagnosis: {_e(dg.error)}</p>{search}'
    cls = dg.baseline is not None
    cols = ["#", "layer group", "nodes"] + (["accuracy (Δ)"] if cls else []) + ["output KL"]
    rows = []
    for i, r in enumerate(dg.rows[:dg.top], 1):
        cells = [str(i), r.group, str(r.nodes)]
        if cls:
            cells.append(f"{r.metric:.2f} ({r.delta:+.2f})")
        cells.append(f"{r.output_error:.3g}")
        rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    return (f"{head}<p>Each layer group quantized alone, {dg.samples} eval examples, ranked by "
            f"{_e(dg.method)}.</p><table><tr>"
            + "".join(f"<th>{_e(c)}</th>" for c in cols) + "</tr>" + "".join(rows)
            + f"</table><p>Suggestion: {_e(dg.suggestion)}</p>{search}")


