"""HTML report page and Pareto front, on synthetic run reports (shared with test_compare)."""

from __future__ import annotations

import re

import pytest

from compress.html_report import pareto_front, render_html
from compress.report import GateResult, RunReport, read_report
from compress.report_io import write_report
from tests.conftest import card, run

pytestmark = pytest.mark.unit

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


def test_write_report_writes_every_format_atomically(tonight, tmp_path):
    folder = write_report(tonight, tmp_path / "out")
    assert (folder / "report.html").read_text(encoding="utf-8") == render_html(tonight)
    assert read_report(folder) == tonight
    assert (folder / "report.md").read_text().startswith("# bert-edge — run run-42")
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
