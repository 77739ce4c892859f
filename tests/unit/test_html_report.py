"""HTML report page, Pareto front and night-to-night comparison, on synthetic run reports."""

from __future__ import annotations

import re

import pytest

from compress.artifact import ModelRef
from compress.evaluate import Metrics
from compress.html_report import compare, pareto_front, render_html, write_html
from compress.measure import Latency
from compress.report import GateResult, RunReport, StageCard

pytestmark = pytest.mark.unit

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


@pytest.fixture
def tonight() -> RunReport:
    r = run("run-42", card("reference", 86.0, 40.0, 438.0, kind="reference"),
            card("prune", 85.6, 25.0, 300.0), card("quantize", 85.2, 10.0, 110.0))
    r.gates = [GateResult(gate="max_accuracy_drop", passed=True, value=0.8, threshold=1.0,
                          message="accuracy 86.00 -> 85.20: drop 0.80 points (allowed 1)")]
    return r


def test_page_is_self_contained_and_has_every_part(tonight):
    earlier = run("run-41", card("reference", 86.0, 40.0, 438.0),
                  card("quantize", 84.0, 12.0, 110.0))
    page = render_html(tonight, [earlier])
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<svg") == 3  # size bars, latency bars, scatter
    for name in ("reference", "prune", "quantize", "run-42", "run-41", "bert-edge",
                 "max_accuracy_drop", "Test CPU 9000", "avx512_vnni", "onnxruntime 1.31.0"):
        assert name in page
    assert 'class="badge passed"' in page
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<(script|link|img|iframe)\b|\bsrc=|@import|url\(", page)
    assert 'class="pareto"' in page  # the step line


def test_text_is_escaped(tonight):
    tonight.stages[0].name = "<script>alert(1)</script>"
    tonight.recipe = 'a"b&c'
    page = render_html(tonight)
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a&quot;b&amp;c" in page


def test_pareto_front_on_hand_made_points():
    pts = [(10.0, 80.0), (20.0, 85.0), (15.0, 79.0), (30.0, 85.0), (5.0, 70.0), (40.0, 90.0),
           (10.0, 75.0)]
    # (15,79) beaten by (10,80); (30,85) by (20,85); (10,75) by (10,80)
    assert pareto_front(pts, higher_is_better=True) == [4, 0, 1, 5]
    # lower is better (perplexity): the fastest point already has the lowest value
    assert pareto_front(pts, higher_is_better=False) == [4]
    ppl = [(10.0, 12.0), (20.0, 11.0), (15.0, 13.0), (30.0, 10.5)]
    assert pareto_front(ppl, higher_is_better=False) == [0, 1, 3]
    assert pareto_front([], higher_is_better=True) == []
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)], higher_is_better=True) == [0]


def test_scatter_marks_exactly_the_front(tonight):
    slow_bad = run("run-40", card("reference", 86.0, 40.0, 438.0),
                   card("quantize", 84.0, 30.0, 110.0))
    page = render_html(tonight, [slow_bad])
    # reference (40, 86), prune (25, 85.6), quantize (10, 85.2) are all non-dominated;
    # run-40's final (30, 84) is beaten by prune
    assert page.count('class="front"') == 3


def test_compare_identical_reports_flags_nothing(tonight):
    text, problems = compare(tonight, tonight.model_copy(deep=True))
    assert problems == []
    lines = text.splitlines()
    assert lines[0].startswith("| stage | metric a → b")
    assert any(line.startswith("| prune |") for line in lines)
    assert any(line.startswith("| final (quantize) |") for line in lines)


def test_compare_flags_accuracy_drop_and_latency_rise(tonight):
    b = tonight.model_copy(deep=True)
    b.stages[-1].metrics.value = 83.9  # -1.30 points
    b.stages[0].metrics.latency[0].p50_ms = 30.0  # prune b1: 25 -> 30 ms, +20 %
    b.stages[1].metrics.latency[0].p50_ms = 10.5  # +5 %: within tolerance
    _, problems = compare(tonight, b)
    assert "final (quantize): accuracy 85.20 -> 83.90 (-1.30 points, allowed -0.50)" in problems
    assert len(problems) == 2
    assert problems[0].startswith("prune: p50 batch-1 25.00 -> 30.00 ms (+20.0%")
    assert compare(tonight, b, max_metric_drop=2.0, max_latency_rise=0.25)[1] == []


def test_compare_perplexity_is_relative_and_lower_is_better():
    a = run("a", card("reference", 20.0, 40.0, 500.0, metric="perplexity"),
            card("quantize", 21.0, 10.0, 130.0, metric="perplexity"))
    b = a.model_copy(deep=True)
    b.stages[0].metrics.value = 21.05  # +0.24 %: fine at 0.5 %
    assert compare(a, b)[1] == []
    b.stages[0].metrics.value = 21.5  # +2.4 %
    (msg,) = compare(a, b)[1]
    assert msg.startswith("final (quantize): perplexity 21.00 -> 21.50")
    b.stages[0].metrics.value = 18.0  # better
    assert compare(a, b)[1] == []


def test_compare_handles_changed_recipes(tonight):
    b = run("run-43", tonight.reference, tonight.stages[0], card("distill", 85.5, 12.0, 200.0))
    text, problems = compare(tonight, b)
    assert "| distill | — → 85.50 | — → 12.00 | — → 200.0 |" in text
    assert "| quantize | 85.20 → — |" in text
    assert any(line.startswith("| final (distill) | 85.20 → 85.50") for line in text.split("\n"))
    assert len(problems) == 1 and problems[0].startswith("final (distill): p50 batch-1")


def test_write_html(tonight, tmp_path):
    path = write_html(tonight, tmp_path / "out")
    assert path == tmp_path / "out" / "report.html"
    assert path.read_text(encoding="utf-8") == render_html(tonight)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
