"""Plan and run a recipe: the one loop that both the CLI's local path and the Prefect flow use.

`make_plan` does every check that needs no heavy work (data loads and splits, the source model
exists and each stage can handle it, every output id is computed), so a bad recipe fails before
anything runs. `execute` walks the plan; its callers inject what differs between them: the flow
passes Prefect-task versions of `run_stage` and `evaluate_reference` and an `on_card` that
publishes artifacts, and the CLI passes the diagnosis as `on_gate_failure`. This module knows no
stage kind: it reads what each stage declares (compress.stage).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import yaml
from pydantic import BaseModel

from compress import manifest
from compress.artifact import (
    INFO_FILE,
    ModelRef,
    canonical_hash,
    files_hash,
    read_ref,
    source_ref,
    write_ref,
)
from compress.atomic import (
    atomic_write_text,
    owner_alive,
    owner_record,
    remove_orphans,
)
from compress.data import TaskData, load_task_data
from compress.errors import CompressError, GateFailed, RecipeError
from compress.evaluate import evaluate, head_to_head, positive_class
from compress.interrupt import Interrupted
from compress.locks import exclusive
from compress.measure import cpu_info, default_threads, environment
from compress.metrics import Metrics
from compress.models import check_model_folder, wait_for_everyone
from compress.recipe import AnyStage, Recipe
from compress.render import model_card
from compress.report import (
    LATEST,
    Diagnosis,
    HeadToHead,
    RunReport,
    StageCard,
    check_gates,
    over_distillation,
    read_report,
)
from compress.report_io import earlier_runs, write_report
from compress.stage import Progress, StageConfig, StageContext

GateHook = Callable[["Plan", RunReport], Diagnosis | None]
# A stage's facts may name side outputs: {folder name: card facts (and "parent", the id of the
# model it grew from)}; each folder inside the output is a whole model, carded beside the stage.
SIDE_OUTPUTS = "side_outputs"


class PlannedStage(BaseModel):
    index: int  # -1 for the reference's ONNX export
    name: str
    config: AnyStage
    hash: str
    parent: str
    output_dir: str

    @property
    def kind(self) -> str:
        return self.config.kind

    def done(self) -> bool:
        """Finished and whole by its manifest's sizes (cheap; reuse also checks digests)."""
        out = Path(self.output_dir)
        return read_ref(out) is not None and not manifest.verify(out, digests=False)


class Plan(BaseModel):
    recipe: Recipe
    source: ModelRef
    data_fingerprint: str
    num_labels: int
    train_size: int
    eval_size: int
    eval_hash: str
    reference_index: int | None  # last leading makes_reference stage; None: the source
    stages: list[PlannedStage]
    reference_onnx: PlannedStage | None

    def lines(self) -> list[str]:
        out = [f"source  {self.source.path}  ({self.source.format}, id {self.source.short})"]
        for s in self.stages:
            ref = "  ← reference (teacher)" if s.index == self.reference_index else ""
            state = "done, will be reused" if s.done() else (
                "damaged: will be set aside and rebuilt" if Path(s.output_dir).exists()
                else "to run")
            out.append(f"[{s.index}] {s.name:<10} {s.kind:<9} → {s.output_dir}  ({state}){ref}")
        return out


def _plan_stage(index: int, cfg: StageConfig, parent: str, root: Path,
                data_fp: str | None) -> PlannedStage:
    h = cfg.output_id(parent, data_fp)
    return PlannedStage(index=index, name=cfg.label if index >= 0 else "reference (onnx fp32)",
                        config=cfg, hash=h, parent=parent,
                        output_dir=str(root / f"{cfg.kind}-{h[:12]}"))


def _check_hub_model(path: str, revision: str | None) -> None:
    """Offline, a hub id must already be in the local cache: say so now, not after 30 s."""
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(path, "config.json", revision=revision)
    except ValueError:  # not even a valid repo id
        found = None
    if not isinstance(found, str):
        raise RecipeError(f"model.path: {path!r} is not a local folder and not in the hub cache "
                          "(HF_HUB_OFFLINE=1): download it first or give a folder")


def _check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".probe-"):
            pass
    except OSError as e:
        raise RecipeError(f"output_root: cannot write to {root}: {e.strerror or e}") from None


def make_plan(recipe: Recipe) -> Plan:
    """Check the recipe against the world (files, columns, labels, architectures) and compute
    every output id."""
    p = Path(recipe.model.path)
    if not p.exists():
        if recipe.model.path.startswith(("/", ".", "~")):
            raise RecipeError(f"model.path: {recipe.model.path}: no such folder")
        _check_hub_model(recipe.model.path, recipe.model.revision)
    _check_writable(Path(recipe.output_root))
    model_config = check_model_folder(p) if p.exists() else {}
    source = source_ref(recipe.model.path, recipe.model.task, recipe.model.revision)
    for i, st in enumerate(recipe.stages):
        try:
            st.check_model(model_config)
        except ValueError as e:
            raise RecipeError(f"{st.where(i)}: {e}") from None
    num_labels = recipe.model.num_labels
    if num_labels is None and recipe.model.task != "causal-lm":
        labels = model_config.get("id2label") or {}
        if len(labels) >= 2:
            num_labels = len(labels)
    data = load_task_data(recipe.data, num_labels, recipe.model.task)
    positive_class(recipe.evaluation, data)  # a positive label the data lacks: refused now
    root = Path(recipe.output_root)
    stages, parent, ref_index = [], source.hash, None
    for i, st in enumerate(recipe.stages):
        ps = _plan_stage(i, st, parent, root, data.fingerprint)
        if st.makes_reference and ref_index == (i - 1 if i else None):
            ref_index = i
        stages.append(ps)
        parent = ps.hash
    reference_hash = stages[ref_index].hash if ref_index is not None else source.hash
    ref_onnx = None
    exporter = next((st for st in recipe.stages
                     if st.input_format == "hf" and st.output_format == "onnx"), None)
    if recipe.evaluation.reference_onnx and exporter is not None:
        # exported exactly as the recipe exports its own model (opset, parity tolerance)
        ref_onnx = _plan_stage(-1, exporter.model_copy(update={"name": None}), reference_hash,
                               root, data.fingerprint)
    threads = recipe.evaluation.latency.threads or default_threads()
    probe = _probe_hash(recipe.evaluation.probe_data)
    eval_hash = canonical_hash(recipe.evaluation.model_dump(mode="json"), data.fingerprint,
                               cpu_info()["model"], threads, *([probe] if probe else []))
    return Plan(recipe=recipe, source=source, data_fingerprint=data.fingerprint,
                num_labels=data.num_labels, train_size=len(data.train),
                eval_size=len(data.eval), eval_hash=eval_hash, reference_index=ref_index,
                stages=stages, reference_onnx=ref_onnx)


def _probe_hash(path: str | None) -> str | None:
    """The probe text's content hash (part of the evaluation's cache key), or a RecipeError
    before any work when the file is missing."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"evaluation.probe_data: {path}: no such file")
    return files_hash([p], p.parent)


def plan_data(plan: Plan) -> TaskData:
    """The plan's data (memoised by load_task_data: every stage sees the same splits)."""
    return load_task_data(plan.recipe.data, plan.recipe.model.num_labels or plan.num_labels,
                          plan.recipe.model.task)


def reference_ref(plan: Plan) -> ModelRef:
    if plan.reference_index is None:
        return plan.source
    ref = read_ref(Path(plan.stages[plan.reference_index].output_dir))
    if ref is None:
        raise CompressError("the reference model (finetune output) is not built yet")
    return ref


def evaluate_cached(plan: Plan, ref: ModelRef, warnings: list[str] | None = None) -> Metrics:
    """Metrics for a model, cached on disk by (model id, evaluation settings, machine). The
    cache file is sealed with its own digest: a damaged one is set aside (named in `warnings`)
    and the model evaluated again."""
    root = Path(plan.recipe.output_root)
    draft_for = _draft_target(plan)
    key = canonical_hash(plan.eval_hash, draft_for.hash) if draft_for else plan.eval_hash
    cache = root / "metrics" / f"{ref.short}-{key[:12]}.json"
    if cache.is_file():
        payload = manifest.unseal(cache.read_text(errors="replace"))
        try:
            if payload is not None:
                return Metrics.model_validate(payload)
        except ValueError:
            pass
        moved = manifest.quarantine(cache, root)
        if warnings is not None:
            warnings.append(f"metric cache {cache.name} was damaged: moved to {moved} and the "
                            "model evaluated again")
    m = evaluate(ref, plan_data(plan), plan.recipe.evaluation,
                 trust_remote_code=plan.recipe.model.trust_remote_code, draft_for=draft_for)
    atomic_write_text(cache, manifest.seal(m.model_dump(mode="json")))
    return m


def _draft_target(plan: Plan) -> ModelRef | None:
    """The model a causal LM's card drafts for (the reference), when the recipe measures it."""
    decode = plan.recipe.evaluation.decode
    if plan.recipe.model.task != "causal-lm" or decode is None or not decode.draft:
        return None
    try:
        return reference_ref(plan)
    except CompressError:  # not built yet (a model evaluated before the finetune stage ran)
        return None


def evaluate_reference(plan: Plan) -> StageCard:
    ref = reference_ref(plan)
    name = "reference" if plan.reference_index is None else \
        f"reference ({plan.stages[plan.reference_index].name})"
    warnings = [f"trust_remote_code is on: Python code shipped with {plan.recipe.model.path} "
                "ran in this process (the recipe asked for it)"] \
        if plan.recipe.model.trust_remote_code else []
    metrics = evaluate_cached(plan, ref, warnings)
    return StageCard(name=name, kind="reference", index=plan.reference_index, model=ref,
                     metrics=metrics, reused=False, warnings=warnings)


def _context(plan: Plan, ps: PlannedStage, progress: Progress | None) -> StageContext:
    before_reference = plan.reference_index is not None and ps.index <= plan.reference_index
    return StageContext(recipe=plan.recipe, data=plan_data(plan), progress=progress,
                        reference=plan.source if before_reference else reference_ref(plan),
                        work_dir=Path(plan.recipe.output_root) / "work" /
                        Path(ps.output_dir).name)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def stage_lock(root: Path, name: str) -> Iterator[None]:
    """One builder of a stage output at a time, across runs and processes: a second run that
    needs the same stage waits, then finds it done and reuses it."""
    with exclusive(Path(root) / "locks" / f"stage-{name}.lock", wait=True,
                   on_wait=lambda who: _say(f"waiting for {name}: another run is building it "
                                            f"({who})")):
        yield


def reusable(out: Path, root: Path, warnings: list[str]) -> ModelRef | None:
    """The finished output at `out` if it verifies in full (sizes and digests); a damaged one
    is quarantined (named in `warnings`) so the caller rebuilds it."""
    warning = manifest.check(out, root, digests=True, what="stage output")
    if warning:
        warnings.append(warning)
        return None
    return read_ref(out)


def run_stage(plan: Plan, index: int, input_ref: ModelRef,
              progress: Progress | None = None) -> StageCard:
    """Run one stage (or reuse it, once verified), then evaluate its output. The input is never
    touched."""
    ps = plan.reference_onnx if index == -1 else plan.stages[index]
    assert ps is not None
    out, root = Path(ps.output_dir), Path(plan.recipe.output_root)
    if ps.config.trains:
        wait_for_everyone()  # the other ranks (if any) train this stage with us: run_as_worker
    warnings: list[str] = []
    with stage_lock(root, out.name):
        ref = reusable(out, root, warnings)
        reused = ref is not None
        if ref is None:
            ref = build_output(ps.config, ps.hash, input_ref, _context(plan, ps, progress), out)
    info = json.loads((out / INFO_FILE).read_text()) if (out / INFO_FILE).is_file() else {}
    warnings += info.pop("warnings", [])
    metrics = evaluate_cached(plan, ref, warnings)
    side = []
    for name, side_info in info.get(SIDE_OUTPUTS, {}).items():
        side_ref = read_ref(out / name)
        if side_ref is None:
            raise CompressError(f"{ps.name}: side output {name} has no lineage")
        side.append(StageCard(name=f"{ps.name} ({name})", kind=ps.kind, index=ps.index,
                              model=side_ref, metrics=evaluate_cached(plan, side_ref),
                              info=side_info, reused=reused))
    return StageCard(name=ps.name, kind=ps.kind, index=ps.index, model=ref, metrics=metrics,
                     info=info, notes=ps.config.notes(info), reused=reused,
                     seconds=info.get("seconds", 0.0), warnings=warnings, side=side)


def build_output(cfg: StageConfig, h: str, input_ref: ModelRef, ctx: StageContext,
                 out: Path) -> ModelRef:
    """Apply one stage into a staging folder, with its card facts, lineage and manifest,
    renamed to `out` only once complete; the stage's checkpoints go once it has succeeded."""
    remove_orphans(out.parent)
    t0 = time.perf_counter()
    with manifest.finished_dir(out) as tmp:
        info = cfg.apply(input_ref, ctx, tmp)
        info["seconds"] = round(time.perf_counter() - t0, 2)
        onnx_file = info.pop("onnx_file", None)
        for name, side in info.get(SIDE_OUTPUTS, {}).items():  # each with a lineage of its own
            write_ref(tmp / name, ModelRef(
                path=str(out / name), format="hf", task=input_ref.task,
                hash=canonical_hash(h, name), stage=cfg.kind, parent=side.get("parent"),
                config=cfg.model_dump(mode="json")))
        atomic_write_text(tmp / INFO_FILE, json.dumps(info, indent=2, default=str))
        write_ref(tmp, ModelRef(path=str(out), format=cfg.output_format, task=input_ref.task,
                                hash=h, stage=cfg.kind, parent=input_ref.hash,
                                config=cfg.model_dump(mode="json"), onnx_file=onnx_file))
    if ctx.work_dir is not None:
        shutil.rmtree(ctx.work_dir, ignore_errors=True)
    ref = read_ref(out)
    assert ref is not None
    return ref


def run_as_worker(plan: Plan) -> None:
    """What ranks other than 0 do under `torchrun`/`accelerate launch`: train their share of
    every training stage rank 0 runs, and nothing else (rank 0 prunes, exports, evaluates and
    writes every file). Each training stage starts with a barrier, after which rank 0's output
    of the stage before it is on disk to read."""
    for ps in plan.stages:
        if not ps.config.trains:
            continue
        wait_for_everyone()
        if ps.done():
            continue
        prev = plan.source if ps.index == 0 else read_ref(Path(plan.stages[ps.index - 1]
                                                               .output_dir))
        if prev is None:
            raise CompressError(f"rank {os.environ.get('RANK')}: the input of stage "
                                f"{ps.index} is missing; did rank 0 fail?")
        with tempfile.TemporaryDirectory() as scratch:
            ps.config.apply(prev, _context(plan, ps, None), Path(scratch))


@contextlib.contextmanager
def recipe_lock(reports_root: Path, recipe: str) -> Iterator[None]:
    """One run of a recipe at a time, whatever output root it writes to: the lock lives in the
    recipe's reports folder, which every run of it shares. flock dies with its process, so a
    killed run never leaves a stale lock; other recipes never wait."""
    try:
        with exclusive(Path(reports_root) / recipe / ".lock", wait=False):
            yield
    except BlockingIOError as e:
        raise CompressError(f"recipe {recipe!r} is already running ({e}); wait for it or "
                            "stop it") from None


class PublishError(CompressError):
    """The final model does not verify: nothing is published, the last good one stays."""


def publish_latest(report: RunReport, reports_root: Path, recipe: Recipe | None = None
                   ) -> Path | None:
    """Publish a passed run to reports/<recipe>/latest as a package: the model (verified by
    its manifest before and after the copy), the recipe that made it, the final report, a model
    card (README.md) and the package's own manifest.

    The package is built beside the old one and swapped in (compress.atomic): `latest` is never
    half a package, and the previous good one stays until the new one is complete and verified.
    """
    final = report.final
    if report.status != "passed" or final is None:
        return None
    problems = manifest.verify(final.model.dir, digests=True)
    if problems:
        raise PublishError(f"not published: the final model {final.model.dir} does not verify "
                           f"({problems[0]}); {LATEST}/ keeps the last good model")
    dest = Path(reports_root) / report.recipe / LATEST
    with manifest.finished_dir(dest, replace=True) as tmp:
        shutil.copytree(final.model.dir, tmp / "model")
        copied = manifest.verify(tmp / "model", digests=True)
        if copied:
            raise PublishError(f"not published: the copy of the final model does not verify "
                               f"({copied[0]}); {LATEST}/ keeps the last good model")
        atomic_write_text(tmp / "report.json", report.model_dump_json(indent=2))
        if recipe is not None:
            atomic_write_text(tmp / "recipe.yaml", yaml.safe_dump(
                recipe.model_dump(mode="json", exclude_none=True), sort_keys=False))
        atomic_write_text(tmp / "README.md", model_card(report, recipe))
    return dest


def new_run_id() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def time_final(plan: Plan, report: RunReport) -> HeadToHead | None:
    """The final card against its like-for-like reference, timed in turns (None: nothing to
    compare, e.g. a torch final with only an ONNX reference, or no compression stage)."""
    final = report.final
    ref = report.like_for_like(final) if final is not None else None
    if final is None or ref is None or final is ref or final is report.reference or \
            ref.metrics.runtime != final.metrics.runtime:
        return None
    return head_to_head(ref.model, final.model, plan_data(plan), plan.recipe.evaluation,
                        names=(ref.name, final.name),
                        trust_remote_code=plan.recipe.model.trust_remote_code)


def execute(plan: Plan, reports_root: Path, *, run_id: str | None = None,
            run_stage: Callable[..., StageCard] = run_stage,
            evaluate_reference: Callable[[Plan], StageCard] = evaluate_reference,
            time_final: Callable[[Plan, RunReport], HeadToHead | None] = time_final,
            on_card: Callable[[RunReport, StageCard | None], None] | None = None,
            on_gate_failure: GateHook | None = None,
            progress: Progress | None = None, keep_going: bool = False,
            publish: bool = True) -> RunReport:
    """Run every stage in order, writing the report after each; check gates at the end.

    The report folder is reports_root/<recipe>/<run_id>. A stage failure is recorded in the
    report (status failed, the error) before it propagates, an interruption as status
    interrupted; earlier outputs stay where they are. When a gate fails and the recipe asks for
    it, `on_gate_failure` adds a diagnosis. `time_final` times the final model against its
    reference for the card and the min_speedup gate. `on_card(report, card)` sees every card,
    and once more with card None when the report is final (status, gates). `publish=False` leaves
    `latest/` alone (a search's trials: only the best one is published, by the search).
    """
    with recipe_lock(Path(reports_root), plan.recipe.name):
        return _execute(plan, Path(reports_root), run_id=run_id, run_stage=run_stage,
                        evaluate_reference=evaluate_reference, time_final=time_final,
                        on_card=on_card,
                        on_gate_failure=on_gate_failure, progress=progress, publish=publish,
                        keep_going=keep_going)


def mark_interrupted_runs(recipe_dir: Path) -> list[str]:
    """Runs of this recipe left 'running' by a process that is gone are interrupted: say so in
    their reports (the run cannot) and return one line per run for the new run's card."""
    found = []
    for folder in sorted(Path(recipe_dir).glob("*/report.json")):
        try:
            r = read_report(folder.parent)
        except (OSError, ValueError):
            continue
        if r.status != "running" or r.owner is None or owner_alive(r.owner):
            continue
        r.status, r.finished_at = "interrupted", r.finished_at or _now()
        r.error = r.error or "the run's process ended without finishing (killed or crashed)"
        write_report(r, folder.parent)
        found.append(f"run {r.run_id} was interrupted (its process is gone); its finished "
                     "stages are reused")
    return found


def _execute(plan: Plan, reports_root: Path, *, run_id: str | None,
             run_stage: Callable[..., StageCard], evaluate_reference: Callable[[Plan], StageCard],
             time_final: Callable[[Plan, RunReport], HeadToHead | None],
             on_card: Callable[[RunReport, StageCard | None], None] | None,
             on_gate_failure: GateHook | None, progress: Progress | None,
             keep_going: bool, publish: bool) -> RunReport:
    threads = plan.recipe.evaluation.latency.threads or default_threads()
    earlier = mark_interrupted_runs(reports_root / plan.recipe.name)
    root = Path(plan.recipe.output_root)
    for folder in [root, root / "teacher-cache", *root.glob("work/*")]:
        remove_orphans(folder)  # staging folders of runs that died (ours, owner gone)
    data = plan_data(plan)
    report = RunReport(recipe=plan.recipe.name, run_id=run_id or new_run_id(), started_at=_now(),
                       environment=environment(threads), owner=owner_record(),
                       data=data.accounting, warnings=[*earlier, *data.warnings()])
    folder = report_folder(reports_root, report)
    history = earlier_runs(folder)  # read once: it cannot change while this run goes on
    write_report(report, folder, history)

    def record(card: StageCard | None) -> None:
        write_report(report, folder, history)
        if on_card:
            on_card(report, card)

    try:
        current = plan.source
        if plan.reference_index is None:
            report.reference = evaluate_reference(plan)
            record(report.reference)
        for ps in plan.stages:
            card = run_stage(plan, ps.index, current, progress)
            current = card.model
            if ps.index == plan.reference_index:
                report.reference = evaluate_reference(plan)
                report.reference.info, report.reference.reused = card.info, card.reused
                report.reference.seconds = card.seconds
                report.reference.warnings = card.warnings + report.reference.warnings
                record(report.reference)
                continue
            if plan.reference_onnx and ps.config.output_format == "onnx" and \
                    report.reference_onnx is None:
                report.reference_onnx = run_stage(plan, -1, report.reference.model, progress)
                record(report.reference_onnx)
            share = plan.recipe.evaluation.probe_warn_increase
            for c in (card, *card.side):
                c.warnings += [w for w in [over_distillation(report.reference, c, share)] if w]
            report.stages.append(card)
            record(card)
    except BaseException as e:
        interrupted = isinstance(e, Interrupted | KeyboardInterrupt)
        report.status = "interrupted" if interrupted else "failed"
        report.finished_at = _now()
        report.error = (str(e) or "interrupted") if interrupted or isinstance(e, CompressError) \
            else f"{type(e).__name__}: {e}"
        record(None)
        raise
    report.head_to_head = time_final(plan, report)
    report.gates = check_gates(report, plan.recipe.gates)
    failed = [g for g in report.gates if not g.passed]
    report.status = "failed" if failed else "passed"  # --keep-going changes the exit, not this
    if failed:
        report.error = "gate failed: " + "; ".join(f"{g.gate}: {g.message}" for g in failed)
        if plan.recipe.diagnose.on_gate_failure and on_gate_failure is not None:
            report.diagnosis = on_gate_failure(plan, report)  # hooks never raise
    elif publish:
        try:
            publish_latest(report, reports_root, plan.recipe)
        except PublishError as e:
            report.status, report.error = "failed", str(e)
    report.finished_at = _now()
    record(None)
    if report.status == "failed" and not failed:
        raise CompressError(report.error or "not published")
    if failed and not keep_going:
        raise GateFailed(f"{report.error} (report: {folder / 'report.md'})")
    return report


def report_folder(reports_root: Path, report: RunReport) -> Path:
    return Path(reports_root) / report.recipe / report.run_id
