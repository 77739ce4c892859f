"""Plan and run a recipe: the one loop that both the CLI's local path and the Prefect flow use.

`make_plan` does every check that needs no heavy work (data loads and splits, the source model
exists, every output id is computed), so a bad recipe fails before anything runs. `execute` walks
the plan; the flow passes Prefect-task versions of `run_stage` and `evaluate_reference`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from compress.artifact import (
    INFO_FILE,
    ModelRef,
    atomic_write_text,
    canonical_hash,
    read_ref,
    source_ref,
    stage_hash,
    staging_dir,
    sweep_stale_temps,
    write_ref,
)
from compress.data import TaskData, load_task_data
from compress.errors import CompressError, GateFailed, RecipeError
from compress.measure import cpu_info, default_threads, environment
from compress.models import check_weights, wait_for_everyone
from compress.recipe import NOT_HASHED, STAGE_CONFIGS, ExportConfig, Recipe
from compress.report import (
    LATEST,
    RunReport,
    StageCard,
    check_gates,
    earlier_runs,
    write_report,
)

OUTPUT_FORMAT = {"finetune": "hf", "prune": "hf", "distill": "hf", "export": "onnx",
                 "quantize": "onnx", "bnb": "hf"}
USES_DATA = {"finetune", "prune", "distill"}  # prune: taylor/activation importance reads data


def uses_data(kind: str, config: dict[str, Any]) -> bool:
    """Whether the data's fingerprint is part of a stage's id (static INT8 calibrates on it)."""
    return kind in USES_DATA or (kind == "quantize" and config.get("method") == "static")


class PlannedStage(BaseModel):
    index: int  # -1 for the reference's ONNX export
    name: str
    kind: str
    config: dict[str, Any]
    hash: str
    parent: str
    output_dir: str

    def done(self) -> bool:
        return read_ref(Path(self.output_dir)) is not None


class Plan(BaseModel):
    recipe: Recipe
    source: ModelRef
    data_fingerprint: str
    num_labels: int
    train_size: int
    eval_size: int
    eval_hash: str
    reference_index: int | None  # last leading finetune stage; None: the source is the reference
    stages: list[PlannedStage]
    reference_onnx: PlannedStage | None

    def lines(self) -> list[str]:
        out = [f"source  {self.source.path}  ({self.source.format}, id {self.source.short})"]
        for s in self.stages:
            ref = "  ← reference (teacher)" if s.index == self.reference_index else ""
            state = "done, will be reused" if s.done() else "to run"
            out.append(f"[{s.index}] {s.name:<10} {s.kind:<9} → {s.output_dir}  ({state}){ref}")
        return out


def _plan_stage(index: int, name: str, kind: str, config: dict, parent: str, root: Path,
                data_fp: str | None) -> PlannedStage:
    hashed = {k: v for k, v in config.items() if k not in NOT_HASHED}
    h = stage_hash(parent, kind, hashed, data_fp if uses_data(kind, config) else None)
    return PlannedStage(index=index, name=name, kind=kind, config=config, hash=h, parent=parent,
                        output_dir=str(root / f"{kind}-{h[:12]}"))


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
    """Check the recipe against the world (files, columns, labels) and compute every output id."""
    p = Path(recipe.model.path)
    if not p.exists():
        if recipe.model.path.startswith(("/", ".", "~")):
            raise RecipeError(f"model.path: {recipe.model.path}: no such folder")
        _check_hub_model(recipe.model.path, recipe.model.revision)
    _check_writable(Path(recipe.output_root))
    source = source_ref(recipe.model.path, recipe.model.task, recipe.model.revision)
    if p.is_dir():
        check_weights(p)
    num_labels = recipe.model.num_labels
    if num_labels is None and p.is_dir() and recipe.model.task != "causal-lm":
        cfg = json.loads((p / "config.json").read_text())
        if "id2label" in cfg and len(cfg["id2label"]) >= 2:
            num_labels = len(cfg["id2label"])
    data = load_task_data(recipe.data, num_labels, recipe.model.task)
    root = Path(recipe.output_root)
    stages, parent, ref_index = [], source.hash, None
    for i, st in enumerate(recipe.stages):
        ps = _plan_stage(i, st.name or st.kind, st.kind, st.model_dump(mode="json"), parent,
                         root, data.fingerprint)
        if st.kind == "finetune" and ref_index == (i - 1 if i else None):
            ref_index = i
        stages.append(ps)
        parent = ps.hash
    reference_hash = stages[ref_index].hash if ref_index is not None else source.hash
    ref_onnx = None
    export = next((st for st in recipe.stages if st.kind == "export"), None)
    if recipe.evaluation.reference_onnx and export is not None:
        # exported exactly as the recipe exports its own model (opset, parity tolerance)
        cfg = ExportConfig.model_validate(export.model_dump(exclude={"name"}))
        ref_onnx = _plan_stage(-1, "reference (onnx fp32)", "export",
                               cfg.model_dump(mode="json"), reference_hash, root, None)
    threads = recipe.evaluation.latency.threads or default_threads()
    eval_hash = canonical_hash(recipe.evaluation.model_dump(mode="json"), data.fingerprint,
                               cpu_info()["model"], threads)
    return Plan(recipe=recipe, source=source, data_fingerprint=data.fingerprint,
                num_labels=data.num_labels, train_size=len(data.train),
                eval_size=len(data.eval), eval_hash=eval_hash, reference_index=ref_index,
                stages=stages, reference_onnx=ref_onnx)


def _data(plan: Plan) -> TaskData:
    return load_task_data(plan.recipe.data, plan.recipe.model.num_labels or plan.num_labels,
                          plan.recipe.model.task)


def reference_ref(plan: Plan) -> ModelRef:
    if plan.reference_index is None:
        return plan.source
    ref = read_ref(Path(plan.stages[plan.reference_index].output_dir))
    if ref is None:
        raise CompressError("the reference model (finetune output) is not built yet")
    return ref


def _evaluate(plan: Plan, ref: ModelRef) -> Any:
    """Metrics for a model, cached on disk by (model id, evaluation settings, machine)."""
    from compress.evaluate import Metrics, evaluate

    cache = Path(plan.recipe.output_root) / "metrics" / f"{ref.short}-{plan.eval_hash[:12]}.json"
    if cache.is_file():
        return Metrics.model_validate_json(cache.read_text())
    m = evaluate(ref, _data(plan), plan.recipe.evaluation,
                 trust_remote_code=plan.recipe.model.trust_remote_code)
    atomic_write_text(cache, m.model_dump_json(indent=2))
    return m


def evaluate_reference(plan: Plan) -> StageCard:
    ref = reference_ref(plan)
    name = "reference" if plan.reference_index is None else \
        f"reference ({plan.stages[plan.reference_index].name})"
    warnings = [f"trust_remote_code is on: Python code shipped with {plan.recipe.model.path} "
                "ran in this process (the recipe asked for it)"] \
        if plan.recipe.model.trust_remote_code else []
    return StageCard(name=name, kind="reference", index=plan.reference_index, model=ref,
                     metrics=_evaluate(plan, ref), reused=True, warnings=warnings)


Progress = Callable[[str, int, int], None]


TRAINING = {"finetune", "distill"}  # every rank of a distributed launch takes part in these


def _context(plan: Plan, ps: PlannedStage, progress: Progress | None) -> Any:
    from compress.stages import StageContext

    before_reference = plan.reference_index is not None and ps.index <= plan.reference_index
    return StageContext(recipe=plan.recipe, data=_data(plan), progress=progress,
                        reference=plan.source if before_reference else reference_ref(plan),
                        work_dir=Path(plan.recipe.output_root) / "work" /
                        Path(ps.output_dir).name)


def run_stage(plan: Plan, index: int, input_ref: ModelRef,
              progress: Progress | None = None) -> StageCard:
    """Run one stage (or find it done), then evaluate its output. The input is never touched."""

    ps = plan.reference_onnx if index == -1 else plan.stages[index]
    assert ps is not None
    out = Path(ps.output_dir)
    if ps.kind in TRAINING:
        wait_for_everyone()  # the other ranks (if any) train this stage with us: see follow()
    reused = ps.done()
    ref = read_ref(out) if reused else build_output(ps.kind, ps.config, ps.hash, input_ref,
                                                    _context(plan, ps, progress), out)
    assert ref is not None
    info = json.loads((out / INFO_FILE).read_text()) if (out / INFO_FILE).is_file() else {}
    warnings = info.pop("warnings", [])
    return StageCard(name=ps.name, kind=ps.kind, index=ps.index, model=ref,
                     metrics=_evaluate(plan, ref), info=info, reused=reused,
                     seconds=info.get("seconds", 0.0), warnings=warnings)


def build_output(kind: str, config: dict[str, Any], h: str, input_ref: ModelRef, ctx: Any,
                 out: Path) -> ModelRef:
    """Apply one stage into a staging folder, with its card facts and lineage, renamed to `out`
    only once complete; the stage's checkpoints go once it has succeeded."""
    from compress.stages import registry

    sweep_stale_temps(out.parent)
    t0 = time.perf_counter()
    with staging_dir(out) as tmp:
        info = registry()[kind](input_ref, STAGE_CONFIGS[kind].model_validate(config), ctx, tmp)
        info["seconds"] = round(time.perf_counter() - t0, 2)
        onnx_file = info.pop("onnx_file", None)
        atomic_write_text(tmp / INFO_FILE, json.dumps(info, indent=2, default=str))
        write_ref(tmp, ModelRef(path=str(out), format=OUTPUT_FORMAT[kind], task=input_ref.task,
                                hash=h, stage=kind, parent=input_ref.hash, config=config,
                                onnx_file=onnx_file))
    if ctx.work_dir is not None:
        shutil.rmtree(ctx.work_dir, ignore_errors=True)
    ref = read_ref(out)
    assert ref is not None
    return ref


def follow(plan: Plan) -> None:
    """What ranks other than 0 do under `torchrun`/`accelerate launch`: train their share of
    every training stage rank 0 runs, and nothing else (rank 0 prunes, exports, evaluates and
    writes every file). Each training stage starts with a barrier, after which rank 0's output
    of the stage before it is on disk to read."""
    from compress.stages import registry

    for ps in plan.stages:
        if ps.kind not in TRAINING:
            continue
        wait_for_everyone()
        if ps.done():
            continue
        prev = plan.source if ps.index == 0 else read_ref(Path(plan.stages[ps.index - 1]
                                                               .output_dir))
        if prev is None:
            raise CompressError(f"rank {os.environ.get('RANK')}: the input of stage "
                                f"{ps.index} is missing; did rank 0 fail?")
        cfg = STAGE_CONFIGS[ps.kind].model_validate(ps.config)
        with tempfile.TemporaryDirectory() as scratch:
            registry()[ps.kind](prev, cfg, _context(plan, ps, None), Path(scratch))


@contextlib.contextmanager
def recipe_lock(root: Path, recipe: str) -> Iterator[None]:
    """One run of a recipe at a time. flock dies with its process, so a killed run never leaves
    a stale lock; runs of other recipes, even into the same output root, never wait."""
    import fcntl

    path = Path(root) / "locks" / f"{recipe}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise CompressError(f"recipe {recipe!r} is already running ({holder}); wait for it "
                                "or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}, since {_now()}")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def publish_latest(report: RunReport, reports_root: Path) -> Path | None:
    """Copy the final model and its card to reports/<recipe>/latest, only for a passed run.

    The new copy is made beside the old one and swapped in by two renames, so `latest` is
    never half a model: the previous good one until the new one is complete (and, for the
    instant between the renames, absent).
    """
    final = report.final
    if report.status != "passed" or final is None:
        return None
    dest = Path(reports_root) / report.recipe / LATEST
    tmp = dest.with_name(f".tmp-latest-{secrets.token_hex(4)}")
    shutil.copytree(final.model.dir, tmp / "model")
    atomic_write_text(tmp / "report.json", report.model_dump_json(indent=2))
    old = dest.with_name(f".old-latest-{secrets.token_hex(4)}")
    if dest.exists():
        os.rename(dest, old)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def new_run_id() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def execute(plan: Plan, reports_root: Path, *, run_id: str | None = None,
            run_stage: Callable[..., StageCard] = run_stage,
            evaluate_reference: Callable[[Plan], StageCard] = evaluate_reference,
            on_card: Callable[[RunReport, StageCard], None] | None = None,
            progress: Progress | None = None, keep_going: bool = False) -> RunReport:
    """Run every stage in order, writing the report after each; check gates at the end.

    The report folder is reports_root/<recipe>/<run_id>. A stage failure is recorded in the
    report (status failed, the error) before it propagates; earlier outputs stay where they are.
    """
    with recipe_lock(Path(plan.recipe.output_root), plan.recipe.name):
        return _execute(plan, Path(reports_root), run_id=run_id, run_stage=run_stage,
                        evaluate_reference=evaluate_reference, on_card=on_card,
                        progress=progress, keep_going=keep_going)


def _execute(plan: Plan, reports_root: Path, *, run_id: str | None,
             run_stage: Callable[..., StageCard], evaluate_reference: Callable[[Plan], StageCard],
             on_card: Callable[[RunReport, StageCard], None] | None, progress: Progress | None,
             keep_going: bool) -> RunReport:
    threads = plan.recipe.evaluation.latency.threads or default_threads()
    report = RunReport(recipe=plan.recipe.name, run_id=run_id or new_run_id(), started_at=_now(),
                       environment=environment(threads))
    folder = report_folder(reports_root, report)
    history = earlier_runs(folder)  # read once: it cannot change while this run goes on
    write_report(report, folder, history)

    def record(card: StageCard) -> None:
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
                record(report.reference)
                continue
            if plan.reference_onnx and ps.kind == "export" and report.reference_onnx is None:
                report.reference_onnx = run_stage(plan, -1, report.reference.model, progress)
                record(report.reference_onnx)
            report.stages.append(card)
            record(card)
    except BaseException as e:
        report.status, report.finished_at = "failed", _now()
        report.error = str(e) if isinstance(e, CompressError) else f"{type(e).__name__}: {e}"
        write_report(report, folder, history)
        raise
    report.gates = check_gates(report, plan.recipe.gates)
    failed = [g for g in report.gates if not g.passed]
    report.status = "failed" if failed else "passed"  # --keep-going changes the exit, not this
    report.finished_at = _now()
    if failed:
        report.error = "gate failed: " + "; ".join(f"{g.gate}: {g.message}" for g in failed)
        if plan.recipe.diagnose.on_gate_failure:  # which layers cost the most; never raises
            from compress.diagnose import on_gate_failure

            report.diagnosis = on_gate_failure(plan, report)
    write_report(report, folder, history)
    if failed and not keep_going:
        raise GateFailed(f"{report.error} (report: {folder / 'report.md'})")
    if not failed:
        publish_latest(report, reports_root)
    return report


def report_folder(reports_root: Path, report: RunReport) -> Path:
    return Path(reports_root) / report.recipe / report.run_id
