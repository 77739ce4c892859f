"""Vocabulary trimming for WordPiece encoders (BERT, DistilBERT, MiniLM).

Why: in all-MiniLM-L6-v2 the 30,522 x 384 word-embedding matrix is half of the weights, and one
task's data uses only a fraction of the rows. Dropping the unused rows shrinks the file without
touching any computation, so logits on text made of kept tokens are unchanged.

How the tokenizer stays exact. The trimmed tokenizer is the original one with the vocabulary cut
to the kept pieces, renumbered in the old order (tokenizer.json's `model.vocab`, vocab.txt, the
special-token ids of the post-processor, padding and added tokens). WordPiece splits each word by
greedy longest match, left to right, against the vocabulary. The kept vocabulary V' is a subset
of V, so if every piece of a word's original split is kept, then at each step the piece chosen
under V is still there, and no longer candidate can appear (it would have won under V already):
the word splits identically. Hence every text whose original ids are all kept encodes to exactly
the remapped ids, truncation included. One exception: a word that fell back to [UNK] under V may
split under V' when a piece its failed greedy path went through is dropped, so `used_token_ids`
also counts those path pieces: the texts the keep set was built from then all stay exact.

What a dropped piece becomes. WordPiece cannot turn one piece of a word into [UNK]: it either
splits the word into other, shorter kept pieces, or, when no kept piece matches somewhere in the
word, encodes the whole word as one [UNK]. So words with dropped pieces are re-split, not
[UNK]-ed token by token; mapping ids one-to-one would need several strings per id, which neither
vocab.txt nor the tokenizers serializer keeps (a later save_pretrained would silently undo it).
`unknown_rate(..., keep_ids=...)` estimates the per-token share before trimming; measured on the
trimmed tokenizer it is the share that really falls back to [UNK]. Keeping `character_ids` (every
single-character piece) means only words with characters the original vocabulary lacked become
[UNK]. `trim_vocabulary(check_texts=...)` re-encodes texts with both tokenizers and reports how
many come out exactly remapped.
"""

from __future__ import annotations

import collections
import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from compress.errors import StageError

BATCH = 512
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKEN_ID_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id",
                 "mask_token_id", "unk_token_id", "decoder_start_token_id")


def _encode(tokenizer: Any, texts: Sequence[str], text_pairs: Sequence[str] | None,
            max_length: int) -> list[list[int]]:
    """Ids as the model is fed them: special tokens added, truncated to max_length, no padding."""
    out: list[list[int]] = []
    for i in range(0, len(texts), BATCH):
        pairs = list(text_pairs[i:i + BATCH]) if text_pairs is not None else None
        enc = tokenizer(list(texts[i:i + BATCH]), pairs, truncation=True, max_length=max_length,
                        padding=False)
        out.extend(enc["input_ids"])
    return out


def _wordpiece_state(tokenizer: Any) -> dict[str, Any]:
    if not getattr(tokenizer, "is_fast", False):
        raise StageError("vocab: needs a fast (tokenizers) tokenizer")
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = state["model"]["type"]
    if kind != "WordPiece":
        raise StageError(f"vocab: trimming supports WordPiece tokenizers (BERT, DistilBERT, "
                         f"MiniLM); this one is {kind}")
    return state


def _failed_paths(tokenizer: Any, model: dict[str, Any], text: str) -> set[int]:
    """Ids of the pieces WordPiece matched inside words it then gave up on ([UNK] words).
    `model` is tokenizer.json's WordPiece model section."""
    vocab, prefix = model["vocab"], model["continuing_subword_prefix"]
    backend, unk = tokenizer.backend_tokenizer, tokenizer.unk_token_id
    norm = backend.normalizer.normalize_str(text) if backend.normalizer else text
    words = backend.pre_tokenizer.pre_tokenize_str(norm) if backend.pre_tokenizer else [(norm, 0)]
    ids: set[int] = set()
    for word, _ in words:
        if len(word) > model["max_input_chars_per_word"]:
            continue  # [UNK] by length: no vocabulary change splits it
        if [t.id for t in backend.model.tokenize(word)] != [unk]:
            continue
        start = 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = (prefix if start else "") + word[start:end]
                if piece in vocab:
                    ids.add(vocab[piece])
                    start = end
                    break
            else:
                break
    return ids


def used_token_ids(tokenizer: Any, texts: Sequence[str], *,
                   text_pairs: Sequence[str] | None = None, max_length: int,
                   min_count: int = 1, extra_texts: Iterable[str] = ()) -> collections.Counter:
    """How often each id occurs when `texts` (paired with `text_pairs` if given) and
    `extra_texts` (e.g. label words, prompts) are tokenized as the model will be fed them,
    truncation included; ids seen fewer than `min_count` times are left out. Pieces on the
    failed path of [UNK] words count too (see the module docstring), so these texts stay
    exactly encodable after trimming."""
    texts, extra = list(texts), list(extra_texts)
    if text_pairs is not None and len(text_pairs) != len(texts):
        raise StageError(f"vocab: {len(text_pairs)} text pairs for {len(texts)} texts")
    jobs = [(texts, list(text_pairs) if text_pairs is not None else None), (extra, None)]
    counts: collections.Counter = collections.Counter()
    unk, model = tokenizer.unk_token_id, None
    for group, pairs in jobs:
        for k, ids in enumerate(_encode(tokenizer, group, pairs, max_length)):
            counts.update(ids)
            if unk in ids:
                model = model or _wordpiece_state(tokenizer)["model"]
                for t in (group[k], pairs[k] if pairs else None):
                    if t:
                        counts.update(_failed_paths(tokenizer, model, t))
    return collections.Counter({i: n for i, n in counts.items() if n >= min_count})


def character_ids(tokenizer: Any) -> list[int]:
    """Ids of every single-character piece ("a" and "##a"). Kept, they let any word spelled
    with known characters split into kept pieces instead of falling back to [UNK]."""
    model = _wordpiece_state(tokenizer)["model"]
    prefix = model["continuing_subword_prefix"]
    return sorted(i for t, i in model["vocab"].items()
                  if len(t) == 1 or (t.startswith(prefix) and len(t) == len(prefix) + 1))


def unknown_rate(tokenizer: Any, texts: Sequence[str], max_length: int, *,
                 keep_ids: Iterable[int] | None = None) -> float:
    """Share of the text tokens the model sees ([CLS]/[SEP]/padding excluded) that are [UNK].

    With `keep_ids`, tokens whose ids are not kept count as unknown too: the estimate for a
    trimmed vocabulary that maps dropped pieces one-to-one to [UNK] (see the module docstring
    for why WordPiece re-splits instead; the trimmed tokenizer's own rate is usually lower)."""
    unk = tokenizer.unk_token_id
    special = set(tokenizer.all_special_ids) - {unk}
    keep = set(keep_ids) | {unk} if keep_ids is not None else None
    total = bad = 0
    for ids in _encode(tokenizer, list(texts), None, max_length):
        for i in ids:
            if i in special:
                continue
            total += 1
            bad += i == unk or (keep is not None and i not in keep)
    return bad / total if total else 0.0


# --- trimming ------------------------------------------------------------------------------------

def _remap_post_processor(node: Any, old_to_new: dict[int, int]) -> Any:
    """Special-token ids inside a (possibly nested) post-processor: TemplateProcessing's
    special_tokens[*].ids, BertProcessing/RobertaProcessing's [token, id] pairs."""
    if isinstance(node, list):
        return [_remap_post_processor(n, old_to_new) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _remap_post_processor(v, old_to_new) for k, v in node.items()}
    if node.get("type") in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            out[key] = [node[key][0], old_to_new[node[key][1]]]
    if node.get("type") == "TemplateProcessing":
        out["special_tokens"] = {
            k: {**v, "ids": [old_to_new[i] for i in v["ids"]]}
            for k, v in node["special_tokens"].items()}
    return out


def _trimmed_tokenizer_state(state: dict[str, Any], keep: list[int],
                             old_to_new: dict[int, int]) -> tuple[dict[str, Any], list[str]]:
    """tokenizer.json with the vocabulary cut to `keep`; also the new vocab.txt lines."""
    by_id = {i: t for t, i in state["model"]["vocab"].items()}
    by_id.update({a["id"]: a["content"] for a in state.get("added_tokens", [])})
    missing = [i for i in keep if i not in by_id]
    if missing:
        raise StageError(f"vocab: ids {missing[:5]} are in no tokenizer vocabulary")
    lines = [by_id[i] for i in keep]
    new = dict(state)
    new["model"] = {**state["model"], "vocab": {t: old_to_new[i] for t, i in
                                                state["model"]["vocab"].items() if i in old_to_new}}
    new["added_tokens"] = [{**a, "id": old_to_new[a["id"]]} for a in state.get("added_tokens", [])]
    new["post_processor"] = _remap_post_processor(state.get("post_processor"), old_to_new)
    if state.get("padding"):
        new["padding"] = {**state["padding"], "pad_id": old_to_new[state["padding"]["pad_id"]]}
    return new, lines


def _weights_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir()
               if p.name in WEIGHT_FILES or (p.name.startswith("model-") and
                                             p.suffix == ".safetensors"))


def _model_class(config: Any) -> Any:
    import transformers

    for arch in config.architectures or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _vocab_tensors(model: Any) -> tuple[set[int], int]:
    """data_ptrs of the vocabulary-indexed parameters (input embedding; an untied or tied output
    embedding and its bias, e.g. an MLM head) and how many numbers they hold (counted once)."""
    params = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None:
        params += [out.weight] + ([out.bias] if getattr(out, "bias", None) is not None else [])
    ptrs = {p.data_ptr(): p.numel() for p in params}
    return set(ptrs), sum(ptrs.values())


def check_remap(old_tok: Any, new_tok: Any, old_to_new: dict[int, int], texts: Sequence[str],
                max_length: int) -> dict[str, Any]:
    """Encode `texts` with both tokenizers. `covered`: texts whose original ids are all kept;
    `covered_exact`: of those, how many encode to exactly the remapped ids (all, unless an
    [UNK] word's failed path lost a piece); `violations`: covered texts that differ without an
    [UNK] in their original encoding, which the subset argument says cannot happen."""
    texts = list(texts)
    old_ids = _encode(old_tok, texts, None, max_length)
    new_ids = _encode(new_tok, texts, None, max_length)
    unk = old_tok.unk_token_id
    covered = covered_exact = 0
    violations: list[str] = []
    for text, a, b in zip(texts, old_ids, new_ids, strict=True):
        ok = all(i in old_to_new for i in a)
        same = ok and b == [old_to_new[i] for i in a]
        covered += ok
        covered_exact += same
        if ok and not same and unk not in a:
            violations.append(text)
    return {"texts": len(texts), "covered": covered, "covered_exact": covered_exact,
            "violations": violations[:5], "violation_count": len(violations)}


def trim_vocabulary(model_dir: Path, out_dir: Path, keep_ids: Iterable[int], *,
                    check_texts: Sequence[str] = (), max_length: int = 512) -> dict[str, Any]:
    """Write to `out_dir` the model of `model_dir` with only the `keep_ids` vocabulary rows
    (plus every special and added token, and the config's token ids), old order kept, and a
    tokenizer that encodes to the renumbered ids. With `check_texts`, both tokenizers encode them
    and both models run on up to 32 fully kept ones: the card gets the exact-encoding counts and
    the max abs output difference (StageError on an impossible mismatch). Returns the facts."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    old_tok = AutoTokenizer.from_pretrained(model_dir)
    state = _wordpiece_state(old_tok)
    config = AutoConfig.from_pretrained(model_dir)
    vocab = int(config.vocab_size)
    forced = set(old_tok.all_special_ids) | {old_tok.unk_token_id}
    forced |= {a["id"] for a in state.get("added_tokens", [])}
    forced |= {v for k in TOKEN_ID_KEYS if isinstance(v := getattr(config, k, None), int)}
    keep = sorted(set(keep_ids) | forced)
    if keep[0] < 0 or keep[-1] >= vocab:
        raise StageError(f"vocab: keep ids must lie in [0, {vocab}); got {keep[0]}..{keep[-1]}")
    old_to_new = {old: new for new, old in enumerate(keep)}

    cls = _model_class(config)
    model = cls.from_pretrained(model_dir).eval()
    ptrs, emb_before = _vocab_tensors(model)
    if model.get_input_embeddings().weight.shape[0] != vocab:
        raise StageError("vocab: the input embedding rows differ from config.vocab_size")
    index = torch.tensor(keep, dtype=torch.long)
    sd = {k: (t.index_select(0, index) if t.data_ptr() in ptrs and t.shape[0] == vocab else t)
          for k, t in model.state_dict().items()}
    new_config = type(config).from_dict(config.to_dict())
    new_config.vocab_size = len(keep)
    for k in TOKEN_ID_KEYS:
        if isinstance(v := getattr(config, k, None), int):
            setattr(new_config, k, old_to_new[v])
    new_model = cls(new_config).to(model.get_input_embeddings().weight.dtype)
    new_model.load_state_dict(sd, strict=True)
    new_model.tie_weights()
    new_model.eval()
    _, emb_after = _vocab_tensors(new_model)
    out_dir.mkdir(parents=True, exist_ok=True)
    new_model.save_pretrained(out_dir, safe_serialization=True)

    new_state, lines = _trimmed_tokenizer_state(state, keep, old_to_new)
    _write_tokenizer(model_dir, out_dir, new_state, lines, old_to_new)
    new_tok = AutoTokenizer.from_pretrained(out_dir)
    new_tok.save_pretrained(out_dir)  # through the tokenizers serializer, as later stages will
    new_tok = AutoTokenizer.from_pretrained(out_dir)
    if len(new_tok) != len(keep):
        raise StageError(f"vocab: trimmed tokenizer has {len(new_tok)} ids, model {len(keep)}")

    before, after = _weights_bytes(model_dir), _weights_bytes(out_dir)
    facts: dict[str, Any] = {
        "vocab_before": vocab, "vocab_after": len(keep), "kept_forced": len(forced),
        "embedding_params_before": emb_before, "embedding_params_after": emb_after,
        "weights_bytes_before": before, "weights_bytes_after": after,
        "bytes_saved": before - after,
    }
    if check_texts:
        check = check_remap(old_tok, new_tok, old_to_new, check_texts, max_length)
        if check["violation_count"]:
            raise StageError(f"vocab: {check['violation_count']} fully kept texts encode "
                             f"differently after trimming, e.g. {check['violations'][0]!r}")
        facts["check"] = {k: v for k, v in check.items() if k != "violations"}
        facts["check"]["max_abs_diff"] = _output_diff(model, new_model, old_tok, old_to_new,
                                                      check_texts, max_length)
    return facts


def _output_diff(old: Any, new: Any, tok: Any, old_to_new: dict[int, int],
                 texts: Sequence[str], max_length: int, limit: int = 32) -> float | None:
    """Max abs difference of the first output (logits or hidden states) on fully kept texts,
    the old model fed the old ids and the new one the remapped ids."""
    import torch

    ids = [a for a in _encode(tok, list(texts), None, max_length)
           if all(i in old_to_new for i in a)][:limit]
    diff = 0.0
    with torch.inference_mode():
        for a in ids:
            x = torch.tensor([a])
            y = torch.tensor([[old_to_new[i] for i in a]])
            diff = max(diff, float((old(input_ids=x)[0] - new(input_ids=y)[0]).abs().max()))
    return diff if ids else None


def _write_tokenizer(src: Path, out: Path, state: dict[str, Any], lines: list[str],
                     old_to_new: dict[int, int]) -> None:
    """tokenizer.json and vocab.txt from the trimmed state; tokenizer_config.json and
    special_tokens_map.json copied, with added_tokens_decoder keys renumbered."""
    (out / "tokenizer.json").write_text(json.dumps(state, ensure_ascii=False, indent=2))
    (out / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if (src / "special_tokens_map.json").is_file():
        shutil.copy2(src / "special_tokens_map.json", out / "special_tokens_map.json")
    cfg_path = src / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    if "added_tokens_decoder" in cfg:
        cfg["added_tokens_decoder"] = {str(old_to_new[int(k)]): v for k, v in
                                       cfg["added_tokens_decoder"].items()}
    cfg.pop("tokenizer_file", None)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2))
