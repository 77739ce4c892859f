"""bitsandbytes stage on a tiny BERT: quantized Linear layers, a smaller footprint, a saved folder
that reloads as the same quantized model. Without CUDA it runs on bitsandbytes' CPU backend when
that works, and is skipped with the stage's own message when it does not."""

from __future__ import annotations

import json

import pytest
import torch

from compress.errors import StageError
from compress.pipeline import make_plan, plan_data, run_stage
from compress.recipe import load_recipe
from compress.stage import StageContext
from compress.stages.bnb import BnbConfig

pytestmark = pytest.mark.integration

pytest.importorskip("bitsandbytes")


def run_bnb(write_recipe, tmp_path, stage: dict) -> tuple[dict, object]:
    """The stage's apply straight (not run_stage: evaluating the output is evaluate.py's)."""
    plan = make_plan(load_recipe(write_recipe([stage], name=f"bnb{stage['bits']}.yaml")))
    cfg = plan.stages[0].config
    ctx = StageContext(recipe=plan.recipe, data=plan_data(plan), reference=plan.source)
    out = tmp_path / f"out{stage['bits']}"
    out.mkdir()
    try:
        info = cfg.apply(plan.source, ctx, out)
    except StageError as e:
        if torch.cuda.is_available():
            raise
        pytest.skip(str(e))
    return info, out


@pytest.mark.parametrize("stage", [
    {"kind": "bnb", "bits": 8},
    {"kind": "bnb", "bits": 4, "quant_type": "nf4", "compute_dtype": "float32"},
    {"kind": "bnb", "bits": 4, "quant_type": "fp4", "double_quant": False,
     "skip_modules": ["pooler"]},
], ids=["int8", "nf4", "fp4-skip-pooler"])
def test_bnb_quantizes_saves_and_reloads(write_recipe, tmp_path, tiny_model, stage):
    import bitsandbytes as bnb
    from transformers import AutoModelForSequenceClassification

    info, out = run_bnb(write_recipe, tmp_path, stage)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes"
    assert qc["load_in_8bit" if stage["bits"] == 8 else "load_in_4bit"] is True
    assert "classifier" in qc["llm_int8_skip_modules"]
    assert (out / "tokenizer.json").is_file()
    again = AutoModelForSequenceClassification.from_pretrained(
        out, device_map={"": 0} if torch.cuda.is_available() else {"": "cpu"})
    kind = bnb.nn.Linear8bitLt if stage["bits"] == 8 else bnb.nn.Linear4bit
    layer = again.bert.encoder.layer[0]
    assert isinstance(layer.intermediate.dense, kind)
    assert isinstance(layer.attention.self.query, kind)
    assert type(again.classifier) is torch.nn.Linear  # the head stays float
    skipped_pooler = "pooler" in stage.get("skip_modules", [])
    assert (type(again.bert.pooler.dense) is torch.nn.Linear) == skipped_pooler
    expected_float = 2 if skipped_pooler else 1
    assert info["linear_layers"]["float"] == expected_float
    assert info["linear_layers"]["int8" if stage["bits"] == 8 else "4bit"] == 4 * 6 + 1 - (
        expected_float - 1)
    assert info["footprint_bytes"] < info["input_weights_bytes"]
    assert info["reload_max_diff"] < 1e-2
    assert (info["cuda_peak_mb"] is None) == (not torch.cuda.is_available())
    if stage["bits"] == 4:
        assert info["bnb"]["quant_type"] == stage["quant_type"]


@pytest.mark.gpu
def test_bnb_on_gpu_reports_cuda_memory(write_recipe, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    info, _ = run_bnb(write_recipe, tmp_path, {"kind": "bnb", "bits": 4})
    assert info["bnb"]["device"] == "cuda" and info["cuda_peak_mb"] > 0
    assert "warnings" not in info


def test_bnb_needs_a_pytorch_model(write_recipe):
    from compress.artifact import ModelRef

    plan = make_plan(load_recipe(write_recipe([{"kind": "bnb"}])))
    onnx_ref = ModelRef(path="/nowhere", format="onnx", task="sequence-classification",
                        hash="0" * 64, stage="export", onnx_file="model.onnx")
    ctx = StageContext(recipe=plan.recipe, data=plan_data(plan), reference=plan.source)
    with pytest.raises(StageError, match="bnb: needs a PyTorch"):
        BnbConfig().apply(onnx_ref, ctx, plan.source.dir)


@pytest.mark.parametrize("bits", [8, 4])
def test_bnb_through_the_pipeline_is_evaluated(write_recipe, tiny_model, bits):
    plan = make_plan(load_recipe(write_recipe([{"kind": "bnb", "bits": bits}])))
    card = run_stage(plan, 0, plan.source)
    assert card.metrics.runtime == "torch" and sum(card.info["linear_layers"].values()) > 0
    # 4-bit storage packs two weights per byte: the card still counts real parameters
    from transformers import AutoModelForSequenceClassification

    full = AutoModelForSequenceClassification.from_pretrained(tiny_model).num_parameters()
    assert card.metrics.parameters == full
    assert 0 <= card.metrics.value <= 100
