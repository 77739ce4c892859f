"""Unit tests for compress.decode on tiny random Llama models built from configs (no hub)."""

from __future__ import annotations

import pytest
import torch

from compress.decode import decode_speed, draft_acceptance

pytestmark = pytest.mark.unit

PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    from compress.testing import make_tiny_llama

    root = tmp_path_factory.mktemp("lm")
    return (make_tiny_llama(root / "a", seed=0),
            make_tiny_llama(root / "b", layers=2, seed=1))


def load(path, seed: int):
    """The model with its non-embedding matrices redrawn at std 0.2 from `seed`. At the default
    0.02 init with tied embeddings the residual stream is mostly the input embedding, so every
    such model greedily repeats its last token and any two models agree on everything."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if w.dim() == 2 and "embed" not in name:
                w.normal_(0.0, 0.2, generator=g)
    return model


def test_decode_speed_reports_ttft_and_rate(llama_dirs):
    from transformers import AutoTokenizer

    model = load(llama_dirs[0], 0)
    tok = AutoTokenizer.from_pretrained(llama_dirs[0])
    r = decode_speed(model, tok, prompt_tokens=12, new_tokens=8, runs=2, warmup=1)
    assert r["prompt_tokens"] == 12 and r["new_tokens"] == 8
    assert r["decode_tokens_per_s"] > 0 and r["ttft_s_p50"] > 0
    assert r["total_s_p50"] > r["ttft_s_p50"]
    assert len(r["per_run"]["ttft_s"]) == len(r["per_run"]["decode_tokens_per_s"]) == 2
    assert r["spread"]["decode_tokens_per_s"]["min"] <= r["decode_tokens_per_s"]


def test_decode_speed_takes_ids_and_threads_and_refuses_one_token(llama_dirs):
    model = load(llama_dirs[0], 0)
    before = torch.get_num_threads()
    r = decode_speed(model, torch.tensor(PROMPTS[0]), new_tokens=4, runs=1, warmup=0,
                     torch_threads=1)
    assert r["prompt_tokens"] == 4 and r["decode_tokens_per_s"] > 0
    assert r["torch_threads"] == 1 and torch.get_num_threads() == before  # restored
    with pytest.raises(ValueError, match="new_tokens"):
        decode_speed(model, PROMPTS[0], new_tokens=1)


def test_same_weights_draft_is_always_accepted(llama_dirs):
    target, draft = load(llama_dirs[0], 0), load(llama_dirs[0], 0)
    before = draft.generation_config.to_dict()
    r = draft_acceptance(target, draft, PROMPTS, new_tokens=16, num_assistant_tokens=4,
                         rounds=1, warmup=0)
    assert r["proposed"] > 0 and r["acceptance_rate"] == 1.0
    assert r["same_tokens"] == 1.0 and r["speedup_p50"] > 0
    assert r["tokens_per_target_step"] > 1  # several tokens per target forward
    assert draft.generation_config.to_dict() == before  # restored
    assert "_get_candidate_generator" not in vars(target)  # the wrapper is gone


def test_different_draft_is_partly_rejected(llama_dirs):
    target, draft = load(llama_dirs[0], 0), load(llama_dirs[1], 1)
    r = draft_acceptance(target, draft, PROMPTS, new_tokens=16, rounds=1, warmup=0)
    assert r["proposed"] > 0 and r["acceptance_rate"] < 1.0
    assert r["same_tokens"] == 1.0  # greedy assisted decoding still yields the target's tokens


def test_draft_acceptance_refuses_non_torch(llama_dirs):
    with pytest.raises(TypeError, match="crop"):
        draft_acceptance(object(), load(llama_dirs[0], 0), PROMPTS)
