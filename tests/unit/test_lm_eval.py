"""Prompt/response data and LM task metrics as pure logic: rendering, response-only labels,
BOS blocks, answer normalisation, the one NLL, the over-distillation warning and probe gate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from compress.data import PROMPT, RESPONSE, encode, encode_lm, fit_pair, load_task_data, render_pair
from compress.lm_eval import normalize_answer, sequence_nll
from compress.metrics import METRICS, token_nll
from compress.spec import DataSpec

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from compress.testing import _word_tokenizer

    return _word_tokenizer(tmp_path_factory.mktemp("tok"))


def test_pairs_load_with_the_template_and_split_at_random(tmp_path):
    from compress.testing import make_pairs_csv

    spec = DataSpec(path=str(make_pairs_csv(tmp_path / "p.csv", rows=40)),
                    prompt_column="prompt", response_column="response",
                    template="review : {prompt}")
    d = load_task_data(spec, task="causal-lm")
    assert d.causal_lm and d.instruct and len(d.eval) == 4
    assert all(p.startswith("review : the ") for p in d.train[PROMPT])
    assert set(d.train[RESPONSE]) == {"good", "bad"}
    assert d.train["text"] == d.train[PROMPT]  # the latency batch reads the prompts


def test_template_needs_its_placeholder():
    with pytest.raises(ValueError, match=r"must contain \{prompt\}"):
        DataSpec(path="x.csv", template="Review:")


def test_labels_cover_the_response_and_eos_only(tok):
    import datasets

    ds = datasets.Dataset.from_dict({PROMPT: ["the film was good"], RESPONSE: ["good"],
                                     "chat": [True], "text": ["the film was good"]})
    row = encode(ds, tok, 32)[0]
    ids = tok("the film was good good", add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == ids + [tok.eos_token_id]
    assert row["labels"] == [-100] * 4 + [ids[-1], tok.eos_token_id]


def test_a_long_prompt_loses_its_start_not_the_answer():
    p, r = fit_pair([1, 10, 11, 12, 13, 14], [20, 2], 5, keep_first=True)
    assert p == [1, 13, 14] and r == [20, 2]
    p, r = fit_pair([10, 11, 12, 13], [20, 21, 22, 23, 24, 2], 4, keep_first=False)
    assert p == [13] and r == [20, 21, 22]


def test_chat_template_renders_the_assistant_turn(tok):
    tok.chat_template = ("{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
                         "{% if add_generation_prompt %}<s> {% endif %}")
    try:
        p_ids, r_ids = render_pair(tok, "the film", "good", True)
        assert tok.decode(p_ids) == "<s> the film </s> <s>"
        assert tok.decode(r_ids) == "good </s>"
        assert render_pair(tok, "the film", "good", False)[0] == tok(
            "the film", add_special_tokens=False)["input_ids"]
    finally:
        tok.chat_template = None


def test_blocks_start_with_bos_when_the_tokenizer_adds_one(tok):
    import datasets
    from tokenizers.processors import TemplateProcessing

    ds = datasets.Dataset.from_dict({"text": ["the film was good ."] * 6})
    plain = encode_lm(ds, tok, 8)
    assert plain[0]["input_ids"][0] != tok.bos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    try:
        with_bos = encode_lm(ds, tok, 8)
    finally:
        tok._tokenizer.post_processor = None
    assert all(b[0] == tok.bos_token_id and len(b) == 8 for b in with_bos["input_ids"])
    assert with_bos[0]["input_ids"][1:] == plain[0]["input_ids"][:7]


@pytest.mark.parametrize(("a", "b"), [("Positive.", "positive"), ("  The answer ", "answer"),
                                      ("an apple, a day!", "apple day")])
def test_answers_are_normalised_like_squad(a, b):
    assert normalize_answer(a) == b


def test_token_nll_by_hand():
    logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    labels = np.array([[1, 1]])
    nll, n = token_nll(logits, labels, np.array([[True, True]]))
    assert n.tolist() == [2] and nll[0] == pytest.approx(-math.log(0.25) - math.log(0.8))
    nll, n = token_nll(logits, labels, np.array([[False, True]]))
    assert n.tolist() == [1] and nll[0] == pytest.approx(-math.log(0.8))


def test_sequence_nll_scores_the_response_tokens_only():
    vocab = 5
    table = np.log(np.full((vocab, vocab), 0.1) + np.eye(vocab) * 0.5)  # next = same token

    def logits(batch):
        return table[batch["input_ids"]]

    rows = [([1, 2], [2, 2]), ([3], [4])]
    nll, n = sequence_nll(logits, rows, pad=0, batch_size=1)
    assert n.tolist() == [2, 1]
    assert nll[0] == pytest.approx(-2 * math.log(0.6))  # 2 -> 2 twice
    assert nll[1] == pytest.approx(-math.log(0.1))  # 3 -> 4


def test_every_metric_declares_direction_and_unit():
    for name in ("answer_accuracy", "choice_accuracy", "response_perplexity",
                 "probe_perplexity", "decode_tokens_per_s", "ttft_ms", "draft_acceptance",
                 "draft_speedup"):
        m = METRICS[name]
        assert m.unit and m.description
    assert not METRICS["ttft_ms"].higher_is_better and METRICS["draft_acceptance"].change == \
        "points"


def _card(name, scores, metric="answer_accuracy"):
    from tests.conftest import card

    c = card(name, scores[metric], 10.0, 100.0, metric=metric)
    c.metrics.scores = scores
    return c


def test_over_distillation_warns_when_the_probe_falls_and_the_task_holds():
    from compress.report import over_distillation

    ref = _card("teacher", {"answer_accuracy": 80.0, "probe_perplexity": 40.0})
    held = _card("student", {"answer_accuracy": 79.0, "probe_perplexity": 60.0})
    w = over_distillation(ref, held, 0.2)
    assert w and "over-distillation: probe perplexity 40.00 -> 60.00 (+50%" in w
    assert over_distillation(ref, held, 0.6) is None  # within the share
    lost = _card("student", {"answer_accuracy": 60.0, "probe_perplexity": 60.0})
    assert over_distillation(ref, lost, 0.2) is None  # the task did not hold: a different story


def test_probe_gate_and_side_cards_in_the_report():
    from compress.report import RunReport, check_gates
    from compress.spec import Gates

    ref = _card("teacher", {"answer_accuracy": 80.0, "probe_perplexity": 40.0})
    final = _card("student", {"answer_accuracy": 79.0, "probe_perplexity": 70.0})
    peer = _card("distill (peer)", {"answer_accuracy": 81.0, "probe_perplexity": 41.0})
    final.side = [peer]
    report = RunReport(recipe="r", run_id="1", started_at="now", reference=ref, stages=[final])
    [gate] = check_gates(report, Gates(max_probe_increase=0.5))
    assert not gate.passed and "probe perplexity 40.00 -> 70.00" in gate.message
    assert [c.name for c in report.cards()] == ["teacher", "student", "distill (peer)"]
    assert report.final is final


def test_options_added_later_leave_existing_ids_alone():
    """Recipes that do not use the new fields keep their output ids (no needless rebuilds)."""
    from compress.data import _fingerprint_fields
    from compress.stages.distill import DistillConfig

    new = {"student", "sequence_level", "rationale", "mutual"}
    assert not new & set(DistillConfig().identity())
    assert DistillConfig(mutual=True).identity()["mutual"] is True
    assert DistillConfig(sequence_level={"seed": 1}).identity()["sequence_level"]["seed"] == 1
    fields = _fingerprint_fields(DataSpec(path="d.csv"))
    assert not {"prompt_column", "response_column", "template", "chat_template"} & set(fields)
    assert _fingerprint_fields(DataSpec(path="d.csv", template="Q: {prompt}"))["template"]
