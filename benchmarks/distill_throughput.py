"""Distillation throughput: what the teacher costs, and what caching its logits saves.

In one run, on the real MiniLM (pruned to 3 layers and half the FFN as the student; the full
6-layer model as the teacher) and the movie snippets, samples/s of:
  (a) plain fine-tuning of the student (no teacher),
  (b) KD with the live teacher (a forward pass every step),
  (c) KD from cached top-k teacher logits (teacher run once, beforehand; build time shown apart),
printed as cost ratios to (a). Goal: (c) <= 1.15x the cost of (a).
Usage: python benchmarks/distill_throughput.py [--steps 40] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from compress.assets import prepare
from compress.data import load_task_data
from compress.measure import default_threads
from compress.models import load_classifier, load_tokenizer
from compress.pipeline import make_plan, run_stage
from compress.recipe import DistillConfig, parse_recipe
from compress.stages import StageContext
from compress.stages.distill import build_teacher_cache, kd_loss
from compress.stages.finetune import label_loss
from compress.train import train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(default_threads())
    tmp = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    assets = prepare(Path("assets"))
    n = args.steps * args.batch_size
    recipe = parse_recipe({
        "name": "bench", "model": {"path": str(assets["minilm"].resolve()), "num_labels": 2},
        "data": {"path": str(assets["movie_snippets"].resolve()), "max_length": 64,
                 "max_train_samples": n, "max_eval_samples": 64},
        "stages": [{"kind": "prune", "drop_layers": [1, 3, 5], "ffn": 0.5}],
        "output_root": str(tmp),
    })
    plan = make_plan(recipe)
    student_ref = run_stage(plan, 0, plan.source).model
    data = load_task_data(recipe.data, 2)
    tok = load_tokenizer(student_ref.path)
    teacher = load_classifier(plan.source.path, 2)

    t0 = time.perf_counter()
    ctx = StageContext(recipe=recipe, data=data, reference=plan.source)
    cache = build_teacher_cache(teacher, plan.source, tok, ctx, 2, args.batch_size)
    build_s = time.perf_counter() - t0

    cfg = DistillConfig(max_steps=args.steps, batch_size=args.batch_size, alpha=0.5,
                        temperature=2.0)
    kd = kd_loss(cfg)  # exactly what the distill stage trains with
    rates = {}
    for name, loss, kw in (("(a) fine-tune, no teacher", label_loss, {}),
                           ("(b) KD, live teacher", kd, {"teachers": [teacher]}),
                           ("(c) KD, cached top-k", kd, {"teacher_cache": cache})):
        student = load_classifier(student_ref.path, 2)
        _, stats = train(student, tok, data, cfg, loss, desc=name[:3], **kw)
        rates[name] = stats["samples_per_s"]
    base = rates["(a) fine-tune, no teacher"]
    print(f"\n{args.steps} steps x batch {args.batch_size}, max length 64, "
          f"{default_threads()} threads, {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"{'mode':30}{'samples/s':>12}{'cost vs (a)':>14}")
    for name, r in rates.items():
        print(f"{name:30}{r:>12.1f}{base / r:>13.2f}x")
    print(f"teacher cache built once in {build_s:.1f}s for {len(data.train)} examples "
          f"({len(data.train) / build_s:.0f} examples/s)")


if __name__ == "__main__":
    main()
