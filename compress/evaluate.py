"""Evaluate any model reference the same way: task metric on the eval split, latency, size, memory.

PyTorch models are timed in PyTorch and ONNX models in ONNX Runtime; the inputs, thread count and
batch sizes are the same for every stage, so the numbers on one report card compare.
"""

from __future__ import annotations

import gc
import json
import time
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from compress.artifact import WEIGHT_SUFFIXES, ModelRef, dir_bytes
from compress.data import TaskData, encode, loader
from compress.errors import RecipeError
from compress.interrupt import check as check_interrupt
from compress.lm_eval import block_perplexity, card_scores, pair_scores
from compress.logs import quiet
from compress.measure import (
    NOISY,
    PeakMemory,
    default_threads,
    in_turns,
    interleaved,
    latency_stats,
    spread,
    time_calls,
)
from compress.metrics import Metrics, classification_scores, default_metric
from compress.models import (
    count_parameters,
    device_of,
    load_model,
    load_tokenizer,
    placed_as_loaded,
)
from compress.report import HeadToHead
from compress.spec import EvaluationSpec

SESSION_FILE = "ort_session.json"  # {"graph_optimization_level": "basic"}: how to run the model
_OPT_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
               "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def session_options(threads: int, folder: Any = None) -> Any:
    """ORT session options with our thread policy, and the graph optimization level recorded in
    the folder's ort_session.json (quantize writes it), so every runner applies the same one."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    f = Path(folder) / SESSION_FILE if folder is not None else None
    if f is not None and f.is_file():
        level = json.loads(f.read_text()).get("graph_optimization_level", "all")
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[level])
    return opts


def ort_causal_lm(folder: Any, file_name: str, threads: int) -> Any:
    """optimum's ORTModelForCausalLM over an exported (or quantized) folder: it feeds the empty
    first-step cache, position ids and the cache between steps, so `generate` works as in torch."""
    from optimum.onnxruntime import ORTModelForCausalLM

    with quiet(stdout=True):
        model = ORTModelForCausalLM.from_pretrained(
            str(folder), file_name=file_name, use_cache=True, local_files_only=True,
            provider="CPUExecutionProvider", session_options=session_options(threads, folder),
            use_io_binding=False)
    # optimum-onnx 0.1.0 sizes the empty first-step cache as hidden_size / heads per head and,
    # for families it does not list (Phi-3), as many key/value heads as query heads: wrong once
    # heads are pruned (head_dim stays) or with GQA. The config says what the graph has.
    c = model.config
    if getattr(model, "embed_size_per_head", None) is not None:
        model.embed_size_per_head = getattr(c, "head_dim", None) or \
            c.hidden_size // c.num_attention_heads
    if getattr(c, "num_key_value_heads", None):
        model.num_key_value_heads = c.num_key_value_heads
    return model


class Predictor:
    """Logits for a batch of token ids, whatever runs the model."""

    runtime: str
    device: str = "cpu"

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    @property
    def parameters(self) -> int:
        raise NotImplementedError


class TorchPredictor(Predictor):
    runtime = "torch"

    def __init__(self, model: Any, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if placed_as_loaded(model):  # bitsandbytes places its own weights
            self.device = str(device_of(model))
            self.model = model.eval()
        else:
            self.model = model.to(self.device).eval()
        import inspect

        self._accepts = set(inspect.signature(self.model.forward).parameters)

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        feed = {k: torch.as_tensor(np.asarray(v), device=self.device) for k, v in batch.items()
                if k in self._accepts and k != "labels"}
        with torch.inference_mode():
            out = self.model(**feed).logits
        return out.float().cpu().numpy()

    @property
    def parameters(self) -> int:
        return count_parameters(self.model)


class OrtPredictor(Predictor):
    runtime = "onnxruntime"

    def __init__(self, path: str, threads: int) -> None:
        import onnxruntime as ort

        self.path = path
        self.session = ort.InferenceSession(path, session_options(threads, Path(path).parent),
                                            providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self.session.get_inputs()}

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        feed = {k: np.asarray(v, dtype=np.int64) for k, v in batch.items() if k in self._inputs}
        return self.session.run(None, feed)[0]

    @cached_property
    def parameters(self) -> int:
        return onnx_parameters(self.path)


def onnx_parameters(path: str) -> int:
    """Weights counted from the graph's initializers (external data need not be read)."""
    import onnx

    m = onnx.load(path, load_external_data=False)
    return int(sum(int(np.prod(t.dims)) for t in m.graph.initializer))


class OrtCausalLMPredictor(Predictor):
    """An exported decoder (with KV-cache inputs) through optimum's ORTModelForCausalLM, which
    feeds the empty past a full-sequence forward needs."""

    runtime = "onnxruntime"

    def __init__(self, ref: ModelRef, threads: int) -> None:
        self.path = str(ref.onnx_path)
        self.model = ort_causal_lm(ref.dir, ref.onnx_file or "model.onnx", threads)

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        feed = {k: torch.as_tensor(np.asarray(batch[k], dtype=np.int64))
                for k in ("input_ids", "attention_mask") if k in batch}
        with torch.inference_mode():
            return self.model(**feed).logits.float().numpy()

    @cached_property
    def parameters(self) -> int:
        return onnx_parameters(self.path)


def predictor(ref: ModelRef, num_labels: int, threads: int, *,
              trust_remote_code: bool = False) -> Predictor:
    if ref.format == "onnx":
        if ref.task == "causal-lm":
            return OrtCausalLMPredictor(ref, threads)
        return OrtPredictor(str(ref.onnx_path), threads)
    model = load_model(ref.path, ref.task, num_labels, trust_remote_code=trust_remote_code)
    return TorchPredictor(model, threads)


_ONNX_MATMULS = {"MatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul",
                 "MatMulNBits", "FusedMatMul", "Attention", "QAttention"}  # fused: Q, K, V


def linear_macs_per_token(model: Any) -> int:
    """Weight-matmul MACs per token (every Linear's in x out): with the same count for ONNX
    graphs, the card compares MACs across runtimes and shows when fewer MACs buy no speed."""
    import torch

    return sum(m.in_features * m.out_features for m in model.modules()
               if isinstance(m, torch.nn.Linear))


def onnx_macs_per_token(path: str) -> int:
    """The same count from an ONNX graph: each matmul whose weight is a constant (directly, or
    through DequantizeLinear/Transpose/Cast), or a MatMulNBits with its K x N attributes."""
    import onnx

    m = onnx.load(path, load_external_data=False)
    shapes = {t.name: list(t.dims) for t in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}

    def weight_shape(name: str, depth: int = 0) -> list[int] | None:
        if name in shapes:
            return shapes[name]
        node = producer.get(name)
        if node is None or depth > 3 or node.op_type not in (
                "DequantizeLinear", "Transpose", "Cast", "Reshape"):
            return None
        return weight_shape(node.input[0], depth + 1)

    total = 0
    for node in m.graph.node:
        if node.op_type not in _ONNX_MATMULS:
            continue
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            total += attrs.get("K", 0) * attrs.get("N", 0)
            continue
        b = node.input[3] if node.op_type == "QLinearMatMul" else node.input[1]
        shape = weight_shape(b)
        if shape and len(shape) >= 2:
            total += int(shape[-1] * shape[-2])
    return total


def fixed_batch(tokenizer: Any, texts: list[str], batch_size: int, seq_len: int
                ) -> dict[str, np.ndarray]:
    """A batch of real eval texts padded to exactly seq_len: the same shapes for every stage."""
    rows = (texts * (batch_size // max(len(texts), 1) + 1))[:batch_size]
    enc = tokenizer(rows, padding="max_length", truncation=True, max_length=seq_len,
                    return_tensors="np")
    return {k: v.astype(np.int64) for k, v in enc.items()}


def real_lengths(tokenizer: Any, data: TaskData, limit: int = 2000) -> dict[str, int]:
    """The eval texts' median and 95th-percentile token counts (special tokens included, capped
    at max_length): the lengths requests really have, unlike the padded max the table uses."""
    texts = list(data.eval["text"][:limit])
    pairs = list(data.eval["text_pair"][:limit]) if "text_pair" in data.eval.column_names \
        else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=data.spec.max_length)
    counts = np.array([len(ids) for ids in enc["input_ids"]])
    return {"median": int(np.median(counts)), "p95": int(np.percentile(counts, 95))}


def timing_plan(tokenizer: Any, data: TaskData, spec: EvaluationSpec
                ) -> list[tuple[int, int, str]]:
    """(batch size, sequence length, length label) for every latency the card shows: batch 1
    and latency.batch_size at the fixed length, then batch 1 at the real lengths."""
    fixed = spec.latency.sequence_length or data.spec.max_length
    plan = [(bs, fixed, "max") for bs in sorted({1, spec.latency.batch_size})]
    if spec.latency.real_lengths and not data.causal_lm:
        plan += [(1, n, label) for label, n in real_lengths(tokenizer, data).items()]
    return plan


def logit_parity(a: Predictor, b: Predictor, data: TaskData, tokenizer: Any, samples: int,
                 batch_size: int = 16) -> dict[str, Any]:
    """How far two runnings of one classifier disagree on real eval examples: the max abs
    logit difference and the share of equal predictions. Every stage that rewrites a model
    without meaning to change it (export, graph fusions) must pass this."""
    n = min(samples, len(data.eval))
    enc = encode(data.eval.select(range(n)), tokenizer, data.spec.max_length)
    diff, agree = 0.0, 0
    for batch in loader(enc, tokenizer, batch_size, tensors="np"):
        batch.pop("labels")
        x, y = a.logits(batch), b.logits(batch)
        diff = max(diff, float(np.abs(x - y).max()))
        agree += int((x.argmax(-1) == y.argmax(-1)).sum())
    return {"max_abs_diff": diff, "samples": n, "argmax_agreement": agree / max(n, 1)}


def positive_class(spec: EvaluationSpec, data: TaskData) -> int | None:
    """The class id whose F1 the card reports: `positive_label` (a name or an id), class 1 for
    two classes, none otherwise (and none for a causal LM). A name or id the data does not have
    is a recipe error, found at plan time."""
    if data.causal_lm:
        return None
    label = spec.positive_label
    if label is None:
        if spec.metric == "f1" and data.num_labels != 2:
            raise RecipeError(f"evaluation.positive_label: metric f1 with {data.num_labels} "
                              "classes needs the positive class named")
        return 1 if data.num_labels == 2 else None
    names = data.label_names or ()
    if isinstance(label, str) and label in names:
        return names.index(label)
    if isinstance(label, int) or (isinstance(label, str) and label.isdigit() and not names):
        i = int(label)
        if 0 <= i < data.num_labels:
            return i
    known = ", ".join(names) if names else f"0-{data.num_labels - 1}"
    raise RecipeError(f"evaluation.positive_label: {label!r} is not a class of the data "
                      f"(classes: {known})")


def classify(pred: Predictor, data: TaskData, tokenizer: Any, batch_size: int,
             max_samples: int | None = None, positive: int | None = None
             ) -> tuple[dict[str, float], int]:
    """Accuracy, macro-F1 and the positive class's F1 on the eval split; (scores, examples)."""
    ev = data.eval
    if max_samples:
        ev = ev.select(range(min(max_samples, len(ev))))
    enc = encode(ev, tokenizer, data.spec.max_length)
    preds, labels = [], []
    for batch in loader(enc, tokenizer, batch_size, tensors="np"):
        check_interrupt()
        labels.append(np.asarray(batch.pop("labels")))
        preds.append(pred.logits(batch).argmax(-1))
    y = np.concatenate(labels) if labels else np.zeros(0, dtype=int)
    p = np.concatenate(preds) if preds else np.zeros(0, dtype=int)
    return classification_scores(p, y, data.num_labels, positive), len(y)


def accuracy(pred: Predictor, data: TaskData, tokenizer: Any, batch_size: int,
             max_samples: int | None = None) -> tuple[float, int]:
    scores, n = classify(pred, data, tokenizer, batch_size, max_samples)
    return scores["accuracy"], n


def task_scores(pred: Predictor, data: TaskData, tokenizer: Any, spec: EvaluationSpec,
                max_samples: int | None = None) -> tuple[dict[str, float], int]:
    """Every metric the task offers for this model, on the eval split: the one place that
    decides what a card's scores are (evaluation and early stopping both call it)."""
    if data.instruct:  # prompt/response pairs: answers, choices, response perplexity
        return pair_scores(getattr(pred, "model", None), pred.logits, data, tokenizer, spec,
                           max_samples)
    if data.causal_lm:
        ppl, n = perplexity(pred, data, tokenizer, spec.batch_size, max_samples)
        return {"perplexity": round(ppl, 4)}, n
    return classify(pred, data, tokenizer, spec.batch_size, max_samples,
                    positive_class(spec, data))


def metric_name(spec: EvaluationSpec, data: TaskData) -> str:
    return spec.metric or default_metric("causal-lm" if data.causal_lm else "", data.instruct)


def perplexity(pred: Predictor, data: TaskData, tokenizer: Any, batch_size: int,
               max_samples: int | None = None) -> tuple[float, int]:
    """exp(mean next-token NLL) over the eval blocks; (perplexity, tokens scored)."""
    enc = encode(data.eval, tokenizer, data.spec.max_length)
    if max_samples:
        enc = enc.select(range(min(max_samples, len(enc))))
    return block_perplexity(pred.logits, enc, tokenizer, batch_size)


def evaluate(ref: ModelRef, data: TaskData, spec: EvaluationSpec, *,
             trust_remote_code: bool = False, draft_for: ModelRef | None = None) -> Metrics:
    """Score and time one model. Causal LMs also get compress.lm_eval's card scores (probe,
    decode speed; drafting for `draft_for`, the reference, when both are PyTorch models)."""
    threads = spec.latency.threads or default_threads()
    seq_len = spec.latency.sequence_length or data.spec.max_length
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        tokenizer = load_tokenizer(ref.path, trust_remote_code=trust_remote_code)
        pred = predictor(ref, data.num_labels, threads, trust_remote_code=trust_remote_code)
        scores, n = task_scores(pred, data, tokenizer, spec, spec.max_samples)
        texts = list(data.eval["text"][: max(spec.latency.batch_size, 1)])
        lat = []
        for bs, length, label in timing_plan(tokenizer, data, spec):
            check_interrupt()
            batch = fixed_batch(tokenizer, texts, bs, length)
            samples = time_calls(lambda b=batch, p=pred: p.logits(b), warmup=spec.latency.warmup,
                                 runs=spec.latency.runs)
            lat.append(latency_stats(samples, runtime=pred.runtime, batch_size=bs,
                                     sequence_length=length, length=label, threads=threads,
                                     warmup=spec.latency.warmup))
        params, device = pred.parameters, pred.device
        per_token = onnx_macs_per_token(pred.path) if isinstance(
            pred, (OrtPredictor, OrtCausalLMPredictor)) else linear_macs_per_token(pred.model)
    lm_scores, generation = _lm_card(pred, ref, data, tokenizer, spec, draft_for,
                                     trust_remote_code) if data.causal_lm else ({}, None)
    del pred
    gc.collect()
    name = metric_name(spec, data)
    return Metrics(
        metric=name, value={**scores, **lm_scores}[name], scores={**scores, **lm_scores},
        eval_samples=n, runtime=lat[0].runtime, generation=generation,
        device=device, latency=lat,
        parameters=params, size_bytes=dir_bytes(ref.dir, WEIGHT_SUFFIXES),
        dir_bytes=dir_bytes(ref.dir), peak_rss_mb=round(mem.peak_mb, 1),
        rss_increase_mb=round(mem.peak_mb - mem.start_mb, 1),
        cuda_peak_mb=None if mem.cuda_peak_mb is None else round(mem.cuda_peak_mb, 1),
        eval_seconds=round(time.perf_counter() - t0, 2), macs=per_token * seq_len,
    )


def head_to_head(reference: ModelRef, candidate: ModelRef, data: TaskData,
                 spec: EvaluationSpec, *, names: tuple[str, str] = ("reference", "candidate"),
                 trust_remote_code: bool = False) -> HeadToHead:
    """The speed-up that goes on the card and the min_speedup gate: both models loaded side by
    side and timed in turns (reference, candidate, candidate, reference, ...) at batch 1 and the
    fixed length (causal LMs: decode ms per token, one generate call a round), so a busy moment
    slows both. Two evaluations minutes apart measured 24x for a 3x MAC cut on a loaded machine;
    this does not."""
    threads = spec.latency.threads or default_threads()
    seq_len = spec.latency.sequence_length or data.spec.max_length
    tok = load_tokenizer(candidate.path, trust_remote_code=trust_remote_code)
    preds = [predictor(r, data.num_labels, threads, trust_remote_code=trust_remote_code)
             for r in (reference, candidate)]
    runtime = preds[1].runtime
    if preds[0].runtime != runtime:
        raise ValueError(f"head to head needs one runtime, got {preds[0].runtime} and {runtime}")
    rounds = spec.latency.head_to_head_rounds
    extra: dict[str, Any] = {}
    if data.causal_lm and spec.decode is not None:
        # what an LM user waits for: ms per generated token, each round one generate call of
        # each model (the prompt is the card's decode prompt)
        from compress.decode import decode_speed

        d = spec.decode
        onnx = runtime == "onnxruntime"

        def per_token(p: Predictor) -> float:
            r = decode_speed(p.model, tok, prompt_tokens=d.prompt_tokens,
                             new_tokens=d.new_tokens, runs=1, warmup=0,
                             torch_threads=1 if onnx else None)
            return 1000 / max(r["decode_tokens_per_s"], 1e-9)

        for p in preds:
            per_token(p)  # warm-up
        ms = in_turns({"a": lambda: per_token(preds[0]), "b": lambda: per_token(preds[1])},
                      rounds)
        seq_len = d.prompt_tokens
        extra = {"measure": "decode", "new_tokens": d.new_tokens}
    else:
        batch = fixed_batch(tok, list(data.eval["text"][:1]), 1, seq_len)
        ms = interleaved({"a": lambda: preds[0].logits(batch),
                          "b": lambda: preds[1].logits(batch)},
                         rounds=rounds, runs=max(3, spec.latency.runs // 3),
                         warmup=spec.latency.warmup)
    ratios = [round(x / max(y, 1e-9), 4) for x, y in zip(ms["a"], ms["b"], strict=True)]
    preds.clear()
    gc.collect()
    return HeadToHead(reference=names[0], candidate=names[1], runtime=runtime,
                      batch_size=1, sequence_length=seq_len, rounds=rounds,
                      reference_ms=[round(x, 4) for x in ms["a"]],
                      candidate_ms=[round(x, 4) for x in ms["b"]], ratios=ratios,
                      speedup=round(float(np.median(ratios)), 3), low=min(ratios),
                      high=max(ratios), noisy=spread(ratios) > NOISY, **extra)


def _lm_card(pred: Predictor, ref: ModelRef, data: TaskData, tokenizer: Any,
             spec: EvaluationSpec, draft_for: ModelRef | None, trust_remote_code: bool
             ) -> tuple[dict[str, float], dict[str, Any]]:
    """compress.lm_eval.card_scores for this predictor, after the memory and latency
    measurements (the draft target loaded here must not count as this model's memory)."""
    target = None
    if draft_for is not None and spec.decode is not None and spec.decode.draft and \
            ref.format == "hf" and draft_for.format == "hf":
        target = pred.model if draft_for.hash == ref.hash else load_model(
            draft_for.path, "causal-lm", trust_remote_code=trust_remote_code)
        if not placed_as_loaded(target):  # draft and target must share a device
            target = target.to(device_of(pred.model))
    return card_scores(pred.model, pred.logits, ref.format == "onnx", data, tokenizer, spec,
                       draft_target=target)
