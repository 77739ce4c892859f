"""Causal LMs end to end on tiny Llama-family models: token-level distillation, perplexity on the
card, cached top-k teacher, teacher-generated text, early stopping, gradient accumulation."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from compress.errors import RecipeError
from compress.pipeline import make_plan, run_stage
from compress.recipe import load_recipe
from compress.testing import run_stages as run_all

pytestmark = pytest.mark.integration

EVAL = {"batch_size": 16, "latency": {"batch_size": 2, "warmup": 1, "runs": 2},
        "reference_onnx": False}


@pytest.fixture(scope="module")
def lm_assets(tmp_path_factory):
    from compress.testing import make_text_file, make_tiny_llama

    root = tmp_path_factory.mktemp("lm")
    teacher = make_tiny_llama(root / "teacher", layers=4, seed=0)
    student = make_tiny_llama(root / "student", layers=2, seed=1)
    text = make_text_file(root / "text.txt", lines=300)
    return teacher, student, text


def lm_recipe(tmp_path, lm_assets, stages, *, model="student", name="lm.yaml", **extra):
    teacher, student, text = lm_assets
    raw = {"name": "tiny-lm", "model": {"path": str(student if model == "student" else teacher),
                                        "task": "causal-lm"},
           "data": {"path": str(text), "max_length": 24}, "evaluation": EVAL,
           "stages": stages, "output_root": str(tmp_path / "out"), **extra}
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw))
    return p


def teach(lm_assets, **distill):
    teacher = lm_assets[0]
    return {"kind": "distill", "teachers": [{"path": str(teacher)}], "batch_size": 8,
            "learning_rate": 3e-3, **distill}


def test_finetune_then_distill_lowers_student_perplexity(tmp_path, lm_assets):
    """The student learns the text from the (fine-tuned) teacher: perplexity falls a lot."""
    p = lm_recipe(tmp_path, lm_assets, [
        {"kind": "finetune", "max_steps": 60, "batch_size": 8, "learning_rate": 3e-3}],
        model="teacher")
    _, [tuned] = run_all(p)
    assert tuned.metrics.metric == "perplexity"
    assert tuned.metrics.value < 8  # a 40-word vocabulary: random is ~40
    before = make_plan(load_recipe(lm_recipe(tmp_path, lm_assets, [teach(lm_assets)],
                                             name="s.yaml")))
    from compress.pipeline import evaluate_reference

    start = evaluate_reference(before).metrics.value
    d = teach(lm_assets, max_steps=60, alpha=0.5)
    d["teachers"] = [{"path": tuned.model.path}]
    _, [card] = run_all(lm_recipe(tmp_path, lm_assets, [d], name="d.yaml"))
    assert card.metrics.metric == "perplexity"
    assert card.metrics.value < 0.5 * start, (start, card.metrics.value)
    stats = card.info["training"]
    assert stats["tokens_per_s"] > 0 and stats["teacher"] == "live"


def test_token_level_losses_mask_the_shift_and_padding():
    """What the stage's loss sees: position t against token t + 1, padding excluded."""
    from types import SimpleNamespace

    from compress.distillation import kd_loss
    from compress.stages.distill import DistillConfig

    torch.manual_seed(0)
    s = torch.randn(2, 5, 7)
    t = torch.randn(2, 5, 7)
    y = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    fn = kd_loss(DistillConfig(alpha=0.5, temperature=2.0).terms())
    got = fn(SimpleNamespace(logits=s), [SimpleNamespace(logits=t)], y,
             {"attention_mask": mask})
    # by hand: positions (0..3) of row 0 and (0..1) of row 1 predict the next token
    pos = [(0, i) for i in range(4)] + [(1, 0), (1, 1)]
    kl = ce = 0.0
    for b, i in pos:
        pt = torch.softmax(t[b, i] / 2, -1)
        ps = torch.log_softmax(s[b, i] / 2, -1)
        kl += float((pt * (pt.log() - ps)).sum()) * 4
        ce += float(-torch.log_softmax(s[b, i], -1)[y[b, i + 1]])
    assert got.item() == pytest.approx(0.5 * kl / 6 + 0.5 * ce / 6, rel=1e-5)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_lm_divergences_train(tmp_path, lm_assets, divergence):
    _, [card] = run_all(lm_recipe(tmp_path, lm_assets, [
        teach(lm_assets, max_steps=8, divergence=divergence, alpha=1.0)]))
    curve = card.info["training"]["loss_curve"]
    assert card.info["divergence"] == divergence and math.isfinite(curve[-1][1])


def test_cached_topk_for_an_lm_is_built_once_and_trains(tmp_path, lm_assets):
    stage = teach(lm_assets, max_steps=10, teacher_cache=True, top_k=8)
    _, [card] = run_all(lm_recipe(tmp_path, lm_assets, [stage]))
    assert card.info["training"]["teacher"] == "cached top-k"
    caches = list((tmp_path / "out" / "teacher-cache").iterdir())
    assert len(caches) == 1
    from compress.teacher_cache import TopKCache

    cache = TopKCache.open(caches[0])
    assert cache is not None and cache.k == 8
    assert cache.num_rows(0) == 24  # one row per token of a full block
    assert math.isfinite(card.info["training"]["final_loss"])


def test_teacher_writes_extra_training_text(tmp_path, lm_assets):
    stage = teach(lm_assets, max_steps=4, augment={"prompts": 3, "prompt_tokens": 6,
                                                   "max_new_tokens": 5})
    _, [card] = run_all(lm_recipe(tmp_path, lm_assets, [stage]))
    aug = card.info["augmentation"]
    assert aug["prompts"] == 3 and 0 < aug["generated_tokens"] <= 15 and aug["example"]


def test_early_stopping_keeps_the_best_and_stops(tmp_path, lm_assets):
    stage = teach(lm_assets, max_steps=200, learning_rate=0.5,  # diverges: stops early
                  early_stopping={"eval_every": 5, "patience": 2, "max_samples": 8})
    _, [card] = run_all(lm_recipe(tmp_path, lm_assets, [stage]))
    es = card.info["training"]["early_stopping"]
    assert es["stopped_at_step"] is not None and es["stopped_at_step"] < 200
    best = max(v for _, v in es["evals"])
    assert es["best"] == pytest.approx(best) and es["score"] == "-perplexity"
    # the saved model is the best evaluation's weights: its perplexity matches that check
    assert card.metrics.value == pytest.approx(-best, rel=0.05)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path, lm_assets):
    stage = teach(lm_assets, max_steps=3, gradient_accumulation=2, batch_size=4)
    _, [card] = run_all(lm_recipe(tmp_path, lm_assets, [stage]))
    stats = card.info["training"]
    assert stats["steps"] == 3 and stats["samples"] == 3 * 2 * 4
    assert stats["gradient_accumulation"] == 2


def test_half_precision_teacher(tmp_path, lm_assets):
    _, [card] = run_all(lm_recipe(tmp_path, lm_assets, [
        teach(lm_assets, max_steps=3, teacher_dtype="bfloat16")]))
    assert card.info["teacher_dtype"] == "bfloat16"
    assert math.isfinite(card.info["training"]["final_loss"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_int8_teacher_needs_a_gpu(tmp_path, lm_assets):
    from compress.errors import StageError

    plan = make_plan(load_recipe(lm_recipe(tmp_path, lm_assets, [
        teach(lm_assets, max_steps=3, teacher_dtype="int8")])))
    with pytest.raises(StageError, match="int8 \\(bitsandbytes\\) needs a CUDA GPU"):
        run_stage(plan, 0, plan.source)


@pytest.mark.parametrize(("stage", "message"), [
    ({"kind": "distill", "attention_weight": 1.0}, "attention-map matching is for encoders"),
    ({"kind": "distill", "teacher_cache": True, "divergence": "jsd"}, "supports divergence"),
    ({"kind": "quantize", "method": "int4"}, "needs an ONNX model"),
])
def test_lm_recipe_mistakes_are_named(tmp_path, lm_assets, stage, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(lm_recipe(tmp_path, lm_assets, [stage]))


def test_an_lm_final_speedup_is_decode_timed_in_turns(tmp_path, lm_assets):
    """For a causal LM the card's final speed-up (and min_speedup) is decode ms per token, both
    models generating in turns, not one forward pass over the fixed length."""
    from compress.pipeline import execute

    ev = {**EVAL, "decode": {"prompt_tokens": 8, "new_tokens": 6, "runs": 1, "draft": False},
          "latency": {**EVAL["latency"], "head_to_head_rounds": 5}}
    p = lm_recipe(tmp_path, lm_assets, [{"kind": "prune", "drop_layers": [1, 2]}],
                  model="teacher", evaluation=ev, gates={"min_speedup": 0.01})
    report = execute(make_plan(load_recipe(p)), tmp_path / "reports")
    h = report.head_to_head
    assert h is not None and h.measure == "decode" and h.new_tokens == 6
    assert h.sequence_length == 8 and len(h.ratios) == len(h.candidate_ms) == 5
    assert h.low <= h.speedup <= h.high and h.runtime == "torch"
    [gate] = report.gates
    assert gate.gate == "min_speedup" and "decode tokens/s" in gate.message
