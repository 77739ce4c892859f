"""One training loop for fine-tuning and distillation, through accelerate.

accelerate gives us the device, bf16 autocast on GPU and multi-GPU (`accelerate launch`) from the
same code; on a CPU-only machine it is a plain loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from compress.data import TaskData, encode, loader
from compress.recipe import _Training
from compress.stages import Progress

# loss(student_logits, teacher_logits or None, labels) -> scalar
LossFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


def _precision(cfg: _Training) -> str:
    if cfg.bf16 == "on" or (cfg.bf16 == "auto" and torch.cuda.is_available()):
        return "bf16"
    return "no"


def train(model: Any, tokenizer: Any, data: TaskData, cfg: _Training, loss_fn: LossFn, *,
          teacher: Any | None = None, desc: str = "train",
          progress: Progress | None = None) -> tuple[Any, dict[str, Any]]:
    """Train `model` in place; returns (unwrapped model, stats for the report card)."""
    from accelerate import Accelerator
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(cfg.seed)
    acc = Accelerator(mixed_precision=_precision(cfg), cpu=not torch.cuda.is_available())
    enc = encode(data.train, tokenizer, data.spec.max_length)
    dl = loader(enc, tokenizer, cfg.batch_size, shuffle=True, seed=cfg.seed)
    steps = cfg.max_steps or max(1, math.ceil(len(dl) * cfg.epochs))
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate, fused=torch.cuda.is_available() or None,
    )
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * steps), steps)
    model.train()
    model, opt, dl, sched = acc.prepare(model, opt, dl, sched)
    if teacher is not None:
        teacher = teacher.to(acc.device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    losses: list[float] = []
    curve: list[tuple[int, float]] = []
    step, samples, t0 = 0, 0, time.perf_counter()
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not acc.is_local_main_process,
               dynamic_ncols=True, mininterval=1.0)
    every = max(1, steps // 50)
    while step < steps:
        for batch in dl:
            labels = batch.pop("labels")
            with acc.autocast():
                logits = model(**batch).logits
                t_logits = None
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(**batch).logits
                loss = loss_fn(logits, t_logits, labels)
            acc.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            samples += len(labels)
            losses.append(float(loss.detach()))
            if step % every == 0 or step == steps:
                curve.append((step, sum(losses[-every:]) / len(losses[-every:])))
                rate = samples / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{curve[-1][1]:.4f}", samples_s=f"{rate:.1f}", refresh=False)
                if progress:
                    progress(desc, step, steps)
            bar.update(1)
            if step >= steps:
                break
    bar.close()
    seconds = time.perf_counter() - t0
    model = acc.unwrap_model(model).eval()
    tail = losses[-max(1, min(50, len(losses) // 5)):]
    return model, {
        "steps": step, "samples": samples, "seconds": round(seconds, 2),
        "samples_per_s": round(samples / seconds, 2), "final_loss": round(sum(tail) / len(tail), 5),
        "loss_curve": [(s, round(v, 5)) for s, v in curve], "precision": _precision(cfg),
        "device": str(acc.device),
    }
