"""Demo benchmark: original vs final, from one run's report card (run the demo first).

Prints accuracy, the p50 latency ratio (ONNX Runtime fp32 original ÷ ONNX Runtime INT8 final,
batch 1 and batch N, same threads and inputs) and the size ratio, all measured in that one run.
Usage: python benchmarks/demo.py [reports/demo-sentiment/<run>]
"""

from __future__ import annotations

import sys
from pathlib import Path

from compress.report import p50, read_report


def main(path: str = "reports/demo-sentiment") -> int:
    p = Path(path)
    if not (p / "report.json").is_file():
        runs = sorted(d for d in p.glob("*") if (d / "report.json").is_file())
        if not runs:
            print(f"no report under {p}: run `make demo` first")
            return 1
        p = runs[-1]
    rep = read_report(p)
    ref, ref_onnx, final = rep.reference, rep.reference_onnx, rep.final
    if ref is None or final is None or ref_onnx is None:
        print(f"{p}: the run has no reference, ONNX reference or final stage")
        return 1
    batch = max(x.batch_size for x in final.metrics.latency)
    env = rep.environment
    print(f"run {rep.run_id} ({rep.status}); {env['cpu']['model']}, {env['threads']} threads")
    print(f"{'':28}{'accuracy':>10}{'p50 b1 ms':>12}{f'p50 b{batch} ms':>13}{'size MB':>10}")
    for name, c in (("original (torch fp32)", ref), ("original (ORT fp32)", ref_onnx),
                    (f"final ({final.name}, ORT)", final)):
        print(f"{name:28}{c.metrics.value:>10.2f}{p50(c, 1):>12.2f}{p50(c, batch):>13.2f}"
              f"{c.metrics.size_bytes / 1e6:>10.1f}")
    print(f"accuracy change: {final.metrics.value - ref.metrics.value:+.2f} points")
    print(f"p50 latency ratio (ORT fp32 original / final), batch 1: "
          f"{p50(ref_onnx, 1) / p50(final, 1):.2f}x; batch {batch}: "
          f"{p50(ref_onnx, batch) / p50(final, batch):.2f}x")
    ratio = ref.metrics.size_bytes / final.metrics.size_bytes
    print(f"size ratio (original / final): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
