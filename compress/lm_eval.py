"""Causal-LM evaluation beyond a perplexity: what a product built on the model would measure.

- On prompt/response data (`pair_scores`): answer accuracy from greedy generation (normalised
  exact match, SQuAD-style: lowercase, punctuation and articles dropped, spaces collapsed), and
  with `choices` the choice whose response has the highest log-likelihood (summed over its
  tokens, end-of-turn included, so "positive" must also be a complete answer); the perplexity of
  the reference responses comes from the same forward passes when the reference is a choice.
- On every LM card (`card_scores`): the probe's perplexity (a general text such as Hamlet: a
  student that gains the task and loses the language has been over-distilled), decode tokens/s
  and time to first token, and, for PyTorch models, the acceptance rate and the speed-up when
  this model drafts for the reference (compress.decode).

Everything takes the predictor's pieces (a `logits(batch)` function over numpy batches and a
model with `generate`), so PyTorch and ONNX Runtime models are scored by the same code: this
module sits below compress.evaluate, which calls it from `task_scores` and `evaluate`.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from compress.data import (
    CHAT,
    PROMPT,
    RESPONSE,
    TaskData,
    bos_prefix,
    encode_lm,
    fit_pair,
    render_pair,
)
from compress.errors import RecipeError
from compress.interrupt import check as check_interrupt
from compress.logs import quiet
from compress.metrics import token_nll
from compress.spec import EvaluationSpec

Logits = Callable[[dict[str, np.ndarray]], np.ndarray]
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def _pad(seqs: list[list[int]], pad: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    return ids, mask


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    return int(pad or 0)


def stop_ids(tokenizer: Any, model: Any) -> list[int]:
    """Tokens that end an answer: the tokenizer's EOS and the model's generation EOS (chat
    models end a turn with a token of their own, e.g. <|im_end|>)."""
    found = [tokenizer.eos_token_id]
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found += eos if isinstance(eos, list) else [eos]
    return sorted({int(t) for t in found if t is not None})


def sequence_nll(logits: Logits, rows: list[tuple[list[int], list[int]]], pad: int,
                 batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per (prompt ids, response ids) row: summed NLL of the response tokens, and their count."""
    nll = np.zeros(len(rows))
    count = np.zeros(len(rows), dtype=np.int64)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    for start in range(0, len(order), batch_size):
        check_interrupt()
        part = order[start:start + batch_size]
        seqs = [rows[i][0] + rows[i][1] for i in part]
        ids, mask = _pad(seqs, pad, left=False)
        target = np.zeros_like(mask, dtype=bool)
        for j, i in enumerate(part):
            p, r = len(rows[i][0]), len(rows[i][1])
            target[j, p:p + r] = True
        out = logits({"input_ids": ids, "attention_mask": mask})
        rows_nll, rows_n = token_nll(out[:, :-1], ids[:, 1:], target[:, 1:])
        nll[part], count[part] = rows_nll, rows_n
    return nll, count


def generate_answers(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int,
                     batch_size: int, *, temperature: float = 0.0, top_p: float = 1.0,
                     seed: int = 0) -> list[str]:
    """Answers to token-id prompts (left-padded batches, shortest first), cut at the first stop
    token, decoded: greedy, or sampled (seeded) with a temperature. Evaluation and the
    teacher's generations (compress.llm_distill) share it."""
    import torch

    from compress.models import device_of

    device = device_of(model)
    pad, stops = _pad_id(tokenizer), stop_ids(tokenizer, model)
    sample = {"do_sample": True, "temperature": temperature, "top_p": top_p} \
        if temperature > 0 else {"do_sample": False}
    torch.manual_seed(seed)
    out: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        check_interrupt()
        part = order[start:start + batch_size]
        ids, mask = _pad([prompts[i] for i in part], pad, left=True)
        with torch.inference_mode():
            gen = model.generate(input_ids=torch.as_tensor(ids, device=device),
                                 attention_mask=torch.as_tensor(mask, device=device),
                                 max_new_tokens=max_new_tokens, num_beams=1, **sample,
                                 eos_token_id=stops, pad_token_id=pad)
        for j, i in enumerate(part):
            new = [int(t) for t in gen[j, ids.shape[1]:]]
            cut = next((k for k, t in enumerate(new) if t in stops), len(new))
            out[i] = tokenizer.decode(new[:cut], skip_special_tokens=True)
    return out


def pair_scores(model: Any, logits: Logits, data: TaskData, tokenizer: Any,
                spec: EvaluationSpec, max_samples: int | None = None
                ) -> tuple[dict[str, float], int]:
    """answer_accuracy, choice_accuracy (with `choices`) and response_perplexity on the eval
    pairs; (scores, examples)."""
    ev = data.eval
    if max_samples:
        ev = ev.select(range(min(max_samples, len(ev))))
    length, keep_first = data.spec.max_length, bool(bos_prefix(tokenizer))
    pad = _pad_id(tokenizer)
    prompts, gold = [], []
    rows: list[tuple[list[int], list[int]]] = []
    choice_rows: list[list[int]] = []  # per example: row index of each choice
    gold_row: list[int] = []
    choices = [c.strip() for c in spec.choices or []]
    for p, r, chat in zip(ev[PROMPT], ev[RESPONSE], ev[CHAT], strict=True):
        prompts.append(fit_pair(render_pair(tokenizer, p, None, chat)[0], [], length,
                                keep_first)[0])
        gold.append(r)
        mine = []
        for c in choices:
            mine.append(len(rows))
            rows.append(fit_pair(*render_pair(tokenizer, p, c, chat), length, keep_first))
        choice_rows.append(mine)
        if r.strip() in choices:
            gold_row.append(mine[choices.index(r.strip())])
        else:
            gold_row.append(len(rows))
            rows.append(fit_pair(*render_pair(tokenizer, p, r, chat), length, keep_first))
    nll, count = sequence_nll(logits, rows, pad, spec.batch_size)
    longest = max((len(rows[i][1]) for i in gold_row), default=1)
    answers = generate_answers(model, tokenizer, prompts, min(spec.max_new_tokens, longest),
                               spec.batch_size)
    n = len(gold)
    hits = sum(normalize_answer(a) == normalize_answer(g) for a, g in zip(answers, gold,
                                                                         strict=True))
    g_nll, g_count = nll[gold_row].sum(), max(int(count[gold_row].sum()), 1)
    scores = {"answer_accuracy": round(100.0 * hits / max(n, 1), 4),
              "response_perplexity": round(float(np.exp(g_nll / g_count)), 4)}
    if choices:
        picked = [int(np.argmin(nll[m])) for m in choice_rows]
        right = sum(normalize_answer(choices[k]) == normalize_answer(g)
                    for k, g in zip(picked, gold, strict=True))
        scores["choice_accuracy"] = round(100.0 * right / max(n, 1), 4)
    return scores, n


def block_perplexity(logits: Logits, blocks: Any, tokenizer: Any, batch_size: int
                     ) -> tuple[float, int]:
    """exp(mean next-token NLL) over encoded text blocks; (perplexity, tokens scored)."""
    pad = _pad_id(tokenizer)
    rows = [([], list(ids)) for ids in blocks["input_ids"]]
    nll, count = sequence_nll(logits, rows, pad, batch_size)
    return float(np.exp(nll.sum() / max(int(count.sum()), 1))), int(count.sum())


def probe_blocks(path: str, tokenizer: Any, block: int, tokens: int) -> Any:
    """The first `tokens` tokens of the probe text, in blocks as LM data is cut."""
    import datasets

    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"evaluation.probe_data: {path}: no such file")
    lines = [ln for ln in p.read_text(encoding="utf-8", errors="replace").splitlines()
             if ln.strip()]
    enc = encode_lm(datasets.Dataset.from_dict({"text": lines}), tokenizer, block)
    return enc.select(range(min(len(enc), max(1, tokens // block))))


Scores = tuple[dict[str, float], dict[str, Any]]  # (card scores, how they were measured)


def speed(model: Any, tokenizer: Any, onnx: bool, decode: Any) -> Scores:
    """Decode tokens/s and TTFT (compress.decode); ORT models with one torch thread, so torch's
    spin-waiting workers leave ORT the cores."""
    from compress.decode import decode_speed

    r = decode_speed(model, tokenizer, prompt_tokens=decode.prompt_tokens,
                     new_tokens=decode.new_tokens, runs=decode.runs, warmup=1,
                     torch_threads=1 if onnx else None)
    return ({"decode_tokens_per_s": round(r["decode_tokens_per_s"], 2),
             "ttft_ms": round(1000 * r["ttft_s_p50"], 2)}, r)


def draft(target: Any, model: Any, tokenizer: Any, data: TaskData, decode: Any) -> Scores:
    """`model` drafting for `target` (the reference) on eval prompts: acceptance and speed-up.
    Needs one vocabulary: a student with another tokenizer cannot draft token by token."""
    from compress.decode import draft_acceptance

    if target.config.vocab_size != model.config.vocab_size:
        return {}, {"skipped": "the reference and this model have different vocabularies"}
    ev = data.eval
    n = min(decode.draft_prompts, len(ev))
    if data.instruct:
        prompts = [render_pair(tokenizer, ev[PROMPT][i], None, ev[CHAT][i])[0]
                   for i in range(n)]
    else:
        blocks = encode_lm(ev, tokenizer, data.spec.max_length)
        prompts = [list(blocks[i % len(blocks)]["input_ids"][:decode.prompt_tokens])
                   for i in range(n)]
    with quiet("transformers"):  # it notes each changed generation default; we chose them
        r = draft_acceptance(target, model, prompts, new_tokens=decode.draft_tokens,
                             num_assistant_tokens=decode.assistant_tokens, rounds=1, warmup=1)
    return ({"draft_acceptance": round(100 * r["acceptance_rate"], 2),
             "draft_speedup": round(r["speedup_p50"], 3)}, r)


def card_scores(model: Any, logits: Logits, onnx: bool, data: TaskData, tokenizer: Any,
                spec: EvaluationSpec, *, draft_target: Any = None) -> Scores:
    """What every LM card shows besides the task metric: probe perplexity, decode speed, and
    (PyTorch, with the reference model as `draft_target`) draft acceptance. (scores, details)"""
    scores: dict[str, float] = {}
    details: dict[str, Any] = {}
    if spec.probe_data:
        blocks = probe_blocks(spec.probe_data, tokenizer, data.spec.max_length,
                              spec.probe_tokens)
        ppl, n = block_perplexity(logits, blocks, tokenizer, spec.batch_size)
        scores["probe_perplexity"] = round(ppl, 4)
        details["probe"] = {"path": spec.probe_data, "tokens": n}
    if spec.decode is not None:
        s, details["decode"] = speed(model, tokenizer, onnx, spec.decode)
        scores.update(s)
        if spec.decode.draft and draft_target is not None and not onnx:
            s, details["draft"] = draft(draft_target, model, tokenizer, data, spec.decode)
            scores.update(s)
        elif spec.decode.draft:
            details["draft"] = {"skipped": "assisted generation needs PyTorch models (ONNX "
                                "Runtime's cache cannot be cropped)" if onnx else
                                "no reference model to draft for"}
    return scores, details
