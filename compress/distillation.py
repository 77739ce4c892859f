"""Knowledge distillation, the engine: the loss, where the teacher's signal comes from, and the
teacher-generated data. The `distill` stage (compress/stages/distill.py) drives it.

loss = alpha * KL(teacher_T || student_T) * T^2 + (1 - alpha) * CE(student, labels)
     + hidden_weight * sum over mapped layers of MSE/cosine(proj(student_h), teacher_h)
     + attention_weight * sum over mapped layers of KL(teacher attention || student attention)

Causal LMs: the same terms per token (position t against token t + 1, padding masked; on
prompt/response data the response tokens only), with `divergence` choosing forward KL, reverse KL
or GKD's generalized JSD for the soft term.

The training loop (compress.train) sees only a `LossProvider`: `LiveTeachers` runs the teachers
on each batch (several teachers: their T-softmaxes averaged with weights); `CachedTeacher`
reads the teacher's top-k logits from a memory-mapped cache built once (compress.teacher_cache):
for a classifier k covers every class, so the cached loss is exact; for an LM it is the exact KL
over the kept top-k (both distributions renormalised over those k tokens).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress import manifest
from compress.artifact import ModelRef, canonical_hash
from compress.data import TaskData, encode, loader
from compress.errors import StageError
from compress.losses import (
    attention_kl_loss,
    hidden_state_loss,
    mix_soft_hard,
    mix_teacher_logits,
    shift_for_causal_lm,
    soft_target_loss,
    topk_kd_kl_loss,
    uniform_layer_map,
)
from compress.models import device_of, on_accelerator, placed_as_loaded
from compress.teacher_cache import TopKCache, TopKCacheWriter, cache_key
from compress.train import LossProvider, encode_indexed

# loss(student outputs, teacher signal, labels, batch) -> scalar. The signal is a list of the
# teachers' outputs (live), or (top-k values, top-k indices, rows present) from a cache.
KDLoss = Callable[[Any, Any, torch.Tensor, dict], torch.Tensor]


@dataclass(frozen=True)
class KDTerms:
    """The weights and shapes of the distillation loss's terms (from the stage's config)."""

    alpha: float = 0.5
    temperature: float = 2.0
    divergence: str = "kl"
    jsd_beta: float = 0.5
    hidden_weight: float = 0.0
    hidden_kind: str = "mse"
    attention_weight: float = 0.0


def kd_loss(terms: KDTerms, *, weights: Sequence[float] = (1.0,),
            pairs: Sequence[tuple[int, int]] = (),
            proj: torch.nn.ModuleDict | None = None) -> KDLoss:
    """The distillation loss as a function of (student out, teacher signal, labels, batch)."""
    proj = proj if proj is not None else torch.nn.ModuleDict()

    def loss(s: Any, t: Any, y: torch.Tensor, batch: dict) -> torch.Tensor:
        mask = batch.get("attention_mask")
        logits, pos = s.logits, None
        lm = logits.dim() == 3
        if lm:  # position t predicts token t + 1; padding and prompt tokens (-100) never count
            logits, y, pos = shift_for_causal_lm(logits, y, mask)
            pos = (y != -100) if pos is None else pos & (y != -100)
        if isinstance(t, tuple):  # cached top-k logits: (values, indices, rows present)
            values, indices, present = t
            if lm:
                values, indices = values[:, :-1], indices[:, :-1]
                pos = present[:, :-1] & pos
            else:
                values, indices = values.squeeze(1), indices.squeeze(1)
            soft = topk_kd_kl_loss(logits, values, indices, temperature=terms.temperature,
                                   mask=pos)
            return mix_soft_hard(soft, logits, y, terms.alpha, pos)
        t_logits = t[0].logits if len(t) == 1 else mix_teacher_logits(
            [o.logits for o in t], list(weights), terms.temperature)
        if lm:
            t_logits = t_logits[:, :-1]
        soft = soft_target_loss(logits, t_logits.float(), divergence=terms.divergence,
                                temperature=terms.temperature, beta=terms.jsd_beta, mask=pos)
        total = mix_soft_hard(soft, logits, y, terms.alpha, pos)
        for si, ti in pairs:
            if terms.hidden_weight:
                h = s.hidden_states[si]
                h = proj[str(si)](h) if len(proj) else h
                total = total + terms.hidden_weight * hidden_state_loss(
                    h, t[0].hidden_states[ti].float(), kind=terms.hidden_kind, mask=mask)
            if terms.attention_weight and si >= 1 and ti >= 1:
                total = total + terms.attention_weight * attention_kl_loss(
                    s.attentions[si - 1], t[0].attentions[ti - 1], mask=mask)
        return total

    return loss


class LiveTeachers(LossProvider):
    """Runs the teachers on every batch (under inference mode: no graph, no grads)."""

    def __init__(self, teachers: list[Any], loss: KDLoss, forward_kwargs: dict[str, Any],
                 extra: torch.nn.Module | None = None) -> None:
        self.teachers, self._loss = teachers, loss
        self.forward_kwargs = forward_kwargs
        self._extra = extra if extra is not None else torch.nn.ModuleList()

    def modules(self) -> torch.nn.Module:
        return self._extra

    def prepare(self, device: Any) -> None:
        self.teachers = [(t if placed_as_loaded(t) else t.to(device)).eval().requires_grad_(False)
                         for t in self.teachers]

    def loss(self, out: Any, labels: torch.Tensor, batch: dict[str, Any],
             idx: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            signal = [t(**batch, **self.forward_kwargs) for t in self.teachers]
        return self._loss(out, signal, labels, batch)

    def describe(self) -> str:
        return f"live ({len(self.teachers)})" if len(self.teachers) > 1 else "live"


class CachedTeacher(LossProvider):
    """Reads the teacher's top-k logits for each batch's rows from the cache."""

    def __init__(self, cache: TopKCache, loss: KDLoss) -> None:
        self.cache, self._loss, self._device = cache, loss, torch.device("cpu")

    def prepare(self, device: Any) -> None:
        self._device = device

    def loss(self, out: Any, labels: torch.Tensor, batch: dict[str, Any],
             idx: torch.Tensor) -> torch.Tensor:
        seq = labels.shape[1] if labels.dim() == 2 else None
        signal = tuple(x.to(self._device) for x in self.cache.batch(idx.tolist(), seq_len=seq))
        return self._loss(out, signal, labels, batch)

    def describe(self) -> str:
        return "cached top-k"


def build_teacher_cache(teacher: Any, teacher_ref: ModelRef, tokenizer: Any, data: TaskData,
                        root: Path, k: int, batch_size: int,
                        warnings: list[str] | None = None) -> TopKCache:
    """Open the cache for this teacher and data under `root` once its manifest verifies, or
    fill it first (a damaged cache is quarantined under `root`, and named in `warnings`)."""
    key = cache_key(teacher_ref.hash, data.fingerprint, k, data.spec.max_length)
    folder = Path(root) / "teacher-cache" / key[:16]
    damaged = manifest.check(folder, root, digests=True, what="teacher cache")
    if damaged and warnings is not None:
        warnings.append(damaged)
    cache = TopKCache.open(folder)
    if cache is not None:
        return cache
    enc = encode_indexed(data, tokenizer)
    writer = TopKCacheWriter(folder, len(enc), k)
    with on_accelerator(teacher), torch.inference_mode():
        device = device_of(teacher)
        for batch in loader(enc, tokenizer, batch_size * 2):
            batch.pop("labels")
            idx = batch.pop("idx")
            batch = {k_: v.to(device) for k_, v in batch.items()}
            logits = teacher(**batch).logits.float().cpu()
            mask = batch["attention_mask"].cpu() if logits.dim() == 3 else None
            writer.add(idx.tolist(), logits, mask)
    writer.finish()
    opened = TopKCache.open(folder)
    assert opened is not None
    return opened


def layer_map(student: Any, teacher: Any, given: Sequence[Sequence[int]] | None
              ) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs, 1-based (0 = embeddings): the given map checked
    against both models, or the uniform one."""
    s_n, t_n = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    pairs = given or uniform_layer_map(s_n, t_n)
    for s, t in pairs:
        if not (0 <= s <= s_n and 0 <= t <= t_n):
            raise StageError(f"distill.hidden.layer_map: ({s}, {t}) is out of range: the student "
                             f"has layers 1-{s_n}, the teacher 1-{t_n} (0 = embeddings)")
    return [(int(s), int(t)) for s, t in pairs]


def augment(teacher: Any, tokenizer: Any, data: TaskData, *, prompts: int, prompt_tokens: int,
            max_new_tokens: int, temperature: float, top_p: float, seed: int,
            settings: dict[str, Any]) -> tuple[TaskData, dict[str, Any]]:
    """The teacher continues `prompts` prompts cut from the training text; the data gains one
    row per continuation. Seeded, so the same recipe writes the same text (and cache key)."""
    import datasets

    blocks = encode(data.train, tokenizer, data.spec.max_length)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(blocks), generator=gen)[:prompts].tolist()
    device = device_of(teacher)
    texts: list[str] = []
    new_tokens = 0
    torch.manual_seed(seed)
    with torch.inference_mode():
        for i in order:
            prompt = torch.tensor([blocks[i]["input_ids"][:prompt_tokens]], device=device)
            sample = temperature > 0
            out = teacher.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                do_sample=sample, temperature=temperature if sample else None,
                top_p=top_p if sample else None, pad_token_id=tokenizer.pad_token_id)
            new_tokens += out.shape[1] - prompt.shape[1]
            texts.append(tokenizer.decode(out[0], skip_special_tokens=True))
    extra = datasets.Dataset.from_dict({"text": texts})
    train = datasets.concatenate_datasets([data.train, extra])
    fp = canonical_hash(data.fingerprint, "augment", settings, texts)
    info = {"prompts": len(texts), "generated_tokens": new_tokens,
            "example": texts[0][:300] if texts else ""}
    return dataclasses.replace(data, train=train, fingerprint=fp), info
