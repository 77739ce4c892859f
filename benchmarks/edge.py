"""Edge benchmark: how much of the demo's speed-up comes from INT8 alone, and how much from
pruning + distillation on top (run `make demo` first).

In ONE process, with the same threads, inputs and batch sizes (compress.evaluate.evaluate), it
measures four ONNX Runtime models of the demo recipe:
  fp32          the fine-tuned teacher exported to ONNX (the plan's reference_onnx if built)
  dynamic int8  the teacher, dynamic INT8 (the recipe's quantize target and per_channel)
  static int8   the teacher, static INT8 QDQ calibrated on the training split
  final         the demo's last stage: pruned + distilled + INT8
and prints accuracy, size, p50/p90 at batch 1 and batch N, and ratios against fp32. Goal: the
final model >= 5x lower p50 than fp32 with >= 97% of its accuracy (PASS/MISS per batch size).
Variants it builds live under <output_root>/bench-edge/ (cheap to rebuild; reused when present).
Usage: python benchmarks/edge.py [recipes/demo-sentiment.yaml]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

GOAL_SPEEDUP, GOAL_ACCURACY = 5.0, 97.0
MISSING = "run `make demo` first: benchmarks/edge.py measures the demo's own models"


def build(plan: Any, data: Any, name: str, config: Any, parent: Any,
          reference: Any, root: Path) -> Any:
    """One variant (an export or quantize stage applied outside the recipe), kept under `root`
    by content id like pipeline outputs, so a second run reuses it."""
    from compress.artifact import read_ref
    from compress.pipeline import build_output
    from compress.stage import StageContext

    h = config.output_id(parent.hash, data.fingerprint)  # the pipeline's own id rule
    out = root / f"{name}-{h[:12]}"
    done = read_ref(out)
    if done is not None:
        return done
    ctx = StageContext(recipe=plan.recipe, data=data, reference=reference,
                       work_dir=root / "work" / out.name)
    return build_output(config, h, parent, ctx, out)


def variants(plan: Any, data: Any, teacher: Any, final: Any, root: Path,
             fp32: Any | None = None) -> dict[str, Any]:
    """fp32 / dynamic int8 / static int8 of the teacher (built if absent) and the final model."""
    from compress.stages.export import ExportConfig
    from compress.stages.quantize import QuantizeConfig

    if fp32 is None:
        fp32 = build(plan, data, "teacher-fp32", ExportConfig(), teacher, teacher, root)
    q = next((s for s in reversed(plan.recipe.stages) if s.kind == "quantize"), None)
    target = q.target if q is not None else "avx512_vnni"
    per_channel = q.per_channel if q is not None else True
    dyn = QuantizeConfig(method="dynamic", target=target, per_channel=per_channel)
    sta = QuantizeConfig(method="static", target=target, per_channel=per_channel)
    return {
        "fp32 (teacher)": fp32,
        "dynamic int8 (teacher)": build(plan, data, "teacher-dynamic", dyn, fp32,
                                        teacher, root),
        "static int8 (teacher)": build(plan, data, "teacher-static", sta, fp32,
                                       teacher, root),
        "final (pruned+distilled int8)": final,
    }


def measure(refs: dict[str, Any], data: Any, spec: Any) -> dict[str, Any]:
    """Metrics for every variant, one after another in this process (same threads, inputs)."""
    from compress.evaluate import evaluate

    out = {}
    for name, ref in refs.items():
        print(f"measuring {name} ({ref.path}) ...", flush=True)
        out[name] = evaluate(ref, data, spec)
    return out


def _lat(m: Any, batch: int) -> Any:
    return next(x for x in m.latency if x.batch_size == batch)


def table(metrics: dict[str, Any], batch: int) -> tuple[list[str], dict[int, bool]]:
    """Printable lines, and per batch size whether the final model meets the goal."""
    names = list(metrics)
    base, final = metrics[names[0]], metrics[names[-1]]
    lines = [f"{'':31}{'acc':>7}{'MB':>7}{'p50 b1':>9}{'p90 b1':>9}{f'p50 b{batch}':>9}"
             f"{f'p90 b{batch}':>9}{'x b1':>7}{f'x b{batch}':>7}{'size x':>8}{'acc %':>8}"]
    for name, m in metrics.items():
        b1, bn = _lat(m, 1), _lat(m, batch)
        x1, xn = _lat(base, 1).p50_ms / b1.p50_ms, _lat(base, batch).p50_ms / bn.p50_ms
        lines.append(
            f"{name:31}{m.value:>7.2f}{m.size_bytes / 1e6:>7.1f}{b1.p50_ms:>9.2f}"
            f"{b1.p90_ms:>9.2f}{bn.p50_ms:>9.2f}{bn.p90_ms:>9.2f}{x1:>6.2f}x{xn:>6.2f}x"
            f"{base.size_bytes / m.size_bytes:>7.2f}x{100 * m.value / base.value:>7.1f}%")
    acc = 100 * final.value / base.value
    ok = {}
    for b in sorted({1, batch}):
        speed = _lat(base, b).p50_ms / _lat(final, b).p50_ms
        ok[b] = speed >= GOAL_SPEEDUP and acc >= GOAL_ACCURACY
        lines.append(f"goal, batch {b}: final {speed:.2f}x lower p50 than fp32 (>= "
                     f"{GOAL_SPEEDUP:g}x), {acc:.1f}% of its accuracy (>= {GOAL_ACCURACY:g}%): "
                     f"{'PASS' if ok[b] else 'MISS'}")
    return lines, ok


def main(recipe: str = "recipes/demo-sentiment.yaml") -> int:
    from compress.artifact import read_ref
    from compress.data import load_task_data
    from compress.errors import CompressError
    from compress.measure import cpu_info, default_threads
    from compress.pipeline import make_plan, run_stage
    from compress.recipe import load_recipe

    try:
        plan = make_plan(load_recipe(recipe))
    except CompressError as e:
        print(f"{recipe}: {e}\n{MISSING}")
        return 1
    kinds = [s.kind for s in plan.stages]
    if plan.reference_index is None or "distill" not in kinds:
        print(f"{recipe}: needs a finetune (teacher) and a distill stage")
        return 1
    last_distill = max(i for i, k in enumerate(kinds) if k == "distill")
    teacher = read_ref(Path(plan.stages[plan.reference_index].output_dir))
    student = read_ref(Path(plan.stages[last_distill].output_dir))
    if teacher is None or student is None:
        which = "teacher (finetune)" if teacher is None else "distill"
        print(f"the demo's {which} output is not on disk under {plan.recipe.output_root}: "
              f"{MISSING}")
        return 1
    final = student
    for s in plan.stages[last_distill + 1:]:  # export + quantize: cheap, built if missing
        done = read_ref(Path(s.output_dir))
        final = done if done is not None else run_stage(plan, s.index, final).model
    if final.format != "onnx":
        print(f"{recipe}: the last stage ({plan.stages[-1].kind}) is not an ONNX model")
        return 1
    fp32 = read_ref(Path(plan.reference_onnx.output_dir)) if plan.reference_onnx else None

    data = load_task_data(plan.recipe.data, plan.recipe.model.num_labels or plan.num_labels,
                          plan.recipe.model.task)
    root = Path(plan.recipe.output_root) / "bench-edge"
    refs = variants(plan, data, teacher, final, root, fp32)
    spec = plan.recipe.evaluation
    metrics = measure(refs, data, spec)
    cpu, seq = cpu_info(), spec.latency.sequence_length or data.spec.max_length
    print(f"\n{cpu['model']}; {spec.latency.threads or default_threads()} threads; flags "
          f"{' '.join(cpu['flags']) or 'none of interest'}; sequence length {seq}; "
          f"{metrics[next(iter(metrics))].eval_samples} eval examples")
    lines, _ = table(metrics, spec.latency.batch_size)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
