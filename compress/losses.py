"""Knowledge-distillation losses as pure functions of tensors.

Conventions shared by every loss here:
- logits are ``(..., C)``: ``(batch, classes)`` for classifiers, ``(batch, seq, vocab)`` for LMs;
- ``mask`` is a bool/0-1 tensor of shape ``logits.shape[:-1]`` selecting the positions that count;
- reduction is "batchmean": sum over classes, mean over selected positions (0 if none selected);
- everything is computed in float32 (inputs are cast with ``.float()``) for bf16/autocast safety.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_ATTN_EPS = 1e-8


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _select(x: Tensor, mask: Tensor | None) -> Tensor:
    """Flatten positions to (N, last), keeping only masked-in ones so padding never enters."""
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    if tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"mask shape {tuple(mask.shape)} must be {tuple(x.shape[:-1])}")
    return x[mask.bool()]


def _mean(per_position: Tensor) -> Tensor:
    """Mean over positions that returns 0 (not NaN) when every position is masked out."""
    return per_position.sum() / max(per_position.numel(), 1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) summed over the last dim, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_probs(s: Tensor, t: Tensor, temperature: float, mask: Tensor | None):
    """Temperature-scaled student and teacher log-probs at the selected positions."""
    _check_temperature(temperature)
    if s.shape != t.shape:
        raise ValueError(f"student shape {tuple(s.shape)} != teacher shape {tuple(t.shape)}")
    s, t = _select(s, mask).float(), _select(t, mask).float()
    return F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)


def kd_kl_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, mask=None
) -> Tensor:
    """Forward KL(teacher_T || student_T) * T**2 (Hinton et al.: T**2 keeps grad scale T-free)."""
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature, mask)
    return _mean(_kl(log_t, log_s)) * temperature**2


def reverse_kl_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, mask=None
) -> Tensor:
    """Reverse KL(student_T || teacher_T) * T**2: mode-seeking, the GKD/MiniLLM choice for LMs."""
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature, mask)
    return _mean(_kl(log_s, log_t)) * temperature**2


def generalized_jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask=None,
) -> Tensor:
    """Generalized JSD of GKD/TRL, m = beta*p_t + (1-beta)*p_s, times T**2.

    loss = beta*KL(p_t || m) + (1-beta)*KL(p_s || m). TRL convention at the endpoints: beta == 0
    returns ``kd_kl_loss`` (forward KL teacher||student) and beta == 1 returns ``reverse_kl_loss``.
    Those are the limits of JSD/beta and JSD/(1-beta); the unnormalised JSD itself goes to 0 there,
    so the value jumps at the endpoints.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return kd_kl_loss(student_logits, teacher_logits, temperature, mask)
    if beta == 1.0:
        return reverse_kl_loss(student_logits, teacher_logits, temperature, mask)
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature, mask)
    log_m = torch.logsumexp(
        torch.stack([log_t + math.log(beta), log_s + math.log(1.0 - beta)]), dim=0
    )
    jsd = beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)
    return _mean(jsd) * temperature**2


def hard_label_loss(student_logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Cross-entropy, mean over non-ignored labels (no shifting: align causal-LM labels first)."""
    if tuple(labels.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must be {tuple(student_logits.shape[:-1])}"
        )
    logits = student_logits.float().reshape(-1, student_logits.shape[-1])
    labels = labels.reshape(-1).long()
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / max(int((labels != ignore_index).sum()), 1)


def mix_soft_hard(
    soft: Tensor,
    student_logits: Tensor,
    labels: Tensor | None,
    alpha: float,
    mask=None,
    ignore_index: int = -100,
) -> Tensor:
    """alpha * soft + (1 - alpha) * hard_label_loss: the one place soft targets meet labels.

    ``soft`` is any soft-target term already computed (KL, reverse KL, JSD, top-k KL); ``mask``
    (positions that count) also drops the labels it excludes. alpha == 1 is pure distillation
    (labels unused, may be None); alpha == 0 plain fine-tuning on the labels.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 1.0:
        return soft
    if labels is None:
        raise ValueError(f"labels are required when alpha < 1 (got alpha={alpha}, labels=None)")
    if mask is not None:
        if tuple(mask.shape) != tuple(labels.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} != labels {tuple(labels.shape)}")
        labels = labels.masked_fill(~mask.bool(), ignore_index)
    hard = hard_label_loss(student_logits, labels, ignore_index)
    return hard if alpha == 0.0 else alpha * soft + (1.0 - alpha) * hard


def hidden_state_loss(
    student_hidden: Tensor, teacher_hidden: Tensor, kind: str = "mse", mask=None
) -> Tensor:
    """Hidden-state matching (FitNets/TinyBERT): "mse", "nmse" (MSE over the teacher's mean
    square: a pre-norm LM's residual stream grows with depth to norms in the hundreds, where
    plain MSE outweighs the task loss ~1000 to 1) or "cosine" (mean of 1 - cos)."""
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"student hidden shape {tuple(student_hidden.shape)} != teacher hidden shape "
            f"{tuple(teacher_hidden.shape)}; project the student first"
        )
    s, t = _select(student_hidden, mask).float(), _select(teacher_hidden, mask).float()
    if kind == "mse":
        return _mean((s - t).pow(2))
    if kind == "nmse":
        return _mean((s - t).pow(2)) / _mean(t.pow(2)).detach().clamp_min(1e-12)
    if kind == "cosine":
        return _mean(1.0 - F.cosine_similarity(s, t, dim=-1))
    raise ValueError(f"kind must be 'mse', 'nmse' or 'cosine', got {kind!r}")


def attention_kl_loss(student_attn: Tensor, teacher_attn: Tensor, mask=None) -> Tensor:
    """KL(teacher || student) between attention probabilities (MiniLM), mean over (b, h, q).

    Maps are (batch, heads, q, k) probabilities; ``mask`` is a (batch, q) query mask. Probabilities
    are clamped to 1e-8 before the log so exact zeros (masked keys) stay finite.
    """
    if student_attn.shape != teacher_attn.shape or student_attn.dim() != 4:
        raise ValueError(
            f"attention maps must both be (batch, heads, q, k); got {tuple(student_attn.shape)} "
            f"and {tuple(teacher_attn.shape)}"
        )
    if mask is not None:
        b, h, q, _ = student_attn.shape
        if tuple(mask.shape) != (b, q):
            raise ValueError(f"attention mask shape {tuple(mask.shape)} must be {(b, q)}")
        mask = mask.bool()[:, None, :].expand(b, h, q)
    s, t = _select(student_attn, mask).float(), _select(teacher_attn, mask).float()
    kl = (t * (t.clamp_min(_ATTN_EPS).log() - s.clamp_min(_ATTN_EPS).log())).sum(-1)
    return _mean(kl)


def topk_kd_kl_loss(
    student_logits: Tensor,
    topk_values: Tensor,
    topk_indices: Tensor,
    temperature: float = 1.0,
    mask=None,
) -> Tensor:
    """Forward KL from cached teacher top-k logits, on the k-element support, times T**2.

    Teacher: softmax(topk_values / T) over the k kept entries (renormalised kept mass). Student:
    log_softmax over the full vocab, gathered at ``topk_indices``, renormalised over those k
    entries; that cancels the full-vocab normaliser, so it equals log_softmax of the gathered
    logits, which is how it is computed (no (..., V) softmax). Both live on the same k-element
    support, so this is an exact KL (>= 0); non-kept vocab entries get no gradient.
    """
    _check_temperature(temperature)
    if topk_values.shape != topk_indices.shape or (
        topk_values.shape[:-1] != student_logits.shape[:-1]
    ):
        raise ValueError(
            f"topk values {tuple(topk_values.shape)} / indices {tuple(topk_indices.shape)} must "
            f"be (..., k) matching student logits {tuple(student_logits.shape)}"
        )
    if topk_values.shape[-1] > student_logits.shape[-1]:
        raise ValueError(f"k={topk_values.shape[-1]} exceeds vocab {student_logits.shape[-1]}")
    s, v = _select(student_logits, mask).float(), _select(topk_values, mask).float()
    idx = _select(topk_indices, mask).long()
    log_s = F.log_softmax(s.gather(-1, idx) / temperature, -1)
    log_t = F.log_softmax(v / temperature, -1)
    return _mean(_kl(log_t, log_s)) * temperature**2


def uniform_layer_map(num_student_layers: int, num_teacher_layers: int) -> list[tuple[int, int]]:
    """Student layer i (1..S, 0 = embeddings) -> teacher layer round(i*T/S), ties rounded up.

    Exact integer half-up rounding (Python's round() is banker's: (4, 6) would map 3 -> 4, not 5),
    clamped to >= 1 so a student deeper than 2x its teacher never maps onto the embeddings.
    """
    named = {"num_student_layers": num_student_layers, "num_teacher_layers": num_teacher_layers}
    for name, n in named.items():
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    s, t = num_student_layers, num_teacher_layers
    return [(i, max(1, (2 * i * t + s) // (2 * s))) for i in range(1, s + 1)]


def mix_teacher_logits(teacher_logits: list[Tensor], weights: list[float],
                       temperature: float = 1.0) -> Tensor:
    """Logits whose T-softmax is the weighted mean of the teachers' T-softmaxes (multi-teacher).

    Returns T * log(sum_i w_i softmax(t_i / T)) with weights normalised to sum to 1, so any loss
    that applies softmax(. / T) to teacher logits sees exactly the averaged soft targets.
    """
    _check_temperature(temperature)
    if not teacher_logits or len(teacher_logits) != len(weights) or min(weights) <= 0:
        raise ValueError("need one positive weight per teacher")
    total = float(sum(weights))
    logs = [torch.log_softmax(t.float() / temperature, -1) + math.log(w / total)
            for t, w in zip(teacher_logits, weights, strict=True)]
    return temperature * torch.logsumexp(torch.stack(logs), dim=0)


def shift_for_causal_lm(logits: Tensor, labels: Tensor, mask: Tensor | None = None
                        ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Align a causal LM's outputs with what they predict: position t scores token t + 1.

    Logits lose the last position, labels and mask the first; padding (mask 0) is then excluded
    by the losses, so neither a pad token nor the token after the last real one is ever scored.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"causal LM logits (B, T, V) and labels (B, T) expected, got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    return logits[:, :-1], labels[:, 1:], None if mask is None else mask[:, 1:].bool()


def soft_target_loss(student_logits: Tensor, teacher_logits: Tensor, *, divergence: str = "kl",
                     temperature: float = 1.0, beta: float = 0.5, mask=None) -> Tensor:
    """The soft-target term by name: "kl" (forward, Hinton), "reverse_kl" or "jsd" (GKD)."""
    if divergence == "kl":
        return kd_kl_loss(student_logits, teacher_logits, temperature, mask)
    if divergence == "reverse_kl":
        return reverse_kl_loss(student_logits, teacher_logits, temperature, mask)
    if divergence == "jsd":
        return generalized_jsd_loss(student_logits, teacher_logits, beta, temperature, mask)
    raise ValueError(f"divergence must be kl, reverse_kl or jsd, got {divergence!r}")
