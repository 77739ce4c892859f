"""LLM distillation as practitioners do it, on tiny models: a task teacher, prompt/response data,
task metrics in torch and ONNX Runtime, sequence-level KD across tokenizers, rationales,
co-distillation, the over-distillation probe and the student as a draft model."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from compress.errors import StageError
from compress.testing import run_stages

pytestmark = pytest.mark.integration

EVAL = {"batch_size": 16, "choices": ["good", "bad"], "reference_onnx": False,
        "latency": {"batch_size": 2, "warmup": 1, "runs": 2},
        "decode": {"prompt_tokens": 6, "new_tokens": 6, "runs": 1, "draft_tokens": 6,
                   "assistant_tokens": 3}}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from compress.testing import make_pairs_csv, make_text_file, make_tiny_llama

    root = tmp_path_factory.mktemp("llm")
    return {"teacher": make_tiny_llama(root / "teacher", layers=4, seed=0),
            "other": make_tiny_llama(root / "other", layers=2, hidden=32, ffn=64, seed=3,
                                     vocab_seed=7),
            "pairs": make_pairs_csv(root / "pairs.csv", rows=240),
            "probe": make_text_file(root / "probe.txt", lines=80, seed=5)}


def recipe(tmp_path, assets, stages, name="r.yaml", evaluation=None, **extra):
    raw = {"name": "tiny-task", "model": {"path": str(assets["teacher"]), "task": "causal-lm"},
           "data": {"path": str(assets["pairs"]), "prompt_column": "prompt",
                    "response_column": "response", "max_length": 24},
           "evaluation": {**EVAL, "probe_data": str(assets["probe"]), "probe_tokens": 96,
                          **(evaluation or {})},
           "stages": stages, "output_root": str(tmp_path / "out"), **extra}
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw))
    return p


FINETUNE = {"kind": "finetune", "max_steps": 60, "batch_size": 16, "learning_rate": 3e-3}
PRUNE = {"kind": "prune", "depth": 2, "ffn": 0.5, "round_to": 8}


def distill(**kw):
    return {"kind": "distill", "max_steps": 20, "batch_size": 16, "learning_rate": 3e-3, **kw}


def test_task_teacher_then_smaller_student_with_task_metrics_in_torch_and_onnx(tmp_path,
                                                                                  assets):
    """Teacher fine-tuned on the task, student = pruned teacher, KD on the answers, ONNX with
    KV cache, INT4: every card has the task metrics, the probe, decode speed; PyTorch cards
    have draft acceptance, and ONNX Runtime scores what PyTorch scores."""
    _, cards = run_stages(recipe(tmp_path, assets, [
        FINETUNE, PRUNE, distill(teacher_cache=True, top_k=8), {"kind": "export"},
        {"kind": "quantize", "method": "int4", "block_size": 16}]))
    teacher, pruned, student, onnx, int4 = cards
    assert teacher.metrics.metric == "answer_accuracy" and teacher.metrics.value >= 90
    assert student.metrics.parameters * 2 <= teacher.metrics.parameters
    for c in cards:
        s = c.metrics.scores
        assert {"answer_accuracy", "choice_accuracy", "response_perplexity", "probe_perplexity",
                "decode_tokens_per_s", "ttft_ms"} <= set(s), c.name
        assert s["decode_tokens_per_s"] > 0 and s["probe_perplexity"] > 1
    assert teacher.metrics.scores["draft_acceptance"] == 100.0  # drafting for itself
    assert 0 <= student.metrics.scores["draft_acceptance"] <= 100
    assert student.metrics.scores["draft_speedup"] > 0
    assert "draft_acceptance" not in onnx.metrics.scores  # assisted decoding: torch only
    assert "torch models" in onnx.metrics.generation["draft"]["skipped"] or \
        "PyTorch" in onnx.metrics.generation["draft"]["skipped"]
    for name in ("answer_accuracy", "choice_accuracy"):
        assert onnx.metrics.scores[name] == student.metrics.scores[name]
    assert onnx.metrics.scores["response_perplexity"] == pytest.approx(
        student.metrics.scores["response_perplexity"], rel=1e-3)
    assert student.info["training"]["teacher"] == "cached top-k"
    assert int4.metrics.runtime == "onnxruntime"


def test_response_only_loss(tmp_path, assets):
    """The loss covers the answer: a fine-tuned teacher answers, though prompts are never
    learned (their labels are -100, so the probe text's perplexity stays high)."""
    from compress.data import encode, load_task_data
    from compress.models import load_tokenizer
    from compress.recipe import load_recipe

    r = load_recipe(recipe(tmp_path, assets, [FINETUNE]))
    data = load_task_data(r.data, None, "causal-lm")
    enc = encode(data.train.select(range(4)), load_tokenizer(str(assets["teacher"])), 24)
    for row in enc:
        answer = [t for t in row["labels"] if t != -100]
        assert len(answer) == 2 and row["input_ids"][-2:] == answer  # the word and EOS


def test_sequence_level_kd_across_tokenizers_is_cached_and_part_of_the_id(tmp_path, assets):
    """A student of another family/tokenizer learns the teacher's generated answers; soft KD
    is refused for it with the way out named; the generations are cached and reused."""
    student = str(assets["other"])
    seq = {"max_new_tokens": 4, "seed": 1}
    with pytest.raises(StageError, match="use sequence_level and alpha 0"):
        run_stages(recipe(tmp_path, assets, [distill(student=student)], name="soft.yaml"))
    p = recipe(tmp_path, assets, [FINETUNE, distill(student=student, alpha=0.0,
                                                    sequence_level=seq, max_steps=40)])
    plan, [teacher, card] = run_stages(p)
    seq_info = card.info["sequence_level"]
    assert seq_info["generated_now"] and seq_info["count"] > 100
    assert card.info["training"]["teacher"] is None  # hard labels: no teacher pass in training
    assert card.metrics.parameters < teacher.metrics.parameters / 2
    gen = json.loads((tmp_path / "out" / "teacher-generations").glob("*/generations.json")
                     .__next__().read_text())
    assert gen["settings"]["seed"] == 1 and len(gen["texts"]) == seq_info["count"]
    # a second recipe asking the same generations reads them; another seed is another id
    p2 = recipe(tmp_path, assets, [FINETUNE, distill(student=student, alpha=0.0,
                                                     sequence_level=seq, max_steps=41)],
                name="again.yaml")
    _, [_, again] = run_stages(p2)
    assert not again.info["sequence_level"]["generated_now"]
    from compress.pipeline import make_plan
    from compress.recipe import load_recipe

    other = make_plan(load_recipe(recipe(tmp_path, assets, [
        FINETUNE, distill(student=student, alpha=0.0, sequence_level={**seq, "seed": 2},
                          max_steps=40)], name="seed2.yaml")))
    assert other.stages[1].hash != plan.stages[1].hash


def test_rationale_distillation_reports_accuracy_with_and_without(tmp_path, assets):
    stage = distill(rationale={"instruction": "{prompt} because", "prefix": "why ",
                               "max_new_tokens": 4}, max_steps=10)
    _, [_, _, card] = run_stages(recipe(tmp_path, assets, [FINETUNE, PRUNE, stage]))
    r = card.info["rationale"]
    assert r["rows"] > 100 and r["count"] == r["rows"] + r["empty"]
    assert 0 <= r["answer_accuracy_with"] <= 100 and 0 <= r["answer_accuracy_without"] <= 100
    assert r["answer_accuracy_with"] == card.metrics.scores["answer_accuracy"]
    assert any("rationale distillation" in n for n in card.notes)


def test_co_distillation_makes_two_outputs_with_their_own_cards(tmp_path, assets):
    import torch
    from safetensors.torch import load_file

    _, [_, pruned, card] = run_stages(recipe(tmp_path, assets, [
        FINETUNE, PRUNE, distill(mutual=True, alpha=0.5, max_steps=10)]))
    [peer] = card.side
    assert peer.name == "distill (peer)" and peer.model.parent == card.info["teacher_hashes"][0]
    assert peer.model.hash != card.model.hash and peer.model.dir == card.model.dir / "peer"
    assert peer.metrics.parameters > card.metrics.parameters  # the teacher, trained
    assert {"answer_accuracy", "probe_perplexity"} <= set(peer.metrics.scores)
    before = load_file(f"{card.info['teachers'][0]}/model.safetensors")
    after = load_file(str(peer.model.dir / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the peer trained
    tr = card.info["training"]
    assert tr["teacher"].startswith("mutual") and math.isfinite(tr["peer_final_loss"])
    assert peer.info["training"]["final_loss"] == tr["peer_final_loss"]
    from compress.render import render_markdown
    from compress.report import RunReport

    md = render_markdown(RunReport(recipe="r", run_id="1", started_at="now", reference=pruned,
                                   stages=[card]))
    assert "| distill (peer) |" in md and "- distill (peer): 10 steps" in md


def test_over_distillation_probe_warns_and_gates(tmp_path, assets):
    """Fine-tuning hard on the task raises the probe's perplexity while the answers hold:
    a warning on the card, and the optional gate fails the run."""
    from typer.testing import CliRunner

    from compress.cli import app

    p = recipe(tmp_path, assets, [FINETUNE, distill(max_steps=60, learning_rate=1e-2,
                                                    alpha=0.0)],
               evaluation={"probe_warn_increase": 0.0}, gates={"max_probe_increase": 0.0})
    r = CliRunner().invoke(app, ["run", str(p), "--local", "--reports-dir",
                                 str(tmp_path / "reports")], catch_exceptions=False)
    assert r.exit_code == 3, r.output
    report = json.loads(next((tmp_path / "reports").glob("*/*/report.json")).read_text())
    final = report["stages"][-1]
    assert any(w.startswith("over-distillation: probe perplexity") for w in final["warnings"])
    [gate] = [g for g in report["gates"] if g["gate"] == "max_probe_increase"]
    assert not gate["passed"]


def test_recipe_metric_and_gates_on_lm_metrics(tmp_path, assets):
    from compress.pipeline import execute, make_plan
    from compress.recipe import load_recipe

    p = recipe(tmp_path, assets, [FINETUNE, PRUNE], evaluation={"metric": "choice_accuracy"},
               gates={"max_metric_drop": 100.0})
    report = execute(make_plan(load_recipe(p)), tmp_path / "reports")
    assert report.final.metrics.metric == "choice_accuracy"
    [gate] = report.gates
    assert gate.gate == "max_metric_drop" and gate.passed
    assert gate.message.startswith("choice_accuracy ")


@pytest.mark.parametrize(("family", "heads", "kv"), [("qwen3", 6, 3), ("gemma3_text", 6, 3),
                                                     ("phi3", 6, 3)])
def test_more_families_prune_distill_export_int4(tmp_path, assets, family, heads, kv):
    """Gemma 3, Qwen3 and Phi-3 (fused qkv and gate/up): depth, heads and FFN pruning that
    reloads, distillation, ONNX with KV cache (greedy parity) and INT4."""
    from compress.testing import make_tiny_llama

    model = make_tiny_llama(tmp_path / family, model_type=family, layers=4, heads=heads,
                            kv_heads=kv, hidden=48, ffn=96)
    p = recipe(tmp_path, assets, [
        {"kind": "prune", "depth": 1, "heads": 0.333, "ffn": 0.5, "round_to": 8},
        distill(max_steps=5), {"kind": "export"},
        {"kind": "quantize", "method": "int4", "block_size": 16}],
        evaluation={"decode": None, "probe_data": None})
    raw = yaml.safe_load(p.read_text())
    raw["model"]["path"] = str(model)
    p.write_text(yaml.safe_dump(raw))
    _, [pruned, student, onnx, int4] = run_stages(p)
    after = pruned.info["after"]
    assert after["layers"] == 3 and after["ffn"] == 48
    assert after["heads_per_layer"] == [4] * 3 and after["kv_heads_per_layer"] == [2] * 3
    assert pruned.info["generate_check_tokens"] == 4
    assert onnx.info["parity"]["generation"]["match"] and onnx.info["use_cache"]
    assert int4.info["quantization"]["method"] == "int4"
    assert onnx.metrics.scores["answer_accuracy"] == student.metrics.scores["answer_accuracy"]


@pytest.mark.gpu
def test_int8_teacher_distills_on_a_gpu(tmp_path, assets):
    """bitsandbytes 8-bit teacher, bf16 student (make gpu-check runs this)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _, [card] = run_stages(recipe(tmp_path, assets, [distill(teacher_dtype="int8",
                                                             max_steps=5)]))
    assert card.info["teacher_dtype"] == "int8"
    assert card.info["training"]["precision"] == "bf16"
