"""Unit tests for compress.vocab: trimming on tiny models built from configs, and the WordPiece
splitting argument that makes the trimmed tokenizer exact."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from compress.errors import StageError
from compress.testing import make_tiny_bert
from compress.vocab import (
    _trimmed_tokenizer_state,
    _wordpiece_state,
    character_ids,
    check_remap,
    trim_vocabulary,
    unknown_rate,
    used_token_ids,
)

pytestmark = pytest.mark.unit

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Longest-match matters here: "unbelievable" is "unbeliev ##able" in full, and other splits
# ("un ##believ ##able", "un ##b ##e ...") exist once longer pieces go.
PIECES = ["a", "b", "e", "l", "u", "n", "i", "v", "c", "d", "x", "un", "ab", "abc", "able",
          "believ", "unbeliev", "##a", "##b", "##e", "##l", "##i", "##v", "##n", "##u", "##c",
          "##able", "##believ", "##ble", "##cd", "##ab", "##li", "##ev"]


def _wordpiece_model(path: Path, pieces: list[str], seed: int = 0) -> Path:
    """A tiny BERT classifier whose tokenizer is WordPiece over `pieces` (subwords included)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = SPECIALS + pieces
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _logits(model_dir: Path, tok, texts: list[str]) -> torch.Tensor:
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.inference_mode():
        return model(**batch).logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("vocab") / "tiny")


@pytest.fixture(scope="module")
def wp(tmp_path_factory) -> Path:
    return _wordpiece_model(tmp_path_factory.mktemp("vocab") / "wp", PIECES)


def test_used_ids_follow_truncation_pairs_extras_and_min_count(tiny):
    tok = AutoTokenizer.from_pretrained(tiny)
    vocab = tok.get_vocab()
    c = used_token_ids(tok, ["the movie was good and fun"], max_length=4)  # [CLS] the movie [SEP]
    assert set(c) == {vocab[w] for w in ("[CLS]", "the", "movie", "[SEP]")}
    c = used_token_ids(tok, ["the movie", "the film"], text_pairs=["good", "bad"], max_length=16,
                       extra_texts=["awful"])
    assert c[vocab["the"]] == 2 and c[vocab["[SEP]"]] == 5 and c[vocab["awful"]] == 1
    assert {vocab["good"], vocab["bad"]} <= set(c)
    c = used_token_ids(tok, ["the movie", "the film"], max_length=16, min_count=2)
    assert vocab["the"] in c and vocab["movie"] not in c


def test_trim_tiny_bert_identical_logits_and_remapped_ids(tiny, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny)
    train = ["the movie was good", "a dull plot and bland acting", "the film is fun"]
    keep = used_token_ids(tok, train, max_length=32)
    out = tmp_path / "trimmed"
    facts = trim_vocabulary(tiny, out, list(keep), check_texts=train, max_length=32)

    old_to_new = {o: n for n, o in enumerate(sorted(set(keep) | set(tok.all_special_ids)))}
    assert facts["vocab_before"] == len(tok) and facts["vocab_after"] == len(old_to_new)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(old_to_new)
    assert facts["embedding_params_after"] == len(old_to_new) * 64
    assert facts["bytes_saved"] == facts["weights_bytes_before"] - facts["weights_bytes_after"] > 0
    assert facts["check"] == {"texts": 3, "covered": 3, "covered_exact": 3,
                              "violation_count": 0, "max_abs_diff": 0.0}

    new_tok = AutoTokenizer.from_pretrained(out)
    assert len(new_tok) == len(old_to_new)
    texts = ["the film was fun", "a good movie and a dull plot", "the the the"]
    for t in texts:  # every word of these was kept
        assert new_tok(t).input_ids == [old_to_new[i] for i in tok(t).input_ids]
    # padded batches, different lengths: identical logits
    diff = (_logits(tiny, tok, texts) - _logits(out, new_tok, texts)).abs().max()
    assert diff < 1e-5
    # a dropped word (one piece in this word-level vocab) becomes [UNK]
    ids = new_tok("the boring movie").input_ids
    assert ids[2] == new_tok.unk_token_id and new_tok.unk_token_id == old_to_new[tok.unk_token_id]
    assert new_tok.decode(ids, skip_special_tokens=False).startswith("[CLS] the [UNK] movie")


def test_special_tokens_always_kept_and_bad_ids_refused(tiny, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny)
    facts = trim_vocabulary(tiny, tmp_path / "specials", [])
    assert facts["vocab_after"] == len(tok.all_special_ids) == 5
    new_tok = AutoTokenizer.from_pretrained(tmp_path / "specials")
    assert new_tok("good movie").input_ids == [2, 1, 1, 3]  # [CLS] [UNK] [UNK] [SEP]
    assert new_tok.pad_token_id == 0 and new_tok.mask_token_id == 4
    with pytest.raises(StageError, match="keep ids"):
        trim_vocabulary(tiny, tmp_path / "bad", [len(tok)])


def test_wordpiece_longest_match_is_preserved(wp, tmp_path):
    tok = AutoTokenizer.from_pretrained(wp)
    pieces = lambda t, text: t.convert_ids_to_tokens(t(text).input_ids)[1:-1]  # noqa: E731
    assert pieces(tok, "unbelievable") == ["unbeliev", "##able"]
    assert pieces(tok, "believable") == ["believ", "##able"]
    vocab = tok.get_vocab()
    keep = list(used_token_ids(tok, ["unbelievable"], max_length=16))
    # shorter pieces a different split could use are kept too: they must not win
    keep += [vocab[p] for p in ("un", "##believ", "b", "##e", "##l", "##i", "##v", "##ble")]
    out = tmp_path / "wp-trim"
    trim_vocabulary(wp, out, keep)
    new = AutoTokenizer.from_pretrained(out)
    assert pieces(new, "unbelievable") == ["unbeliev", "##able"]
    assert (_logits(wp, tok, ["unbelievable"]) - _logits(out, new, ["unbelievable"])
            ).abs().max() < 1e-5
    # "believ" dropped: WordPiece re-splits with the longest kept pieces, no [UNK]
    assert pieces(new, "believable") == ["b", "##e", "##l", "##i", "##e", "##v", "##able"]
    # no kept piece for "x": the whole word is one [UNK]
    assert pieces(new, "xable") == ["[UNK]"]
    # the longest piece gone: the shorter kept ones take over
    trim_vocabulary(wp, tmp_path / "wp-trim2", [vocab[p] for p in ("un", "##believ", "##able")])
    new2 = AutoTokenizer.from_pretrained(tmp_path / "wp-trim2")
    assert pieces(new2, "unbelievable") == ["un", "##believ", "##able"]


def test_wordpiece_subset_property_randomised(wp):
    """For random texts and random kept subsets: a text whose original ids are all kept encodes
    to exactly the remapped ids (the subset argument in the module docstring)."""
    tok = AutoTokenizer.from_pretrained(wp)
    state = _wordpiece_state(tok)
    rng = random.Random(0)
    letters = "ablevincdux"
    checked = 0
    for trial in range(40):
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 9))) for _ in range(30)]
        texts = [" ".join(rng.sample(words, 3)) for _ in range(30)]
        used = used_token_ids(tok, texts[:20], max_length=64)
        drop = set(rng.sample(sorted(used), k=min(len(used) // 4, 5))) - set(tok.all_special_ids)
        keep = sorted((set(used) - drop) | set(tok.all_special_ids)
                      | {i for i in range(5, len(tok)) if rng.random() < 0.3})
        old_to_new = {o: n for n, o in enumerate(keep)}
        new_state, _ = _trimmed_tokenizer_state(state, keep, old_to_new)
        new = Tokenizer.from_str(json.dumps(new_state))
        new.no_padding()
        new.no_truncation()
        for t in texts:
            a = tok(t).input_ids
            if all(i in old_to_new for i in a):
                checked += 1
                assert new.encode(t).ids == [old_to_new[i] for i in a], (trial, t)
    assert checked > 300


def test_unk_word_failed_path_is_counted(tmp_path):
    # "abcd": greedy takes "abc", then finds no "##d": the whole word is [UNK]. Without "abc",
    # "ab ##cd" would match: so "abc" must count as used although it never reaches the model.
    path = _wordpiece_model(tmp_path / "unk", ["a", "ab", "abc", "##cd", "x", "##x"])
    tok = AutoTokenizer.from_pretrained(path)
    vocab = tok.get_vocab()
    assert tok("abcd").input_ids == [2, 1, 3]
    used = used_token_ids(tok, ["abcd", "ab"], max_length=8)
    assert vocab["abc"] in used
    keep = sorted(set(used) | {vocab["##cd"]})
    facts = trim_vocabulary(path, tmp_path / "kept", keep, check_texts=["abcd"], max_length=8)
    assert facts["check"]["covered_exact"] == 1
    # dropping "abc" changes an [UNK] word into pieces: reported, not a violation
    keep = [vocab["ab"], vocab["##cd"]]
    facts = trim_vocabulary(path, tmp_path / "lost", keep, check_texts=["abcd"], max_length=8)
    assert facts["check"]["covered"] == 1 and facts["check"]["covered_exact"] == 0
    assert facts["check"]["violation_count"] == 0


def test_check_remap_counts(tiny, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny)
    keep = used_token_ids(tok, ["the movie"], max_length=8)
    trim_vocabulary(tiny, tmp_path / "t", list(keep))
    new = AutoTokenizer.from_pretrained(tmp_path / "t")
    o2n = {o: n for n, o in enumerate(sorted(set(keep) | set(tok.all_special_ids)))}
    r = check_remap(tok, new, o2n, ["the movie", "movie the the", "the film"], 8)
    assert (r["texts"], r["covered"], r["covered_exact"], r["violation_count"]) == (3, 2, 2, 0)


def test_unknown_rate_and_character_ids(tiny, wp):
    tok = AutoTokenizer.from_pretrained(tiny)
    assert unknown_rate(tok, ["the movie"], 16) == 0.0
    assert unknown_rate(tok, ["the zebra", "the movie"], 16) == pytest.approx(1 / 4)
    vocab = tok.get_vocab()
    assert unknown_rate(tok, ["the movie"], 16, keep_ids=[vocab["the"]]) == pytest.approx(0.5)
    wtok = AutoTokenizer.from_pretrained(wp)
    chars = set(wtok.convert_ids_to_tokens(character_ids(wtok)))
    assert {"a", "##a", "x", "##v"} <= chars and not chars & {"ab", "##cd", "[UNK]"}


def test_tied_mlm_head_and_bias_are_sliced(tmp_path):
    from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

    src = make_tiny_bert(tmp_path / "cls")
    torch.manual_seed(0)
    cfg = BertConfig.from_pretrained(src)
    cfg.architectures = ["BertForMaskedLM"]
    mlm = BertForMaskedLM(cfg)
    with torch.no_grad():
        mlm.cls.predictions.bias.normal_()
    mlm.save_pretrained(tmp_path / "mlm")
    tok = AutoTokenizer.from_pretrained(src)
    tok.save_pretrained(tmp_path / "mlm")
    keep = sorted(used_token_ids(tok, ["the movie was good"], max_length=16))
    trim_vocabulary(tmp_path / "mlm", tmp_path / "mlm-trim", keep)
    old = AutoModelForMaskedLM.from_pretrained(tmp_path / "mlm").eval()
    new = AutoModelForMaskedLM.from_pretrained(tmp_path / "mlm-trim").eval()
    assert new.get_output_embeddings().weight is new.get_input_embeddings().weight
    keep = sorted(set(keep) | set(tok.all_special_ids))
    ids = tok("the movie was good", return_tensors="pt").input_ids
    new_ids = torch.tensor([[keep.index(int(i)) for i in ids[0]]])
    with torch.inference_mode():
        a, b = old(input_ids=ids).logits[..., keep], new(input_ids=new_ids).logits
    assert (a - b).abs().max() < 1e-5


def test_refuses_non_wordpiece(tmp_path):
    from compress.testing import make_tiny_llama

    path = make_tiny_llama(tmp_path / "llama", layers=1)
    with pytest.raises(StageError, match="WordPiece"):
        trim_vocabulary(path, tmp_path / "out", [5, 6])
