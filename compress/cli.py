"""The `compress` command: a thin layer over the recipe and the pipeline.

Exit codes: 0 ok · 1 a stage failed · 2 bad recipe or input (nothing ran) · 3 a gate failed.
`run` goes through the Prefect flow (embedded server unless PREFECT_API_URL is set); `--local`
runs the same stages without Prefect.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.markup import escape

from compress.errors import CompressError, RecipeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress a trained Hugging Face model into an edge-ready one.")
out = Console()
err = Console(stderr=True)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
OutputRoot = Annotated[Path | None, typer.Option(help="Override the recipe's output_root.")]
ReportsDir = Annotated[Path, typer.Option(help="Where report cards are written.")]


def _show(markdown: str) -> None:
    """Rendered in a terminal; plain Markdown when piped (logs, CI), where tables stay whole."""
    if out.is_terminal:
        out.print(Markdown(markdown))
    else:
        print(markdown)


def _error(label: str, text: object) -> None:
    """`label: text` on stderr; the text is never read as Rich markup (a stage named
    `[/oops]` is a name, not a closing tag)."""
    err.print(f"[bold red]{label}:[/] {escape(str(text))}", highlight=False, soft_wrap=True)


def _plain(text: object) -> None:
    """A line on stdout, never read as markup."""
    out.print(escape(str(text)), highlight=False, soft_wrap=True)


def _fail(e: CompressError) -> typer.Exit:
    _error("error", e)
    return typer.Exit(e.exit_code)


def _disk_full(e: BaseException, where: str) -> str | None:
    """One line for a full disk (or a file-size limit), whatever layer wrapped the OSError
    (safetensors and torch re-raise it as their own errors, keeping only the text)."""
    import errno

    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return f"disk full while writing {seen.filename or where}: {seen.strerror}"
        text = str(seen)
        for reason in ("No space left on device", "File too large", "Disk quota exceeded"):
            if reason in text:
                return f"disk full while writing {where}: {reason}"
        seen = seen.__cause__ or seen.__context__
    return None


def _load(recipe: Path, output_root: Path | None):
    from compress.pipeline import make_plan
    from compress.recipe import load_recipe

    r = load_recipe(recipe)
    if output_root is not None:
        r = r.model_copy(update={"output_root": str(output_root.resolve())})
    return make_plan(r)


@app.command()
def validate(recipe: RecipeArg, output_root: OutputRoot = None) -> None:
    """Check the recipe and what it points at, and print the plan. Runs nothing."""
    try:
        plan = _load(recipe, output_root)
        searched = None
        if plan.recipe.search is not None:  # the block checked against the recipe
            from compress.search import Search

            searched = _search_line(Search(plan.recipe, Path("reports")))
    except CompressError as e:
        raise _fail(e) from None
    out.print("[green]ok[/] " + escape(
        f"{plan.recipe.name}: {len(plan.stages)} stages; data: {plan.train_size} train / "
        f"{plan.eval_size} eval examples, {plan.num_labels} labels; metric: "
        f"{plan.recipe.metric}"), highlight=False, soft_wrap=True)
    for line in plan.lines():
        _plain("  " + line)
    if searched:
        _plain(searched)
    for w in plan_warnings(plan):
        _error("warning", w)


def _search_line(s) -> str:  # noqa: ANN001 - a compress.search.Search
    """What a search would explore, in one line."""
    return (f"search {s.study_name}: {len(s.space.params)} fields "
            f"({', '.join(p.name for p in s.space.params)}); objectives "
            f"{', '.join(s.spec.objectives)}; study in {s.storage_label}")


def plan_warnings(plan) -> list[str]:  # noqa: ANN001 - a compress.pipeline.Plan
    """What validation found that does not stop a run (dropped data rows, ...)."""
    from compress.pipeline import plan_data

    return plan_data(plan).warnings()


@app.command()
def run(recipe: RecipeArg, output_root: OutputRoot = None,
        reports_dir: ReportsDir = Path("reports"),
        local: Annotated[bool, typer.Option(help="Run without Prefect.")] = False,
        keep_going: Annotated[bool, typer.Option(help="Record failed gates, exit 0.")] = False,
        ) -> None:
    """Run a recipe: every stage, a report card after each, gates at the end. The first Ctrl-C
    (or SIGTERM) stops it: the run is recorded as interrupted, finished stages are kept."""
    from compress.diagnose import on_gate_failure
    from compress.interrupt import Interrupted, stop_on_signals
    from compress.models import is_distributed, is_main_process
    from compress.pipeline import execute, new_run_id, run_as_worker
    from compress.report import read_report

    try:
        plan = _load(recipe, output_root)
    except CompressError as e:
        raise _fail(e) from None
    for line in plan.lines():
        _plain(line)
    for w in plan_warnings(plan):
        _error("warning", w)
    reports_dir = reports_dir.resolve()
    run_id = new_run_id()
    folder = reports_dir / plan.recipe.name / run_id
    try:
        with stop_on_signals():
            distributed = is_distributed()  # torchrun/accelerate launch: always local
            if distributed and not is_main_process():  # rank 0 does everything but train
                run_as_worker(plan)
                return
            if local or distributed:
                execute(plan, reports_dir, run_id=run_id, keep_going=keep_going,
                        on_gate_failure=on_gate_failure)
            else:
                from flows.compress_flow import compress_recipe
                from flows.embedded import embedded_server

                with embedded_server():  # an embedded server dies with this process
                    state = compress_recipe(recipe=plan.recipe, reports_dir=str(reports_dir),
                                            keep_going=keep_going, run_id=run_id,
                                            return_state=True)
                if not (folder / "report.json").is_file():
                    raise CompressError(state.message or "the flow failed before any stage ran")
    except (Interrupted, KeyboardInterrupt) as e:
        signum = getattr(e, "signum", 2)
        _error("error", f"{e or 'interrupted'}: the run is recorded as interrupted in "
                        f"{folder}; finished stages are kept and reused by the next run")
        raise typer.Exit(128 + signum) from None
    except Exception as e:  # a full disk reads the same whichever stage or library hit it
        if (full := _disk_full(e, plan.recipe.output_root)) is not None:
            raise _fail(CompressError(full)) from None
        if isinstance(e, CompressError):
            raise _fail(e) from None
        raise
    report = read_report(folder)
    _show((folder / "report.md").read_text())
    _plain(f"report: {folder / 'report.md'}")
    if report.status != "passed":
        gate_failed = any(not g.passed for g in report.gates)
        if gate_failed and keep_going:
            return
        _error("error", report.error or report.status)
        raise typer.Exit(3 if gate_failed else 1)


def _read(path: Path):
    """A run's report from its folder or report.json, or a recipe folder's latest run."""
    from compress.report import read_report, run_folders

    p = path
    if p.is_dir() and not (p / "report.json").is_file():
        runs = run_folders(p)
        if not runs:
            raise _fail(CompressError(f"{p}: no report here"))
        p = runs[-1]
    try:
        return read_report(p)
    except (OSError, ValueError) as e:
        raise _fail(CompressError(f"{path}: not a report ({type(e).__name__})")) from None


@app.command()
def report(path: Annotated[Path, typer.Argument(help="A report folder or report.json; or a "
                                                     "recipe's folder for its latest run.")],
           as_json: Annotated[bool, typer.Option("--json", help="Print the JSON.")] = False,
           compare: Annotated[Path | None, typer.Option(
               help="Compare PATH (the baseline run) with this run; exit 3 on a regression.")
           ] = None,
           max_metric_drop: Annotated[float, typer.Option(
               help="With --compare: allowed drop of accuracy/F1 scores, in points.")] = 0.5,
           max_perplexity_rise: Annotated[float, typer.Option(
               help="With --compare: allowed perplexity rise, relative (0.02 = +2%).")] = 0.02,
           max_latency_rise: Annotated[float, typer.Option(
               help="With --compare: allowed p50 rise at any batch size (0.1 = +10%).")] = 0.10,
           max_size_rise: Annotated[float, typer.Option(
               help="With --compare: allowed rise of size on disk and MACs (0.01 = +1%).")
           ] = 0.01,
           ) -> None:
    """Print a report card, or compare two runs stage by stage (every metric on the card,
    latency at every batch size, size and MACs)."""
    from compress.compare import Tolerances
    from compress.compare import compare as compare_runs
    from compress.render import comparison_markdown, render_markdown

    rep = _read(path)
    if compare is not None:
        result = compare_runs(_read(compare), rep, Tolerances(
            metric_drop_points=max_metric_drop, metric_rise_relative=max_perplexity_rise,
            latency_rise=max_latency_rise, size_rise=max_size_rise))
        _show(comparison_markdown(result))
        for msg in result.problems:
            _error("regression", msg)
        if result.problems:
            raise typer.Exit(3)
    elif as_json:
        print(rep.model_dump_json(indent=2))
    else:
        _show(render_markdown(rep))


@app.command()
def sweep(recipe: RecipeArg,
          set_: Annotated[list[str], typer.Option(
              "--set", help="PATH=V1,V2,... (e.g. 'stages[1].ffn=0.25,0.5'); repeat for a grid.",
              show_default=False)],
          output_root: OutputRoot = None, reports_dir: ReportsDir = Path("reports"),
          local: Annotated[bool, typer.Option(help="One after another, without Prefect.")
                           ] = False,
          threads: Annotated[bool, typer.Option(help="Dask workers as threads, not processes."
                                                )] = False,
          keep_going: Annotated[bool, typer.Option(help="Record failed gates, exit 0.")] = False,
          ) -> None:
    """Run one variant of the recipe per grid point, concurrently (each its own flow run)."""
    from compress.sweep import parse_sets, run_local, variants

    try:
        plan, grid = _load(recipe, output_root), parse_sets(set_)
        for v in variants(plan.recipe, grid):
            _plain(f"variant {v.name}")
        if local:
            rows = run_local(plan.recipe, grid, reports_dir.resolve(), keep_going=keep_going)
        else:
            from flows.sweep import run_sweep

            rows = run_sweep(plan.recipe, grid, reports_dir.resolve(), keep_going=keep_going,
                             processes=not threads)
    except CompressError as e:
        raise _fail(e) from None
    for row in rows:
        _plain(f"{row['recipe']:<40} {row['status']:<7} {row['report'] or row['error']}")
    codes = [r["exit_code"] for r in rows if r["exit_code"] != 3 or not keep_going]
    if max(codes, default=0):
        raise typer.Exit(max(codes))


@app.command()
def search(recipe: RecipeArg, output_root: OutputRoot = None,
           reports_dir: ReportsDir = Path("reports"),
           trials: Annotated[int | None, typer.Option(
               help="Trials in the study, finished ones included (overrides budget.trials).")
           ] = None,
           minutes: Annotated[float | None, typer.Option(
               help="Minutes for this run: no trial starts that would end later "
                    "(overrides budget.minutes).")] = None,
           local: Annotated[bool, typer.Option(help="One trial after another, without "
                                               "Prefect.")] = False,
           workers: Annotated[int | None, typer.Option(
               help="Trials at once, one per Dask worker (default 2; not with --local).")
           ] = None,
           storage: Annotated[str | None, typer.Option(
               help="Optuna storage URL (sqlite:///f.db, postgresql://...): overrides "
                    "search.storage.")] = None,
           ) -> None:
    """Search the recipe's `search:` space for the best models that pass its gates: the Pareto
    front in reports/<recipe>/search-<id>/, the best one as a plain recipe and in latest/.
    Exit 0: found one; 3: no trial met every gate (the closest are named); 1: every trial
    failed. Run it again to resume: the study keeps every finished trial."""
    from compress.interrupt import Interrupted, stop_on_signals
    from compress.search import Search, run_local, with_budget
    from compress.search_report import summary_lines

    try:
        if workers is not None and workers < 1:
            raise RecipeError(f"--workers {workers}: at least 1")
        if local and workers not in (None, 1):
            raise RecipeError(f"--workers {workers}: --local runs one trial at a time; drop "
                              "--local (Dask workers), or start another `compress search "
                              "--local` on the same study")
        plan = _load(recipe, output_root)
        s = Search(with_budget(plan.recipe, trials, minutes, storage), reports_dir)
        _plain(_search_line(s))
        _plain(f"results in {s.folder}")
        with stop_on_signals():
            if local:
                res = run_local(s, say=_plain)
            else:
                from flows.search import run_search

                res = run_search(s.recipe, reports_dir, workers=workers or 2)
    except (Interrupted, KeyboardInterrupt) as e:
        _error("error", f"{e or 'interrupted'}: the study keeps every finished trial; run the "
                        "same command to resume (the unfinished trial runs again)")
        raise typer.Exit(128 + getattr(e, "signum", 2)) from None
    except CompressError as e:
        raise _fail(e) from None
    for line in summary_lines(res):
        _plain(line)
    _plain(f"report: {Path(res.folder) / 'report.md'}")
    if res.publish_error:
        _error("error", f"the best trial was not published: {res.publish_error}")
        raise typer.Exit(1)
    if res.status == "infeasible":
        _error("error", "no trial met every gate; the closest are named above and kept "
                        f"(closest-1.yaml in {res.folder})")
        raise typer.Exit(3)
    if res.status == "no-trials":
        first = next((t.note for t in res.trials if t.state == "failed"), "no trial ran")
        _error("error", f"every trial failed; the first: {first}")
        raise typer.Exit(1)


@app.command()
def diagnose(recipe: RecipeArg, output_root: OutputRoot = None,
             stage: Annotated[int | None, typer.Option(
                 help="Stage index to diagnose; default: the one that lost the most.")] = None,
             top: Annotated[int | None, typer.Option(
                 help="Layer groups listed; default: the recipe's diagnose.top.")] = None,
             as_json: Annotated[bool, typer.Option("--json", help="Print the JSON.")] = False,
             ) -> None:
    """Rank a finished stage's layers by what compressing each one alone costs."""
    from compress.diagnose import diagnose as run_diagnosis
    from compress.render import diagnosis_lines

    try:
        plan = _load(recipe, output_root)
        result = run_diagnosis(plan, stage, top=top)
    except CompressError as e:
        raise _fail(e) from None
    if as_json:
        print(result.model_dump_json(indent=2))
    else:
        _show("\n".join(diagnosis_lines(result)))


def _need_server(what: str) -> None:
    if not os.environ.get("PREFECT_API_URL"):
        raise _fail(CompressError(
            f"{what} needs a Prefect server (the embedded one cannot schedule): run `prefect "
            "server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api"))


@app.command()
def serve(recipes: Annotated[list[Path], typer.Argument(help="Recipe YAML files.")],
          cron: Annotated[str, typer.Option(help="When to run, cron syntax.")] = "0 2 * * *",
          timezone: Annotated[str, typer.Option(help="Time zone of the cron.")] = "UTC",
          reports_dir: ReportsDir = Path("reports")) -> None:
    """Serve nightly deployments of these recipes from this machine (flow.serve)."""
    _need_server("compress serve")
    from flows.deploy import serve_recipes

    try:
        serve_recipes(recipes, cron, timezone, reports_dir)
    except CompressError as e:
        raise _fail(e) from None


@app.command()
def submit(recipe: RecipeArg,
           watch: Annotated[bool, typer.Option(help="Wait for the run and report how it ended."
                                               )] = False) -> None:
    """Trigger a run of a served/deployed recipe now (run_deployment)."""
    from compress.recipe import load_recipe

    _need_server("compress submit")
    from flows.deploy import submit as submit_run

    try:
        run = submit_run(load_recipe(recipe).name, watch)
    except CompressError as e:
        raise _fail(e) from None
    state = run.state.name if run.state else "Scheduled"
    _plain(f"flow run {run.name} ({run.id}): {state}")
    if watch and run.state and not run.state.is_completed():
        message = run.state.message or ""
        _error("error", message)
        raise typer.Exit(3 if "gate failed" in message else 1)


@app.command()
def runs(reports_dir: ReportsDir = Path("reports"),
         limit: Annotated[int, typer.Option(help="How many runs to list.")] = 10) -> None:
    """Recent runs of every recipe, newest first, with their final cards' headline numbers. A
    run still marked running whose process is gone is shown as interrupted."""
    from compress.atomic import owner_alive
    from compress.report import deltas, read_report, run_folders

    found = []
    for d in (f for recipe in Path(reports_dir).glob("*/") for f in run_folders(recipe)):
        try:
            found.append(read_report(d))
        except (OSError, ValueError):
            continue
    found.sort(key=lambda r: r.started_at, reverse=True)
    print(f"{'started':30}{'recipe':22}{'status':12}{'final':>10}{'Δ':>8}{'smaller':>9}"
          f"{'faster':>8}")
    for r in found[:limit]:
        final, d = r.final, (deltas(r, r.final) if r.final and r.reference else {})
        value = f"{final.metrics.value:.2f}" if final else "-"
        status = "interrupted" if r.status == "running" and r.owner is not None and \
            not owner_alive(r.owner) else r.status
        print(f"{r.started_at:30}{r.recipe[:21]:22}{status:12}{value:>10}"
              f"{d.get('metric_change', 0):>+8.2f}{d.get('size_ratio', 1):>8.2f}x"
              f"{d.get('speedup_b1', 1):>7.2f}x")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except CompressError as e:  # anything a command did not catch itself
        _error("error", e)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
