"""The whole recipe through the Prefect flow on tiny models: cards, artifacts, caching."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_flow_runs_every_stage_writes_cards_and_reuses_on_rerun(prefect_harness, write_recipe,
                                                                 tmp_path):
    from prefect.artifacts import Artifact

    from compress.recipe import load_recipe
    from flows.compress_flow import compress_recipe

    recipe = load_recipe(write_recipe([
        {"kind": "finetune", "epochs": 4, "learning_rate": 2e-3, "batch_size": 16},
        {"kind": "prune", "heads": 0.5, "ffn": 0.5},
        {"kind": "distill", "epochs": 1, "learning_rate": 2e-3, "batch_size": 16},
        {"kind": "export"}, {"kind": "quantize"}], gates={"max_accuracy_drop": 30}))
    reports = tmp_path / "reports"
    first = compress_recipe(recipe=recipe, reports_dir=str(reports))
    assert first["status"] == "passed"
    card = json.loads((tmp_path / first["report"] / "report.json").read_text())
    assert card["reference"]["name"] == "reference (finetune)"
    assert card["reference_onnx"]["metrics"]["runtime"] == "onnxruntime"
    assert [s["kind"] for s in card["stages"]] == ["prune", "distill", "export", "quantize"]
    assert not any(s["reused"] for s in card["stages"])
    assert card["reference"]["metrics"]["value"] >= 90  # the tiny task is learnable
    lat = card["stages"][-1]["metrics"]["latency"]
    assert [(x["batch_size"], x["length"]) for x in lat] == [
        (1, "max"), (4, "max"), (1, "median"), (1, "p95")] and lat[0]["threads"] >= 1
    assert lat[0]["p50_ms"] <= lat[0]["p90_ms"] <= lat[0]["p99_ms"]
    assert card["stages"][2]["info"]["parity"]["max_abs_diff"] < 1e-4
    assert card["gates"][0]["gate"] == "max_accuracy_drop" and card["gates"][0]["passed"]
    assert card["environment"]["cpu"]["logical_cores"] >= 1
    md = (tmp_path / first["report"] / "report.md").read_text()
    assert "| quantize | onnxruntime |" in md

    art = Artifact.get("tiny-report-card")
    assert art is not None and art.type == "table"
    assert "quantize" in json.dumps(art.data)
    md = Artifact.get("tiny-report")
    assert md is not None and md.description.endswith(": passed")  # the last one is final
    assert "## Gates" in md.data and "Status: **passed**" in md.data

    again = compress_recipe(recipe=recipe, reports_dir=str(reports))
    card2 = json.loads((tmp_path / again["report"] / "report.json").read_text())
    assert again["report"] != first["report"]
    assert all(s["reused"] for s in card2["stages"]) and card2["reference"]["reused"]
    assert [s["model"]["hash"] for s in card2["stages"]] == \
           [s["model"]["hash"] for s in card["stages"]]
