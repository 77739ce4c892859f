"""The search block: parsed with the recipe, checked against it before any work (one line each),
turned into plain recipe variants; and the sampler is deterministic for a seed, resumed or not."""

from __future__ import annotations

import json

import optuna
import pytest

from compress.errors import RecipeError
from compress.recipe import parse_recipe
from compress.search import Space, make_sampler, with_budget
from compress.search_spec import SearchSpec
from compress.sweep import assign, resolve

pytestmark = pytest.mark.unit

STAGES = [{"kind": "finetune", "epochs": 1}, {"kind": "prune", "ffn": 0.5},
          {"kind": "distill", "epochs": 1}, {"kind": "export"}, {"kind": "quantize"}]


def recipe(space: dict, **search) -> dict:
    return {"name": "r", "model": {"path": "org/model"}, "data": {"path": "org/data"},
            "gates": {"max_accuracy_drop": 2.0}, "stages": json.loads(json.dumps(STAGES)),
            "search": {"space": space, "budget": {"trials": 4}, **search}}


def space_error(raw: dict) -> str:
    with pytest.raises(RecipeError) as e:
        Space.of(parse_recipe(raw))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_fields_by_index_name_or_kind_and_their_types():
    raw = recipe({"stages[prune].ffn": {"low": 0.25, "high": 0.75},
                  "stages[1].depth": {"low": 0, "high": 2},
                  "stages[distill].temperature": {"low": 1.0, "high": 8.0, "log": True},
                  "stages[prune].drop_layers": [[1, 3], [1, 2, 3]],
                  "stages[quantize].per_channel": [True, False],
                  "stages[quantize].enabled": [True, False]})
    raw["stages"][2]["name"] = "kd"
    raw["search"]["space"]["stages[kd].epochs"] = [1, 2]
    space = Space.of(parse_recipe(raw))
    kinds = {p.name: (p.path, p.kind) for p in space.params}
    assert kinds["stages[prune].ffn"] == (("stages", 1, "ffn"), "float")
    assert kinds["stages[1].depth"] == (("stages", 1, "depth"), "int")
    assert kinds["stages[kd].epochs"] == (("stages", 2, "epochs"), "choice")
    assert kinds["stages[quantize].enabled"] == (("stages", 4, "enabled"), "enabled")


def test_a_variant_is_a_plain_recipe_and_drops_optional_stages():
    raw = recipe({"stages[prune].ffn": [0.25], "stages[prune].drop_layers": [[1, 3]],
                  "stages[distill].early_stopping.patience": [2],
                  "stages[quantize].enabled": [True, False]})
    space = Space.of(parse_recipe(raw))
    v, kept = space.variant({"stages[prune].ffn": 0.25, "stages[prune].drop_layers": [1, 3],
                             "stages[distill].early_stopping.patience": 2,
                             "stages[quantize].enabled": False}, "r-t003")
    assert v.name == "r-t003" and v.search is None and kept == [0, 1, 2, 3]
    assert [s.kind for s in v.stages] == ["finetune", "prune", "distill", "export"]
    assert v.stages[1].ffn == 0.25 and v.stages[1].drop_layers == [1, 3]
    assert v.stages[2].early_stopping.patience == 2  # an unset optional block gets the field
    v, kept = space.variant({"stages[quantize].enabled": True}, "r-t004")
    assert kept == [0, 1, 2, 3, 4] and v.stages[1].ffn == 0.5  # untouched: as written


def test_suggest_skips_the_fields_of_a_dropped_stage():
    raw = recipe({"stages[distill].enabled": [False], "stages[distill].epochs": [1, 2],
                  "stages[prune].ffn": [0.25, 0.5]})
    space = Space.of(parse_recipe(raw))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    values = space.suggest(study.ask())
    assert set(values) == {"stages[distill].enabled", "stages[prune].ffn"}


@pytest.mark.parametrize(("space", "expect"), [
    ({"stages[prune].fnn": [0.5]},
     "search.space.stages[prune].fnn: stages[1] has no field 'fnn'; did you mean 'ffn'?"),
    ({"stages[sparsify].ffn": [0.5]},
     "search.space.stages[sparsify].ffn: no item of stages is named or of kind 'sparsify' "
     "(have: finetune, prune, distill, export, quantize)"),
    ({"stages[9].ffn": [0.5]}, "search.space.stages[9].ffn: no item [9] at stages"),
    ({"stages[prune].drop_layers": {"low": 1, "high": 3}},
     "search.space.stages[prune].drop_layers: a range needs a numeric field; "
     "stages[1].drop_layers is list[int]: list its choices instead"),
    ({"stages[quantize].per_channel": {"low": 0, "high": 1}},
     "a range needs a numeric field; stages[4].per_channel is bool"),
    ({"stages[prune].depth": {"low": 0.5, "high": 2}},
     "search.space.stages[prune].depth: stages[1].depth is a whole number"),
    ({"stages[prune].ffn": {"low": 0.5, "high": 1.0}},
     "search.space.stages[prune].ffn: 1.0 makes a bad recipe: stages[1].ffn: Input should be "
     "less than 1"),
    ({"stages[export].enabled": [True, False]},
     "search.space: without stages[3] (export) the recipe is bad: stages[3] (quantize): needs "
     "an ONNX model"),
    ({"stages[prune].enabled": [0, 1]},
     "search.space.stages[prune].enabled: whether a stage runs is a choice: [true, false]"),
    ({"stages[prune].kind": ["distill"]}, "stages[1].kind cannot be searched"),
    ({"stages[prune].ffn": [0.5], "stages[1].ffn": [0.25]},
     "search.space.stages[1].ffn: the same field as search.space.stages[prune].ffn"),
])
def test_bad_space_is_one_line(space, expect):
    assert expect in space_error(recipe(space))


def test_two_stages_of_a_kind_need_names():
    raw = recipe({"stages[prune].ffn": [0.5]})
    raw["stages"].insert(2, {"kind": "prune", "heads": 0.5})
    assert "2 items of stages match 'prune' (stages[1], stages[2]); give each a name" in \
        space_error(raw)


@pytest.mark.parametrize(("search", "expect"), [
    ({"space": {}}, "search.space: empty: name at least one field to search"),
    ({"budget": {"trials": 0}}, "search.budget.trials: Input should be greater than or equal"),
    ({"budget": {}}, "search.budget: set trials, minutes or both"),
    ({"objectives": ["speed"]}, "search.objectives: 'speed' is not an objective"),
    ({"space": {"stages[prune].ffn": {"low": 0.5, "hi": 0.7}}},
     "'hi' is not a range key; did you mean 'high'?"),
    ({"space": {"stages[prune].ffn": 0.5}}, "give a list of choices ([a, b]) or a range"),
    ({"space": {"stages[prune].ffn": []}}, "an empty choice list"),
])
def test_bad_block_is_refused_when_the_recipe_is_parsed(search, expect):
    raw = recipe({"stages[prune].ffn": [0.5]})
    raw["search"].update(search)
    with pytest.raises(RecipeError, match=None) as e:
        parse_recipe(raw, "r.yaml")
    assert expect in str(e.value)


def test_command_line_budget_replaces_the_blocks():
    r = parse_recipe(recipe({"stages[prune].ffn": [0.5]}))
    assert with_budget(r, trials=9, minutes=5).search.budget.model_dump() == \
        {"trials": 9, "minutes": 5}
    with pytest.raises(RecipeError, match="--trials 0: a search needs at least 1 trial"):
        with_budget(r, trials=0)


def test_selectors_in_sweep_paths_too():
    raw = {"stages": [{"kind": "prune"}, {"kind": "distill", "name": "kd"}]}
    assert resolve(raw, "stages[kd].epochs") == ["stages", 1, "epochs"]
    assert resolve(raw, "stages[prune].ffn") == ["stages", 0, "ffn"]
    assign(raw, "stages[distill].epochs", 3)
    assert raw["stages"][1]["epochs"] == 3


def _run(study: optuna.Study, n: int) -> None:
    """A deterministic two-objective problem with a constraint, asked and told like the search."""
    for _ in range(n):
        t = study.ask()
        x, y = t.suggest_float("x", 0.0, 1.0), t.suggest_categorical("y", ["a", "b", "c"])
        t.set_constraint("gate", x - 0.8)
        study.tell(t, [x + (y == "b"), (1 - x) ** 2])


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random"])
def test_sampler_is_deterministic_for_a_seed_and_a_resume_changes_nothing(sampler, tmp_path):
    spec = SearchSpec(space={"x": [1]}, budget={"trials": 1}, sampler=sampler, seed=3,
                      startup_trials=3)

    def study(url: str) -> optuna.Study:
        return optuna.create_study(study_name="s", storage=url, sampler=make_sampler(spec),
                                   directions=["maximize", "minimize"], load_if_exists=True)

    whole = study(f"sqlite:///{tmp_path}/whole.db")
    _run(whole, 10)
    halves = study(f"sqlite:///{tmp_path}/halves.db")
    _run(halves, 5)
    _run(study(f"sqlite:///{tmp_path}/halves.db"), 5)  # a new process, resuming the study
    again = study(f"sqlite:///{tmp_path}/again.db")
    _run(again, 10)
    seq = [t.params for t in whole.trials]
    assert seq == [t.params for t in again.trials]
    assert seq == [t.params for t in study(f"sqlite:///{tmp_path}/halves.db").trials]
    assert len({json.dumps(p, sort_keys=True) for p in seq}) == 10  # no trial repeated


def test_the_recipe_as_written_is_the_baseline_trial():
    raw = recipe({"stages[distill].epochs": [1, 2], "stages[prune].ffn": {"low": 0.1,
                                                                          "high": 0.4},
                  "stages[prune].drop_layers": [[], [1]], "stages[quantize].enabled": [False,
                                                                                     True]})
    space = Space.of(parse_recipe(raw))
    written = space.as_written()  # ffn 0.5 is outside its range: sampled instead
    assert written == {"stages[distill].epochs": 1, "stages[prune].drop_layers": "[]",
                       "stages[quantize].enabled": True}
    study = optuna.create_study()
    study.enqueue_trial(written)
    values = space.suggest(study.ask())
    assert values["stages[distill].epochs"] == 1 and type(values["stages[distill].epochs"]) is int
    assert values["stages[prune].drop_layers"] == [] and 0.1 <= values["stages[prune].ffn"] <= 0.4
