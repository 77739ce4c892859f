"""The real causal LM (SmolLM2-135M, converted from its GGUF file) on Hamlet, on a tiny budget.

Marked slow: CI runs it once. What it checks on real weights: the GGUF conversion reloads, depth
and FFN pruning of a GQA decoder reload and still generate, distillation from a cached top-k
teacher runs per token, the KV-cache ONNX export generates the same greedy tokens as PyTorch,
and INT4 (MatMulNBits) shrinks it; every card carries a finite perplexity.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def assets():
    from compress.assets import prepare_lm

    try:
        return prepare_lm(ROOT / "assets")  # converted once, shared with `make demo-lm`
    except Exception as e:  # the packages are installed by `make install`
        pytest.skip(f"real LM assets not installed: {e}")


def test_smollm2_prune_distill_export_int4(assets, tmp_path):
    from typer.testing import CliRunner

    from compress.cli import app

    recipe = {
        "name": "smollm2-small", "model": {"path": str(assets["smollm2"]), "task": "causal-lm"},
        "data": {"path": str(assets["hamlet"]), "max_length": 64, "max_train_samples": 120},
        "evaluation": {"batch_size": 4, "max_samples": 6,
                       "latency": {"batch_size": 2, "warmup": 1, "runs": 2}},
        "gates": {"min_size_reduction": 3.0},
        "stages": [{"kind": "prune", "depth": 2, "ffn": 0.15, "round_to": 64,
                    "importance": "activation", "calibration_samples": 4},
                   {"kind": "distill", "max_steps": 2, "batch_size": 2, "alpha": 1.0,
                    "teacher_cache": True, "top_k": 16},
                   {"kind": "export", "atol": 1e-3, "parity_samples": 2},
                   {"kind": "quantize", "method": "int4"}],
        "output_root": str(tmp_path / "out"),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    r = CliRunner().invoke(app, ["run", str(path), "--local", "--reports-dir",
                                 str(tmp_path / "reports")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    [run] = [p for p in (tmp_path / "reports" / "smollm2-small").iterdir()
             if p.name != "latest" and not p.name.startswith(".")]  # .lock: the recipe lock
    report = json.loads((run / "report.json").read_text())
    ref, prune, distill, export, quant = [report["reference"], *report["stages"]]
    for card in (ref, prune, distill, export, quant):
        assert card["metrics"]["metric"] == "perplexity"
        assert math.isfinite(card["metrics"]["value"]) and card["metrics"]["value"] > 1
    assert ref["metrics"]["parameters"] > 130e6 > prune["metrics"]["parameters"]
    assert prune["info"]["after"]["layers"] == 28 and len(prune["info"]["layers_dropped"]) == 2
    assert prune["info"]["after"]["kv_heads_per_layer"][0] == 3  # GQA groups untouched
    assert distill["info"]["training"]["teacher"] == "cached top-k"
    gen = export["info"]["parity"]["generation"]
    assert gen["prompts"] and all(a == b for a, b in zip(gen["torch"], gen["onnx"], strict=True))
    assert quant["info"]["quantization"]["method"] == "int4"
    assert quant["metrics"]["size_bytes"] * 2.5 < export["metrics"]["size_bytes"]
