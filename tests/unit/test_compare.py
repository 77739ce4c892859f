"""Night-to-night comparison: every number on the card, each metric in its own direction."""

from __future__ import annotations

import pytest

from compress.compare import Tolerances, compare
from compress.render import comparison_markdown
from tests.conftest import card, run

pytestmark = pytest.mark.unit


@pytest.fixture
def tonight():
    return run("run-42", card("reference", 86.0, 40.0, 438.0, kind="reference"),
               card("prune", 85.6, 25.0, 300.0), card("quantize", 85.2, 10.0, 110.0))


def test_identical_reports_flag_nothing(tonight):
    result = compare(tonight, tonight.model_copy(deep=True))
    assert result.problems == []
    lines = comparison_markdown(result).splitlines()
    assert lines[0].startswith("| stage | metric a → b")
    assert any(line.startswith("| prune |") for line in lines)
    assert any(line.startswith("| final (quantize) |") for line in lines)


def test_accuracy_drop_and_latency_rise(tonight):
    b = tonight.model_copy(deep=True)
    b.stages[-1].metrics.value = 83.9  # -1.30 points
    b.stages[0].metrics.latency[0].p50_ms = 30.0  # prune b1: 25 -> 30 ms, +20 %
    b.stages[1].metrics.latency[0].p50_ms = 10.5  # +5 %: within tolerance
    problems = compare(tonight, b).problems
    assert "final (quantize): accuracy 85.20 -> 83.90 (-1.30 points, allowed -0.50 points)" \
        in problems
    assert len(problems) == 2
    assert problems[0].startswith("prune: p50 batch-1 25.00 -> 30.00 ms (+20.0%")
    loose = Tolerances(metric_drop_points=2.0, latency_rise=0.25)
    assert compare(tonight, b, loose).problems == []


def test_every_batch_size_is_checked(tonight):
    b = tonight.model_copy(deep=True)
    b.stages[0].metrics.latency[1].p50_ms *= 1.5  # batch 8 only
    (msg,) = compare(tonight, b).problems
    assert msg.startswith("prune: p50 batch-8")


def test_a_model_that_grew_is_a_regression(tonight):
    """A final model 3.5x larger used to compare as no regression (exit 0)."""
    b = tonight.model_copy(deep=True)
    b.stages[-1].metrics.size_bytes = int(b.stages[-1].metrics.size_bytes * 3.5)
    (msg,) = compare(tonight, b).problems
    assert msg.startswith("final (quantize): size 110 -> 385 MB (3.50x")
    b.stages[-1].metrics.macs = 2_000_000_000
    tonight.stages[-1].metrics.macs = 1_000_000_000
    assert any("MACs 1 -> 2 GMACs" in p for p in compare(tonight, b).problems)


def test_every_score_on_the_card_is_checked(tonight):
    """macro-F1 can fall while accuracy holds (imbalanced data): both are on the card."""
    for c in (tonight.stages[-1],):
        c.metrics.scores = {"accuracy": 85.2, "macro_f1": 80.0}
    b = tonight.model_copy(deep=True)
    b.stages[-1].metrics.scores = {"accuracy": 85.2, "macro_f1": 75.0}
    (msg,) = compare(tonight, b).problems
    assert msg.startswith("final (quantize): macro_f1 80.00 -> 75.00 (-5.00 points")


def test_perplexity_is_relative_and_lower_is_better():
    a = run("a", card("reference", 20.0, 40.0, 500.0, metric="perplexity"),
            card("quantize", 21.0, 10.0, 130.0, metric="perplexity"))
    b = a.model_copy(deep=True)
    b.stages[0].metrics.value = 21.2  # +0.95 %: fine at the default +2 %
    assert compare(a, b).problems == []
    b.stages[0].metrics.value = 21.5  # +2.4 %
    (msg,) = compare(a, b).problems
    assert msg.startswith("final (quantize): perplexity 21.00 -> 21.50 (+2.4%, allowed +2.0%)")
    b.stages[0].metrics.value = 18.0  # better
    assert compare(a, b).problems == []


def test_changed_recipes(tonight):
    b = run("run-43", tonight.reference, tonight.stages[0], card("distill", 85.5, 12.0, 200.0))
    result = compare(tonight, b)
    text = comparison_markdown(result)
    assert "| distill | — → 85.50 | — → 12.00 | — → 200.0 |" in text
    assert "| quantize | 85.20 → — |" in text
    assert any(line.startswith("| final (distill) | 85.20 → 85.50") for line in text.split("\n"))
    assert {p.split(":")[0] for p in result.problems} == {"final (distill)"}
    assert any("p50 batch-1" in p for p in result.problems)
    assert any("size 110 -> 200 MB" in p for p in result.problems)
