"""Distillation beyond the basics: resume from checkpoints, and a cached teacher."""

from __future__ import annotations

import pytest

from compress.pipeline import make_plan, run_stage
from compress.recipe import load_recipe

pytestmark = pytest.mark.integration

PRUNE = {"kind": "prune", "ffn": 0.5, "heads": 0.5}


class Interrupt(Exception):
    pass


def test_interrupted_distill_resumes_and_follows_the_same_loss_curve(write_recipe, tmp_path):
    distill = {"kind": "distill", "max_steps": 60, "batch_size": 8, "checkpoint_every": 20,
               "learning_rate": 1e-3}

    def plan_in(name):
        return make_plan(load_recipe(write_recipe([PRUNE, distill], f"{name}.yaml",
                                                  output_root=str(tmp_path / name))))

    a = plan_in("a")
    pruned_a = run_stage(a, 0, a.source).model
    whole = run_stage(a, 1, pruned_a).info["training"]

    b = plan_in("b")
    pruned_b = run_stage(b, 0, b.source).model

    def boom(label, done, total):
        if done >= 45:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_stage(b, 1, pruned_b, progress=boom)
    assert not b.stages[1].done()
    resumed = run_stage(b, 1, pruned_b).info["training"]
    assert resumed["resumed_from_step"] == 40
    assert len(resumed["loss_curve"]) == len(whole["loss_curve"]) == 60
    for (s1, l1), (s2, l2) in zip(whole["loss_curve"], resumed["loss_curve"], strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-5)
    assert not (tmp_path / "b" / "work").exists() or not any((tmp_path / "b" / "work").iterdir())


def test_cached_teacher_matches_live_teacher_and_is_reused(write_recipe, tmp_path):
    base = {"kind": "distill", "max_steps": 30, "batch_size": 16, "learning_rate": 1e-3}
    plan = make_plan(load_recipe(write_recipe(
        [{"kind": "finetune", "max_steps": 30, "learning_rate": 2e-3, "batch_size": 16}, PRUNE,
         base], "live.yaml")))
    ref = plan.source
    for s in plan.stages:
        card = run_stage(plan, s.index, ref)
        ref = card.model
    live = card.info["training"]

    cached_plan = make_plan(load_recipe(write_recipe(
        [{"kind": "finetune", "max_steps": 30, "learning_rate": 2e-3, "batch_size": 16}, PRUNE,
         {**base, "teacher_cache": True}], "cached.yaml")))
    pruned = run_stage(cached_plan, 1, run_stage(cached_plan, 0, cached_plan.source).model).model
    cached = run_stage(cached_plan, 2, pruned).info["training"]
    assert live["teacher"] == "live" and cached["teacher"] == "cached top-k"
    for (_, a), (_, b) in zip(live["loss_curve"], cached["loss_curve"], strict=True):
        assert a == pytest.approx(b, abs=2e-3)  # fp16 logits in the cache
    [folder] = (tmp_path / "out" / "teacher-cache").iterdir()
    stamp = (folder / "values.npy").stat().st_mtime_ns

    again = make_plan(load_recipe(write_recipe(
        [{"kind": "finetune", "max_steps": 30, "learning_rate": 2e-3, "batch_size": 16}, PRUNE,
         {**base, "teacher_cache": True, "learning_rate": 5e-4}], "again.yaml")))
    run_stage(again, 2, pruned)
    assert (folder / "values.npy").stat().st_mtime_ns == stamp  # same teacher, same data


def test_hidden_states_through_a_projection_and_two_teachers(write_recipe, tmp_path):
    from compress.testing import make_tiny_bert

    wide = make_tiny_bert(tmp_path / "wide", hidden=96, heads=4, ffn=96, layers=2, seed=1)
    plan = make_plan(load_recipe(write_recipe([
        PRUNE,
        {"kind": "distill", "max_steps": 12, "batch_size": 16, "hidden": {"kind": "cosine"},
         "teachers": [{"path": str(wide), "weight": 1.0}, {"path": str(wide), "weight": 2.0}]},
    ])))
    pruned = run_stage(plan, 0, plan.source).model
    card = run_stage(plan, 1, pruned)
    assert card.info["projected"] is True  # student width 64, teacher width 96
    assert card.info["layer_map"] == [[1, 1], [2, 1], [3, 2], [4, 2]]  # uniform, 4 -> 2
    assert card.info["training"]["teacher"] == "live (2)"
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(card.model.path)
    assert saved.config.hidden_size == 64  # projections are not part of the student


def test_attention_matching_needs_equal_heads(write_recipe):
    from compress.errors import StageError

    plan = make_plan(load_recipe(write_recipe([
        PRUNE, {"kind": "distill", "max_steps": 2, "attention_weight": 1.0}])))
    pruned = run_stage(plan, 0, plan.source).model
    with pytest.raises(StageError, match="attention maps need equal heads"):
        run_stage(plan, 1, pruned)


def test_gradual_rounds_of_prune_and_distill(write_recipe, tmp_path):
    from compress.pipeline import execute

    rounds = []
    for _ in range(3):
        rounds += [{"kind": "prune", "ffn": 0.15},
                   {"kind": "distill", "max_steps": 6, "batch_size": 16}]
    plan = make_plan(load_recipe(write_recipe(rounds)))
    report = execute(plan, tmp_path / "reports")
    widths = [c.info["after"]["ffn"] for c in report.stages if c.kind == "prune"]
    assert widths == [112, 96, 80]  # 15% of the current width each round, rounded to 8
    params = [c.metrics.parameters for c in report.stages]
    assert params == sorted(params, reverse=True) and len(report.stages) == 6
    assert not any(c.warnings for c in report.stages)  # each step removes well under a third


def test_compiled_student_trains_like_the_eager_one(write_recipe, tmp_path):
    """torch.compile is an option that changes speed, not results."""
    runs = {}
    for compiled in (False, True):
        stage = {"kind": "finetune", "max_steps": 4, "batch_size": 8, "compile": compiled}
        plan = make_plan(load_recipe(write_recipe([stage], f"c{compiled}.yaml",
                                                  output_root=str(tmp_path / str(compiled)))))
        runs[compiled] = run_stage(plan, 0, plan.source).info["training"]
    assert runs[True]["compiled"] and not runs[False]["compiled"]
    for r in runs.values():  # the rate after the first tenth of the steps (compilation)
        assert r["steady"]["from_step"] == 1 and r["steady"]["samples_per_s"] > 0
    for (s1, a), (s2, b) in zip(runs[False]["loss_curve"], runs[True]["loss_curve"],
                                strict=True):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-3, abs=1e-4)


def test_a_deeper_pruned_student_matches_the_layers_it_kept(write_recipe):
    plan = make_plan(load_recipe(write_recipe([
        {"kind": "prune", "drop_layers": [1]},
        {"kind": "distill", "max_steps": 6, "batch_size": 8}])))
    pruned = run_stage(plan, 0, plan.source)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(pruned.model.path).compress_layer_origin == [0, 2, 3]
    card = run_stage(plan, 1, pruned.model)
    assert card.info["layer_map"] == [[1, 1], [2, 3], [3, 4]]
    assert card.info["attention_weight"] == 1.0
    assert card.info["layer_matching"].startswith("3 of 4 layers: hidden states matched (mse) to "
                                                  "the layers they came from, attention maps too")
