"""Metrics as data: directions, units, and classification scores computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from compress.metrics import METRICS, classification_scores

pytestmark = pytest.mark.unit


def test_each_metric_declares_its_direction_and_unit():
    assert METRICS["accuracy"].higher_is_better and METRICS["accuracy"].change == "points"
    assert not METRICS["perplexity"].higher_is_better
    assert METRICS["perplexity"].change == "relative"
    assert METRICS["accuracy"].loss(86.0, 85.0) == pytest.approx(1.0)
    assert METRICS["accuracy"].loss(86.0, 87.0) == pytest.approx(-1.0)
    assert METRICS["perplexity"].loss(20.0, 22.0) == pytest.approx(0.1)
    assert METRICS["perplexity"].loss(20.0, 18.0) == pytest.approx(-0.1)
    assert METRICS["perplexity"].score(20.0) > METRICS["perplexity"].score(30.0)
    assert METRICS["macro_f1"].describe_change(80.0, 77.5) == "-2.50 points"
    assert METRICS["perplexity"].describe_change(20.0, 21.0) == "+5.0%"


def test_classification_scores_by_hand():
    # 10 examples, class 1 is rare (2 of 10). A model that always says 0 scores 80% accuracy
    # but its macro-F1 shows it never finds class 1.
    labels = np.array([0] * 8 + [1] * 2)
    always0 = np.zeros(10, dtype=int)
    s = classification_scores(always0, labels, 2, positive=1)
    assert s["accuracy"] == 80.0
    assert s["f1"] == 0.0
    # class 0: tp 8, fp 2, fn 0 -> F1 16/18; class 1: F1 0 -> macro (16/18 + 0) / 2
    assert s["macro_f1"] == pytest.approx(100 * (16 / 18) / 2, abs=1e-3)
    pred = np.array([0] * 7 + [1] + [1, 0])  # one false positive, one hit, one miss
    s = classification_scores(pred, labels, 2, positive=1)
    assert s["accuracy"] == 80.0
    # class 1: tp 1, fp 1, fn 1 -> 2/4; class 0: tp 7, fp 1, fn 1 -> 14/16
    assert s["f1"] == pytest.approx(50.0)
    assert s["macro_f1"] == pytest.approx(100 * (0.5 + 14 / 16) / 2, abs=1e-3)


def test_classes_absent_from_the_labels_do_not_count_in_macro_f1():
    s = classification_scores(np.array([0, 1, 1]), np.array([0, 1, 1]), 3)
    assert s["macro_f1"] == 100.0 and "f1" not in s
