"""The plain-data parts of a recipe that are not stages: model, data, evaluation, gates.

Every config is a `Strict` model: unknown keys are errors (a typo must not be a silently ignored
setting) and values are plain data that round-trip through JSON. Stage configs live with their
stages (compress/stages/); compress.recipe assembles the whole recipe.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Task = Literal["sequence-classification", "causal-lm"]


class Strict(BaseModel):
    """Base for every config: unknown keys are errors, values are plain data (JSON round-trips)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
    path: str = Field(description="Local model directory (save_pretrained layout) or a hub id.")
    task: Task = "sequence-classification"
    num_labels: int | None = Field(None, ge=2, description="Classes; default: from the model/data.")
    revision: str | None = None
    trust_remote_code: bool = False


class DataSpec(Strict):
    """Classification: a text (and label) column. Causal LM: the text column, tokenized,
    concatenated and cut into blocks of `max_length` tokens; or prompt/response pairs
    (`prompt_column` + `response_column`), where losses and distillation cover the response."""

    path: str = Field(description="Local CSV/TSV/JSON(L)/Parquet/text file, or a hub dataset id.")
    format: Literal["auto", "csv", "json", "parquet", "text"] = "auto"
    delimiter: str | None = Field(None, description="CSV delimiter; default ',' ('\\t' for .tsv).")
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    train_split: str = "train"
    eval_split: str | None = Field(None, description="Named eval split; default: eval_fraction.")
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    prompt_column: str | None = Field(None, description="Causal LM: the prompt of each "
                                      "prompt/response pair (with response_column).")
    response_column: str | None = Field(None, description="Causal LM: the target response.")
    template: str = Field("{prompt}", description="How a prompt is asked: '{prompt}' is "
                          "replaced, e.g. 'Review: {prompt}\\nSentiment:'.")
    chat_template: bool = Field(True, description="Wrap the templated prompt in the "
                                "tokenizer's chat template (user turn) when it has one.")
    max_length: int = Field(128, ge=8, le=8192)
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)
    seed: int = 0

    @field_validator("template")
    @classmethod
    def _has_prompt(cls, v: str) -> str:
        return has_prompt_placeholder(v, "each prompt")


def has_prompt_placeholder(template: str, what: str) -> str:
    """A template that will be filled with prompts must say where they go."""
    if "{prompt}" not in template:
        raise ValueError(f"must contain {{prompt}}, where {what} goes")
    return template


class LatencySpec(Strict):
    batch_size: int = Field(32, ge=1, description="Timed at batch 1 and at this batch size.")
    sequence_length: int | None = Field(None, ge=1, description="Default: data.max_length.")
    real_lengths: bool = Field(
        True, description="Also time batch 1 at the eval texts' median and 95th-percentile "
        "token lengths (dynamic shapes; classifiers): what a served request takes.")
    warmup: int = Field(5, ge=0)
    runs: int = Field(30, ge=1)
    threads: int | None = Field(None, ge=1, description="Default: all cores of this machine.")
    head_to_head_rounds: int = Field(
        7, ge=5, description="The final speed-up: reference and final model timed in turns, "
        "this many rounds.")


class DecodeSpec(Strict):
    """Causal LMs: generation speed as a user feels it, and the model as a draft for the
    reference (compress.decode), on every card."""

    prompt_tokens: int = Field(32, ge=1)
    new_tokens: int = Field(32, ge=2)
    runs: int = Field(3, ge=1)
    draft: bool = Field(True, description="Acceptance rate and speed-up when this model drafts "
                        "for the reference in assisted generation (PyTorch models only).")
    draft_prompts: int = Field(2, ge=1, description="Eval prompts the reference answers.")
    draft_tokens: int = Field(32, ge=2)
    assistant_tokens: int = Field(5, ge=1, description="Tokens the draft proposes per step.")


class EvaluationSpec(Strict):
    metric: Literal["accuracy", "macro_f1", "f1", "perplexity", "answer_accuracy",
                    "choice_accuracy", "response_perplexity", "probe_perplexity"] | None = Field(
        None, description="The card's metric; default: accuracy for classifiers, perplexity "
        "for causal LMs on text, answer_accuracy on prompt/response data. macro_f1 and f1 (of "
        "positive_label) suit imbalanced data.")
    choices: list[str] | None = Field(
        None, min_length=2, description="Causal LMs on prompt/response data: the possible "
        "answers; choice_accuracy picks the one the model gives the highest log-likelihood.")
    max_new_tokens: int = Field(32, ge=1, description="Longest generated answer scored by "
                                "answer_accuracy (fewer when every eval response is shorter).")
    probe_data: str | None = Field(
        None, description="Causal LMs: a general text (e.g. hamlet.txt) whose perplexity every "
        "card shows: the over-distillation probe.")
    probe_tokens: int = Field(8192, ge=16, description="Tokens of probe_data scored.")
    probe_warn_increase: float = Field(
        0.2, ge=0, description="Warn when probe perplexity rises more than this share (0.2 = "
        "+20%) over the reference while the task metric holds.")
    decode: DecodeSpec | None = Field(DecodeSpec(), description="Causal LMs: decode tokens/s, "
                                      "time to first token, draft acceptance; null: off.")
    positive_label: str | int | None = Field(
        None, description="The positive class for f1 (a class name or id); default for two "
        "classes: class 1.")
    batch_size: int = Field(64, ge=1)
    max_samples: int | None = Field(None, ge=1, description="Cap on eval examples (same for all).")
    latency: LatencySpec = LatencySpec()
    reference_onnx: bool = Field(
        True, description="Also time the original in ONNX Runtime fp32, for like-for-like ratios."
    )


class Gates(Strict):
    """Checked on the final model against the reference (the original, or the fine-tuned one)."""

    @staticmethod
    def quality_names() -> tuple[str, ...]:
        """The gates on the task metric. Stages after the last training stage (export, INT8)
        do not win the metric back, so a search stops a trial that already fails one; and a
        failure of the other gates (size, speed) is not explained in metric terms."""
        return ("max_accuracy_drop", "max_metric_drop", "max_perplexity_increase")

    def quality(self) -> Gates:
        """Only the gates on the task metric."""
        return Gates(**{k: getattr(self, k) for k in self.quality_names()})

    max_accuracy_drop: float | None = Field(None, ge=0, description="In accuracy points (0-100).")
    max_metric_drop: float | None = Field(
        None, ge=0, description="The recipe's metric, in points (accuracy, macro_f1, f1).")
    max_p50_ms: float | None = Field(
        None, gt=0, description="The final model's p50 latency at batch 1 on this machine, ms.")
    max_perplexity_increase: float | None = Field(None, ge=0, description="Relative, 0.1 = +10%.")
    min_size_reduction: float | None = Field(None, gt=0, description="Reference bytes / final.")
    min_speedup: float | None = Field(None, gt=0, description="Reference p50 / final p50, batch 1.")
    max_probe_increase: float | None = Field(
        None, ge=0, description="Causal LMs: probe perplexity (evaluation.probe_data), "
        "relative, 0.5 = +50%: how much general ability the task may cost.")


class DiagnoseSpec(Strict):
    """When a gate fails, find which layers cost the most (see `compress diagnose`)."""

    on_gate_failure: bool = True
    max_samples: int = Field(128, ge=1, description="Eval examples per sensitivity probe.")
    top: int = Field(5, ge=1, description="Layers listed.")
