"""Metrics as data: each metric declares its name and which direction is better, once.

Gates, `report --compare`, the diagnosis, early stopping, the search and the HTML page all read
the direction from here, so "is this worse?" has one answer. A metric also says how a change is
stated: in points (accuracy and F1, both 0-100) or relative (perplexity: +10% reads the same for
a model at 20 and at 200).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel

from compress.measure import Latency


@dataclass(frozen=True)
class MetricDef:
    name: str
    higher_is_better: bool
    change: Literal["points", "relative"]
    description: str

    def loss(self, before: float, after: float) -> float:
        """How much worse `after` is than `before` (negative: better): points, or a fraction
        (0.1 = 10% worse) for relative metrics."""
        if self.change == "relative":
            ratio = after / before if before else float("inf")
            return ratio - 1 if not self.higher_is_better else 1 - ratio
        return before - after if self.higher_is_better else after - before

    def describe_change(self, before: float, after: float) -> str:
        """`-1.23 points` / `+12.3%`, signed as the value moved."""
        if self.change == "relative":
            return f"{(after / before - 1) if before else float('inf'):+.1%}"
        return f"{after - before:+.2f} points"

    def score(self, value: float) -> float:
        """Higher is better, whatever the metric (early stopping and the search maximise it)."""
        return value if self.higher_is_better else -value


METRICS: dict[str, MetricDef] = {m.name: m for m in (
    MetricDef("accuracy", True, "points", "share of eval examples classified right (0-100)"),
    MetricDef("macro_f1", True, "points", "F1 averaged over classes, each class counted "
                                          "equally (0-100): honest on imbalanced data"),
    MetricDef("f1", True, "points", "F1 of the named positive class (0-100)"),
    MetricDef("perplexity", False, "relative", "exp of the mean next-token loss on eval text"),
)}
CLASSIFICATION = ("accuracy", "macro_f1", "f1")


def metric_def(name: str) -> MetricDef:
    return METRICS[name]


class Metrics(BaseModel):
    """What evaluating one model measured: the recipe's metric (`value`), every other score the
    task offers, latency, size, parameters, MACs and memory."""

    metric: str
    value: float  # the recipe's metric: accuracy/F1 in points (0-100), or perplexity
    scores: dict[str, float] = {}  # every metric computed for this model, `metric` included
    eval_samples: int
    runtime: str
    device: str
    latency: list[Latency]
    parameters: int
    size_bytes: int  # weights on disk
    dir_bytes: int  # everything in the folder (tokenizer, config, ...)
    peak_rss_mb: float
    rss_increase_mb: float
    cuda_peak_mb: float | None = None
    eval_seconds: float
    macs: int | None = None  # multiply-accumulates of the weight matmuls for one timed sequence

    @property
    def definition(self) -> MetricDef:
        return METRICS[self.metric]

    def all_scores(self) -> dict[str, float]:
        """Every score, the recipe's metric (`value`, the authoritative one) included."""
        return {**self.scores, self.metric: self.value}


def classification_scores(pred: np.ndarray, labels: np.ndarray, num_labels: int,
                          positive: int | None = None) -> dict[str, float]:
    """Accuracy, macro-F1 and (given a positive class) its F1, in points, from predicted and
    true class ids. A class never predicted nor present scores F1 0 in the macro average only
    if it is present in the labels (absent classes are left out, as scikit-learn's labels=
    present would)."""
    pred, labels = np.asarray(pred).astype(int), np.asarray(labels).astype(int)
    out = {"accuracy": 100.0 * float((pred == labels).mean()) if len(labels) else 0.0}
    f1s = {}
    for c in range(num_labels):
        tp = int(((pred == c) & (labels == c)).sum())
        fp = int(((pred == c) & (labels != c)).sum())
        fn = int(((pred != c) & (labels == c)).sum())
        f1s[c] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    present = [v for c, v in f1s.items() if v is not None and (labels == c).any()]
    out["macro_f1"] = 100.0 * float(np.mean(present)) if present else 0.0
    if positive is not None:
        out["f1"] = 100.0 * (f1s.get(positive) or 0.0)
    return {k: round(v, 4) for k, v in out.items()}
