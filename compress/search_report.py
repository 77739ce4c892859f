"""A search's results as data, and as Markdown and one self-contained HTML page.

compress.search fills a `SearchResult` from its Optuna study (every trial, whatever became of
it) and writes it to reports/<recipe>/search-<id>/ as trials.json, report.md and report.html.
The renderers are pure functions of that data, like compress.render and compress.html_report
are of a run report; the page draws with the same axes, grid and Pareto staircase as a run's
page, inline SVG with no network.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

# The run page's plot frame and Pareto staircase, not a second copy.
from compress.html_report import CSS, _e, front_path, pareto_front, plot_frame
from compress.metrics import METRICS
from compress.report import HeadToHead

TrialState = Literal["complete", "pruned", "failed", "lost", "running", "waiting"]
UNITS = {"latency": "p50 b1 ms", "size": "size MB", "macs": "GMACs"}


class TrialRow(BaseModel):
    """One trial: what it tried, what it measured and whether it met the gates."""

    number: int
    name: str = ""  # its recipe's name (<recipe>-t007): its report folder and flow run
    state: TrialState
    params: dict[str, Any] = {}
    values: dict[str, float] = {}  # objective -> latency ms, size bytes, MACs or the metric
    deltas: dict[str, float | None] = {}  # vs the reference: metric_change, size_ratio, ...
    gates: list[dict[str, Any]] = []  # {gate, passed, message}
    violation: float = 0.0  # sum of the gates' relative shortfalls; 0 = every gate met
    note: str = ""  # why it was pruned, the error it failed with, or that it was lost
    report: str = ""  # its run report folder
    model: str = ""  # its final model folder
    built: int = 0  # stage outputs this trial built
    reused: int = 0  # stage outputs it found already built (by an earlier trial or run)
    seconds: float | None = None
    intermediate: dict[str, float] = {}  # "stages[i] (name)" -> the metric after that stage
    baseline: bool = False  # the recipe as written

    @property
    def feasible(self) -> bool:
        return self.state == "complete" and self.violation <= 0


class SearchResult(BaseModel):
    recipe: str
    study: str
    storage: str  # the URL, password hidden
    folder: str
    status: Literal["found", "infeasible", "no-trials"]
    metric: str
    objectives: list[str]
    directions: list[Literal["maximize", "minimize"]]
    gates: dict[str, float]  # the recipe's gates: the constraints
    sampler: str
    pruner: str
    seed: int
    budget: dict[str, Any]
    trials: list[TrialRow]
    front: list[int] = []  # trial numbers on the feasible Pareto front
    best: int | None = None
    closest: list[int] = []  # when nothing is feasible: the trials nearest to every gate
    best_recipe: str | None = None
    published: str | None = None
    publish_error: str | None = None
    versus_written: HeadToHead | None = None  # best vs the recipe as written, timed in turns
    elapsed_s: float = 0.0  # this invocation
    started_at: str = ""
    finished_at: str = ""

    def trial(self, number: int) -> TrialRow:
        return next(t for t in self.trials if t.number == number)

    def count(self, state: str) -> int:
        return sum(t.state == state for t in self.trials)


# ----------------------------------------------------------------------------- cells


def objective_label(name: str, metric: str) -> str:
    return metric if name == "metric" else UNITS.get(name, name)


def value_text(name: str, value: float | None) -> str:
    if value is None:
        return "–"
    if name == "size":
        return f"{value / 1e6:.1f}"
    if name == "macs":
        return f"{value / 1e9:.3g}"
    return f"{value:.2f}"


def _param_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _gates_text(t: TrialRow) -> str:
    if t.state != "complete":
        return "–"
    failed = [g for g in t.gates if not g["passed"]]
    return "all met" if not failed else "; ".join(f"{g['gate']}: {g['message']}"
                                                  for g in failed)


def _keys(res: SearchResult) -> list[str]:
    keys: list[str] = []
    for t in res.trials:
        keys += [k for k in t.params if k not in keys]
    return keys


def trial_table(res: SearchResult, numbers: list[int] | None = None
                ) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one trial a row (also the Prefect table artifact of the front)."""
    keys = _keys(res)
    head = ["trial", "state", *[objective_label(o, res.metric) for o in res.objectives],
            *keys, "gates", "built / reused", "s"]
    rows = []
    for t in (res.trial(n) for n in numbers) if numbers is not None else res.trials:
        name = f"t{t.number:03d}" + (" ★" if t.number == res.best else "") + \
            (" (as written)" if t.baseline else "")
        state = t.state + (f": {t.note}" if t.note else "")
        rows.append([name, state, *[value_text(o, t.values.get(o)) for o in res.objectives],
                     *[_param_text(t.params[k]) if k in t.params else "–" for k in keys],
                     _gates_text(t), f"{t.built} / {t.reused}",
                     "–" if t.seconds is None else f"{t.seconds:.0f}"])
    return head, rows


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    def cell(x: str) -> str:
        return x.replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(cell(h) for h in head) + " |", "|" + "---|" * len(head),
            *["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]]


def _headline(res: SearchResult, t: TrialRow) -> str:
    parts = []
    for o in res.objectives:
        v = t.values.get(o)
        if v is None:
            continue
        text = f"{objective_label(o, res.metric)} {value_text(o, v)}"
        change = {"latency": ("speedup_b1", " ({:.2f}x faster)"),
                  "size": ("size_ratio", " ({:.2f}x smaller)"),
                  "metric": ("metric_change", " ({:+.2f})"),
                  res.metric: ("metric_change", " ({:+.2f})")}.get(o)
        if change is not None and t.deltas.get(change[0]) is not None:  # None: not like for like
            text += change[1].format(t.deltas[change[0]])
        parts.append(text)
    return ", ".join(parts)


def trial_line(row: TrialRow, objectives: list[str], metric: str) -> str:
    """A finished trial in one line, for the terminal and the flow's log."""
    params = ", ".join(f"{k.split('.')[-1]}={_param_text(v)}" for k, v in row.params.items())
    out = f"t{row.number:03d} {params} → {row.state}"
    if row.values:
        out += ": " + ", ".join(f"{objective_label(o, metric)} {value_text(o, row.values.get(o))}"
                                for o in objectives)
        out += " · gates met" if row.feasible else " · misses a gate"
    if row.note:
        out += f": {row.note}"
    if row.built or row.reused:
        out += f" · stages built {row.built}, reused {row.reused}"
    return out + (f" · {row.seconds:.0f} s" if row.seconds is not None else "")


def summary_lines(res: SearchResult) -> list[str]:
    """What happened, in the few lines a terminal shows at the end of a search."""
    done = [t for t in res.trials if t.state in ("complete", "pruned", "failed")]
    built, reused = sum(t.built for t in res.trials), sum(t.reused for t in res.trials)
    out = [f"{len(done)} trials: {res.count('complete')} complete, {res.count('pruned')} "
           f"pruned, {res.count('failed')} failed"
           + (f", {res.count('lost')} lost (killed; retried)" if res.count("lost") else "")
           + f"; stage outputs built {built}, reused {reused}"]
    if res.best is not None:
        best = res.trial(res.best)
        out.append(f"best feasible trial: t{best.number:03d} ({_headline(res, best)})")
        written = next((t for t in res.trials if t.baseline and t.values), None)
        if written is not None and written.number != best.number:
            out.append(f"the recipe as written: t{written.number:03d} "
                       f"({_headline(res, written)}"
                       + ("" if written.feasible else "; misses a gate") + ")")
        h = res.versus_written
        if h is not None:
            out.append(f"best vs the recipe as written, timed in turns ({h.rounds} rounds, "
                       f"batch 1, length {h.sequence_length}, {h.runtime}): {h.speedup:.2f}x "
                       f"lower p50 (rounds {h.low:.2f}-{h.high:.2f}x"
                       + ("; noisy" if h.noisy else "") + ")")
        if res.best_recipe:
            out.append(f"its recipe: {res.best_recipe}")
        if res.published:
            out.append(f"its model: {res.published}")
        if res.publish_error:
            out.append(f"not published: {res.publish_error}")
    elif res.closest:
        out.append("no trial met every gate; closest: " + "; ".join(
            f"t{n:03d} ({_gates_text(res.trial(n))})" for n in res.closest))
    return out


def search_markdown(res: SearchResult) -> str:
    goal = ", ".join(f"{d} {objective_label(o, res.metric)}"
                     for o, d in zip(res.objectives, res.directions, strict=True))
    gates = ", ".join(f"{k} {v:g}" for k, v in res.gates.items()) or "none (every trial counts)"
    lines = [f"# Search: {res.recipe}", "",
             f"Status: **{res.status}** · study `{res.study}` in `{res.storage}` · sampler "
             f"{res.sampler} (seed {res.seed}) · pruner {res.pruner} · budget "
             + ", ".join(f"{k} {v:g}" for k, v in res.budget.items() if v is not None)
             + f" · this run {res.elapsed_s / 60:.1f} min", "",
             f"Objectives: {goal}. Constraints (the recipe's gates): {gates}.", "",
             *[f"- {x}" for x in summary_lines(res)], ""]
    if res.front:
        lines += ["## Pareto front (trials that meet every gate)", "",
                  "Each of these is better than every other feasible trial on at least one "
                  "objective; ★ is the best on the first objective.", "",
                  *_md_table(*trial_table(res, res.front)), ""]
    if res.closest:
        lines += ["## Closest trials (no trial met every gate)", "",
                  "Ranked by how far they are from the gates, relative to each threshold. "
                  "Their recipes are in this folder (closest-1.yaml, ...).", "",
                  *_md_table(*trial_table(res, res.closest)), ""]
    lines += ["## All trials", "", *_md_table(*trial_table(res)), "",
              "Trials share every stage whose lineage id matches (the same config on the same "
              "input): built / reused counts stage outputs per trial. Each trial's run report "
              "is in `trials/`.", "",
              "Run the same `compress search` again to resume: the study is the record, "
              "finished trials are kept, a killed trial is retried.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the page


def _plot(res: SearchResult) -> str:
    """The task metric against the first cost objective (latency unless only size or MACs are
    asked for): feasible trials filled, infeasible ones hollow, the feasible front as a
    staircase, the best one starred."""
    cost = next((o for o in res.objectives if o in UNITS), "latency")
    metric_key = next((o for o in res.objectives if o not in UNITS), "metric")
    pts = [(t.values[cost], t.values[metric_key], t) for t in res.trials
           if t.state == "complete" and cost in t.values and metric_key in t.values]
    if not pts:
        return "<p>No complete trial: nothing to plot.</p>"
    scale = {"size": 1e-6, "macs": 1e-9}.get(cost, 1.0)
    xs, ys = [p[0] * scale for p in pts], [p[1] for p in pts]
    name = res.metric if metric_key == "metric" else metric_key
    higher = METRICS[name].higher_is_better
    xlabel = {"latency": "p50 batch-1 latency (ms)", "size": "weights on disk (MB)",
              "macs": "GMACs per sequence"}[cost]
    out, sx, sy, legend = plot_frame(
        xs, ys, f"{name} vs {xlabel}: {'higher' if higher else 'lower'} {name} is better",
        xlabel, name)
    feasible = [i for i, p in enumerate(pts) if p[2].feasible]
    front = [feasible[k] for k in pareto_front([(xs[i], ys[i]) for i in feasible], higher)]
    out.append(front_path([(xs[i], ys[i]) for i in front], sx, sy))
    for i, (_, _, t) in enumerate(pts):
        cx, cy = sx(xs[i]), sy(ys[i])
        tip = (f"<title>t{t.number:03d}: {ys[i]:.2f} {_e(name)}, {xs[i]:.3g} "
               f"{_e(xlabel)}{'' if t.feasible else ' (misses a gate)'}</title>")
        fill = "#4a78b5" if t.feasible else "none"
        out.append(f'<circle class="{"feasible" if t.feasible else "infeasible"}" '
                   f'cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="{fill}" stroke="#4a78b5">'
                   f"{tip}</circle>")
        if t.number == res.best:
            out.append(f'<circle class="best" cx="{cx:.1f}" cy="{cy:.1f}" r="9" fill="none" '
                       f'stroke="#c62828" stroke-width="2"/>')
        out.append(f'<text x="{cx + 8:.1f}" y="{cy - 8:.1f}">t{t.number:03d}</text>')
    out.append(f'<text x="{legend[0]}" y="{legend[1]}" text-anchor="end">● meets every gate  '
               f'○ misses one  ◎ best  - - feasible front</text>')
    return "\n".join(out + ["</svg>"])


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    return ("<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
            + "</table>")


def search_html(res: SearchResult) -> str:
    """The search on one page: summary, the quality-vs-cost plot, the front and every trial."""
    title = f"{res.recipe} — search {res.study}"
    badge = "passed" if res.status == "found" else "failed"
    parts = [f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}'
             f"</title><style>{CSS}</style></head><body>",
             f'<h1>{_e(title)} <span class="badge {badge}">{_e(res.status)}</span></h1>',
             "<ul>" + "".join(f"<li>{_e(x)}</li>" for x in summary_lines(res)) + "</ul>",
             "<h2>Quality vs cost</h2>", _plot(res)]
    if res.front:
        parts += ["<h2>Pareto front (meets every gate)</h2>",
                  _html_table(*trial_table(res, res.front))]
    if res.closest:
        parts += ["<h2>Closest trials (no trial met every gate)</h2>",
                  _html_table(*trial_table(res, res.closest))]
    parts += ["<h2>All trials</h2>", _html_table(*trial_table(res)),
              f"<p>Study <code>{_e(res.study)}</code> in <code>{_e(res.storage)}</code>; "
              f"sampler {_e(res.sampler)} (seed {res.seed}), pruner {_e(res.pruner)}.</p>",
              "</body></html>\n"]
    return "\n".join(parts)
