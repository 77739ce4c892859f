"""Which stage of a run lost the most, and which of its layers: the run-level side of the
diagnosis. The layer probing itself is the stage's own (`StageConfig.diagnose`, e.g. dynamic
INT8 through compress.sensitivity); this module picks the stage, reads its input and output from
disk, and turns a failed gate into a card section. `compress diagnose` and the pipeline's
`on_gate_failure` hook both come here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from compress.artifact import ModelRef, read_ref
from compress.errors import CompressError, first_line
from compress.measure import default_threads
from compress.metrics import METRICS, Metrics
from compress.pipeline import Plan, PlannedStage, evaluate_cached, plan_data
from compress.report import Diagnosis, GateResult, RunReport, StageCard, p50
from compress.search_spec import SearchSpec
from compress.spec import Gates
from compress.stages import registry


def _drops(plan: Plan, metrics_at: Callable[[int | None], Metrics | None]
           ) -> list[tuple[float, PlannedStage]]:
    """How much each stage lost against its input (in its metric's own unit), worst first.
    `metrics_at(index)` gives the metrics of that stage's output (None: the source model), or
    None when they are unknown."""
    out = []
    for ps in plan.stages:
        if ps.index == plan.reference_index:
            continue
        before, after = metrics_at(ps.index - 1 if ps.index else None), metrics_at(ps.index)
        if before is not None and after is not None:
            out.append((METRICS[after.metric].loss(before.value, after.value), ps))
    return sorted(out, key=lambda x: -x[0])


def _describe(metrics: Metrics, loss: float) -> str:
    d = METRICS[metrics.metric]
    return (f"{metrics.metric} {'+' if not d.higher_is_better else '-'}{loss:.1%}"
            if d.change == "relative" else f"-{loss:.2f} points")


def _output(ps: PlannedStage) -> ModelRef | None:
    return read_ref(Path(ps.output_dir))


def pick_stage(plan: Plan) -> int:
    """The stage whose output lost the most against its own input (metrics from the cache)."""
    def metrics_at(index: int | None) -> Metrics | None:
        ref = plan.source if index is None else _output(plan.stages[index])
        return None if ref is None else evaluate_cached(plan, ref)

    drops = _drops(plan, metrics_at)
    if not drops:
        raise CompressError(f"diagnose: no stage of {plan.recipe.name!r} has an output yet: "
                            "run the recipe first")
    return drops[0][1].index


def supported() -> str:
    return ", ".join(c.diagnosis for c in registry().values() if c.diagnosis) or "none"


def diagnose(plan: Plan, stage_index: int | None = None, *, top: int | None = None,
             max_samples: int | None = None) -> Diagnosis:
    """Rank the layer groups of one stage (default: the one that lost the most) by sensitivity.
    The stage's input and output must be on disk: this reads them, it runs no stage."""
    spec = plan.recipe.diagnose
    if stage_index is None:
        stage_index = pick_stage(plan)
    if not 0 <= stage_index < len(plan.stages):
        raise CompressError(f"diagnose: --stage {stage_index}: the recipe has stages 0 to "
                            f"{len(plan.stages) - 1}")
    ps = plan.stages[stage_index]
    where = f"stages[{stage_index}] ({ps.name})"
    if not ps.config.can_diagnose():
        raise CompressError(f"diagnose: {where}: this {ps.kind} configuration cannot be probed "
                            f"layer by layer yet (supported: {supported()})")
    inp = plan.source if stage_index == 0 else _output(plan.stages[stage_index - 1])
    for what, ref, at in (("input", inp, plan.stages[stage_index - 1].output_dir
                           if stage_index else plan.source.path),
                          ("output", _output(ps), ps.output_dir)):
        if ref is None:
            raise CompressError(f"diagnose: {where}: its {what} is not on disk ({at}): run the "
                                "recipe first")
    assert inp is not None
    dg = ps.config.diagnose(
        inp, plan_data(plan), index=stage_index, max_samples=max_samples or spec.max_samples,
        top=top or spec.top, batch_size=plan.recipe.evaluation.batch_size,
        threads=plan.recipe.evaluation.latency.threads or default_threads(),
        trust_remote_code=plan.recipe.model.trust_remote_code)
    return dg.model_copy(update={"stage": ps.name})


def on_gate_failure(plan: Plan, report: RunReport) -> Diagnosis | None:
    """The diagnosis for a failed run, as report data; never raises, so a diagnosis problem
    cannot hide the gate failure. None when no stage lost any of the metric.

    It explains the gate that failed in that gate's terms: a size or speed gate by size or
    latency per stage (never in metric terms); a metric gate by the layers that cost the most,
    whose `exclude` is suggested only if it keeps every other gate (layers kept in float make
    the model bigger). Either way it ends with a `search:` block that explores the fix.
    """
    try:
        failed = [g for g in report.gates if not g.passed]
        quality = [g for g in failed if g.gate in Gates.quality_names()]
        if not quality:
            return _cost(plan, report, failed)
        dg = _on_gate_failure(plan, report)
        return None if dg is None else _agree(plan, report, dg, quality[0])
    except Exception as e:  # noqa: BLE001 - picking the stage failed: say so, keep the gate
        return Diagnosis(stage="?", stage_index=-1, kind="?", method="", metric="",
                         error=f"{type(e).__name__}: {e}"[:400])


def _on_gate_failure(plan: Plan, report: RunReport) -> Diagnosis | None:
    cards = {c.index: c for c in report.stages}
    if report.reference is not None:
        cards.setdefault(plan.reference_index, report.reference)
    drops = [(d, ps) for d, ps in _drops(plan, lambda i: cards[i].metrics if i in cards
                                         else None) if d > 0]
    if not drops:
        return None
    probed = [(d, ps) for d, ps in drops if ps.config.can_diagnose()]
    if not probed:  # say where the loss is, and that it cannot be probed layer by layer
        d, ps = drops[0]
        return Diagnosis(stage=ps.name, stage_index=ps.index, kind=ps.kind, method="",
                         metric="", error=f"the stage that lost the most is stages[{ps.index}] "
                         f"({ps.name}, {_describe(cards[ps.index].metrics, d)}); layer-by-layer "
                         f"diagnosis covers {supported()}")
    best = probed[0][1]
    try:
        return diagnose(plan, best.index)
    except Exception as e:  # noqa: BLE001 - the gate failure is the story; this is a footnote
        msg = str(e) if isinstance(e, CompressError) else f"{type(e).__name__}: {e}"
        return Diagnosis(stage=best.name, stage_index=best.index, kind=best.kind, method="",
                         metric="", error=first_line(ValueError(msg), 400))


def _agree(plan: Plan, report: RunReport, dg: Diagnosis, gate: GateResult) -> Diagnosis:
    """The metric diagnosis checked against every other gate, with its search block."""
    dg = dg.model_copy(update={"gate": gate.gate})
    extra: dict[str, Any] = {}
    final, ref = report.final, report.reference
    if dg.error is None and dg.exclude and final is not None and ref is not None:
        ps = plan.stages[dg.stage_index]
        have = list(getattr(ps.config, "exclude", []) or [])
        extra[f"{selector(plan, ps)}.exclude"] = [have, have + dg.exclude]
        gates = plan.recipe.gates
        if gates.min_size_reduction is not None and dg.compressed_bytes and dg.recovered_bytes:
            size = final.metrics.size_bytes * dg.recovered_bytes / dg.compressed_bytes
            ratio = ref.metrics.size_bytes / size
            if ratio < gates.min_size_reduction:
                dg.conflicts.append(f"min_size_reduction: about {size / 1e6:.1f} MB with it, "
                                    f"{ratio:.2f}x smaller (required "
                                    f"{gates.min_size_reduction:.2f}x)")
        if dg.conflicts:
            patterns = "[" + ", ".join(f"'{p}'" for p in dg.exclude) + "]"
            recovered = f" ({dg.metric} {dg.recovered:.2f} instead of {dg.compressed:.2f})" \
                if dg.recovered is not None and dg.compressed is not None else ""
            dg.suggestion = (f"stages[{dg.stage_index}] ({dg.stage}): keeping {patterns} in "
                             f"float wins the metric back{recovered} but breaks "
                             f"{'; '.join(dg.conflicts)}: not a fix on its own. The search "
                             "block below weighs it against the recipe's other fields (a "
                             "model that removes more can pay for float layers).")
        elif gates.min_speedup is not None or gates.max_p50_ms is not None:
            dg.suggestion += " (layers kept in float also run slower: the speed gates were " \
                "not checked here)"
    dg.search = search_block(plan, "metric", extra)
    return dg


def _cost(plan: Plan, report: RunReport, failed: list[GateResult]) -> Diagnosis | None:
    """A size or speed gate failed (the metric gates passed): where the bytes or milliseconds
    are, stage by stage, and the levers; nothing about the metric, which is not the problem."""
    final, ref = report.final, report.reference
    if not failed or final is None or ref is None:
        return None
    g = failed[0]
    size = g.gate == "min_size_reduction"
    cards = [c for c in report.stages if c.index != plan.reference_index]

    def amount(c: StageCard) -> str:
        if size:
            return f"{c.metrics.size_bytes / 1e6:.1f} MB"
        return f"{p50(c, 1):.2f} ms ({c.metrics.runtime})"

    if size:
        need = f"{ref.metrics.size_bytes / g.threshold / 1e6:.1f} MB or less passes " \
               f"(the reference is {ref.metrics.size_bytes / 1e6:.1f} MB)"
    elif g.gate == "max_p50_ms":
        need = f"{g.threshold:g} ms or less passes"
    else:
        lfl = report.like_for_like(final) or ref
        need = f"{p50(lfl, 1) / g.threshold:.2f} ms or less passes (the reference runs " \
               f"{p50(lfl, 1):.2f} ms in {lfl.metrics.runtime})"
    by_stage = ", ".join(f"{c.name} {amount(c)}" for c in cards)
    block = search_block(plan, "size" if size else "speed")
    levers = ("what to change is how much the stages remove (the fields in the search block "
              "below), not how they train" if block else "no stage of this recipe has a field "
              "that removes more to search; a stage that removes layers, heads or FFN channels "
              "before export would")
    text = (f"{g.gate}: {g.message}. The final model is {amount(final)}; {need}. By stage: "
            f"{by_stage}. The metric gates pass: {levers}.")
    return Diagnosis(stage=final.name, stage_index=final.index if final.index is not None else -1,
                     kind=final.kind, method="size" if size else "speed", metric="",
                     gate=g.gate, suggestion=text, search=block)


def selector(plan: Plan, ps: PlannedStage) -> str:
    """How a search block names a stage: its name, else its kind when no other stage has it,
    else its index (so the block reads `stages[prune].ffn` wherever it can)."""
    if ps.config.name:
        return f"stages[{ps.config.name}]"
    kinds = [p.kind for p in plan.stages]
    return f"stages[{ps.kind}]" if kinds.count(ps.kind) == 1 else f"stages[{ps.index}]"


def search_block(plan: Plan, goal: str, extra: dict[str, Any] | None = None) -> str:
    """A `search:` block (YAML, ready to paste into the recipe) over the stages' own hints for
    `goal` ("metric", "size", "speed"), with the recipe's gates as its constraints."""
    space: dict[str, Any] = {}
    for ps in plan.stages:
        if ps.index == plan.reference_index:
            continue
        for name, values in ps.config.search_hints(goal).items():
            space[f"{selector(plan, ps)}.{name}"] = values
    space.update(extra or {})
    if not space:
        return ""
    first = {"metric": "latency", "size": "size", "speed": "latency"}[goal]
    spec = SearchSpec(objectives=[first, "metric"] if goal != "metric" else ["metric", first],
                      space=space, budget={"trials": 12})
    block = spec.model_dump(mode="json", include={"objectives", "space", "budget"},
                            exclude_none=True)
    block["space"] = {k: ({a: b for a, b in v.items() if b not in (None, False)}
                          if isinstance(v, dict) else v) for k, v in block["space"].items()}
    return yaml.safe_dump({"search": block}, sort_keys=False, default_flow_style=None)
