"""Shared fixtures: tiny models built from configs, synthetic data, recipes written to tmp."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from compress.testing import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from compress.testing import make_sentiment_csv

    return make_sentiment_csv(tmp_path_factory.mktemp("data") / "sentiment.csv", rows=240)


FAST_EVAL = {"batch_size": 32, "latency": {"batch_size": 4, "warmup": 1, "runs": 3}}


def recipe_dict(model: Path, data: Path, out: Path, stages: list[dict], **extra) -> dict:
    return {"name": "tiny", "model": {"path": str(model)},
            "data": {"path": str(data), "max_length": 32}, "evaluation": FAST_EVAL,
            "stages": stages, "output_root": str(out), **extra}


@pytest.fixture
def write_recipe(tmp_path, tiny_model, tiny_data):
    """Write a recipe YAML for the tiny model and data; returns its path."""

    def write(stages: list[dict], name: str = "recipe.yaml", **extra) -> Path:
        p = tmp_path / name
        p.write_text(yaml.safe_dump(recipe_dict(tiny_model, tiny_data, tmp_path / "out",
                                                stages, **extra)))
        return p

    return write
