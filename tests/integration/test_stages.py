"""Stages on tiny models built from configs: real pruning, real export parity, real INT8."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from compress.artifact import read_ref
from compress.errors import StageError
from compress.pipeline import make_plan, run_stage
from compress.recipe import load_recipe
from compress.testing import run_stages as run_all

pytestmark = pytest.mark.integration


def heads_of(model) -> list[int]:
    return [layer.attention.self.num_attention_heads for layer in model.bert.encoder.layer]


def test_prune_removes_heads_ffn_and_layers_and_reloads(write_recipe, tiny_model):
    _, [card] = run_all(write_recipe([{"kind": "prune", "heads": 0.5, "ffn": 0.5,
                                       "drop_layers": [0, 3], "importance": "l1"}]))
    before = AutoModelForSequenceClassification.from_pretrained(tiny_model)
    after = AutoModelForSequenceClassification.from_pretrained(card.model.path)
    assert heads_of(before) == [4, 4, 4, 4]
    assert heads_of(after) == [2, 2]
    assert after.config.intermediate_size == 64 and after.config.num_hidden_layers == 2
    assert after.bert.encoder.layer[0].intermediate.dense.weight.shape == (64, 64)
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    with torch.inference_mode():
        assert after(input_ids=ids).logits.shape == (1, 2)
    assert card.metrics.parameters < 0.6 * before.num_parameters()
    assert card.info["reload_max_diff"] < 1e-5
    assert "Minitron" in card.warnings[0]  # removed more than a third in one step


def test_pruning_never_touches_its_input(write_recipe, tiny_model):
    stamp = {p.name: p.stat().st_mtime_ns for p in tiny_model.iterdir()}
    run_all(write_recipe([{"kind": "prune", "ffn": 0.5}]))
    assert {p.name: p.stat().st_mtime_ns for p in tiny_model.iterdir()} == stamp


@pytest.mark.parametrize(("stage", "message"), [
    ({"kind": "prune", "heads": 0.1}, "prune.heads: 0.1 of 4 heads rounds to none"),
    ({"kind": "prune", "drop_layers": [9]}, "prune.drop_layers: layer 9 does not exist"),
    ({"kind": "prune", "ffn": 0.01}, "removes nothing"),
])
def test_impossible_prune_is_refused_clearly(write_recipe, stage, message):
    plan = make_plan(load_recipe(write_recipe([stage])))
    with pytest.raises(StageError, match=message):
        run_stage(plan, 0, plan.source)
    assert not read_ref(plan.stages[0].output_dir)  # nothing half-made is left as done


def test_taylor_and_random_importance_differ(write_recipe):
    _, [t] = run_all(write_recipe([{"kind": "prune", "heads": 0.5, "importance": "taylor"}],
                                  "t.yaml"))
    _, [r] = run_all(write_recipe([{"kind": "prune", "heads": 0.5, "importance": "random",
                                    "seed": 3}], "r.yaml"))
    assert t.info["heads_removed"] != r.info["heads_removed"] or t.model.hash != r.model.hash


def test_export_matches_pytorch_and_quantize_shrinks(write_recipe):
    _, [prune, export, quant] = run_all(write_recipe([
        {"kind": "prune", "ffn": 0.5, "heads": 0.5}, {"kind": "export"},
        {"kind": "quantize", "per_channel": True}]))
    assert export.model.format == "onnx" and export.info["parity"]["max_abs_diff"] < 1e-4
    assert export.metrics.runtime == "onnxruntime"
    assert abs(export.metrics.value - prune.metrics.value) < 1e-6  # same predictions
    import onnx

    q = onnx.load(str(quant.model.onnx_path))
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in q.graph.node)
    # tiny models are mostly embeddings, which dynamic INT8 leaves in fp32
    assert quant.metrics.size_bytes < 0.75 * export.metrics.size_bytes
    assert (quant.model.dir / "tokenizer.json").is_file()


def test_export_parity_failure_fails_the_stage(write_recipe, monkeypatch):
    from compress.evaluate import OrtPredictor

    real = OrtPredictor.logits
    monkeypatch.setattr(OrtPredictor, "logits", lambda self, b: real(self, b) + np.float32(0.1))
    plan = make_plan(load_recipe(write_recipe([{"kind": "export", "atol": 1e-3}])))
    with pytest.raises(StageError, match=r"ONNX output differs from PyTorch by 0.1 \(atol 0.001\)"):
        run_stage(plan, 0, plan.source)
    assert not read_ref(plan.stages[0].output_dir)


def test_distillation_recovers_a_pruned_student(write_recipe):
    _, cards = run_all(write_recipe([
        {"kind": "finetune", "epochs": 4, "learning_rate": 2e-3, "batch_size": 16},
        {"kind": "prune", "ffn": 0.75, "heads": 0.5, "drop_layers": [1, 2],
         "importance": "random"},
        {"kind": "distill", "epochs": 4, "learning_rate": 2e-3, "batch_size": 16,
         "temperature": 2.0, "alpha": 0.5}]))
    teacher, pruned, student = (c.metrics.value for c in cards)
    assert teacher >= 95
    assert student >= 90 and student >= pruned
    tr = cards[2].info["training"]
    assert tr["loss_curve"][-1][1] < tr["loss_curve"][0][1]


def test_cards_count_macs_the_same_way_in_torch_and_onnx(write_recipe):
    plan, [pruned, exported, quant] = run_all(write_recipe([
        {"kind": "prune", "ffn": 0.5}, {"kind": "export"}, {"kind": "quantize"}]))
    from compress.pipeline import evaluate_reference

    ref = evaluate_reference(plan).metrics
    assert ref.macs and pruned.metrics.macs < ref.macs
    # 4 layers x 2 FFN matmuls x 64 hidden x 64 channels removed, per token, x 32 tokens
    assert ref.macs - pruned.metrics.macs == 4 * 2 * 64 * 64 * 32
    assert exported.metrics.macs == pruned.metrics.macs == quant.metrics.macs


def test_trust_remote_code_is_off_unless_asked_and_warned_on_the_card(write_recipe, tmp_path):
    import yaml

    from compress.pipeline import evaluate_reference
    from compress.render import render_markdown
    from compress.report import RunReport

    p = write_recipe([{"kind": "export"}])
    plain = make_plan(load_recipe(p))
    assert not plain.recipe.model.trust_remote_code
    assert evaluate_reference(plain).warnings == []
    raw = yaml.safe_load(p.read_text())
    raw["model"]["trust_remote_code"] = True
    p.write_text(yaml.safe_dump(raw))
    card = evaluate_reference(make_plan(load_recipe(p)))
    assert "trust_remote_code is on" in card.warnings[0]
    md = render_markdown(RunReport(recipe="tiny", run_id="r", started_at="now", reference=card))
    assert "trust_remote_code is on" in md


def test_the_recipes_metric_leads_the_card_and_every_score_is_kept(tmp_path, tiny_model):
    """macro-F1 / F1 of a named class: what imbalanced data needs; the card keeps accuracy."""
    import csv

    import yaml

    from compress.pipeline import evaluate_reference
    from tests.conftest import recipe_dict

    data = tmp_path / "named.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([[f"the movie was {'great' if i % 4 == 0 else 'dull'} {i}",
                      "pos" if i % 4 == 0 else "neg"] for i in range(80)])
    raw = recipe_dict(tiny_model, data, tmp_path / "out", [{"kind": "prune", "ffn": 0.5}])
    raw["evaluation"] = {**raw["evaluation"], "metric": "f1", "positive_label": "pos"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    plan = make_plan(load_recipe(tmp_path / "r.yaml"))
    m = evaluate_reference(plan).metrics
    assert m.metric == "f1" and set(m.scores) == {"accuracy", "macro_f1", "f1"}
    assert m.value == m.scores["f1"]
    raw["evaluation"]["metric"] = "macro_f1"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    m2 = evaluate_reference(make_plan(load_recipe(tmp_path / "r.yaml"))).metrics
    assert m2.metric == "macro_f1" and m2.value == m.scores["macro_f1"]
