"""Every gate, checked directly on synthetic cards: pass, fail, and not applicable."""

from __future__ import annotations

import pytest

from compress.report import check_gates
from compress.spec import Gates
from tests.conftest import card, run

pytestmark = pytest.mark.unit


def _run(ref_value=86.0, final_value=85.0, *, metric="accuracy", ref_ms=40.0, final_ms=10.0,
         ref_mb=400.0, final_mb=100.0, onnx_ref_ms=None):
    r = run("r", card("reference", ref_value, ref_ms, ref_mb, metric=metric, kind="reference"),
            card("quantize", final_value, final_ms, final_mb, metric=metric))
    if onnx_ref_ms is not None:
        r.reference_onnx = card("reference (onnx fp32)", ref_value, onnx_ref_ms, ref_mb,
                                metric=metric)
        r.reference_onnx.metrics.runtime = r.stages[-1].metrics.runtime = "onnxruntime"
    return r


def _one(report, **gates):
    (g,) = check_gates(report, Gates(**gates))
    return g


def test_accuracy_drop():
    g = _one(_run(86.0, 85.0), max_accuracy_drop=1.0)
    assert g.passed and g.value == 1.0
    assert g.message == "accuracy 86.00 -> 85.00: drop 1.00 points (allowed 1)"
    assert not _one(_run(86.0, 84.9), max_accuracy_drop=1.0).passed
    assert _one(_run(86.0, 87.0), max_accuracy_drop=0.0).value == -1.0  # better passes


def test_metric_drop_reads_the_recipes_metric_and_its_direction():
    r = _run(80.0, 77.0, metric="macro_f1")
    for c in r.cards():
        c.metrics.scores = {"accuracy": 90.0, "macro_f1": c.metrics.value}
    g = _one(r, max_metric_drop=2.0)
    assert g.gate == "max_metric_drop" and not g.passed and g.value == 3.0
    assert g.message.startswith("macro_f1 80.00 -> 77.00: drop 3.00 points")
    assert _one(r, max_accuracy_drop=0.5).passed  # accuracy itself held (90 -> 90)


def test_perplexity_increase_is_relative():
    r = _run(20.0, 23.0, metric="perplexity")
    g = _one(r, max_perplexity_increase=0.2)
    assert g.passed and g.value == pytest.approx(0.15)
    assert g.message == "perplexity 20.00 -> 23.00: +15.0% (allowed +20.0%)"
    assert not _one(r, max_perplexity_increase=0.1).passed


def test_gates_about_a_metric_the_card_lacks_are_not_applicable():
    lm = _run(20.0, 23.0, metric="perplexity")
    assert check_gates(lm, Gates(max_accuracy_drop=1.0, max_metric_drop=1.0)) == []
    cls = _run()
    assert check_gates(cls, Gates(max_perplexity_increase=0.1)) == []


def test_size_reduction():
    g = _one(_run(ref_mb=400.0, final_mb=100.0), min_size_reduction=4.0)
    assert g.passed and g.value == 4.0 and g.message == "4.00x smaller on disk (required 4x)"
    assert not _one(_run(ref_mb=400.0, final_mb=101.0), min_size_reduction=4.0).passed


def test_speedup_is_like_for_like():
    """An ONNX final is compared with the reference timed in ONNX Runtime, not in PyTorch."""
    g = _one(_run(ref_ms=40.0, final_ms=10.0), min_speedup=3.0)
    assert g.passed and g.value == 4.0
    onnx = _run(ref_ms=40.0, final_ms=10.0, onnx_ref_ms=20.0)
    g = _one(onnx, min_speedup=3.0)
    assert not g.passed and g.value == 2.0
    assert g.message == "2.00x faster, p50 at batch 1 (separate timings; required 3x)"


def test_speedup_gate_prefers_the_head_to_head_measurement():
    from compress.report import HeadToHead

    r = _run(ref_ms=40.0, final_ms=10.0)  # separate timings say 4x
    r.head_to_head = HeadToHead(reference="reference", candidate="quantize", runtime="torch",
                                batch_size=1, sequence_length=64, rounds=5,
                                reference_ms=[30.0] * 5, candidate_ms=[10.0] * 5,
                                ratios=[2.9, 3.0, 3.0, 3.1, 3.0], speedup=3.0, low=2.9,
                                high=3.1, noisy=False)
    g = _one(r, min_speedup=3.5)
    assert not g.passed and g.value == 3.0
    assert g.message == "3.00x faster, p50 of a forward pass, batch 1, 64 tokens (head to " \
                        "head, 5 rounds 2.90-3.10x; required 3.5x)"


def test_no_speedup_across_runtimes():
    r = _run(ref_ms=40.0, final_ms=10.0)
    r.stages[-1].metrics.runtime = "onnxruntime"  # and no reference timed in ONNX Runtime
    g = _one(r, min_speedup=1.0)
    assert not g.passed and "no like-for-like reference" in g.message


def test_no_gates_without_a_compressed_model():
    r = run("r", card("reference", 86.0, 40.0, 400.0, kind="reference"))
    assert check_gates(r, Gates(max_accuracy_drop=0.0, min_size_reduction=2.0)) == []


def test_max_p50_is_the_final_models_own_latency():
    g = _one(_run(final_ms=10.0), max_p50_ms=12.0)
    assert g.passed and g.value == 10.0
    assert g.message == "p50 10.00 ms at batch 1 on this machine (allowed 12 ms)"
    assert not _one(_run(final_ms=12.5), max_p50_ms=12.0).passed


def test_quality_gates_are_the_metric_ones():
    gates = Gates(max_accuracy_drop=1.0, min_size_reduction=4.0, max_p50_ms=5.0,
                  max_perplexity_increase=0.1)
    assert gates.quality().model_dump(exclude_none=True) == {
        "max_accuracy_drop": 1.0, "max_perplexity_increase": 0.1}
