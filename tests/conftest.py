"""Shared fixtures: tiny models built from configs, synthetic data, recipes written to tmp."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from compress.artifact import ModelRef
from compress.measure import Latency
from compress.metrics import Metrics
from compress.report import RunReport, StageCard

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


# ----------------------------------------------------------------------------- report data

ENV = {"python": "3.11.9", "platform": "Linux", "threads": 4, "git_commit": "abc123",
       "cpu": {"model": "Test CPU 9000", "arch": "x86_64", "logical_cores": 8,
               "flags": ["avx2", "avx512_vnni"]},
       "packages": {"torch": "2.13.0", "onnxruntime": "1.31.0"}}


def card(name: str, value: float, p50: float, size: float, *, metric: str = "accuracy",
         kind: str = "stage") -> StageCard:
    """A card from what the report shows: metric value, p50 batch-1 ms, size in MB."""
    lat = [Latency(runtime="torch", batch_size=b, sequence_length=128, threads=4, warmup=2,
                   runs=10, p50_ms=p50 * b, p90_ms=p50 * b * 1.1, p99_ms=p50 * b * 1.2,
                   mean_ms=p50 * b) for b in (1, 8)]
    m = Metrics(metric=metric, value=value, eval_samples=100, runtime="torch", device="cpu",
                latency=lat, parameters=1_000_000, size_bytes=int(size * 1e6),
                dir_bytes=int(size * 1e6) + 1000, peak_rss_mb=300.0, rss_increase_mb=50.0,
                eval_seconds=1.0)
    ref = ModelRef(path=f"/tmp/{name}", format="hf", task="text-classification",
                   hash="0" * 64, stage=kind)
    return StageCard(name=name, kind=kind, index=None, model=ref, metrics=m)


def run(run_id: str, ref: StageCard, *stages: StageCard, status: str = "passed") -> RunReport:
    return RunReport(recipe="bert-edge", run_id=run_id, status=status,
                     started_at="2025-01-01T00:00:00", environment=ENV, reference=ref,
                     stages=list(stages))
