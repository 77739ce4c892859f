"""A search through Prefect: every trial (compress.search) its own `compress-search-trial` flow
run, trials run by workers on a Dask task runner, one trial per worker at a time.

The workers share one Optuna study through its storage (SQLite next to the reports, or
PostgreSQL), so a trial started by one worker is seen by the sampler of the other, and the
budget is counted in the study, whichever worker starts the last trial. A trial flow runs its
stages as the recipe flow does (one task per stage, the card as artifacts), so a trial looks in
the UI like a run of its plain recipe, named `<recipe>-t007`. The search ends with the Pareto
front as a Markdown artifact `<recipe>-search` and a table artifact `<recipe>-search-front`.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect_dask import DaskTaskRunner

from compress.recipe import Recipe
from compress.search import Search
from compress.search_report import SearchResult, search_markdown, trial_table


def _rename_this_run(name: str, tags: list[str]) -> None:
    """A trial's number is known once it starts: name the flow run after it, and tag it."""
    from prefect import get_client
    from prefect.runtime import flow_run

    have = list(flow_run.tags or [])
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, name=name,
                               tags=have + [t for t in tags if t not in have])


@flow(name="compress-search-trial", persist_result=False,
      flow_run_name=lambda: f"trial-{datetime.now():%Y%m%d-%H%M%S}")
def search_trial(recipe: Recipe, reports_dir: str = "reports",
                 started: float | None = None) -> dict[str, Any] | None:
    """One trial of the recipe's search: ask the shared study, run the variant's stages as
    tasks, tell the study. None when the budget was spent by another worker meanwhile."""
    from flows.compress_flow import evaluate_reference, publish, run_stage

    logger = get_run_logger()
    search = Search(recipe, reports_dir, started)
    search.open()

    def on_start(number: int, name: str) -> None:
        _rename_this_run(name, ["compress", "search", recipe.name])

    row = search.run_trial(run_stage=run_stage, evaluate_reference=evaluate_reference,
                           on_card=publish, on_start=on_start, say=logger.info)
    return None if row is None else row.model_dump(mode="json")


@task(task_run_name="worker-{worker}")
def search_worker(recipe: Recipe, reports_dir: str, started: float, worker: int) -> list[int]:
    """Trials one after another until the budget is spent, each a child flow run."""
    # Imported here, in the Dask worker (see flows/sweep.py: a flow pickled by value loses the
    # module globals its parameter model needs).
    from flows.search import search_trial

    search = Search(recipe, reports_dir, started)
    search.open()
    done = []
    while search.more():
        state = search_trial(recipe=recipe, reports_dir=reports_dir, started=started,
                             return_state=True)
        row = state.result(raise_on_failure=False)
        if isinstance(row, BaseException):
            raise row
        if row is None:
            break
        done.append(row["number"])
    return done


def _runner(workers: int, processes: bool = True) -> DaskTaskRunner:
    # One thread per worker, processes by default: torch's seed and thread settings are per
    # process, so two trials in one process would disturb each other's training and timings.
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                          "processes": processes, "dashboard_address": None})


def _search_name() -> str:
    from prefect.runtime import flow_run

    recipe = flow_run.parameters.get("recipe")
    name = getattr(recipe, "name", None) or (recipe or {}).get("name", "recipe")
    return f"search-{name}-{datetime.now():%Y%m%d-%H%M}"


@flow(name="compress-search", flow_run_name=_search_name, task_runner=_runner(2),
      persist_result=False)
def compress_search(recipe: Recipe, reports_dir: str = "reports", workers: int = 2
                    ) -> dict[str, Any]:
    """Search the recipe's space with `workers` trials at once; write the search report and
    publish the best feasible model, as `compress search --local` does."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    logger = get_run_logger()
    started = time.time()
    search = Search(recipe, reports_dir, started)
    search.open()  # recovers trials a killed search left running, before the workers start
    futures = [search_worker.submit(recipe, reports_dir, started, w) for w in range(workers)]
    for w, fut in enumerate(futures):
        fut.wait()
        done = fut.result(raise_on_failure=False)
        if isinstance(done, BaseException):
            logger.error(f"worker {w} stopped: {type(done).__name__}: {done}")
        else:
            logger.info(f"worker {w} ran trials {done}")
    res = search.finish()
    create_markdown_artifact(key=f"{recipe.name}-search", markdown=search_markdown(res),
                             description=f"{recipe.name}: search {res.study}: {res.status}")
    shown = res.front or res.closest
    head, rows = trial_table(res, shown)
    create_table_artifact(key=f"{recipe.name}-search-front",
                          table=[dict(zip(head, r, strict=True)) for r in rows],
                          description=f"{recipe.name}: "
                          + ("the feasible Pareto front" if res.front else
                             "no trial met every gate: the closest"))
    return res.model_dump(mode="json")


def run_search(recipe: Recipe, reports_dir: Path, workers: int = 2,
               processes: bool = True) -> SearchResult:
    """The search flow on a server that dies with this process (see flows.embedded)."""
    from flows.embedded import embedded_server

    with embedded_server():
        run = compress_search.with_options(task_runner=_runner(workers, processes))
        out = run(recipe=recipe, reports_dir=str(Path(reports_dir).resolve()), workers=workers)
    return SearchResult.model_validate(out)
