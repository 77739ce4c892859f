"""One training loop for fine-tuning and distillation, through accelerate.

The loop knows nothing of teachers: it trains a model on a `LossProvider`, which decides what
the loss is and where its targets come from (labels, live teachers, a top-k cache, a peer model
that trains too). accelerate gives us the device, bf16 autocast on GPU and multi-GPU
(`accelerate launch`) from the same code; on a CPU-only machine it is a plain loop. Every epoch's
order comes from (seed, epoch), so a run resumed from a checkpoint sees exactly the batches the
interrupted run would have.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from compress.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from compress.data import TaskData, encode, loader
from compress.evaluate import TorchPredictor, metric_name, task_scores
from compress.interrupt import check as check_interrupt
from compress.losses import hard_label_loss, shift_for_causal_lm
from compress.metrics import METRICS
from compress.spec import EvaluationSpec
from compress.stage import Progress, TrainingConfig


class LossProvider:
    """What a training stage optimises. The loop calls `loss(outputs, labels, batch, idx)` under
    autocast for every micro-batch; the provider runs whatever produces its targets.

    `forward_kwargs` go to the student's forward (hidden states, attention maps); `modules()`
    are trainable helpers (projections) optimised and checkpointed with the student, never
    saved with it; `prepare(device)` moves what the provider runs to the training device.
    """

    forward_kwargs: dict[str, Any] = {}

    def modules(self) -> torch.nn.Module:
        return torch.nn.ModuleList()

    def prepare(self, device: Any) -> None:
        pass

    def loss(self, out: Any, labels: torch.Tensor, batch: dict[str, Any],
             idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str | None:
        """What the card says about the targets ("live", "cached top-k", ...)."""
        return None


class LabelLoss(LossProvider):
    """Cross-entropy on the labels: next-token for a causal LM (padding masked)."""

    def loss(self, out: Any, labels: torch.Tensor, batch: dict[str, Any],
             idx: torch.Tensor) -> torch.Tensor:
        return label_loss(out.logits, labels, batch.get("attention_mask"))


def label_loss(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None
               ) -> torch.Tensor:
    if logits.dim() == 3:
        logits, y, pos = shift_for_causal_lm(logits, y, mask)
        return hard_label_loss(logits, y if pos is None else y.masked_fill(~pos, -100))
    return hard_label_loss(logits, y)


def _precision(cfg: TrainingConfig) -> str:
    """accelerate's mixed_precision value: "bf16", or "no" (fp32)."""
    if cfg.bf16 == "on" or (cfg.bf16 == "auto" and torch.cuda.is_available()):
        return "bf16"
    return "no"


def encode_indexed(data: TaskData, tokenizer: Any) -> Any:
    """The training split, tokenized, with each row's index (the teacher cache's key)."""
    enc = encode(data.train, tokenizer, data.spec.max_length)
    return enc.add_column("idx", list(range(len(enc))))


def _evaluator(model: Any, tokenizer: Any, data: TaskData, evaluation: EvaluationSpec,
               max_samples: int) -> Callable[[], float]:
    """Early stopping's score on a fixed eval subset, higher is better: the card's own metric,
    computed the way evaluation computes it, signed by its declared direction."""
    name = metric_name(evaluation, data)

    def score() -> float:
        was_training = model.training
        try:  # the predictor puts the model in eval mode; training resumes in train mode
            pred = TorchPredictor(model, torch.get_num_threads())
            scores, _ = task_scores(pred, data, tokenizer, evaluation, max_samples)
            return METRICS[name].score(scores[name])
        finally:
            model.train(was_training)

    return score


def train(model: Any, tokenizer: Any, data: TaskData, cfg: TrainingConfig,
          loss: LossProvider, *, evaluation: EvaluationSpec | None = None,
          desc: str = "train", progress: Progress | None = None,
          checkpoint_dir: Path | None = None,
          quarantine_root: Path | None = None) -> tuple[Any, dict[str, Any]]:
    """Train `model` in place on `loss`; returns (unwrapped model, stats for the report card).

    `evaluation` (the recipe's) chooses early stopping's metric. A damaged checkpoint is moved
    to `quarantine_root` and not resumed from (stats["warnings"] says so). Under `accelerate
    launch` every process trains its shard of each batch; only the main process writes
    checkpoints. A requested stop (compress.interrupt) ends training at the next micro-batch.
    """
    from accelerate import Accelerator
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(cfg.seed)
    accum = cfg.gradient_accumulation
    acc = Accelerator(mixed_precision=_precision(cfg), cpu=not torch.cuda.is_available())
    enc = encode_indexed(data, tokenizer)
    rows = cfg.batch_size * acc.num_processes
    static = cfg.compile and len(enc) >= rows  # compiled: static shapes, the short batch dropped
    per_epoch = (len(enc) // rows if static else math.ceil(len(enc) / rows))  # micro-batches
    steps = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs / accum))  # optimizer
    fwd = loss.forward_kwargs
    extra = loss.modules().to(acc.device)
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
    loss.prepare(acc.device)
    es = cfg.early_stopping
    evaluation = evaluation or EvaluationSpec(batch_size=cfg.batch_size)
    metric = METRICS[metric_name(evaluation, data)]
    score = _evaluator(acc.unwrap_model(model), tokenizer, data, evaluation,
                       es.max_samples) if es else None

    def trainable() -> torch.nn.Module:  # what a checkpoint holds
        return torch.nn.ModuleDict({"model": acc.unwrap_model(model), "extra": extra})

    losses: list[float] = []
    curve: list[list[float]] = []
    evals: list[list[float]] = []
    best: tuple[float, int, dict] | None = None
    step = resumed = 0
    warnings: list[str] = []
    if checkpoint_dir is not None and (ck := latest_checkpoint(
            checkpoint_dir, quarantine_root=quarantine_root, warnings=warnings)) is not None:
        state = load_checkpoint(ck, model=trainable(), optimizer=opt, scheduler=sched)
        step = resumed = state["step"]
        losses, curve = state["extra"]["losses"], state["extra"]["curve"]
        evals = state["extra"].get("evals", [])
    samples = 0
    tokens: Any = 0  # a device tensor while training: no host sync per step
    unsynced: list[torch.Tensor] = []  # step losses not yet read back from the device

    def flush() -> None:  # one device->host read for many steps (a sync each step stalls GPUs)
        if unsynced:
            losses.extend(torch.stack(unsynced).float().tolist())
            unsynced.clear()

    warm = max(1, steps // 10)  # steps before the steady-state clock starts (compile, caches)
    steady_from: tuple[float, int, int] | None = None
    t0 = time.perf_counter()
    bar = tqdm(total=steps, initial=step, desc=desc, unit="step", dynamic_ncols=True,
               disable=not acc.is_local_main_process, mininterval=1.0)
    every = max(1, steps // 50)
    epoch, skip = divmod(step * accum, per_epoch)
    micro, pending, stopped = 0, 0.0, None
    try:  # the bar ends its line even when a stop or an error ends training
        while step < steps and stopped is None:
            dl = acc.prepare(loader(enc, tokenizer, cfg.batch_size, shuffle=True,
                                    seed=cfg.seed + epoch, static_shapes=static))
            if skip:
                dl = acc.skip_first_batches(dl, skip)
            for batch in dl:
                check_interrupt()
                labels, idx = batch.pop("labels"), batch.pop("idx")
                with acc.autocast():
                    out = forward(**batch, **fwd)
                    value = loss.loss(out, labels, batch, idx) / accum
                acc.backward(value)
                pending = pending + value.detach()
                micro += 1
                samples += len(labels)
                if "attention_mask" in batch:
                    tokens = tokens + batch["attention_mask"].sum()
                if micro % accum:
                    continue
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                unsynced.append(torch.as_tensor(pending))
                pending = 0.0
                if step == warm and step < steps:
                    flush()  # synchronizes: the clock starts with the device idle
                    steady_from = (time.perf_counter(), samples, int(tokens))
                if step % every == 0 or step == steps:
                    flush()
                    curve.append([step, sum(losses[-every:]) / len(losses[-every:])])
                    rate = samples / (time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{curve[-1][1]:.4f}", samples_s=f"{rate:.1f}",
                                    refresh=False)
                    if progress:
                        progress(desc, step, steps)
                bar.update(1)
                if score is not None and es is not None and (step % es.eval_every == 0
                                                             or step == steps):
                    value_ = score()
                    evals.append([step, round(value_, 5)])
                    if best is None or value_ > best[0] + es.min_delta:
                        best = (value_, step, {k: v.detach().clone() for k, v in
                                               acc.unwrap_model(model).state_dict().items()})
                    elif (step - best[1]) // es.eval_every >= es.patience:
                        stopped = step
                        break
                if checkpoint_dir is not None and cfg.checkpoint_every and \
                        step % cfg.checkpoint_every == 0 and step < steps and \
                        acc.is_main_process:
                    flush()
                    save_checkpoint(checkpoint_dir, step, model=trainable(),
                                    optimizer=opt, scheduler=sched,
                                    extra={"losses": losses, "curve": curve, "evals": evals})
                if step >= steps:
                    break
            epoch, skip = epoch + 1, 0
    finally:
        bar.close()
    flush()  # also waits for the device's last step before the clock stops
    tokens = int(tokens)
    t_end = time.perf_counter()
    seconds = t_end - t0
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
        "teacher": loss.describe(),
    }
    if warnings:
        stats["warnings"] = warnings
    if data.causal_lm:
        stats["tokens_per_s"] = round(tokens * acc.num_processes / per_s, 1)
    if steady_from is not None and step > warm:
        # after the first steps (compilation, allocator and kernel caches): what a longer run
        # sustains; the rates above include that start-up
        t_w, s_w, k_w = steady_from
        dt = max(t_end - t_w, 1e-9)
        stats["steady"] = {"from_step": warm,
                           "samples_per_s": round((samples - s_w) * acc.num_processes / dt, 2)}
        if data.causal_lm:
            stats["steady"]["tokens_per_s"] = round((tokens - k_w) * acc.num_processes / dt, 1)
    if es:
        stats["early_stopping"] = {"evals": evals, "stopped_at_step": stopped,
                                   "best_step": best[1] if best else None,
                                   "best": best[0] if best else None,
                                   "score": ("" if metric.higher_is_better else "-")
                                   + metric.name}
    return model, stats
