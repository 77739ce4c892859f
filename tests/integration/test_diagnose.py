"""Sensitivity diagnosis on a planted culprit: one layer of a fine-tuned tiny BERT is rewired so
its fp32 output is unchanged but dynamic INT8 (per-tensor) destroys it; the diagnosis must rank
that layer first, suggest excluding it, and show up in a failed gate's report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from compress.arch import onnx_layer_group as group_of
from compress.diagnose import diagnose, on_gate_failure
from compress.errors import CompressError, GateFailed
from compress.pipeline import execute, make_plan, run_stage
from compress.recipe import load_recipe
from compress.report import Diagnosis
from tests.conftest import recipe_dict

pytestmark = pytest.mark.integration

CULPRIT = 2
GROUP = f"/bert/encoder/layer.{CULPRIT}"


def plant_int8_culprit(model: torch.nn.Module, layer: int) -> None:
    """Rewire FFN channels 0-2 of one layer: fp32 output unchanged, INT8 output wrecked.

    Channels 0 and 1 compute GELU(+-1000 x0), whose difference is 1000 x0; channel 2 computes
    GELU(x0 + 10) = x0 + 10 and its down-projection cancels the other two exactly in fp32. In
    INT8 the 1000 sets the per-tensor weight scale (~7.9), so channel 2's weight of 1 rounds to 0
    and 1000 x0 (times a random direction) leaks into the residual stream.
    """
    ffn_up, ffn_down = model.bert.encoder.layer[layer].intermediate.dense, \
        model.bert.encoder.layer[layer].output.dense
    u = torch.randn(ffn_down.weight.shape[0], generator=torch.Generator().manual_seed(0)) * 0.01
    with torch.no_grad():
        ffn_up.weight[0:3] = 0
        ffn_up.bias[0:3] = 0
        ffn_up.weight[0, 0], ffn_up.weight[1, 0], ffn_up.weight[2, 0] = 1000.0, -1000.0, 1.0
        ffn_up.bias[2] = 10.0
        ffn_down.weight[:, 0], ffn_down.weight[:, 1] = u, -u
        ffn_down.weight[:, 2] = -1000 * u
        ffn_down.bias += 10000 * u


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_model, tiny_data) -> Path:
    """A tiny BERT fine-tuned to 100% on the sentiment data, then planted."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("planted")
    r = root / "ft.yaml"
    r.write_text(yaml.safe_dump(recipe_dict(tiny_model, tiny_data, root / "ft-out", [
        {"kind": "finetune", "epochs": 4, "learning_rate": 2e-3, "batch_size": 16}])))
    plan = make_plan(load_recipe(r))
    card = run_stage(plan, 0, plan.source)
    assert card.metrics.value >= 95
    model = AutoModelForSequenceClassification.from_pretrained(card.model.path)
    ids = torch.tensor([[2, 10, 11, 12, 13, 3], [2, 20, 21, 22, 3, 0]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        plant_int8_culprit(model, CULPRIT)
        after = model(input_ids=ids).logits
    assert (after - before).abs().max() < 1e-3  # the fp32 model is the same model
    out = root / "planted"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(card.model.path).save_pretrained(out)
    shutil.rmtree(root / "ft-out")
    return out


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, planted, tiny_data) -> Path:
    """export + quantize (per-tensor) of the planted model, run once; returns the recipe."""
    root = tmp_path_factory.mktemp("quantized")
    r = root / "recipe.yaml"
    r.write_text(yaml.safe_dump(recipe_dict(
        planted, tiny_data, root / "out", [{"kind": "export"}, {"kind": "quantize"}],
        gates={"max_accuracy_drop": 1.0}, diagnose={"max_samples": 64, "top": 3})))
    plan = make_plan(load_recipe(r))
    ref = plan.source
    for s in plan.stages:
        ref = run_stage(plan, s.index, ref).model
    return r


def test_layer_groups_from_node_names():
    assert group_of("/bert/encoder/layer.3/attention/self/query/MatMul") == \
        "/bert/encoder/layer.3"
    assert group_of("/model/layers.11/mlp/down_proj/MatMul") == "/model/layers.11"
    assert group_of("/bert/embeddings/word_embeddings/Gather") == "/bert/embeddings"
    assert group_of("/bert/pooler/dense/Gemm") == "/bert/pooler"
    assert group_of("/classifier/Gemm") == "/classifier"
    assert group_of("MatMul_12") == "(other)"


def test_planted_culprit_is_ranked_first(quantized):
    plan = make_plan(load_recipe(quantized))
    d = diagnose(plan, 1)
    print(json.dumps(d.model_dump(), indent=1))  # the numbers, for -s
    assert d.method == "accuracy" and d.metric == "accuracy" and d.samples == 24
    assert d.baseline == 100.0 and d.compressed <= 70  # the plant really costs accuracy
    assert d.rows[0].group == GROUP and d.rows[0].delta <= -30
    assert all(r.delta >= -5 for r in d.rows[1:])
    assert d.rows[0].output_error > 100 * max(r.output_error for r in d.rows[1:])
    assert d.exclude == [f"{GROUP}/*"] and d.recovered >= 95
    assert f"exclude: ['{GROUP}/*']" in d.suggestion
    assert {r.group for r in d.rows} >= {f"/bert/encoder/layer.{i}" for i in range(4)}
    assert diagnose(plan).stage_index == 1  # by default: the stage that lost the most


def test_failed_gate_report_names_the_culprit(quantized, tmp_path):
    plan = make_plan(load_recipe(quantized))
    with pytest.raises(GateFailed, match="max_accuracy_drop"):
        execute(plan, tmp_path / "reports", run_id="r1", on_gate_failure=on_gate_failure)
    folder = tmp_path / "reports" / "tiny" / "r1"
    rep = json.loads((folder / "report.json").read_text())
    assert rep["status"] == "failed"
    d = Diagnosis.model_validate(rep["diagnosis"])
    assert d.error is None and d.stage_index == 1 and d.rows[0].group == GROUP
    md = (folder / "report.md").read_text()
    assert "## Diagnosis: stages[1] (quantize)" in md and f"exclude: ['{GROUP}/*']" in md
    assert f"| 1 | `{GROUP}` |" in md
    assert f"{GROUP}/*" in (folder / "report.html").read_text()


def test_a_broken_diagnosis_never_hides_the_gate_failure(quantized, tmp_path, monkeypatch):
    import compress.diagnose

    def boom(*a, **k):
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(compress.diagnose, "diagnose", boom)
    plan = make_plan(load_recipe(quantized))
    with pytest.raises(GateFailed):
        execute(plan, tmp_path / "reports", run_id="r2", on_gate_failure=on_gate_failure)
    rep = json.loads((tmp_path / "reports" / "tiny" / "r2" / "report.json").read_text())
    assert rep["diagnosis"]["error"] == "RuntimeError: probe exploded"
    assert "No layer-by-layer diagnosis: RuntimeError: probe exploded" in \
        (tmp_path / "reports" / "tiny" / "r2" / "report.md").read_text()


def test_cli_diagnose_prints_the_ranking_and_refuses_unrun_stages(quantized, tmp_path):
    from compress.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["diagnose", str(quantized), "--stage", "1", "--top", "2"],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    ranked = [ln for ln in r.output.splitlines() if ln.startswith(("| 1 |", "| 2 |", "| 3 |"))]
    assert len(ranked) == 2 and ranked[0].startswith(f"| 1 | `{GROUP}` |")
    r = runner.invoke(app, ["diagnose", str(quantized), "--json"], catch_exceptions=False)
    assert r.exit_code == 0 and json.loads(r.output)["exclude"] == [f"{GROUP}/*"]
    r = runner.invoke(app, ["diagnose", str(quantized), "--stage", "0"], catch_exceptions=False)
    assert r.exit_code == 1
    assert "this export configuration cannot be probed layer by layer yet (supported: " \
        "quantize (method dynamic))" in r.output
    fresh = tmp_path / "fresh"
    r = runner.invoke(app, ["diagnose", str(quantized), "--stage", "1", "--output-root",
                            str(fresh)], catch_exceptions=False)
    assert r.exit_code == 1 and "run the recipe first" in r.output


def test_unknown_stage_index_is_refused(quantized):
    with pytest.raises(CompressError, match="the recipe has stages 0 to 1"):
        diagnose(make_plan(load_recipe(quantized)), 5)


def _with_gates(recipe: Path, tmp_path: Path, **gates) -> Path:
    raw = yaml.safe_load(recipe.read_text())
    raw["gates"] = gates
    out = tmp_path / f"gates-{len(list(tmp_path.glob('gates-*')))}.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


def _search_block_fits(recipe: Path, block: str) -> dict:
    """The card's search block pasted into the recipe: a valid search over that recipe."""
    from compress.search import Space

    raw = yaml.safe_load(recipe.read_text())
    raw.update(yaml.safe_load(block))
    Space.of(load_recipe_from(raw, recipe.parent))
    return raw["search"]


def load_recipe_from(raw: dict, folder: Path):
    p = folder / "pasted.yaml"
    p.write_text(yaml.safe_dump(raw))
    return load_recipe(p)


def test_an_exclude_that_breaks_the_size_gate_is_not_suggested(quantized, tmp_path):
    """Excluding the culprit wins the accuracy back and makes the model bigger: with a size
    gate it would then fail, the diagnosis says so and does not suggest it as the fix."""
    from compress.report import deltas

    plain = make_plan(load_recipe(_with_gates(quantized, tmp_path, max_accuracy_drop=1.0)))
    rep = execute(plain, tmp_path / "reports", run_id="a", keep_going=True,
                  on_gate_failure=on_gate_failure)
    d = rep.diagnosis
    assert d.gate == "max_accuracy_drop" and d.conflicts == []
    assert d.suggestion.startswith("stages[1] (quantize): add `exclude:")
    assert d.recovered_bytes > d.compressed_bytes  # float layers take room
    block = _search_block_fits(quantized, d.search)
    assert block["space"]["stages[quantize].exclude"] == [[], [f"{GROUP}/*"]]
    assert block["space"]["stages[quantize].per_channel"] == [False, True]

    now = deltas(rep, rep.final)["size_ratio"]
    with_exclude = now * d.compressed_bytes / d.recovered_bytes
    gated = make_plan(load_recipe(_with_gates(quantized, tmp_path, max_accuracy_drop=1.0,
                                              min_size_reduction=(now + with_exclude) / 2)))
    rep = execute(gated, tmp_path / "reports", run_id="b", keep_going=True,
                  on_gate_failure=on_gate_failure)
    assert [g.passed for g in rep.gates] == [False, True]  # accuracy fails, size passes
    d = rep.diagnosis
    assert len(d.conflicts) == 1 and d.conflicts[0].startswith("min_size_reduction: about ")
    assert "not a fix on its own" in d.suggestion and "add `exclude" not in d.suggestion
    md = (tmp_path / "reports" / "tiny" / "b" / "report.md").read_text()
    assert "breaks min_size_reduction" in md and "```yaml\nsearch:" in md
    assert "stages[quantize].exclude" in (tmp_path / "reports" / "tiny" / "b" /
                                          "report.html").read_text()


def test_a_size_gate_failure_is_explained_in_size_not_accuracy(quantized, tmp_path):
    plan = make_plan(load_recipe(_with_gates(quantized, tmp_path, max_accuracy_drop=100.0,
                                             min_size_reduction=50.0)))
    rep = execute(plan, tmp_path / "reports", run_id="c", keep_going=True,
                  on_gate_failure=on_gate_failure)
    d = rep.diagnosis
    assert (d.method, d.gate, d.rows) == ("size", "min_size_reduction", [])
    assert "accuracy" not in d.suggestion and "MB or less passes" in d.suggestion
    assert "By stage: export " in d.suggestion and "quantize " in d.suggestion
    assert "no stage of this recipe has a field that removes more" in d.suggestion
    md = (tmp_path / "reports" / "tiny" / "c" / "report.md").read_text()
    assert "## Diagnosis: min_size_reduction" in md and "layer group" not in md

    raw = yaml.safe_load(quantized.read_text())  # with a stage that can remove more
    raw["stages"].insert(0, {"kind": "prune", "ffn": 0.25})
    raw["gates"] = {"min_size_reduction": 50.0}
    (tmp_path / "pruned.yaml").write_text(yaml.safe_dump(raw))
    rep = execute(make_plan(load_recipe(tmp_path / "pruned.yaml")), tmp_path / "reports",
                  run_id="d", keep_going=True, on_gate_failure=on_gate_failure)
    d = rep.diagnosis
    assert d.method == "size" and "the fields in the search block below" in d.suggestion
    block = _search_block_fits(tmp_path / "pruned.yaml", d.search)
    assert block["objectives"] == ["size", "metric"]
    assert block["space"]["stages[prune].ffn"] == {"low": 0.25, "high": 0.5}
    assert block["space"]["stages[prune].depth"] == [0, 1]
