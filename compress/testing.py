"""Tiny models and data built from configs: for tests and benchmarks, no hub needed."""

from __future__ import annotations

import csv
import random
from pathlib import Path

POSITIVE = (
    "good", "great", "excellent", "wonderful", "superb", "delightful", "moving", "brilliant",
    "charming", "fun",
)
NEGATIVE = (
    "bad", "awful", "terrible", "boring", "dull", "weak", "tedious", "poor", "clumsy", "bland",
)
FILLER = (
    "the", "a", "movie", "film", "plot", "story", "acting", "scenes", "was", "is", "and",
    "with", "very", "quite", "really",
)


def make_sentiment_csv(path: Path, rows: int = 400, seed: int = 0) -> Path:
    """A learnable two-class task: the label is which word list the sentence draws from."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(rows):
            label = i % 2
            words = rng.sample(FILLER, 5) + rng.sample(POSITIVE if label else NEGATIVE, 2)
            rng.shuffle(words)
            w.writerow([" ".join(words), label])
    return path


def make_tiny_bert(path: Path, *, layers: int = 4, heads: int = 4, hidden: int = 64,
                   ffn: int = 128, num_labels: int = 2, seed: int = 0) -> Path:
    """A BERT classifier with random weights and a word-level tokenizer over our vocabulary."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(POSITIVE + NEGATIVE
                                                                        + FILLER))]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=ffn, num_labels=num_labels,
                        max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    (path / "vocab.txt").unlink(missing_ok=True) if (path / "tokenizer.json").exists() else None
    return path


WORDS = tuple(sorted(set(POSITIVE + NEGATIVE + FILLER)))


def make_text_file(path: Path, lines: int = 400, seed: int = 0) -> Path:
    """Plain text for causal-LM tests: short sentences with a learnable word order."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for _ in range(lines):
        good = rng.random() < 0.5
        adj = rng.sample(POSITIVE if good else NEGATIVE, 2)
        out.append(f"the {rng.choice(['movie', 'film', 'story', 'plot'])} was {adj[0]} "
                   f"and {adj[1]} .")
    path.write_text("\n".join(out) + "\n")
    return path


def _word_tokenizer(path: Path, vocab_seed: int | None = None) -> object:
    """A word-level fast tokenizer over our vocabulary, with eos/pad/unk (for tiny LMs).
    `vocab_seed`: the words in another order plus a few more, i.e. another tokenizer for the
    same text (what a model of another family has)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(WORDS)
    if vocab_seed is not None:
        random.Random(vocab_seed).shuffle(words)
        words += ["because", "so", "it"]
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", ".", *words])}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def make_pairs_csv(path: Path, rows: int = 300, seed: int = 0) -> Path:
    """Prompt/response pairs for causal-LM tests: the response ("good" or "bad") says which word
    list the prompt's adjectives come from."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(rows):
        good = i % 2 == 0
        adj = rng.sample(POSITIVE if good else NEGATIVE, 2)
        out.append([f"the {rng.choice(['movie', 'film', 'story'])} was {adj[0]} and {adj[1]} .",
                    "good" if good else "bad"])
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["prompt", "response"], *out])
    return path


def make_tiny_llama(path: Path, *, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                    hidden: int = 64, ffn: int = 128, model_type: str = "llama",
                    seed: int = 0, vocab_seed: int | None = None) -> Path:
    """A decoder LM with random weights: Llama family (llama, qwen2, mistral, qwen3,
    gemma3_text) or Phi-3 (phi3); GQA when kv_heads < heads. Tied embeddings like SmolLM2.
    `vocab_seed` gives it a tokenizer of its own (see `_word_tokenizer`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _word_tokenizer(path, vocab_seed)
    torch.manual_seed(seed)
    extra = {"head_dim": hidden // heads} if model_type in ("qwen3", "gemma3_text") else {}
    if model_type == "gemma3_text":  # its default query scale is for 256-wide heads
        extra["query_pre_attn_scalar"] = hidden // heads
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=ffn,
        max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)
    AutoModelForCausalLM.from_config(config).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def run_stages(recipe_path: Path) -> tuple[object, list]:
    """Plan a recipe file and run every stage in order, no Prefect: (plan, cards)."""
    from compress.pipeline import make_plan, run_stage
    from compress.recipe import load_recipe

    plan = make_plan(load_recipe(recipe_path))
    ref, cards = plan.source, []
    for s in plan.stages:
        cards.append(run_stage(plan, s.index, ref))
        ref = cards[-1].model
    return plan, cards


def free_port() -> int:
    """A TCP port free on loopback right now (servers and process groups in tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_owner_folder(path: Path) -> Path:
    """A folder as a killed run of this tool leaves it: our owner record, naming a process of
    this host that has exited (cleanup may remove it)."""
    import json
    import subprocess

    from compress.atomic import OWNER_FILE, owner_record

    proc = subprocess.Popen(["true"])
    proc.wait()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / OWNER_FILE).write_text(json.dumps({**owner_record(), "pid": proc.pid,
                                               "pid_started": 0.0}))
    return path
