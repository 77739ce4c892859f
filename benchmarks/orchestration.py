"""What Prefect costs: one tiny recipe through the flow vs. the same stages called directly.

Both runs use a fresh output root (no reuse, no metric cache) and the same tiny BERT and data
(built from configs, no hub). The flow runs as `compress run` does: the embedded server (its
start-up timed separately), one task per stage, artifacts after every card. Prints both wall
times, the overhead in % and the fixed cost in seconds (flow minus direct).

    python benchmarks/orchestration.py            # finetune, prune, distill, export, quantize
    python benchmarks/orchestration.py --repeat 2 # alternate the order, report the medians
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

STAGES = [
    {"kind": "finetune", "epochs": 1, "batch_size": 16, "learning_rate": 2e-3},
    {"kind": "prune", "ffn": 0.5, "heads": 0.25},
    {"kind": "distill", "max_steps": 30, "batch_size": 16},
    {"kind": "export"},
    {"kind": "quantize"},
]


def tiny_recipe(base: Path, name: str) -> dict:
    from compress.testing import make_sentiment_csv, make_tiny_bert

    model, data = base / "tiny-bert", base / "sentiment.csv"
    if not model.is_dir():
        make_tiny_bert(model)
        make_sentiment_csv(data, rows=240)
    return {"name": name, "model": {"path": str(model)},
            "data": {"path": str(data), "max_length": 32},
            "evaluation": {"batch_size": 32, "latency": {"batch_size": 4, "warmup": 1, "runs": 3,
                                                                "threads": 1}},
            "stages": STAGES, "output_root": str(base / f"out-{name}")}


def run_direct(base: Path, i: int) -> float:
    from compress.pipeline import execute, make_plan
    from compress.recipe import parse_recipe

    t0 = time.perf_counter()
    report = execute(make_plan(parse_recipe(tiny_recipe(base, f"direct-{i}"))), base / "reports")
    assert report.status == "passed", report.error
    return time.perf_counter() - t0


def run_flow(base: Path, i: int) -> float:
    from compress.recipe import parse_recipe
    from flows.compress_flow import compress_recipe

    t0 = time.perf_counter()
    result = compress_recipe(recipe=parse_recipe(tiny_recipe(base, f"flow-{i}")),
                             reports_dir=str(base / "reports"))
    assert result["status"] == "passed", result
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1, help="pairs of runs (order alternates)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: less noise on a shared machine)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)  # a tiny model gains nothing from more; noise does
    from compress.stages import registry
    from flows.embedded import embedded_server

    registry()  # every stage module imported before any timing, for both sides alike
    direct: list[float] = []
    flow: list[float] = []
    with tempfile.TemporaryDirectory(prefix="compress-bench-") as tmp:
        base = Path(tmp)
        tiny_recipe(base, "warm")
        t0 = time.perf_counter()
        with embedded_server() as url:
            server_s = time.perf_counter() - t0
            for i in range(args.repeat):
                pair = [("direct", run_direct), ("flow", run_flow)]
                for label, fn in pair if i % 2 == 0 else pair[::-1]:
                    (direct if label == "direct" else flow).append(fn(base, i))
    d, f = statistics.median(direct), statistics.median(flow)
    print(f"tiny recipe: {len(STAGES)} stages ({', '.join(s['kind'] for s in STAGES)}), "
          f"{args.repeat} run(s) each, {os.cpu_count()} CPU cores")
    print(f"direct (compress.pipeline.execute): {d:7.2f} s   runs: "
          + ", ".join(f"{x:.2f}" for x in direct))
    print(f"Prefect flow (compress-recipe):     {f:7.2f} s   runs: "
          + ", ".join(f"{x:.2f}" for x in flow))
    tasks = len(STAGES) + 2  # + the reference's evaluation and its fp32 ONNX export
    print(f"overhead: {100 * (f - d) / d:+.1f} %   fixed cost: {f - d:+.2f} s per run "
          f"({(f - d) / tasks:+.2f} s per task, {tasks} tasks)")
    where = "embedded server" if url else "server at PREFECT_API_URL"
    print(f"plus once per process: {where} start-up {server_s:.2f} s")


if __name__ == "__main__":
    main()
