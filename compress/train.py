"""One training loop for fine-tuning and distillation, through accelerate.

accelerate gives us the device, bf16 autocast on GPU and multi-GPU (`accelerate launch`) from the
same code; on a CPU-only machine it is a plain loop. Every epoch's order comes from (seed, epoch),
so a run resumed from a checkpoint sees exactly the batches the interrupted run would have.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from compress.data import TaskData, encode, loader
from compress.recipe import _Training
from compress.stages import Progress

# loss(student outputs, teacher signal, labels, batch) -> scalar. The teacher signal is None
# (fine-tuning), a list of the teachers' outputs, or (top-k values, top-k indices) from a cache.
LossFn = Callable[[Any, Any, torch.Tensor, dict], torch.Tensor]


def _precision(cfg: _Training) -> str:
    """accelerate's mixed_precision value: "bf16", or "no" (fp32)."""
    if cfg.bf16 == "on" or (cfg.bf16 == "auto" and torch.cuda.is_available()):
        return "bf16"
    return "no"


def encode_indexed(data: TaskData, tokenizer: Any) -> Any:
    """The training split, tokenized, with each row's index (the teacher cache's key)."""
    enc = encode(data.train, tokenizer, data.spec.max_length)
    return enc.add_column("idx", list(range(len(enc))))


def _evaluator(model: Any, tokenizer: Any, data: TaskData, spec: Any, batch_size: int
               ) -> Callable[[], float]:
    """Early stopping's score on a fixed eval subset, higher is better: the card's own metric
    (accuracy, or minus perplexity), computed the way evaluation computes it."""
    from compress.evaluate import TorchPredictor, accuracy, perplexity

    def score() -> float:
        was_training = model.training
        try:  # the predictor puts the model in eval mode; training resumes in train mode
            pred = TorchPredictor(model, torch.get_num_threads())
            if data.causal_lm:
                return -perplexity(pred, data, tokenizer, batch_size, spec.max_samples)[0]
            return accuracy(pred, data, tokenizer, batch_size, spec.max_samples)[0]
        finally:
            model.train(was_training)

    return score


def train(model: Any, tokenizer: Any, data: TaskData, cfg: _Training, loss_fn: LossFn, *,
          teachers: list[Any] = (), teacher_cache: Any | None = None, desc: str = "train",
          progress: Progress | None = None, checkpoint_dir: Path | None = None,
          forward_kwargs: dict[str, Any] | None = None,
          extra: torch.nn.Module | None = None) -> tuple[Any, dict[str, Any]]:
    """Train `model` in place; returns (unwrapped model, stats for the report card).

    `extra` holds trainable helpers that are not part of the student (hidden-state
    projections): optimised and checkpointed with it, never saved with it. Under
    `accelerate launch` every process trains its shard of each batch; only the main process
    writes checkpoints.
    """
    from accelerate import Accelerator
    from transformers import get_linear_schedule_with_warmup

    from compress.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    torch.manual_seed(cfg.seed)
    accum = cfg.gradient_accumulation
    acc = Accelerator(mixed_precision=_precision(cfg), cpu=not torch.cuda.is_available())
    enc = encode_indexed(data, tokenizer)
    per_epoch = math.ceil(len(enc) / (cfg.batch_size * acc.num_processes))  # micro-batches
    steps = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs / accum))  # optimizer
    fwd = forward_kwargs or {}
    extra = (extra or torch.nn.ModuleList()).to(acc.device)
    params = list(model.parameters()) + list(extra.parameters())
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate, fused=torch.cuda.is_available() or None,
    )
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * steps), steps)
    model.train()
    model, opt, sched = acc.prepare(model, opt, sched)
    forward = torch.compile(model) if cfg.compile else model
    teachers = [t.to(acc.device).eval().requires_grad_(False) for t in teachers]
    score = _evaluator(acc.unwrap_model(model), tokenizer, data, cfg.early_stopping,
                       cfg.batch_size) if cfg.early_stopping else None

    def trainable() -> torch.nn.Module:  # what a checkpoint holds
        return torch.nn.ModuleDict({"model": acc.unwrap_model(model), "extra": extra})

    losses: list[float] = []
    curve: list[list[float]] = []
    evals: list[list[float]] = []
    best: tuple[float, int, dict] | None = None
    step = resumed = 0
    if checkpoint_dir is not None and (ck := latest_checkpoint(checkpoint_dir)) is not None:
        state = load_checkpoint(ck, model=trainable(), optimizer=opt, scheduler=sched)
        step = resumed = state["step"]
        losses, curve = state["extra"]["losses"], state["extra"]["curve"]
        evals = state["extra"].get("evals", [])
    samples = tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(total=steps, initial=step, desc=desc, unit="step", dynamic_ncols=True,
               disable=not acc.is_local_main_process, mininterval=1.0)
    every = max(1, steps // 50)
    epoch, skip = divmod(step * accum, per_epoch)
    micro, pending, stopped = 0, 0.0, None
    while step < steps and stopped is None:
        dl = acc.prepare(loader(enc, tokenizer, cfg.batch_size, shuffle=True,
                                seed=cfg.seed + epoch))
        if skip:
            dl = acc.skip_first_batches(dl, skip)
        for batch in dl:
            labels, idx = batch.pop("labels"), batch.pop("idx")
            with acc.autocast():
                out = forward(**batch, **fwd)
                signal: Any = None
                if teachers:
                    with torch.inference_mode():
                        signal = [t(**batch, **fwd) for t in teachers]
                elif teacher_cache is not None:
                    seq = labels.shape[1] if labels.dim() == 2 else None
                    signal = tuple(x.to(acc.device) for x in
                                   teacher_cache.batch(idx.tolist(), seq_len=seq))
                loss = loss_fn(out, signal, labels, batch) / accum
            acc.backward(loss)
            pending += float(loss.detach())
            micro += 1
            samples += len(labels)
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
            if micro % accum:
                continue
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(pending)
            pending = 0.0
            if step % every == 0 or step == steps:
                curve.append([step, sum(losses[-every:]) / len(losses[-every:])])
                rate = samples / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{curve[-1][1]:.4f}", samples_s=f"{rate:.1f}",
                                refresh=False)
                if progress:
                    progress(desc, step, steps)
            bar.update(1)
            if score is not None and (step % cfg.early_stopping.eval_every == 0
                                      or step == steps):
                value = score()
                evals.append([step, round(value, 5)])
                if best is None or value > best[0] + cfg.early_stopping.min_delta:
                    best = (value, step, {k: v.detach().clone() for k, v in
                                          acc.unwrap_model(model).state_dict().items()})
                elif (step - best[1]) // cfg.early_stopping.eval_every >= \
                        cfg.early_stopping.patience:
                    stopped = step
                    break
            if checkpoint_dir is not None and cfg.checkpoint_every and \
                    step % cfg.checkpoint_every == 0 and step < steps and \
                    acc.is_main_process:
                save_checkpoint(checkpoint_dir, step, model=trainable(),
                                optimizer=opt, scheduler=sched,
                                extra={"losses": losses, "curve": curve, "evals": evals})
            if step >= steps:
                break
        epoch, skip = epoch + 1, 0
    bar.close()
    seconds = time.perf_counter() - t0
    model = acc.unwrap_model(model).eval()
    if best is not None:
        model.load_state_dict(best[2])  # the best evaluation, not the last step
    acc.wait_for_everyone()
    tail = losses[-max(1, min(50, len(losses) // 5)):] or [float("nan")]
    per_s = max(seconds, 1e-9)
    stats = {
        "steps": step, "resumed_from_step": resumed, "samples": samples * acc.num_processes,
        "seconds": round(seconds, 2),
        "samples_per_s": round(samples * acc.num_processes / per_s, 2),
        "final_loss": round(sum(tail) / len(tail), 5),
        "loss_curve": [(int(s), round(v, 5)) for s, v in curve],
        "precision": "bf16" if _precision(cfg) == "bf16" else "fp32",
        "device": str(acc.device), "processes": acc.num_processes,
        "gradient_accumulation": accum, "compiled": cfg.compile,
        "teacher": "cached top-k" if teacher_cache is not None
        else (f"live ({len(teachers)})" if len(teachers) > 1 else "live" if teachers else None),
    }
    if data.causal_lm:
        stats["tokens_per_s"] = round(tokens * acc.num_processes / per_s, 1)
    if cfg.early_stopping:
        stats["early_stopping"] = {"evals": evals, "stopped_at_step": stopped,
                                   "best_step": best[1] if best else None,
                                   "best": best[0] if best else None,
                                   "score": "-perplexity" if data.causal_lm else "accuracy"}
    return model, stats
