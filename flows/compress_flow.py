"""One flow per recipe run, one task per stage; tasks pass model references, never modules.

Caching: a stage task's cache key is its output's lineage hash (plus the evaluation settings), and
only while that output exists on disk; the library itself also finds finished outputs by hash, so
a retried or re-run flow redoes nothing that finished, with or without Prefect's cache.
"""

from __future__ import annotations

import errno
import time
from datetime import datetime
from typing import Any

from prefect import flow, tags, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import TaskRunContext

from compress import pipeline
from compress.artifact import ModelRef
from compress.diagnose import on_gate_failure
from compress.errors import CompressError
from compress.recipe import Recipe
from compress.render import render_markdown, table
from compress.report import RunReport, StageCard


def _planned(plan: pipeline.Plan, index: int) -> pipeline.PlannedStage:
    ps = plan.reference_onnx if index == -1 else plan.stages[index]
    assert ps is not None
    return ps


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """The lineage hash, but only while the output it names is on disk (else: run it)."""
    plan, index = parameters["plan"], parameters["index"]
    ps = _planned(plan, index)
    return f"{ps.hash[:32]}-{plan.eval_hash[:16]}" if ps.done() else None


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


@task(cache_key_fn=stage_cache_key, persist_result=True, task_run_name=_stage_run_name,
      **RETRIES)
def stage_task(plan: pipeline.Plan, index: int, input_ref: ModelRef) -> StageCard:
    return pipeline.run_stage(plan, index, input_ref, progress=_ProgressArtifact())


@task(task_run_name="reference", **RETRIES)
def reference_task(plan: pipeline.Plan) -> StageCard:
    return pipeline.evaluate_reference(plan)


def publish(report: RunReport, card: StageCard) -> None:
    """The running report card as a table and a Markdown artifact, keyed per recipe."""
    head, rows = table(report)
    create_table_artifact(key=f"{report.recipe}-report-card",
                          table=[dict(zip(head, r, strict=True)) for r in rows],
                          description=f"{report.recipe}: after {card.name} (run {report.run_id})")
    create_markdown_artifact(key=f"{report.recipe}-report", markdown=render_markdown(report),
                             description=f"{report.recipe} report card, run {report.run_id}")


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


@flow(name="compress-recipe", flow_run_name=_run_name, persist_result=True)
def compress_recipe(recipe: Recipe, reports_dir: str = "reports",
                    keep_going: bool = False) -> dict[str, Any]:
    """Run a compression recipe: every stage a task, every report card an artifact."""
    from prefect.runtime import flow_run

    plan = pipeline.make_plan(recipe)
    run_id = f"{datetime.now():%Y%m%d-%H%M%S}-{str(flow_run.id)[:8]}"
    run_tags = ["compress", recipe.name]
    _tag_this_run(run_tags)

    def run_stage(plan: pipeline.Plan, index: int, input_ref: ModelRef,
                  progress: Any = None) -> StageCard:
        return stage_task(plan, index, input_ref)

    with tags(*run_tags):  # the stage task runs carry them too
        report = pipeline.execute(plan, reports_dir, run_id=run_id, run_stage=run_stage,
                                  evaluate_reference=reference_task, on_card=publish,
                                  on_gate_failure=on_gate_failure, keep_going=keep_going)
    return {"report": str(pipeline.report_folder(reports_dir, report)), "status": report.status}


@flow(name="compress-nightly", flow_run_name=lambda: f"nightly-{datetime.now():%Y%m%d-%H%M}")
def nightly(recipe_path: str, reports_dir: str = "reports",
            keep_going: bool = False) -> dict[str, Any]:
    """What deployments run: the recipe file is read when the run starts, so tonight's run uses
    the recipe as it is tonight (and a broken edit fails the run with the reason)."""
    from compress.recipe import load_recipe

    return compress_recipe(recipe=load_recipe(recipe_path), reports_dir=reports_dir,
                           keep_going=keep_going)
