"""Metrics as data: each metric declares its name and which direction is better, once.

Gates, `report --compare`, the diagnosis, early stopping, the search and the HTML page all read
the direction from here, so "is this worse?" has one answer. A metric also says how a change is
stated: in points (accuracy and F1, both 0-100) or relative (perplexity: +10% reads the same for
a model at 20 and at 200), and its unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel

from compress.measure import Latency


@dataclass(frozen=True)
class MetricDef:
    name: str
    higher_is_better: bool
    change: Literal["points", "relative"]
    description: str
    unit: str = ""

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
    MetricDef("accuracy", True, "points", "share of eval examples classified right (0-100)",
              "%"),
    MetricDef("macro_f1", True, "points", "F1 averaged over classes, each class counted "
                                          "equally (0-100): honest on imbalanced data", "%"),
    MetricDef("f1", True, "points", "F1 of the named positive class (0-100)", "%"),
    MetricDef("perplexity", False, "relative", "exp of the mean next-token loss on eval text",
              "ppl"),
    # causal LMs on prompt/response data (compress.lm_eval)
    MetricDef("answer_accuracy", True, "points", "greedy answers that match the reference "
              "response after normalisation (lowercase, no punctuation or articles) (0-100)",
              "%"),
    MetricDef("choice_accuracy", True, "points", "eval examples whose reference response is the "
              "choice with the highest log-likelihood (0-100)", "%"),
    MetricDef("response_perplexity", False, "relative", "exp of the mean loss on the response "
              "tokens of the eval pairs", "ppl"),
    MetricDef("probe_perplexity", False, "relative", "perplexity on the probe text "
              "(evaluation.probe_data): general ability, the over-distillation probe", "ppl"),
    # causal LMs, generation (compress.decode)
    MetricDef("decode_tokens_per_s", True, "relative", "tokens/s after the first, batch 1, "
              "greedy, KV cache", "tokens/s"),
    MetricDef("ttft_ms", False, "relative", "time to first token (prefill + one step), batch 1",
              "ms"),
    MetricDef("draft_acceptance", True, "points", "share of this model's draft tokens the "
              "reference accepts in assisted generation (0-100)", "%"),
    MetricDef("draft_speedup", True, "relative", "the reference's decode time alone / with this "
              "model drafting", "x"),
)}
CLASSIFICATION = ("accuracy", "macro_f1", "f1")
LM_TEXT = ("perplexity", "probe_perplexity")  # plain-text LM data
LM_PAIRS = ("answer_accuracy", "choice_accuracy", "response_perplexity", "probe_perplexity")


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
    # causal LMs: how decode speed, TTFT and draft acceptance were measured (compress.lm_eval)
    generation: dict[str, Any] | None = None

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


def default_metric(task: str, pairs: bool) -> str:
    """The card's metric when the recipe names none."""
    if task != "causal-lm":
        return "accuracy"
    return "answer_accuracy" if pairs else "perplexity"


def token_nll(logits: np.ndarray, labels: np.ndarray, mask: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (summed negative log-likelihood, tokens counted) of `labels` under `logits`
    (batch, seq, vocab) at the positions `mask` selects; labels already aligned (position t
    scores token t + 1). One implementation for every perplexity (blocks, responses, probe) and
    for choice scoring."""
    rows, pos = np.nonzero(mask)
    sel = np.asarray(logits)[rows, pos].astype(np.float64)  # (selected, vocab): only these
    top = sel.max(-1, keepdims=True) if len(sel) else np.zeros((0, 1))
    logz = np.log(np.exp(sel - top).sum(-1)) + top[:, 0]
    picked = sel[np.arange(len(sel)), np.asarray(labels)[rows, pos]]
    nll = np.zeros(mask.shape[0])
    np.add.at(nll, rows, logz - picked)
    return nll, np.asarray(mask).sum(-1).astype(np.int64)
