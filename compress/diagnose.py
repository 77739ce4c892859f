"""Which stage of a run lost the most, and which of its layers: the run-level side of the
diagnosis. The layer probing itself is the stage's own (`StageConfig.diagnose`, e.g. dynamic
INT8 through compress.sensitivity); this module picks the stage, reads its input and output from
disk, and turns a failed gate into a card section. `compress diagnose` and the pipeline's
`on_gate_failure` hook both come here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from compress.artifact import ModelRef, read_ref
from compress.errors import CompressError, first_line
from compress.measure import default_threads
from compress.metrics import METRICS, Metrics
from compress.pipeline import Plan, PlannedStage, evaluate_cached, plan_data
from compress.report import Diagnosis, RunReport
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
    cannot hide the gate failure. None when no stage lost any of the metric."""
    try:
        return _on_gate_failure(plan, report)
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
