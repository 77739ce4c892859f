"""trim_vocab: keep only the token ids the task's text uses, so the embedding table shrinks.

MiniLM's 30,522-row embedding is half of its weights, and the demo's 10,568 snippets use 13,272
of those ids: the rest is dead weight on disk and in memory, at any precision. This stage keeps
the ids the training text produces (as the model is fed it, truncation included; optionally only
those seen `min_count` times, plus an extra text file's, plus every single character so unseen
words still split into known pieces), slices the embedding (and any tied output head), and
writes a tokenizer that encodes kept text to the renumbered ids exactly (compress.vocab says why
WordPiece allows it). The card shows the vocabulary before and after and the share of eval
tokens that now fall back to [UNK].

It goes after distillation (the teacher keeps its own vocabulary) and before export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from compress.artifact import ModelRef
from compress.stage import StageConfig, StageContext

WORDPIECE_FAMILIES = ("bert", "distilbert", "electra")


class TrimVocabConfig(StageConfig):
    """Trim the vocabulary of a WordPiece encoder to the ids the data uses."""

    kind: Literal["trim_vocab"] = "trim_vocab"
    min_count: int = Field(1, ge=1, description="Keep ids seen at least this often in the "
                           "training text (special tokens always stay).")
    keep_characters: bool = Field(True, description="Keep every single-character piece, so "
                                  "words never seen split into known pieces, not [UNK].")
    extra_text: str | None = Field(None, description="A text file whose tokens are kept too "
                                   "(label words, prompts, a domain glossary).")

    architectures: ClassVar[tuple[str, ...] | None] = WORDPIECE_FAMILIES  # WordPiece only

    def uses_data(self) -> bool:
        return True

    def resolve_paths(self, resolve: Any) -> TrimVocabConfig:
        return self if self.extra_text is None else self.model_copy(
            update={"extra_text": resolve(self.extra_text)})

    def check(self, recipe: Any, index: int) -> None:
        where = self.where(index)
        if recipe.model.task != "sequence-classification":
            raise ValueError(f"{where}: vocabulary trimming is for encoder classifiers")
        later = [s for s in recipe.stages[index + 1:] if s.uses_reference]
        if later:
            raise ValueError(f"{where}: comes before {later[0].kind}, which needs the "
                             "reference's own vocabulary; move it after")
        if self.extra_text is not None and not Path(self.extra_text).is_file():
            raise ValueError(f"{where}.extra_text: {self.extra_text}: no such file")

    def notes(self, info: dict[str, Any]) -> list[str]:
        v = info["vocab"]
        return [f"vocabulary {v['vocab_before']} → {v['vocab_after']} ids, embedding "
                f"{v['embedding_params_before'] / 1e6:.2f}M → "
                f"{v['embedding_params_after'] / 1e6:.2f}M parameters; eval tokens falling "
                f"back to [UNK]: {v['eval_unknown_before']:.3%} → {v['eval_unknown_after']:.3%}"]

    def apply(self, ref: ModelRef, ctx: StageContext, out: Path) -> dict[str, Any]:
        from compress import vocab
        from compress.models import load_tokenizer

        data = ctx.data
        tok = load_tokenizer(ref.path, trust_remote_code=ctx.recipe.model.trust_remote_code)
        pairs = list(data.train["text_pair"]) if "text_pair" in data.train.column_names \
            else None
        extra = Path(self.extra_text).read_text().splitlines() if self.extra_text else []
        counts = vocab.used_token_ids(tok, list(data.train["text"]), text_pairs=pairs,
                                      max_length=data.spec.max_length,
                                      min_count=self.min_count, extra_texts=extra)
        keep = set(counts) | (set(vocab.character_ids(tok)) if self.keep_characters else set())
        eval_texts = list(data.eval["text"])
        facts = vocab.trim_vocabulary(ref.dir, out, keep, check_texts=eval_texts,
                                      max_length=data.spec.max_length)
        new_tok = load_tokenizer(str(out))
        facts["eval_unknown_before"] = vocab.unknown_rate(tok, eval_texts, data.spec.max_length)
        facts["eval_unknown_after"] = vocab.unknown_rate(new_tok, eval_texts,
                                                         data.spec.max_length)
        facts["min_count"] = self.min_count
        facts["kept_characters"] = self.keep_characters
        return {"vocab": facts}
