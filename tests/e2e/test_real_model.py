"""The real shipped model (all-MiniLM-L6-v2) on the real movie snippets, on a small budget.

Marked slow: CI runs it once. It checks what the demo promises on real weights: pruning really
removes layers and channels, export parity holds, INT8 is far smaller, and every card is written.
"""

from __future__ import annotations

import json

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from compress.assets import prepare

    try:
        return prepare(tmp_path_factory.mktemp("assets"))
    except Exception as e:  # the packages are installed by `make install`
        pytest.skip(f"real assets not installed: {e}")


def test_minilm_prune_distill_export_quantize(assets, tmp_path):
    from typer.testing import CliRunner

    from compress.cli import app

    recipe = {
        "name": "minilm-small", "model": {"path": str(assets["minilm"]), "num_labels": 2},
        "data": {"path": str(assets["movie_snippets"]), "max_length": 48,
                 "max_train_samples": 512, "max_eval_samples": 256},
        "evaluation": {"batch_size": 64, "latency": {"batch_size": 8, "warmup": 2, "runs": 5}},
        "gates": {"min_size_reduction": 4.0},
        "stages": [{"kind": "finetune", "max_steps": 16, "batch_size": 32},
                   {"kind": "prune", "drop_layers": [1, 3, 5], "ffn": 0.5},
                   {"kind": "distill", "max_steps": 16, "batch_size": 32},
                   {"kind": "export"}, {"kind": "quantize"}],
        "output_root": str(tmp_path / "out"),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    r = CliRunner().invoke(app, ["run", "--local", str(path), "--reports-dir",
                                 str(tmp_path / "reports")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    [rep] = (tmp_path / "reports" / "minilm-small").glob("2*/report.json")  # not latest/
    assert (tmp_path / "reports" / "minilm-small" / "latest" / "model").is_dir()
    card = json.loads(rep.read_text())
    prune, distill, export, quant = card["stages"]
    assert prune["info"]["before"]["layers"] == 6 and prune["info"]["after"]["layers"] == 3
    assert prune["info"]["after"]["ffn"] == 768
    assert prune["metrics"]["parameters"] < 0.75 * card["reference"]["metrics"]["parameters"]
    assert export["info"]["parity"]["max_abs_diff"] < 1e-4
    assert quant["metrics"]["size_bytes"] * 4 < card["reference"]["metrics"]["size_bytes"]
    assert card["gates"][0]["passed"] and card["status"] == "passed"
