"""LM edge benchmark: what a causal LM user waits for, on the SmolLM2 demo (run `make demo-lm`).

Decode speed is the number: time to first token and tokens/s while streaming (prompt 32 tokens,
64 new tokens, batch 1, greedy), every variant timed in turns, round after round, in one window,
so the speed-ups are ratios of the same moments. Perplexity is the card's (the demo's eval
blocks). Variants, all ONNX Runtime on CPU:
  fp32 optimum (baseline)     the original exported by optimum with its KV cache: the baseline
  fp32 (demo's reference)     the demo's own fp32 reference when it exports another way (genai)
  int4 rtn acc4 (optimum graph)  optimum's export, weight-only INT4 (block 32, int8 compute)
  final (demo)                the demo's final model (its INT4 stage on its export)
  genai int4 (reference)      onnxruntime-genai's model builder on the original, INT4 by the
                              builder (lm_head float, block 32, asymmetric, accuracy_level 4)
  genai int4 (student)        the same builder on the demo's distilled student, when the demo
                              prunes and distills
The genai rows need onnxruntime-genai (pinned in the dev extras); they are skipped without it.
Goal (the edge-speed issue): decode tokens/s >= 2x the fp32 reference, perplexity <= +25%.
Usage: python benchmarks/edge_lm.py [recipes/demo-smollm2.yaml] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GOAL_SPEEDUP, GOAL_PPL = 2.0, 0.25
BASE, FINAL = "fp32 optimum (baseline)", "final (demo)"
DEMO_REF = "fp32 (demo's reference)"
PROMPT, NEW = 32, 64
MISSING = "run `make demo-lm` first: benchmarks/edge_lm.py measures the demo's own models"


class Genai:
    """An onnxruntime-genai model timed like compress.decode.decode_speed: TTFT = generator
    set-up + prefill + first token; decode rate = (new - 1) / (last token - first token)."""

    def __init__(self, folder: Path) -> None:
        import onnxruntime_genai as og

        self.og, self.model = og, og.Model(str(folder))

    def run(self, ids: Any) -> tuple[float, float]:
        import numpy as np

        og = self.og
        prompt = np.asarray(ids, dtype=np.int32).reshape(1, -1)
        t0 = time.perf_counter()
        params = og.GeneratorParams(self.model)
        total = prompt.shape[1] + NEW
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(self.model, params)
        gen.append_tokens(prompt)
        stamps = []
        while not gen.is_done():
            gen.generate_next_token()
            stamps.append(time.perf_counter())
        return stamps[0] - t0, (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)

    def perplexity(self, blocks: list[list[int]]) -> float:
        import math

        import numpy as np

        og, nll, n = self.og, 0.0, 0
        for row in blocks:
            params = og.GeneratorParams(self.model)
            params.set_search_options(max_length=len(row) + 8)
            gen = og.Generator(self.model, params)
            gen.append_tokens(np.asarray([row], dtype=np.int32))
            logits = np.asarray(gen.get_output("logits"), dtype=np.float64)[0, :-1]
            top = logits.max(-1, keepdims=True)
            logz = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
            nll += float((logz - logits[np.arange(len(row) - 1), row[1:]]).sum())
            n += len(row) - 1
        return math.exp(nll / n)


def build_genai(hf_folder: Path, out: Path, threads: int) -> Path | None:
    """onnxruntime-genai's builder (INT4, lm_head float: like our INT4 stage), reused if built."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return None
    if not (out / "genai_config.json").is_file():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i",
                        str(hf_folder), "-o", str(out), "-p", "int4", "-e", "cpu",
                        "--extra_options", "op_types_to_quantize=MatMul",
                        "nodes_to_exclude=/lm_head/MatMul", "is_symmetric=false",
                        "accuracy_level=4", "block_size=32"],
                       check=True, capture_output=True, timeout=1800)
    cfg_file = out / "genai_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    cfg_file.write_text(json.dumps(cfg, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.edge import build
    from compress.artifact import dir_bytes, read_ref
    from compress.data import encode
    from compress.decode import decode_speed
    from compress.errors import CompressError
    from compress.evaluate import ort_causal_lm, perplexity, predictor
    from compress.measure import cpu_info, default_threads
    from compress.models import load_tokenizer
    from compress.pipeline import make_plan, plan_data
    from compress.recipe import load_recipe
    from compress.stages.export import ExportConfig
    from compress.stages.quantize import QuantizeConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("recipe", nargs="?", default="recipes/demo-smollm2.yaml")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    try:
        plan = make_plan(load_recipe(args.recipe))
    except CompressError as e:
        print(f"{args.recipe}: {e}\n{MISSING}")
        return 1
    outs = [read_ref(Path(s.output_dir)) for s in plan.stages]
    ref_onnx = read_ref(Path(plan.reference_onnx.output_dir)) if plan.reference_onnx else None
    students = [o for s, o in zip(plan.stages, outs, strict=True) if s.kind == "distill"]
    if ref_onnx is None or outs[-1] is None or (students and students[-1] is None):
        print(f"the demo's outputs are not on disk under {plan.recipe.output_root}: {MISSING}")
        return 1
    data = plan_data(plan)
    threads = plan.recipe.evaluation.latency.threads or default_threads()
    torch.set_num_threads(1)  # ORT does the work; torch only runs generate's bookkeeping
    root = Path(plan.recipe.output_root) / "bench-edge-lm"
    int4 = QuantizeConfig(method="int4", block_size=32, accuracy_level=4)
    # the baseline is optimum's fp32 export of the original, whatever the demo's export route:
    # the project's reference before the genai route existed, and the issue's
    optimum = build(plan, data, "reference-optimum", ExportConfig(atol=1e-3, parity_samples=8),
                    plan.source, plan.source, root)
    onnx = {BASE: optimum}
    if ref_onnx.hash != optimum.hash:
        onnx[DEMO_REF] = ref_onnx
    onnx |= {"int4 rtn acc4 (optimum graph)": build(plan, data, "reference-int4", int4, optimum,
                                                   plan.source, root),
             FINAL: outs[-1]}
    tok = load_tokenizer(plan.source.path)
    blocks = [list(r["input_ids"]) for r in encode(data.eval, tok, data.spec.max_length)]
    prompt = torch.tensor([blocks[0][:PROMPT]])
    runners: dict[str, Any] = {}
    rows: dict[str, dict[str, float]] = {}
    for name, ref in onnx.items():
        print(f"perplexity of {name} ...", flush=True)
        ppl, _ = perplexity(predictor(ref, 0, threads), data, tok, 8)
        rows[name] = {"ppl": ppl, "mb": dir_bytes(ref.dir, (".onnx", ".onnx_data", ".data"))
                      / 1e6}
        lm = ort_causal_lm(ref.dir, ref.onnx_file or "model.onnx", threads)
        runners[name] = lambda m=lm: _ort_run(decode_speed, m, prompt)
    genai = [("genai int4 (reference)", plan.source)]
    if students:  # a demo that prunes and distills: the builder on its student too
        genai.append(("genai int4 (student)", students[-1]))
    for name, hf in genai:
        folder = build_genai(hf.dir, root / name.split()[-1].strip("()"), threads)
        if folder is None:
            print("onnxruntime-genai is not installed: the genai rows are skipped")
            break
        g = Genai(folder)
        print(f"perplexity of {name} ...", flush=True)
        rows[name] = {"ppl": g.perplexity(blocks), "mb": dir_bytes(folder, (".onnx", ".data"))
                      / 1e6}
        runners[name] = lambda g=g: g.run(prompt[0].tolist())
    for run in runners.values():  # warm-up
        run()
    per: dict[str, list[tuple[float, float]]] = {n: [] for n in runners}
    names = list(runners)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            per[name].append(runners[name]())
    base_rates = [x[1] for x in per[BASE]]
    cpu = cpu_info()
    print(f"\n{cpu['model']}; {threads} threads (torch 1); prompt {PROMPT}, {NEW} new tokens, "
          f"batch 1, greedy; {args.rounds} rounds in turns; {len(blocks)} eval blocks")
    print(f"{'variant':28}{'ppl':>8}{'Δppl':>8}{'MB':>8}{'tok/s':>8}{'TTFT ms':>9}"
          f"  decode speed-up (rounds)")
    base_ppl = rows[BASE]["ppl"]
    verdicts = {}
    for name in names:
        rates, ttft = [x[1] for x in per[name]], [x[0] for x in per[name]]
        ratios = [a / b for a, b in zip(rates, base_rates, strict=True)]
        x = statistics.median(ratios)
        rise = rows[name]["ppl"] / base_ppl - 1
        verdicts[name] = (x, rise)
        print(f"{name:28}{rows[name]['ppl']:>8.2f}{rise:>+8.1%}{rows[name]['mb']:>8.1f}"
              f"{statistics.median(rates):>8.1f}{1000 * statistics.median(ttft):>9.0f}  "
              f"{x:>5.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
    for name in [n for n in (FINAL, "genai int4 (student)") if n in verdicts]:
        x, rise = verdicts[name]
        ok = x >= GOAL_SPEEDUP and rise <= GOAL_PPL
        print(f"goal, {name}: decode {x:.2f}x the fp32 optimum export (>= {GOAL_SPEEDUP:g}x), "
              f"perplexity {rise:+.1%} (<= +{GOAL_PPL:.0%}): {'PASS' if ok else 'MISS'}")
    if DEMO_REF in per:  # against the demo's own fp32 reference (another export route)
        own = [a[1] / b[1] for a, b in zip(per[FINAL], per[DEMO_REF], strict=True)]
        x = statistics.median(own)
        print(f"goal, {FINAL} vs {DEMO_REF}: decode {x:.2f}x ({min(own):.2f}-{max(own):.2f}; "
              f">= {GOAL_SPEEDUP:g}x): {'PASS' if x >= GOAL_SPEEDUP else 'MISS'}")
    return 0


def _ort_run(decode_speed: Any, model: Any, prompt: Any) -> tuple[float, float]:
    out = decode_speed(model, prompt, new_tokens=NEW, runs=1, warmup=0, torch_threads=1)
    return out["per_run"]["ttft_s"][0], out["per_run"]["decode_tokens_per_s"][0]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
