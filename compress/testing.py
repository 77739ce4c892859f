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
