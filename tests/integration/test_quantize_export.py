"""Causal-LM export with generation parity, static INT8 (QDQ), weight-only INT4, exclusions.

LM stages are applied directly (not through run_stage) so these tests do not depend on how the
evaluator scores LMs; the classifier tests go through the pipeline like test_stages.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

from compress.artifact import ModelRef, read_ref
from compress.errors import StageError
from compress.evaluate import SESSION_FILE, ort_causal_lm
from compress.pipeline import make_plan, plan_data, run_stage
from compress.recipe import load_recipe
from compress.stage import StageContext
from compress.stages.export import greedy
from compress.testing import run_stages as run_all
from tests.conftest import recipe_dict

pytestmark = pytest.mark.integration


def ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


# ----------------------------------------------------------------------------- causal LM


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from compress.testing import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def lm_text(tmp_path_factory) -> Path:
    from compress.testing import make_text_file

    return make_text_file(tmp_path_factory.mktemp("data") / "text.txt", lines=300)


def lm_plan(tmp: Path, model: Path, text: Path, stages: list[dict]):
    rd = recipe_dict(model, text, tmp / "out", stages)
    rd["model"]["task"] = "causal-lm"
    p = tmp / "lm.yaml"
    p.write_text(yaml.safe_dump(rd))
    return make_plan(load_recipe(p))


def apply_stage(plan, index: int, ref: ModelRef) -> tuple[ModelRef, dict]:
    """One stage's apply into its output folder, no evaluation."""
    ps = plan.stages[index]
    out = Path(ps.output_dir)
    out.mkdir(parents=True)
    ctx = StageContext(recipe=plan.recipe, data=plan_data(plan), reference=plan.source,
                       work_dir=out.parent / "work" / out.name)
    info = ps.config.apply(ref, ctx, out)
    new = ModelRef(path=str(out), format="onnx", task=ref.task, hash=ps.hash, stage=ps.kind,
                   parent=ref.hash, config=ps.config.model_dump(mode="json"),
                   onnx_file=info.pop("onnx_file"))
    return new, info


@pytest.fixture(scope="module")
def lm_export(tmp_path_factory, tiny_llama, lm_text):
    """The tiny llama exported once; the quantize tests start from it."""
    tmp = tmp_path_factory.mktemp("lm-export")
    plan = lm_plan(tmp, tiny_llama, lm_text, [{"kind": "export"}])
    ref, info = apply_stage(plan, 0, plan.source)
    return tmp, ref, info


def test_lm_export_matches_pytorch_generation(lm_export):
    _, ref, info = lm_export
    par = info["parity"]
    assert ref.onnx_file == "model.onnx" and info["onnx_files"] == ["model.onnx"]
    assert par["max_abs_diff"] <= par["atol"] and par["samples"] >= 3
    gen = par["generation"]
    assert gen["match"] and gen["torch"] == gen["onnx"] and len(gen["prompts"]) == 3
    assert all(len(t) == 8 for t in gen["torch"])
    for f in ("config.json", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json"):
        assert (ref.dir / f).is_file(), f
    inputs = {i.name for i in onnx.load(str(ref.onnx_path), load_external_data=False).graph.input}
    assert "past_key_values.0.key" in inputs  # exported with the KV cache (GQA: 2 kv heads)


def test_lm_genai_route_exports_a_graph_optimum_runs_and_int4_quantizes(tmp_path, tiny_llama,
                                                                        lm_text):
    """onnxruntime-genai's builder as the export route: the same parity checks pass (logits and
    greedy generation through ORTModelForCausalLM), and the INT4 stage quantizes its graph."""
    pytest.importorskip("onnxruntime_genai")
    plan = lm_plan(tmp_path, tiny_llama, lm_text,
                   [{"kind": "export", "route": "genai", "atol": 1e-3},
                    {"kind": "quantize", "method": "int4", "block_size": 16}])
    ref, info = apply_stage(plan, 0, plan.source)
    assert "GroupQueryAttention" in ops(ref.onnx_path)  # the builder's fused attention
    assert info["parity"]["max_abs_diff"] <= 1e-3 and info["parity"]["generation"]["match"]
    q_ref, q_info = apply_stage(plan, 1, ref)
    assert "MatMulNBits" in ops(q_ref.onnx_path)
    assert q_info["quantization"]["excluded_by_default"] == ["/lm_head/MatMul"]
    check_lm_runs(q_ref)


def test_lm_export_generation_mismatch_fails(tmp_path, tiny_llama, lm_text, monkeypatch):
    from optimum.onnxruntime import ORTModelForCausalLM

    real = ORTModelForCausalLM.generate

    def off_by_one(self, *a, **k):
        out = real(self, *a, **k)
        out[:, -1] = (out[:, -1] + 1) % self.config.vocab_size
        return out

    monkeypatch.setattr(ORTModelForCausalLM, "generate", off_by_one)
    plan = lm_plan(tmp_path, tiny_llama, lm_text, [{"kind": "export"}])
    with pytest.raises(StageError, match=r"export: greedy generation differs from PyTorch on "
                                         r"prompt 1 of 3: PyTorch \[.*\] vs ONNX \[.*\]"):
        apply_stage(plan, 0, plan.source)


def quantize_lm(lm_export, tmp: Path, tiny_llama, lm_text, stage: dict):
    """Quantize the exported tiny llama with `stage` (a fresh plan whose stage 1 it is)."""
    _, ref, _ = lm_export
    plan = lm_plan(tmp, tiny_llama, lm_text, [{"kind": "export"}, {"kind": "quantize", **stage}])
    return apply_stage(plan, 1, ref)


def check_lm_runs(ref: ModelRef) -> None:
    """The quantized folder loads in ORTModelForCausalLM, scores a block, generates greedily."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ref.path)
    model = ort_causal_lm(ref.dir, ref.onnx_file, threads=1)
    ids = torch.tensor([tok("the movie was good and fun . the film was")["input_ids"]])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    assert tuple(logits.shape) == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    [new] = greedy(model, [ids[0].tolist()], tok.pad_token_id)
    assert len(new) >= 1 and all(0 <= t < len(tok) for t in new)


def test_lm_int4_matmulnbits_keeps_lm_head_float(lm_export, tmp_path, tiny_llama, lm_text):
    ref, info = quantize_lm(lm_export, tmp_path, tiny_llama, lm_text,
                            {"method": "int4", "block_size": 16})
    q = info["quantization"]
    assert ref.onnx_file == "model_int4.onnx"
    assert "MatMulNBits" in ops(ref.onnx_path)
    assert q["excluded_by_default"] == ["/lm_head/MatMul"]
    nodes = onnx.load(str(ref.onnx_path)).graph.node
    [head] = [n for n in nodes if n.name == "/lm_head/MatMul"]
    assert head.op_type == "MatMul"  # still float
    assert sum(n.op_type == "MatMulNBits" for n in nodes) == 4 * 7  # q k v o gate up down
    assert (ref.dir / SESSION_FILE).is_file() and (ref.dir / "tokenizer.json").is_file()
    assert not (ref.dir / "lineage.json").exists()
    check_lm_runs(ref)


@pytest.mark.parametrize("symmetric", [False, True])
def test_lm_int4_zero_points_only_when_asymmetric(lm_export, tmp_path, tiny_llama, lm_text,
                                                  symmetric):
    ref, info = quantize_lm(lm_export, tmp_path, tiny_llama, lm_text,
                            {"method": "int4", "block_size": 16, "symmetric": symmetric})
    assert info["quantization"]["weights"].startswith(
        "int4 (symmetric" if symmetric else "int4 (asymmetric")
    nbits = [n for n in onnx.load(str(ref.onnx_path)).graph.node if n.op_type == "MatMulNBits"]
    # MatMulNBits inputs: A, B, scales[, zero_points]: asymmetric blocks carry a zero point
    has_zp = [len(n.input) > 3 and bool(n.input[3]) for n in nbits]
    assert has_zp and all(z != symmetric for z in has_zp)


@pytest.mark.parametrize("algorithm", ["rtn", "hqq", "gptq"])
def test_lm_int4_algorithms_and_accuracy_level(lm_export, tmp_path, tiny_llama, lm_text,
                                               algorithm):
    ref, info = quantize_lm(lm_export, tmp_path, tiny_llama, lm_text,
                            {"method": "int4", "block_size": 16, "algorithm": algorithm,
                             "accuracy_level": 4, "calibration_samples": 4})
    q = info["quantization"]
    assert q["algorithm"] == algorithm and q["accuracy_level"] == 4
    nodes = onnx.load(str(ref.onnx_path)).graph.node
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * 7
    assert all({a.name: a.i for a in n.attribute}.get("accuracy_level") == 4 for n in nbits)
    [head] = [n for n in nodes if n.name == "/lm_head/MatMul"]
    assert head.op_type == "MatMul"  # excluded from every algorithm, GPTQ's included
    if algorithm == "gptq":
        assert q["calibration"].endswith("blocks (gptq)")
    check_lm_runs(ref)


def test_lm_dynamic_int8_excludes_lm_head_and_embeddings(lm_export, tmp_path, tiny_llama,
                                                         lm_text):
    ref, info = quantize_lm(lm_export, tmp_path, tiny_llama, lm_text, {"method": "dynamic"})
    q = info["quantization"]
    assert set(q["excluded_by_default"]) == {"/lm_head/MatMul", "/model/embed_tokens/Gather"}
    nodes = {n.name: n.op_type for n in onnx.load(str(ref.onnx_path)).graph.node}
    assert nodes["/lm_head/MatMul"] == "MatMul" and nodes["/model/embed_tokens/Gather"] == "Gather"
    assert "MatMulInteger" in nodes.values()
    check_lm_runs(ref)


def test_lm_static_int8_calibrates_with_empty_cache(lm_export, tmp_path, tiny_llama, lm_text):
    ref, info = quantize_lm(lm_export, tmp_path, tiny_llama, lm_text,
                            {"method": "static", "calibration_samples": 16})
    q = info["quantization"]
    assert q["operators"] == ["MatMul", "Gemm", "Gather"] and q["calibration_examples"] >= 2
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops(ref.onnx_path)
    assert q["quantized_ops"].get("MatMul", 0) >= 4 and "Gather" not in q["quantized_ops"]
    check_lm_runs(ref)


# ----------------------------------------------------------------------------- classifier


@pytest.mark.parametrize("calibration", ["minmax", "entropy", "percentile"])
def test_static_int8_qdq_each_calibration(write_recipe, calibration):
    _, [export, quant] = run_all(write_recipe([
        {"kind": "export"},
        {"kind": "quantize", "method": "static", "calibration": calibration,
         "calibration_samples": 32, "optimization_level": "extended"}]))
    q = quant.info["quantization"]
    assert q["method"] == "static" and q["calibration"] == calibration
    assert q["calibration_examples"] == 32 and q["excluded_nodes"] == []
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops(quant.model.onnx_path)
    assert 0 <= quant.metrics.value <= 100 and quant.metrics.eval_samples > 0
    import json

    assert json.loads((quant.model.dir / SESSION_FILE).read_text()) == {
        "graph_optimization_level": "extended"}
    assert set(q["cpu_flags_present"]) <= {"avx2", "avx512f", "avx512_vnni", "avx512_bf16",
                                           "amx_int8", "amx_bf16", "asimd", "sve", "i8mm"}
    if "avx512_vnni" not in q["cpu_flags_present"]:
        assert quant.warnings[0].startswith("the avx512_vnni preset on a CPU without "
                                            "avx512_vnni: ")


def test_static_int8_quantizes_the_embedding_and_says_what_it_quantized(write_recipe):
    _, [export, static] = run_all(write_recipe([
        {"kind": "export"},
        {"kind": "quantize", "method": "static", "calibration_samples": 16}]))
    q = static.info["quantization"]
    assert q["quantized_ops"]["Gather"] == 3  # word, position and token-type tables
    assert q["quantized_ops"]["MatMul"] >= 4 * 6  # q, k, v, o and two FFN matmuls per layer
    m = onnx.load(str(static.model.onnx_path))
    producer = {o: n.op_type for n in m.graph.node for o in n.output}
    [emb] = [n for n in m.graph.node if n.op_type == "Gather" and "word_embeddings" in n.name]
    assert producer.get(emb.input[0]) == "DequantizeLinear"  # the table is stored in int8
    assert np.isfinite(static.metrics.value)


def test_exclude_pattern_matching_nothing_is_refused(write_recipe):
    plan = make_plan(load_recipe(write_recipe([
        {"kind": "export"}, {"kind": "quantize", "exclude": ["*no_such_layer*"]}])))
    ref = run_stage(plan, 0, plan.source).model
    with pytest.raises(StageError, match=r"quantize.exclude: pattern '\*no_such_layer\*' "
                                         r"matches no node"):
        run_stage(plan, 1, ref)
    assert not read_ref(Path(plan.stages[1].output_dir))


def test_exclude_keeps_named_nodes_float(write_recipe):
    pat = "/bert/encoder/layer.0/*/MatMul"
    _, [_, quant] = run_all(write_recipe([
        {"kind": "export"},
        {"kind": "quantize", "method": "static", "calibration_samples": 16, "exclude": [pat]}]))
    q = quant.info["quantization"]
    assert q["exclude_patterns"][pat] == q["excluded_count"] >= 4
    m = onnx.load(str(quant.model.onnx_path))
    produced_by_dq = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    for n in m.graph.node:
        if n.name in q["excluded_nodes"]:
            assert n.op_type == "MatMul"
            assert not any(i in produced_by_dq for i in n.input), n.name  # fed float
    quantized = [n for n in m.graph.node if n.op_type == "MatMul"
                 and n.name not in q["excluded_nodes"]]
    assert any(i in produced_by_dq for n in quantized for i in n.input)
    assert np.isfinite(quant.metrics.value)


# ----------------------------------------------------------------------------- benchmarks/edge.py


def edge_module():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "edge.py"
    spec = importlib.util.spec_from_file_location("bench_edge", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_edge_benchmark_building_blocks(write_recipe, tmp_path, capsys):
    edge = edge_module()
    plan, [_, final] = run_all(write_recipe([{"kind": "export"}, {"kind": "quantize"}]))
    data = plan_data(plan)
    root = tmp_path / "bench-edge"
    refs = edge.variants(plan, data, plan.source, plan.source, final.model, root)
    assert list(refs) == ["fp32 (teacher)", "+ fusion", "+ dynamic int8", "+ static int8",
                          "+ vocab trim", "+ prune & distill", "final (all levers)"]
    assert refs["fp32 (teacher)"].onnx_file == "model.onnx"
    assert {"QuantizeLinear"} <= ops(refs["+ static int8"].onnx_path)
    assert "Attention" in ops(refs["+ fusion"].onnx_path)
    again = edge.variants(plan, data, plan.source, plan.source, final.model, root)  # reused
    assert {k: v.hash for k, v in again.items()} == {k: v.hash for k, v in refs.items()}
    metrics = edge.measure(refs, data, plan.recipe.evaluation)
    speed = edge.head_to_head(refs, data, plan.recipe.evaluation, rounds=3)
    assert speed["fp32 (teacher)"][0] == pytest.approx(1.0, rel=0.5)
    lines, ok = edge.table(metrics, speed)
    assert len(lines) == 1 + 7 + 3 and set(ok) == {"accuracy", "size", "speed"}
    assert lines[-1].startswith("goal: final p50 at batch 1 is ")
    assert lines[-1].endswith(("PASS", "MISS"))


def test_edge_benchmark_without_demo_outputs_says_run_make_demo(write_recipe, capsys):
    edge = edge_module()
    path = write_recipe([{"kind": "finetune"}, {"kind": "distill"}, {"kind": "export"},
                         {"kind": "quantize"}])
    assert edge.main(str(path)) == 1
    out = capsys.readouterr().out
    assert "teacher (finetune) output is not on disk" in out and "run `make demo` first" in out


def test_preset_isa_missing_on_this_cpu_is_a_warning(monkeypatch):
    import compress.measure
    from compress.stages.quantize import QuantizeConfig, _cpu_check

    monkeypatch.setattr(compress.measure, "cpu_info", lambda: {"flags": ["avx2"]})
    flags, warns = _cpu_check(QuantizeConfig(target="avx512_vnni"))
    assert flags == ["avx2"]
    assert warns[0].startswith("the avx512_vnni preset on a CPU without avx512_vnni: ")
    assert _cpu_check(QuantizeConfig(target="avx2"))[1] == []
    assert _cpu_check(QuantizeConfig(method="int4", target="arm64"))[1] == []
