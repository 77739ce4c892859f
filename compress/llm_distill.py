"""LLM distillation as practitioners do it, the engine: what the teacher writes, and a peer that
learns too. The `distill` stage (compress/stages/distill.py) drives it.

- Sequence-level (hard-label) KD (Kim & Rush 2016): the teacher answers every training prompt
  and the student learns those answers with plain cross-entropy. The answers are text, so
  teacher and student need not share a tokenizer (the way to distill across model families).
- Rationale distillation ("distilling step-by-step", Hsieh et al. 2023): the teacher explains
  each training example; the student learns two tasks, the answer (the prompt as it is) and the
  rationale (the prompt behind a prefix), as separate targets, so it answers without writing a
  rationale at inference.
- Both come from `teacher_texts`: generations cached under the output root, keyed by the
  teacher's id, the prompts and the generation settings (seeded), written atomically with a
  manifest; a damaged cache is set aside and regenerated.
- Co-distillation (deep mutual learning, Zhang et al. 2018): `MutualPeer` is a LossProvider
  whose peer (the teacher) trains alongside the student, each learning from the labels and from
  the other's soft targets. The training loop stays ignorant of teachers: the peer is one of the
  provider's trainable `modules()`, stepped by the same optimizer.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from compress import manifest
from compress.artifact import ModelRef, canonical_hash
from compress.atomic import atomic_write_text
from compress.data import (
    CHAT,
    PROMPT,
    RESPONSE,
    TaskData,
    apply_template,
    pair_rows,
    render_pair,
)
from compress.distillation import KDLoss
from compress.lm_eval import generate_answers
from compress.train import LossProvider

GENERATIONS_FILE = "generations.json"
FORMAT_VERSION = 1


def teacher_texts(teacher: Any, teacher_ref: ModelRef, tokenizer: Any, prompts: list[str],
                  chats: list[bool], settings: dict[str, Any], root: Path, batch_size: int,
                  max_length: int, warnings: list[str] | None = None
                  ) -> tuple[list[str], dict[str, Any]]:
    """The teacher's answer to each prompt (chat-templated with the teacher's own tokenizer),
    generated once and read back from the cache on later runs; (texts, facts for the card)."""
    key = canonical_hash("teacher-generations", teacher_ref.hash, prompts, chats, settings,
                         max_length, FORMAT_VERSION)
    folder = Path(root) / "teacher-generations" / key[:16]
    damaged = manifest.check(folder, root, digests=True, what="teacher generations")
    if damaged and warnings is not None:
        warnings.append(damaged)
    cached = folder / GENERATIONS_FILE
    built = False
    if not cached.is_file():
        ids = [render_pair(tokenizer, p, None, c)[0][-max_length:]
               for p, c in zip(prompts, chats, strict=True)]
        was = teacher.training
        teacher.eval()
        try:
            texts = generate_answers(
                teacher, tokenizer, ids, settings["max_new_tokens"], batch_size,
                temperature=settings["temperature"], top_p=settings["top_p"],
                seed=settings["seed"])
        finally:
            teacher.train(was)
        with manifest.finished_dir(folder) as tmp:
            atomic_write_text(tmp / GENERATIONS_FILE, json.dumps(
                {"key": key, "teacher": teacher_ref.hash, "settings": settings,
                 "texts": texts}, indent=1))
        built = True
    texts = json.loads(cached.read_text())["texts"]
    empty = sum(not t.strip() for t in texts)
    return texts, {"cache": str(folder), "generated_now": built, "count": len(texts),
                   "empty": empty, "texts_hash": canonical_hash(texts),
                   "example": {"prompt": prompts[0][:300], "text": texts[0][:300]}
                   if texts else {}}


def with_responses(data: TaskData, responses: list[str], tag: str) -> TaskData:
    """The training pairs with these responses (empty ones keep the original), fingerprinted
    anew so caches keyed by the data (the teacher's top-k) follow."""
    train = data.train
    old = train[RESPONSE]
    new = [r.strip() or o for r, o in zip(responses, old, strict=True)]
    rows = pair_rows(train[PROMPT], new, train[CHAT])
    return dataclasses.replace(data, train=rows,
                               fingerprint=canonical_hash(data.fingerprint, tag, new))


def with_rationales(data: TaskData, rationales: list[str], prefix: str) -> TaskData:
    """Answer rows as they are plus one rationale row per example (the prompt behind `prefix`,
    the teacher's rationale as the target): two tasks, two targets (distilling step-by-step).
    Examples whose rationale came back empty get no rationale row."""
    import datasets

    train = data.train
    keep = [i for i, r in enumerate(rationales) if r.strip()]
    extra = pair_rows([prefix + train[PROMPT][i] for i in keep],
                      [rationales[i].strip() for i in keep], [train[CHAT][i] for i in keep])
    rows = datasets.concatenate_datasets([train, extra]).shuffle(seed=data.spec.seed)
    return dataclasses.replace(data, train=rows, fingerprint=canonical_hash(
        data.fingerprint, "rationale", prefix, rationales))


def rationale_prompts(data: TaskData, instruction: str) -> list[str]:
    """What the teacher is asked for each training example: `{prompt}` in the instruction."""
    return [apply_template(instruction, p) for p in data.train[PROMPT]]


class MutualPeer(LossProvider):
    """Deep mutual learning: the student's loss is `kd(student, peer)`, the peer's is
    `kd(peer, student)`, each against the other's detached outputs (so each model's gradient is
    its own loss's). The loop optimises their sum; the peer's parameters reach the optimizer as
    this provider's `modules()`, and are checkpointed with the student's."""

    def __init__(self, peer: Any, loss: KDLoss) -> None:
        self.peer, self._loss = peer, loss
        self.student_losses: list[float] = []
        self.peer_losses: list[float] = []

    def modules(self) -> torch.nn.Module:
        return self.peer

    def prepare(self, device: Any) -> None:
        self.peer.to(device).train().requires_grad_(True)

    def loss(self, out: Any, labels: torch.Tensor, batch: dict[str, Any],
             idx: torch.Tensor) -> torch.Tensor:
        peer = self.peer(**batch)
        mine = self._loss(out, [SimpleNamespace(logits=peer.logits.detach())], labels, batch)
        theirs = self._loss(peer, [SimpleNamespace(logits=out.logits.detach())], labels, batch)
        self.student_losses.append(float(mine.detach()))
        self.peer_losses.append(float(theirs.detach()))
        return mine + theirs

    def describe(self) -> str:
        return "mutual (the teacher trains too)"

    def stats(self) -> dict[str, float]:
        """Each model's own loss over the last tenth of training (the curve shows the sum)."""
        n = max(1, len(self.peer_losses) // 10)
        tail = slice(len(self.peer_losses) - n, None)
        mean = lambda xs: round(sum(xs[tail]) / max(len(xs[tail]), 1), 5)  # noqa: E731
        return {"student_final_loss": mean(self.student_losses),
                "peer_final_loss": mean(self.peer_losses)}
