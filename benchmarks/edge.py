"""Edge benchmark: what each compression lever is worth on the demo task, alone and combined,
against the fine-tuned teacher in ONNX Runtime fp32 (run `make demo` first).

In ONE process, with the same threads and inputs (compress.evaluate.evaluate), it builds and
measures ONNX Runtime variants of the demo recipe's models:
  fp32 (teacher)           the fine-tuned teacher exported to ONNX: the baseline
  + fusion                 the teacher with ONNX Runtime's transformer fusions (optimize stage)
  + dynamic int8           the teacher, dynamic INT8 (the recipe's target and per_channel)
  + static int8            the teacher, static INT8 QDQ (embedding tables included)
  + vocab trim             the teacher with its vocabulary trimmed to the training text's ids
  + prune & distill        the demo's distilled student, exported, fp32
  final (all levers)       the demo's own last stage
For each: accuracy, size, p50 at batch 1 (fixed length and the eval texts' median length), and
the speed-up over the baseline timed HEAD TO HEAD: every variant's batch-1 call in turns, round
after round, in one window; the ratio is the median of the rounds' ratios, with their range.
Goal (the edge-speed issue): final >= 97% of the teacher's accuracy, >= 8x smaller, >= 5x lower
p50 at batch 1; each goal line says PASS or MISS with the numbers.
Variants it builds live under <output_root>/bench-edge/ (reused when present).
Usage: python benchmarks/edge.py [recipes/demo-sentiment.yaml]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

GOAL_ACCURACY, GOAL_SMALLER, GOAL_SPEEDUP = 97.0, 8.0, 5.0
BASE = "fp32 (teacher)"
FINAL = "final (all levers)"
MISSING = "run `make demo` first: benchmarks/edge.py measures the demo's own models"


def build(plan: Any, data: Any, name: str, config: Any, parent: Any,
          reference: Any, root: Path) -> Any:
    """One variant (a stage applied outside the recipe), kept under `root` by content id like
    pipeline outputs (the pipeline's own id rule and builder), so a second run reuses it."""
    from compress.artifact import read_ref
    from compress.manifest import verify
    from compress.pipeline import build_output
    from compress.stage import StageContext

    h = config.output_id(parent.hash, data.fingerprint)
    out = root / f"{name}-{h[:12]}"
    done = read_ref(out)
    if done is not None and not verify(out):
        return done
    ctx = StageContext(recipe=plan.recipe, data=data, reference=reference,
                       work_dir=root / "work" / out.name)
    return build_output(config, h, parent, ctx, out)


def variants(plan: Any, data: Any, teacher: Any, student: Any, final: Any, root: Path,
             fp32: Any | None = None) -> dict[str, Any]:
    """Every lever alone on the teacher, the student, and the final model (built if absent)."""
    from compress.stages.export import ExportConfig
    from compress.stages.optimize import OptimizeConfig
    from compress.stages.quantize import QuantizeConfig
    from compress.stages.trim_vocab import TrimVocabConfig

    export = next((s for s in plan.recipe.stages if s.kind == "export"), ExportConfig())
    if fp32 is None:
        fp32 = build(plan, data, "teacher-fp32", export, teacher, teacher, root)
    q = next((s for s in reversed(plan.recipe.stages) if s.kind == "quantize"), None)
    target = q.target if q is not None else "avx512_vnni"
    per_channel = q.per_channel if q is not None else True
    dyn = QuantizeConfig(method="dynamic", target=target, per_channel=per_channel)
    sta = QuantizeConfig(method="static", target=target, per_channel=per_channel)
    trimmed = build(plan, data, "teacher-vocab", TrimVocabConfig(), teacher, teacher, root)
    return {
        BASE: fp32,
        "+ fusion": build(plan, data, "teacher-fused", OptimizeConfig(), fp32, teacher, root),
        "+ dynamic int8": build(plan, data, "teacher-dynamic", dyn, fp32, teacher, root),
        "+ static int8": build(plan, data, "teacher-static", sta, fp32, teacher, root),
        "+ vocab trim": build(plan, data, "teacher-vocab-fp32", export, trimmed, teacher, root),
        "+ prune & distill": build(plan, data, "student-fp32", export, student, teacher, root),
        FINAL: final,
    }


def measure(refs: dict[str, Any], data: Any, spec: Any) -> dict[str, Any]:
    """Metrics for every variant, one after another in this process (same threads, inputs)."""
    from compress.evaluate import evaluate

    out = {}
    for name, ref in refs.items():
        print(f"measuring {name} ({ref.path}) ...", flush=True)
        out[name] = evaluate(ref, data, spec)
    return out


def head_to_head(refs: dict[str, Any], data: Any, spec: Any, rounds: int = 7
                 ) -> dict[str, tuple[float, float, float]]:
    """Speed-up over the baseline per variant: (median, lowest, highest) of the rounds'
    ratios, every variant timed in turns at batch 1 and the fixed length in one window."""
    import numpy as np

    from compress.evaluate import fixed_batch, predictor
    from compress.measure import default_threads, interleaved
    from compress.models import load_tokenizer

    threads = spec.latency.threads or default_threads()
    length = spec.latency.sequence_length or data.spec.max_length
    calls = {}
    for name, ref in refs.items():
        batch = fixed_batch(load_tokenizer(ref.path), list(data.eval["text"][:1]), 1, length)
        pred = predictor(ref, data.num_labels, threads)
        calls[name] = (lambda p=pred, b=batch: p.logits(b))
    ms = interleaved(calls, rounds=rounds, runs=max(3, spec.latency.runs // 3),
                     warmup=spec.latency.warmup)
    out = {}
    for name, times in ms.items():
        ratios = [a / max(b, 1e-9) for a, b in zip(ms[BASE], times, strict=True)]
        out[name] = (float(np.median(ratios)), min(ratios), max(ratios))
    return out


def _lat(m: Any, batch: int, length: str = "max") -> Any:
    return next((x for x in m.latency if x.batch_size == batch and x.length == length), None)


def table(metrics: dict[str, Any], speed: dict[str, tuple[float, float, float]]
          ) -> tuple[list[str], dict[str, bool]]:
    """Printable lines, and whether the final model meets each goal."""
    base, final = metrics[BASE], metrics[FINAL]
    med = _lat(base, 1, "median")
    lines = [f"{'lever':20}{'acc':>7}{'acc %':>8}{'MB':>7}{'smaller':>9}{'p50 b1':>9}"
             f"{f'p50 @{med.sequence_length if med else 0}':>9}  speed-up b1 head to head "
             f"(rounds)"]
    for name, m in metrics.items():
        b1, mm = _lat(m, 1), _lat(m, 1, "median")
        x, lo, hi = speed[name]
        lines.append(f"{name:20}{m.value:>7.2f}{100 * m.value / base.value:>7.1f}%"
                     f"{m.size_bytes / 1e6:>7.1f}{base.size_bytes / m.size_bytes:>8.2f}x"
                     f"{b1.p50_ms:>9.2f}{(mm.p50_ms if mm else float('nan')):>9.2f}  "
                     f"{x:>5.2f}x ({lo:.2f}-{hi:.2f})")
    kept = 100 * final.value / base.value
    smaller = base.size_bytes / final.size_bytes
    x, lo, hi = speed[FINAL]
    ok = {"accuracy": kept >= GOAL_ACCURACY, "size": smaller >= GOAL_SMALLER,
          "speed": x >= GOAL_SPEEDUP}
    lines += [f"goal: final keeps {kept:.1f}% of the teacher's accuracy (>= {GOAL_ACCURACY:g}%): "
              f"{'PASS' if ok['accuracy'] else 'MISS'}",
              f"goal: final is {smaller:.2f}x smaller on disk (>= {GOAL_SMALLER:g}x): "
              f"{'PASS' if ok['size'] else 'MISS'}",
              f"goal: final p50 at batch 1 is {x:.2f}x lower, head to head (rounds {lo:.2f}-"
              f"{hi:.2f}x) (>= {GOAL_SPEEDUP:g}x): {'PASS' if ok['speed'] else 'MISS'}"]
    return lines, ok


def main(recipe: str = "recipes/demo-sentiment.yaml") -> int:
    from compress.artifact import read_ref
    from compress.errors import CompressError
    from compress.measure import cpu_info, default_threads
    from compress.pipeline import make_plan, plan_data, run_stage
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
    for s in plan.stages[last_distill + 1:]:  # vocab, export, ...: cheap, built if missing
        done = read_ref(Path(s.output_dir))
        final = done if done is not None else run_stage(plan, s.index, final).model
    if final.format != "onnx":
        print(f"{recipe}: the last stage ({plan.stages[-1].kind}) is not an ONNX model")
        return 1
    fp32 = read_ref(Path(plan.reference_onnx.output_dir)) if plan.reference_onnx else None

    data = plan_data(plan)
    root = Path(plan.recipe.output_root) / "bench-edge"
    refs = variants(plan, data, teacher, student, final, root, fp32)
    spec = plan.recipe.evaluation
    metrics = measure(refs, data, spec)
    print("timing every variant head to head ...", flush=True)
    speed = head_to_head(refs, data, spec)
    cpu, seq = cpu_info(), spec.latency.sequence_length or data.spec.max_length
    print(f"\n{cpu['model']}; {spec.latency.threads or default_threads()} threads; flags "
          f"{' '.join(cpu['flags']) or 'none of interest'}; fixed length {seq}; "
          f"{metrics[BASE].eval_samples} eval examples")
    lines, _ = table(metrics, speed)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
