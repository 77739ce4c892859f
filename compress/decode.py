"""Causal-LM generation speed as a user waits for it, and what a draft model buys.

Per-forward latency (what the report card times) hides the two numbers a chat user feels: how
long until the first token appears (prefill + one step) and how fast tokens stream after that
(one KV-cached step per token). Both come from `generate`, batch 1, greedy, with
`min_new_tokens = new_tokens` so EOS never makes a run shorter than another.

How TTFT is separated from decode: one `generate` call per run with a streamer that timestamps
every `put`. `generate` puts the prompt once before the loop, then each token as soon as it is
chosen, so put #2 marks the first token (TTFT, counted from just before the call, so the
call's own setup is included like a user would see it) and the last put marks the last token;
decode rate = (new_tokens - 1) / (last - first). One call instead of `max_new_tokens=1` plus a
long call: no second prefill, no subtraction of two noisy timings. A streamer works for any
model whose `generate` is transformers' (torch, and optimum's ORTModelForCausalLM).

How acceptance is counted (transformers 4.57): `_assisted_decoding` asks the candidate generator
for candidates (`get_candidates`: returns prompt + proposed tokens) and then reports the number
of leading proposals the target agreed with (`update_candidate_strategy(..., num_matches)`). No
output field carries either, so for the duration of the call we shadow the target's
`_get_candidate_generator` on the instance and wrap those two methods of the generator it returns.
proposed = tokens appended by `get_candidates`, accepted = `num_matches`. Assisted decoding
crops both models' caches after a rejection (`DynamicCache.crop`); optimum's ORT models return
tuples of arrays, and fail as target or draft (`'tuple' object has no attribute 'crop'`), so
both must be torch models. Assisted runs use no EOS instead of `min_new_tokens`, which 4.57
turns into a MinLengthLogitsProcessor that assisted decoding refuses.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

# Neutral English, repeated and cut to the requested prompt length: content does not change the
# cost of a dense forward, but a real-looking prompt keeps greedy continuations ordinary.
_PROMPT_TEXT = ("The old house stood at the end of the road, and every evening the family "
                "gathered by the fire to read, to talk about the day, and to plan the next one. ")


class _Stamps(BaseStreamer):
    """Timestamps of each `put`: the first is the prompt, the rest are newly chosen tokens."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.counts: list[int] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())
        self.counts.append(int(value.numel()))

    def end(self) -> None:
        pass


def _prompt_ids(tokenizer_or_ids: Any, prompt_tokens: int) -> torch.Tensor:
    """(1, L) ids: given ids are used as they are; a tokenizer gets our text cut to L tokens."""
    if isinstance(tokenizer_or_ids, torch.Tensor):
        ids = tokenizer_or_ids.long()
        return ids if ids.dim() == 2 else ids.view(1, -1)
    if isinstance(tokenizer_or_ids, Sequence) and not isinstance(tokenizer_or_ids, str):
        return torch.tensor([list(tokenizer_or_ids)], dtype=torch.long)
    one = tokenizer_or_ids(_PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    if not one:
        raise ValueError("decode: the tokenizer turned the prompt text into no tokens")
    ids = (one * (prompt_tokens // len(one) + 1))[:prompt_tokens]
    return torch.tensor([ids], dtype=torch.long)


def _greedy_kwargs(model: Any, ids: torch.Tensor, new_tokens: int) -> dict[str, Any]:
    cfg = getattr(model, "generation_config", None)
    pad = getattr(cfg, "pad_token_id", None)
    if pad is None:
        eos = getattr(cfg, "eos_token_id", None)
        pad = eos[0] if isinstance(eos, list) else eos
    from compress.models import device_of

    ids = ids.to(device_of(model))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
            "num_beams": 1, "pad_token_id": pad if pad is not None else 0}


def _spread(values: list[float]) -> dict[str, float]:
    return {"p50": statistics.median(values), "min": min(values), "max": max(values)}


def decode_speed(model: Any, tokenizer_or_prompt_ids: Any, *, prompt_tokens: int = 32,
                 new_tokens: int = 64, runs: int = 3, warmup: int = 1,
                 torch_threads: int | None = None) -> dict[str, Any]:
    """TTFT and decode tokens/s of `model.generate` (batch 1, greedy, exactly `new_tokens`).

    ORT models take their threads from the session options; `torch_threads` (restored after)
    sets torch's for the measurement. For an ORT model pass 1: torch then only does generate's
    bookkeeping, and with more threads its OpenMP workers spin-wait on the cores ORT needs
    (on a loaded 2-core box that cut ORT decode from 15.5 to 5.7 tokens/s).
    Returns medians over `runs` after `warmup` untimed runs, and the per-run values."""
    if new_tokens < 2:
        raise ValueError("decode_speed: new_tokens must be >= 2 (one for TTFT, one to decode)")
    ids = _prompt_ids(tokenizer_or_prompt_ids, prompt_tokens)
    kwargs = _greedy_kwargs(model, ids, new_tokens)
    saved_threads = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    try:
        threads = torch.get_num_threads()
        ttft, rate, total = _timed_runs(model, kwargs, ids.shape[1], new_tokens, runs, warmup)
    finally:
        torch.set_num_threads(saved_threads)
    return {"prompt_tokens": int(ids.shape[1]), "new_tokens": new_tokens, "runs": runs,
            "ttft_s_p50": statistics.median(ttft),
            "decode_tokens_per_s": statistics.median(rate),
            "total_s_p50": statistics.median(total),
            "spread": {"ttft_s": _spread(ttft), "decode_tokens_per_s": _spread(rate)},
            "per_run": {"ttft_s": ttft, "decode_tokens_per_s": rate, "total_s": total},
            "torch_threads": threads,
            "method": "one generate call per run; streamer timestamps: TTFT = first token - "
                      "call start, decode = (new_tokens - 1) / (last token - first token)"}


def _timed_runs(model: Any, kwargs: dict[str, Any], prompt_len: int, new_tokens: int, runs: int,
                warmup: int) -> tuple[list[float], list[float], list[float]]:
    ttft: list[float] = []
    rate: list[float] = []
    total: list[float] = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            stamps = _Stamps()
            t0 = time.perf_counter()
            out = model.generate(**kwargs, streamer=stamps)
            t1 = time.perf_counter()
            made = out.shape[1] - prompt_len
            if made != new_tokens or sum(stamps.counts[1:]) != new_tokens:
                raise RuntimeError(f"decode_speed: generate made {made} tokens, not {new_tokens}")
            if i < warmup:
                continue
            first, last = stamps.times[1], stamps.times[-1]
            ttft.append(first - t0)
            rate.append((new_tokens - 1) / (last - first))
            total.append(t1 - t0)
    return ttft, rate, total


class _Tally:
    """Proposed and accepted draft tokens, counted by wrapping the candidate generator."""

    def __init__(self) -> None:
        self.proposed = self.accepted = self.steps = 0

    def wrap(self, generator: Any) -> Any:
        get, update = generator.get_candidates, generator.update_candidate_strategy

        def get_candidates(input_ids: torch.Tensor) -> Any:
            cand, logits = get(input_ids)
            self.proposed += int(cand.shape[1] - input_ids.shape[1])
            self.steps += 1  # one target forward verifies each batch of candidates
            return cand, logits

        def update_candidate_strategy(input_ids: torch.Tensor, scores: Any, n: Any) -> Any:
            self.accepted += int(n)
            return update(input_ids, scores, n)

        generator.get_candidates = get_candidates
        generator.update_candidate_strategy = update_candidate_strategy
        return generator


def draft_acceptance(target: Any, draft: Any, prompts: Sequence[Any], *, tokenizer: Any = None,
                     new_tokens: int = 64, num_assistant_tokens: int = 5,
                     confidence_threshold: float = 0.0, rounds: int = 3,
                     warmup: int = 1) -> dict[str, Any]:
    """Assisted (speculative, greedy) decoding of `target` with `draft`: acceptance rate of the
    draft's proposals and the speed-up over the target alone.

    Fixed-length drafts by default (`num_assistant_tokens`, schedule "constant", and
    transformers' confidence early-stop off with `confidence_threshold=0.0`) so the rate is a
    property of the draft, not of a heuristic's state; the draft's generation_config is restored
    after. Timing interleaves alone/assisted per prompt and flips the order every round, so drift
    on a shared machine hits both; speed-up = alone time / assisted time per round (median,
    min, max). Prompts are id sequences, or strings with `tokenizer`. Torch models only."""
    from transformers import PreTrainedModel

    if not isinstance(target, PreTrainedModel) or not isinstance(draft, PreTrainedModel):
        raise TypeError("draft_acceptance: target and draft must be torch PreTrainedModels: "
                        "assisted decoding crops the KV cache (DynamicCache.crop), which "
                        "optimum's ORT models (tuple caches) do not support")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("draft_acceptance: no prompts")
    if any(isinstance(p, str) for p in prompts) and tokenizer is None:
        raise ValueError("draft_acceptance: string prompts need tokenizer=")
    ids = [tokenizer(p, return_tensors="pt")["input_ids"] if isinstance(p, str)
           else _prompt_ids(p, 0) for p in prompts]
    saved = copy.deepcopy(draft.generation_config)
    draft.generation_config.num_assistant_tokens = num_assistant_tokens
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = confidence_threshold
    tally = _Tally()
    make = target._get_candidate_generator
    target._get_candidate_generator = lambda *a, **k: tally.wrap(make(*a, **k))
    alone_t, assisted_t, same = [], [], 0
    try:
        with torch.inference_mode():
            for r in range(warmup + rounds):
                t_alone = t_assisted = 0.0
                for p in ids:
                    # min_new_tokens becomes a MinLengthLogitsProcessor, which assisted decoding
                    # refuses (ValueError in 4.57); with no EOS nothing can stop a run early.
                    kw = {**_greedy_kwargs(target, p, new_tokens), "min_new_tokens": None,
                          "eos_token_id": None}
                    for assisted in ((False, True) if r % 2 == 0 else (True, False)):
                        before = (tally.proposed, tally.accepted, tally.steps)
                        t0 = time.perf_counter()
                        out = target.generate(**kw, assistant_model=draft if assisted else None)
                        dt = time.perf_counter() - t0
                        if assisted:
                            t_assisted += dt
                            seq_a = out
                        else:
                            t_alone += dt
                            seq_t = out
                        if r < warmup:  # counts from timed rounds only (greedy: all the same)
                            tally.proposed, tally.accepted, tally.steps = before
                    if r >= warmup:
                        same += int(torch.equal(seq_a, seq_t))
                if r >= warmup:
                    alone_t.append(t_alone)
                    assisted_t.append(t_assisted)
    finally:
        del target._get_candidate_generator  # the instance attribute shadowed the method
        draft.generation_config = saved
    speedup = [a / b for a, b in zip(alone_t, assisted_t, strict=True)]
    n_tok = new_tokens * len(ids)
    return {"acceptance_rate": tally.accepted / tally.proposed if tally.proposed else 0.0,
            "proposed": tally.proposed, "accepted": tally.accepted,
            "tokens_per_target_step": n_tok * rounds / tally.steps if tally.steps else 0.0,
            "speedup_p50": statistics.median(speedup), "speedup": _spread(speedup),
            "alone_tokens_per_s_p50": n_tok / statistics.median(alone_t),
            "assisted_tokens_per_s_p50": n_tok / statistics.median(assisted_t),
            "same_tokens": same / (rounds * len(ids)),
            "prompts": len(ids), "new_tokens": new_tokens, "rounds": rounds,
            "num_assistant_tokens": num_assistant_tokens,
            "confidence_threshold": confidence_threshold,
            "method": "proposed/accepted counted by wrapping the candidate generator's "
                      "get_candidates and update_candidate_strategy(num_matches)"}
