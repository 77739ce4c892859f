"""Data loading through `datasets`' file loaders, with one-line errors for bad data."""

from __future__ import annotations

import json

import pytest

from compress.data import load_task_data
from compress.errors import RecipeError
from compress.recipe import DataSpec

pytestmark = pytest.mark.unit


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_with_class_names_maps_to_ids_and_splits_deterministically(tmp_path):
    rows = [{"review": f"text {i}", "y": "pos" if i % 2 else "neg"} for i in range(50)]
    spec = DataSpec(path=jsonl(tmp_path / "d.jsonl", rows), text_column="review",
                    label_column="y", eval_fraction=0.2)
    d = load_task_data(spec)
    assert d.num_labels == 2 and d.label_names == ("neg", "pos")
    assert len(d.train) == 40 and len(d.eval) == 10
    assert set(d.train["label"]) == {0, 1} and d.train.column_names == ["text", "label"]
    again = load_task_data(spec.model_copy(update={"seed": 0}))
    assert list(again.eval["text"]) == list(d.eval["text"])


def test_label_out_of_range_for_the_model(tmp_path):
    rows = [{"text": "t", "label": i % 3} for i in range(12)]
    with pytest.raises(RecipeError, match=r"label 2 out of range for model.num_labels=2"):
        load_task_data(DataSpec(path=jsonl(tmp_path / "d.jsonl", rows)), 2)


def test_empty_and_tiny_data(tmp_path):
    (tmp_path / "e.csv").write_text("text,label\n")
    with pytest.raises(RecipeError, match="has no usable rows|cannot read"):
        load_task_data(DataSpec(path=str(tmp_path / "e.csv")))
    (tmp_path / "t.csv").write_text("text,label\na,0\nb,1\n")
    with pytest.raises(RecipeError, match="too few to split off an eval set"):
        load_task_data(DataSpec(path=str(tmp_path / "t.csv")))


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(RecipeError, match="no such file"):
        load_task_data(DataSpec(path=str(tmp_path / "nope.csv")))
    (tmp_path / "d.xyz").write_text("x")
    with pytest.raises(RecipeError, match="cannot tell the format of d.xyz; set data.format"):
        load_task_data(DataSpec(path=str(tmp_path / "d.xyz")))
