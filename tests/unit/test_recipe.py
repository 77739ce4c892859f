"""Recipe validation: a bad recipe fails before any work, naming the field and the reason."""

from __future__ import annotations

import json

import pytest
import yaml

from compress.errors import RecipeError
from compress.recipe import STAGES, load_recipe, parse_recipe

pytestmark = pytest.mark.unit

BASE = {"name": "r", "model": {"path": "org/model"}, "data": {"path": "org/data"},
        "stages": [{"kind": "prune", "ffn": 0.5}, {"kind": "export"}, {"kind": "quantize"}]}


def with_(**changes):
    raw = json.loads(json.dumps(BASE))
    raw.update(changes)
    return raw


def error_of(raw) -> str:
    with pytest.raises(RecipeError) as e:
        parse_recipe(raw, "r.yaml")
    return str(e.value)


def test_a_valid_recipe_parses_with_defaults():
    r = parse_recipe(BASE)
    assert [s.kind for s in r.stages] == ["prune", "export", "quantize"]
    assert r.metric == "accuracy" and r.stages[0].importance == "l2"


def test_unknown_field_names_path_and_suggests():
    msg = error_of(with_(stages=[{"kind": "prune", "fnn": 0.5}]))
    assert msg.startswith("r.yaml: stages[0].fnn: unknown field; did you mean 'ffn'?")
    assert "\n" not in msg


def test_unknown_top_level_field():
    assert "r.yaml: modle: unknown field; did you mean 'model'?" in error_of(with_(modle={}))


def test_unknown_stage_kind():
    msg = error_of(with_(stages=[{"kind": "sparsify"}]))
    assert "stages[0].kind: unknown stage kind 'sparsify'" in msg and "prune" in msg


@pytest.mark.parametrize(("stages", "expect"), [
    ([{"kind": "quantize"}], "needs an ONNX model; "
                             "add '- kind: export' before it"),
    ([{"kind": "export"}, {"kind": "prune", "ffn": 0.5}], "works on PyTorch models but comes "
                                                          "after export"),
    ([{"kind": "prune", "ffn": 0.5}, {"kind": "finetune"}], "finetune prepares the reference"),
    ([{"kind": "export"}, {"kind": "export"}], "already exported"),
])
def test_stage_order_rules(stages, expect):
    assert expect in error_of(with_(stages=stages))


@pytest.mark.parametrize(("stage", "field", "reason"), [
    ({"kind": "prune", "ffn": 1.0}, "stages[0].ffn", "less than 1"),
    ({"kind": "prune", "heads": -0.1}, "stages[0].heads", "greater than or equal to 0"),
    ({"kind": "prune"}, "stages[0]", "prunes nothing"),
    ({"kind": "distill", "temperature": 0}, "stages[0].temperature", "greater than 0"),
    ({"kind": "distill", "batch_size": 0}, "stages[0].batch_size", "greater than or equal to 1"),
    ({"kind": "distill", "alpha": 1.5}, "stages[0].alpha", "less than or equal to 1"),
    ({"kind": "prune", "drop_layers": [1, 1]}, "stages[0].drop_layers", "unique"),
])
def test_bad_values_name_the_field(stage, field, reason):
    msg = error_of(with_(stages=[stage]))
    assert f"r.yaml: {field}: " in msg and reason in msg


def test_wrong_type():
    assert "data.max_length: Input should be a valid integer" in error_of(
        with_(data={"path": "x", "max_length": "long"}))


def test_malformed_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: r\nstages: [\n  - kind: prune\n")
    with pytest.raises(RecipeError, match=r"bad.yaml:\d+:\d+: not valid YAML"):
        load_recipe(p)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_relative_paths_resolve_against_the_recipe(tmp_path):
    (tmp_path / "m").mkdir()
    raw = with_(model={"path": "m"}, data={"path": "../d.csv"})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    r = load_recipe(tmp_path / "r.yaml")
    assert r.model.path == str(tmp_path / "m")
    assert r.data.path == str((tmp_path / ".." / "d.csv").resolve())


@pytest.mark.parametrize("kind", sorted(STAGES))
def test_every_stage_config_round_trips_through_json(kind):
    cls = STAGES[kind]
    cfg = cls.model_validate({"ffn": 0.25} if kind == "prune" else {})
    again = cls.model_validate_json(cfg.model_dump_json())
    assert again == cfg and again.kind == kind


def test_teacher_cache_refuses_what_needs_live_teachers():
    msg = error_of(with_(stages=[{"kind": "distill", "teacher_cache": True,
                                  "hidden": {"weight": 1.0}}]))
    assert "stages[0]: teacher_cache keeps logits of one teacher only" in msg


def test_distill_matches_kept_layers_by_default():
    """TinyBERT-style: a student with fewer layers matches the layers it kept."""
    from compress.stages.distill import DistillConfig, HiddenMatch

    teacher = {"num_hidden_layers": 6, "num_attention_heads": 12}
    student = {"num_hidden_layers": 3, "num_attention_heads": 12,
               "compress_layer_origin": [0, 2, 5]}
    hidden, attention, why = DistillConfig().matching(student, teacher, lm=False)
    assert hidden.layer_map == [(1, 1), (2, 3), (3, 6)] and attention == 1.0
    assert "the layers they came from, attention maps too" in why
    pruned_heads = {**student, "pruned_heads": {"0": [0, 1]}}
    assert DistillConfig().matching(pruned_heads, teacher, lm=False)[1] == 0.0
    uniform, _, why = DistillConfig().matching({"num_hidden_layers": 3}, teacher, lm=True)
    assert uniform.layer_map is None and "uniform" in why  # the loss builds the uniform map
    assert (hidden.kind, uniform.kind) == ("mse", "nmse")  # a decoder's states are not O(1)
    assert DistillConfig(teacher_cache=True).matching(student, teacher, False)[:2] == (None, 0)
    explicit = HiddenMatch(weight=2.0)
    assert DistillConfig(hidden=explicit).matching(student, teacher, False) == (explicit, 0.0,
                                                                               None)
    assert DistillConfig(match_layers="off").matching(student, teacher, False) == (None, 0.0,
                                                                                   None)
    assert DistillConfig().matching(teacher, teacher, False) == (None, 0.0, None)  # not smaller
