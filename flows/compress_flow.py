"""One flow per recipe run, one task per stage; tasks pass model references, never modules.

Caching is the library's, not Prefect's: a finished stage output is found by its lineage hash and
reused only once its manifest verifies (compress.manifest), and metrics are cached in sealed JSON.
Prefect persists no task or flow result: a persisted result is read back with whatever
serializer its own file names (pickle included), so a result file on shared storage would be a
way to run code in the next run. A re-run of a finished recipe still redoes nothing: each stage
task verifies and reuses its output in about a second.

Failures end as a Failed state carrying the one-line error (no Python traceback in the log for
our own errors); every stage logs its one-line result; the last artifact of a run is the final
report card, status and gates included.
"""

from __future__ import annotations

import contextlib
import errno
import threading
import time
from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.states import Failed, State

from compress import pipeline
from compress.artifact import ModelRef
from compress.diagnose import on_gate_failure
from compress.errors import CompressError
from compress.interrupt import stop_on_signals
from compress.recipe import Recipe
from compress.render import one_line, render_markdown, table
from compress.report import RunReport, StageCard


def _planned(plan: pipeline.Plan, index: int) -> pipeline.PlannedStage:
    ps = plan.reference_onnx if index == -1 else plan.stages[index]
    assert ps is not None
    return ps


def _stage_run_name() -> str:
    from prefect.runtime import task_run

    p = task_run.parameters
    ps = _planned(p["plan"], p["index"])
    return f"{ps.index}-{ps.name}" if ps.index >= 0 else "reference-onnx"


class _ProgressArtifact:
    """Training progress as a Prefect progress artifact, updated at most every 2 s."""

    def __init__(self) -> None:
        self.id: Any = None
        self.last = 0.0

    def __call__(self, label: str, done: int, total: int) -> None:
        pct = 100.0 * done / max(total, 1)
        if self.id is None:
            self.id = create_progress_artifact(pct, description=f"{label}: steps")
        elif time.monotonic() - self.last > 2 or done == total:
            update_progress_artifact(self.id, pct)
        else:
            return
        self.last = time.monotonic()


# I/O hiccups worth another try (NFS, a busy or briefly unreachable disk). A full disk, missing
# file or denied permission fails the same way again, so those fail at once.
TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ETIMEDOUT,
                    errno.ESTALE, errno.ECONNRESET, errno.ECONNREFUSED, errno.EHOSTUNREACH,
                    errno.ENETDOWN, errno.ENETUNREACH}


def is_transient(exc: BaseException | None) -> bool:
    """Retry only transient I/O: never our own errors (a bad config or failed parity repeats)."""
    if exc is None or isinstance(exc, CompressError):
        return False
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def retry_transient_io(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry_condition_fn: look at the exception the failed attempt raised."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # the result could not even be read: do not guess
        return False
    return is_transient(exc if isinstance(exc, BaseException) else None)


RETRIES = {"retries": 2, "retry_delay_seconds": [5, 30], "retry_condition_fn": retry_transient_io}


@task(persist_result=False, task_run_name=_stage_run_name, **RETRIES)
def stage_task(plan: pipeline.Plan, index: int, input_ref: ModelRef) -> StageCard | State:
    try:
        return pipeline.run_stage(plan, index, input_ref, progress=_ProgressArtifact())
    except CompressError as e:  # ours: one line in the log, no traceback, never retried
        return Failed(message=str(e), data=e)


@task(task_run_name="reference", persist_result=False, **RETRIES)
def reference_task(plan: pipeline.Plan) -> StageCard | State:
    try:
        return pipeline.evaluate_reference(plan)
    except CompressError as e:
        return Failed(message=str(e), data=e)


def _unwrap(result: StageCard | State) -> StageCard:
    """A task that ended as a Failed state (our errors) raises its error here, in the flow."""
    if isinstance(result, State):
        exc = result.result(raise_on_failure=False)
        if isinstance(exc, BaseException):
            raise exc
        raise CompressError(result.message or "the stage failed")
    return result


def run_stage(plan: pipeline.Plan, index: int, input_ref: ModelRef,
              progress: Any = None) -> StageCard:
    """pipeline.run_stage as a task run: what `pipeline.execute` takes as its run_stage (the
    recipe flow's, and each trial's of a search)."""
    return _unwrap(stage_task(plan, index, input_ref))


def evaluate_reference(plan: pipeline.Plan) -> StageCard:
    return _unwrap(reference_task(plan))


def publish(report: RunReport, card: StageCard | None) -> None:
    """The running report card as a table and a Markdown artifact, keyed per recipe, and each
    stage's one-line result in the run's log. card None: the report is final."""
    logger = get_run_logger()
    if card is not None:
        logger.info(one_line(report, card))
        for w in card.warnings:
            logger.warning(f"{card.name}: {w}")
    else:
        logger.info(f"{report.recipe}: {report.status}"
                    + (f": {report.error}" if report.error else ""))
    head, rows = table(report)
    after = f"after {card.name}" if card is not None else report.status
    create_table_artifact(key=f"{report.recipe}-report-card",
                          table=[dict(zip(head, r, strict=True)) for r in rows],
                          description=f"{report.recipe}: {after} (run {report.run_id})")
    create_markdown_artifact(key=f"{report.recipe}-report", markdown=render_markdown(report),
                             description=f"{report.recipe} report card, run {report.run_id}: "
                                         f"{report.status}")


def _run_name() -> str:
    from prefect.runtime import flow_run

    recipe = flow_run.parameters.get("recipe")
    name = getattr(recipe, "name", None) or (recipe or {}).get("name", "recipe")
    return f"{name}-{datetime.now():%Y%m%d-%H%M}"


def _tag_this_run(names: list[str]) -> None:
    """Tags on the flow run itself (filterable in the UI), however it was started: a flow's
    tags are fixed when its run is created, so add ours to whatever the caller gave it."""
    from prefect import get_client
    from prefect.runtime import flow_run

    have = list(flow_run.tags or [])
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=have + [t for t in names if t not in have])


@flow(name="compress-recipe", flow_run_name=_run_name, persist_result=False)
def compress_recipe(recipe: Recipe, reports_dir: str = "reports", keep_going: bool = False,
                    run_id: str | None = None) -> dict[str, Any] | State:
    """Run a compression recipe: every stage a task, every report card an artifact. The report
    is reports_dir/<recipe>/<run_id> (run_id: given by the caller, or made here)."""
    from prefect.runtime import flow_run

    run_id = run_id or f"{datetime.now():%Y%m%d-%H%M%S}-{str(flow_run.id)[:8]}"
    folder = f"{reports_dir}/{recipe.name}/{run_id}"
    try:
        plan = pipeline.make_plan(recipe)
    except CompressError as e:
        return Failed(message=str(e))
    run_tags = ["compress", recipe.name]
    _tag_this_run(run_tags)
    # Prefect answers SIGTERM with its own handler inside a flow run (the run would end as
    # failed): ours records the run as interrupted, and the CLI exits 128 + signal.
    stop = stop_on_signals() if threading.current_thread() is threading.main_thread() \
        else contextlib.nullcontext()
    try:
        with tags(*run_tags), stop:  # the stage task runs carry the tags too
            report = pipeline.execute(plan, reports_dir, run_id=run_id, run_stage=run_stage,
                                      evaluate_reference=evaluate_reference, on_card=publish,
                                      on_gate_failure=on_gate_failure, keep_going=keep_going)
    except CompressError as e:  # a failed gate or stage: the report says it all
        return Failed(message=f"{e} (report: {folder})")
    return {"report": folder, "status": report.status}


@flow(name="compress-nightly", flow_run_name=lambda: f"nightly-{datetime.now():%Y%m%d-%H%M}",
      persist_result=False)
def nightly(recipe_path: str, reports_dir: str = "reports",
            keep_going: bool = False) -> dict[str, Any] | State:
    """What deployments run: the recipe file is read when the run starts, so tonight's run uses
    the recipe as it is tonight (and a broken edit fails the run with the reason)."""
    from compress.recipe import load_recipe

    try:
        recipe = load_recipe(recipe_path)
    except CompressError as e:
        return Failed(message=str(e))
    return compress_recipe(recipe=recipe, reports_dir=reports_dir, keep_going=keep_going,
                           return_state=True)
