"""Distillation throughput: what the teacher costs, and what caching its logits saves.

In one run, on the real MiniLM (pruned to 3 layers and half the FFN as the student; the full
6-layer model as the teacher) and the movie snippets, samples/s of:
  (a) plain fine-tuning of the student (no teacher),
  (b) KD with the live teacher (a forward pass every step),
  (c) KD from cached top-k teacher logits (teacher run once, beforehand; build time shown apart),
printed as cost ratios to (a). Goal: (c) <= 1.15x the cost of (a).

--lm: the same three on SmolLM2-135M (student: 2 of 30 layers and ~15% of the FFN pruned) and
Hamlet in blocks of 128 tokens, in tokens/s as well, and the training throughput in TFLOP/s
(6 x student parameters x tokens/s, plus 2 x teacher parameters x tokens/s when it runs live);
--peak-tflops (e.g. 989 for an H100's dense bf16) prints it as a fraction of the GPU's peak.
--compile on|both trains with torch.compile (both: each mode eager and compiled, one table).
Rates are steady-state (after the first tenth of the steps: compilation and warm-up); the
'whole run' column counts those steps too.
Usage: python benchmarks/distill_throughput.py [--lm] [--steps 40] [--batch-size 32]
       [--compile off|on|both]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from compress.assets import prepare, prepare_lm
from compress.data import load_task_data
from compress.distillation import CachedTeacher, LiveTeachers, build_teacher_cache, kd_loss
from compress.measure import default_threads
from compress.models import count_parameters, load_model, load_tokenizer
from compress.pipeline import make_plan, run_stage
from compress.recipe import parse_recipe
from compress.stages.distill import DistillConfig
from compress.train import LabelLoss, train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lm", action="store_true", help="SmolLM2 on Hamlet instead of MiniLM")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--compile", choices=("off", "on", "both"), default="off")
    args = ap.parse_args()
    torch.set_num_threads(default_threads())
    tmp = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    steps = args.steps or (10 if args.lm else 40)
    bs = args.batch_size or (4 if args.lm else 32)
    n = steps * bs
    if args.lm:
        lm = prepare_lm(Path("assets"))
        raw = {"name": "bench", "model": {"path": str(lm["smollm2"].resolve()),
                                          "task": "causal-lm"},
               "data": {"path": str(lm["hamlet"].resolve()), "max_length": 128,
                        "max_train_samples": n * 14, "max_eval_samples": 64},
               "stages": [{"kind": "prune", "depth": 2, "ffn": 0.15, "importance": "l2",
                           "round_to": 64}]}
    else:
        assets = prepare(Path("assets"))
        raw = {"name": "bench", "model": {"path": str(assets["minilm"].resolve()),
                                          "num_labels": 2},
               "data": {"path": str(assets["movie_snippets"].resolve()), "max_length": 64,
                        "max_train_samples": n, "max_eval_samples": 64},
               "stages": [{"kind": "prune", "drop_layers": [1, 3, 5], "ffn": 0.5}]}
    recipe = parse_recipe({**raw, "output_root": str(tmp)})
    plan = make_plan(recipe)
    student_ref = run_stage(plan, 0, plan.source).model
    task = recipe.model.task
    data = load_task_data(recipe.data, None if args.lm else 2, task)
    tok = load_tokenizer(student_ref.path)
    teacher = load_model(plan.source.path, task, data.num_labels)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    t0 = time.perf_counter()
    k = 32 if args.lm else 2
    cache = build_teacher_cache(teacher.to(device), plan.source, tok, data, tmp, k, bs)
    build_s = time.perf_counter() - t0

    rows = {}
    s_params = t_params = 0
    modes = {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]
    for compiled in modes:
        cfg = DistillConfig(max_steps=steps, batch_size=bs, alpha=0.5, temperature=2.0,
                            compile=compiled)
        kd = kd_loss(cfg.terms())  # exactly what the distill stage trains with
        tag = ", compiled" if compiled else ""
        for name, loss in (("(a) fine-tune, no teacher", LabelLoss()),
                           ("(b) KD, live teacher", LiveTeachers([teacher], kd, {})),
                           ("(c) KD, cached top-k", CachedTeacher(cache, kd))):
            student = load_model(student_ref.path, task, data.num_labels)
            s_params, t_params = count_parameters(student), count_parameters(teacher)
            _, stats = train(student, tok, data, cfg, loss, desc=name[:3])
            flops = 6 * s_params + (2 * t_params if isinstance(loss, LiveTeachers) else 0)
            steady = stats.get("steady", stats)  # after the first tenth of the steps
            rows[name + tag] = (steady["samples_per_s"], steady.get("tokens_per_s"),
                                flops * steady.get("tokens_per_s", 0) / 1e12,
                                stats["precision"], stats["samples_per_s"])
    base = next(iter(rows.values()))[0]
    length = 128 if args.lm else 64
    print(f"\n{'SmolLM2-135M' if args.lm else 'MiniLM'}: {steps} steps x batch {bs}, max length "
          f"{length}, {default_threads()} threads, {device}; student {s_params / 1e6:.1f}M, "
          f"teacher {t_params / 1e6:.1f}M parameters")
    print("steady state: after the first tenth of the steps (compilation, caches); 'whole "
          "run' counts them")
    head = (f"{'mode':40}{'precision':>10}{'whole run':>11}{'samples/s':>11}"
            f"{'cost vs (a)':>13}")
    if args.lm:
        head += f"{'tokens/s':>12}{'TFLOP/s':>10}" + ("  of peak" if args.peak_tflops else "")
    print(head)
    for name, (r, tps, tflops, precision, whole) in rows.items():
        line = f"{name:40}{precision:>10}{whole:>11.2f}{r:>11.2f}{base / r:>12.2f}x"
        if args.lm:
            line += f"{tps:>12.1f}{tflops:>10.3f}"
            if args.peak_tflops:
                line += f"  {tflops / args.peak_tflops:>7.1%}"
        print(line)
    print(f"teacher cache built once in {build_s:.1f}s for {len(cache)} examples "
          f"({len(cache) / build_s:.1f} examples/s)")


if __name__ == "__main__":
    main()
