"""Structured pruning, the engine: layer, head and FFN-channel removal that keeps a model
loadable with plain `from_pretrained` (no custom code). The `prune` stage drives it.

- Layers: dropped by index, and/or by importance: each layer is scored by how much it changes
  its input on calibration data (angular distance, or ShortGPT's block influence) and the least
  useful go. The layer count in the config shrinks; decoders renumber each attention's
  `layer_idx` (the KV cache is indexed by it) and slice `layer_types` (compress.arch).
- Attention heads, encoders: scored per head, removed with the model's own `prune_heads`, which
  records them in `config.pruned_heads`; `from_pretrained` re-applies that, the only way these
  configs can describe fewer heads of the same size (checked for DistilBERT on transformers 4.57).
- Attention heads, decoders: whole key/value groups go, each with all its query heads, so the
  query-per-kv ratio (`num_key_value_groups`) is unchanged; q/k/v/o (and biases) are sliced and
  `num_attention_heads`, `num_key_value_heads` and `head_dim` are written to the config (head_dim
  explicitly: otherwise a reload would derive hidden_size // heads, a different size).
- FFN channels: torch-pruning's dependency graph finds everything coupled to each channel
  (BERT: over the whole model; DistilBERT and decoders: over each layer's FFN module alone,
  which is fast and safe, whereas a graph over a whole GQA decoder has hung). Every layer keeps
  the same count, rounded to a multiple of `round_to`, so `intermediate_size` describes it.

Importance scores: l1/l2 magnitude, taylor (|w x grad| on calibration data), activation (mean
|input| on calibration data), random: callables of (weights, units), as torch-pruning separates
importance from the pruner.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.arch import DecoderLayout, EncoderLayout, Layout
from compress.data import TaskData, encode
from compress.errors import StageError, first_line
from compress.evaluate import linear_macs_per_token
from compress.models import load_model

# --- calibration -------------------------------------------------------------------------------

def _forward_inputs(batch: dict[str, Any], lay: Layout) -> dict[str, Any]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if lay.decoder:
        inputs["use_cache"] = False
    return inputs


def _token_mask(batch: dict[str, Any]) -> torch.Tensor:
    ids = batch["input_ids"]
    return batch.get("attention_mask", torch.ones_like(ids)).float()


def calibrate_gradients(model: Any, batches: list[dict[str, Any]]) -> None:
    """Populate .grad with the task loss on the calibration batches (for taylor scores)."""
    model.zero_grad(set_to_none=True)
    for batch in batches:
        model(**batch).loss.backward()


def _mean_abs_inputs(model: Any, lay: Layout, batches: list[dict[str, Any]],
                     modules: list[nn.Module], units: int | list[int]) -> list[torch.Tensor]:
    """Mean |input| per token of each module, summed within `units` equal slices of its features
    (one slice per head, group or channel): the `activation` importance."""
    counts = [units] * len(modules) if isinstance(units, int) else units
    sums = [torch.zeros(n, dtype=torch.float64) for n in counts]
    state: dict[str, torch.Tensor] = {}

    def hook(i: int) -> Any:
        def pre(_mod: nn.Module, args: tuple) -> None:
            x = args[0].detach().float().abs()
            x = x.reshape(*x.shape[:-1], counts[i], -1).sum(-1)  # [batch, tokens, units]
            sums[i] += (x * state["mask"][..., None]).sum((0, 1)).double()
        return pre

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(modules)]
    tokens = _hooked_pass(model, lay, batches, handles, state)
    return [(s / max(tokens, 1.0)).float() for s in sums]


def _hooked_pass(model: Any, lay: Layout, batches: list[dict[str, Any]], handles: list,
                 state: dict) -> float:
    """Run the calibration batches through hooks (removed afterwards), keeping each batch's
    token mask in state["mask"] for them; returns the number of real tokens seen."""
    tokens = 0.0
    try:
        with torch.inference_mode():
            for batch in batches:
                state["mask"] = _token_mask(batch)
                tokens += float(state["mask"].sum())
                model(**_forward_inputs(batch, lay))
    finally:
        for h in handles:
            h.remove()
    return tokens


def _layer_scores(model: Any, lay: Layout, batches: list[dict[str, Any]], kind: str
                  ) -> list[float]:
    """How much each layer changes its hidden states, averaged over non-padding tokens: angular
    distance arccos(cos)/pi (Gromov et al.) or block influence 1 - cos (ShortGPT). Hooks read
    each layer's own input and output, so a final norm never muddles the last layer's score."""
    n = len(lay.layers)
    sums = torch.zeros(n, dtype=torch.float64)
    state: dict[Any, torch.Tensor] = {}

    def pre(i: int) -> Any:
        def f(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(kwargs[k] for k in ("hidden_states", "x",
                                                              "hidden_state") if k in kwargs)
            state[i] = x.detach()
        return f

    def post(i: int) -> Any:
        def f(_mod: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> None:
            y = out[0] if isinstance(out, (tuple, list)) else out
            cos = torch.nn.functional.cosine_similarity(state.pop(i).float(), y.float(), dim=-1)
            cos = cos.clamp(-1.0, 1.0)
            s = torch.arccos(cos) / math.pi if kind == "angular" else 1 - cos
            sums[i] += float((s * state["mask"]).sum())
        return f

    handles = []
    for i, layer in enumerate(lay.layers):
        handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post(i), with_kwargs=True))
    tokens = _hooked_pass(model, lay, batches, handles, state)
    return [float(s) / max(tokens, 1.0) for s in sums]


def _rows(w: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop of a fused weight as a tensor of its own, its gradient's rows attached
    (so `_score`'s taylor importance reads them as it reads a whole weight's)."""
    part = w.detach()[start:stop].clone()
    if w.grad is not None:
        part.grad = w.grad[start:stop].clone()
    return part


def _score(weights: list[tuple[torch.Tensor, int]], importance: str, n: int,
           gen: torch.Generator) -> torch.Tensor:
    """Per-unit scores from (weight, dim) pairs whose `dim` has n equal slices, one per unit."""
    if importance == "random":
        return torch.rand(n, generator=gen)
    score = torch.zeros(n)
    for w, dim in weights:
        if importance == "taylor":
            if w.grad is None:
                raise StageError("prune: taylor importance found no gradients")
            t = (w.detach() * w.grad).abs()
        else:
            t = w.detach().abs() if importance == "l1" else w.detach() ** 2
        score += t.movedim(dim, 0).reshape(n, -1).sum(1)
    return score.sqrt() if importance == "l2" else score


# --- layers ------------------------------------------------------------------------------------

def drop_layers(lay: Layout, drop: list[int]) -> None:
    n = len(lay.layers)
    if drop[-1] >= n:
        raise StageError(f"prune.drop_layers: layer {drop[-1]} does not exist "
                         f"(the model has {n} layers, 0-{n - 1})")
    if len(drop) >= n:
        raise StageError(f"prune.drop_layers: cannot drop all {n} layers")
    lay.keep_layers([i for i in range(n) if i not in drop])


def drop_by_importance(lay: Layout, depth: int, kind: str, batches: list[dict[str, Any]],
                       original: list[int], after_drop: bool = False
                       ) -> tuple[dict[str, float], list[int]]:
    """Drop the `depth` layers that change their input least (`kind`: angular or
    block_influence); returns scores and the dropped layers, both by original index."""
    n = len(lay.layers)
    if depth >= n:
        left = " left after drop_layers" if after_drop else ""
        raise StageError(f"prune.depth: cannot drop {depth} of the {n} layers{left}; "
                         "at least one must stay")
    scores = _layer_scores(lay.model, lay, batches, kind)
    worst = sorted(torch.argsort(torch.tensor(scores), stable=True)[: depth].tolist())
    lay.keep_layers([i for i in range(n) if i not in worst])
    return ({str(original[i]): round(s, 6) for i, s in enumerate(scores)},
            [original[i] for i in worst])


# --- heads -------------------------------------------------------------------------------------

def prune_encoder_heads(lay: EncoderLayout, ratio: float, importance: str,
                        gen: torch.Generator, batches: Any) -> dict[int, list[int]]:
    """Remove round(ratio x heads) heads in every layer with the model's own `prune_heads`."""
    model = lay.model
    total = getattr(model.config, lay.heads_key)
    counts = [len(lay.heads_left(layer, total)) for layer in lay.layers]
    acts = (_mean_abs_inputs(model, lay, batches(), [lay.attention(x)[3] for x in lay.layers],
                             counts) if importance == "activation" else None)
    plan: dict[int, list[int]] = {}
    for li, layer in enumerate(lay.layers):
        present = lay.heads_left(layer, total)
        n = len(present)
        k = round(ratio * n)
        if k == 0:
            raise StageError(f"prune.heads: {ratio} of {n} heads rounds to none; "
                             f"the smallest useful ratio is {1 / n:.3f}")
        if k >= n:
            raise StageError(f"prune.heads: {ratio} would remove all {n} heads of layer {li}")
        if acts is not None:
            scores = acts[li]
        else:
            q, k_, v, o = lay.attention(layer)
            scores = _score([(q.weight, 0), (k_.weight, 0), (v.weight, 0), (o.weight, 1)],
                            importance, n, gen)
        worst = torch.argsort(scores)[:k].tolist()
        plan[li] = sorted(present[i] for i in worst)
    model.prune_heads(plan)
    return plan


def _kv_groups_to_remove(ratio: float, groups: int) -> int:
    """Whole key/value groups `ratio` removes; a ratio printed to 3 decimals (as the error lists
    them) counts as exact."""
    k = round(ratio * groups)
    exact = abs(ratio * groups - k) <= 1e-6 or round(ratio, 3) == round(k / groups, 3)
    if not exact or not 1 <= k < groups:
        works = ", ".join(f"{j / groups:.3f}" for j in range(1, groups)) or \
            "none (one key/value group cannot be pruned)"
        raise StageError(f"prune.heads: {ratio} does not remove a whole number of the {groups} "
                         f"key/value groups; ratios that work: {works}")
    return k


def _slice_linear(lin: nn.Linear, idx: torch.Tensor, dim: int) -> None:
    """Keep rows (dim 0, with the bias) or columns (dim 1) `idx` of a linear layer in place."""
    lin.weight = nn.Parameter(lin.weight.detach().index_select(dim, idx).clone())
    if dim == 0:
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.detach()[idx].clone())
        lin.out_features = len(idx)
    else:
        lin.in_features = len(idx)


def prune_decoder_heads(lay: DecoderLayout, ratio: float, importance: str,
                        gen: torch.Generator, batches: Any
                        ) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """Remove the same number of key/value groups (each with its query heads) in every layer;
    returns (query heads removed, kv groups removed) per layer."""
    model, c = lay.model, lay.model.config
    d = lay.head_dim
    nh, nkv = c.num_attention_heads, c.num_key_value_heads
    r = nh // nkv  # query heads per group: q head j reads kv head j // r (repeat_kv)
    k = _kv_groups_to_remove(ratio, nkv)
    acts = (_mean_abs_inputs(model, lay, batches(), [lay.attention(x)[3] for x in lay.layers],
                             nkv) if importance == "activation" else None)
    heads_removed: dict[int, list[int]] = {}
    groups_removed: dict[int, list[int]] = {}
    nq = nh * d  # query rows; a fused qkv_proj (Phi-3) holds rows [q | k | v]
    for li, layer in enumerate(lay.layers):
        q, k_, v, o = lay.attention(layer)
        if lay.fused_qkv:
            qw, kw, vw = (_rows(q.weight, 0, nq), _rows(q.weight, nq, nq + nkv * d),
                          _rows(q.weight, nq + nkv * d, nq + 2 * nkv * d))
        else:
            qw, kw, vw = q.weight, k_.weight, v.weight
        if acts is not None:
            scores = acts[li]
        else:
            scores = _score([(qw, 0), (kw, 0), (vw, 0), (o.weight, 1)], importance, nkv, gen)
        worst = sorted(torch.argsort(scores)[:k].tolist())
        keep = [g for g in range(nkv) if g not in worst]
        q_idx = torch.tensor([i for g in keep for i in range(g * r * d, (g + 1) * r * d)])
        kv_idx = torch.tensor([i for g in keep for i in range(g * d, (g + 1) * d)])
        if lay.fused_qkv:
            _slice_linear(q, torch.cat([q_idx, nq + kv_idx, nq + nkv * d + kv_idx]), 0)
        else:
            _slice_linear(q, q_idx, 0)
            _slice_linear(k_, kv_idx, 0)
            _slice_linear(v, kv_idx, 0)
        _slice_linear(o, q_idx, 1)
        attn = layer.self_attn
        attn.head_dim = d  # unchanged; num_key_value_groups (= r) is unchanged too
        if hasattr(attn, "num_heads"):
            attn.num_heads = (nkv - k) * r
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = nkv - k
        groups_removed[li] = worst
        heads_removed[li] = [h for g in worst for h in range(g * r, (g + 1) * r)]
    c.num_attention_heads = (nkv - k) * r
    c.num_key_value_heads = nkv - k
    c.head_dim = d
    return heads_removed, groups_removed


# --- FFN ---------------------------------------------------------------------------------------

def ffn_keep(width: int, ratio: float, round_to: int) -> int:
    """Channels every FFN keeps: width x (1 - ratio), rounded to a multiple of round_to."""
    keep = max(round_to, round(width * (1 - ratio) / round_to) * round_to)
    if keep >= width:
        raise StageError(f"prune.ffn: {ratio} of {width} channels, rounded to a multiple of "
                         f"{round_to}, removes nothing; raise ffn or lower round_to")
    return keep


def _group_importance(importance: str) -> Any:
    import torch_pruning as tp

    return {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "taylor": tp.importance.GroupTaylorImportance,
    }.get(importance, lambda: None)()


def prune_ffn(lay: Layout, ratio: float, round_to: int, importance: str,
              example: dict[str, torch.Tensor], gen: torch.Generator, batches: Any) -> int:
    """FFN channels, the same count kept in every layer; the dependency graph slices every
    tensor coupled to a channel."""
    import torch_pruning as tp

    model = lay.model
    width = getattr(model.config, lay.ffn_key)
    keep = ffn_keep(width, ratio, round_to)
    if lay.fused_gate_up:
        return _prune_fused_ffn(lay, width, keep, importance, gen, batches)
    imp = _group_importance(importance)
    per_layer = lay.ffn_block(lay.layers[0]) is not None
    if per_layer:  # one small graph per FFN module (a whole-decoder graph can hang)
        graphs = [tp.DependencyGraph().build_dependency(
            lay.ffn_block(layer), example_inputs=torch.randn(1, 4, lay.ffn_up(layer).in_features),
            verbose=False) for layer in lay.layers]
    else:
        whole = tp.DependencyGraph().build_dependency(model, example_inputs=example,
                                                      verbose=False)
        graphs = [whole] * len(lay.layers)
    if importance == "taylor":
        calibrate_gradients(model, batches())
    acts = (_mean_abs_inputs(model, lay, batches(), [lay.ffn_down(x) for x in lay.layers], width)
            if importance == "activation" else None)
    for li, (layer, graph) in enumerate(zip(lay.layers, graphs, strict=True)):
        up = lay.ffn_up(layer)
        if acts is not None:
            scores = acts[li]
        elif imp is None:
            scores = torch.rand(width, generator=gen)
        else:
            group = graph.get_pruning_group(up, tp.prune_linear_out_channels,
                                            idxs=list(range(width)))
            scores = imp(group)
        drop = torch.argsort(scores.float().cpu())[: width - keep].tolist()
        graph.get_pruning_group(up, tp.prune_linear_out_channels, idxs=drop).prune()
    widths = {lay.ffn_up(x).out_features for x in lay.layers} | \
        {lay.ffn_down(x).in_features for x in lay.layers}
    if widths != {keep}:
        raise StageError(f"prune.ffn: the dependency graph left FFN widths {sorted(widths)}, "
                         f"not {keep}; this architecture's FFN cannot be pruned this way")
    setattr(model.config, lay.ffn_key, keep)
    return keep


def _prune_fused_ffn(lay: Layout, width: int, keep: int, importance: str,
                     gen: torch.Generator, batches: Any) -> int:
    """A fused gate_up_proj (rows [gate | up]): channel i is gate row i, up row width + i and
    down column i; sliced by hand (the dependency graph cannot see through the chunk)."""
    model = lay.model
    if importance == "taylor":
        calibrate_gradients(model, batches())
    acts = (_mean_abs_inputs(model, lay, batches(), [lay.ffn_down(x) for x in lay.layers], width)
            if importance == "activation" else None)
    for li, layer in enumerate(lay.layers):
        gu, down = lay.ffn_up(layer), lay.ffn_down(layer)
        scores = acts[li] if acts is not None else _score(
            [(_rows(gu.weight, 0, width), 0), (_rows(gu.weight, width, 2 * width), 0),
             (down.weight, 1)], importance, width, gen)
        kept = torch.sort(torch.argsort(scores.float(), descending=True)[:keep]).values
        _slice_linear(gu, torch.cat([kept, width + kept]), 0)
        _slice_linear(down, kept, 1)
    setattr(model.config, lay.ffn_key, keep)
    return keep


# --- MACs --------------------------------------------------------------------------------------

def count_macs(model: Any, length: int) -> tuple[int, str]:
    """MACs for one sequence of `length` tokens: torch-pruning's counter, or (if it fails for an
    architecture) the linear layers' MACs, which dominate a transformer's."""
    ids = torch.ones(1, length, dtype=torch.long)
    try:
        import torch_pruning as tp

        with torch.no_grad():
            macs, _ = tp.utils.count_ops_and_params(model, example_inputs=(ids,))
        if macs > 0:
            return int(macs), "torch-pruning"
    except Exception:  # any architecture the counter cannot trace: fall back
        pass
    return linear_macs_per_token(model) * length, "linear layers"


# --- checks ------------------------------------------------------------------------------------

def _check_batch(data: TaskData, tok: Any, lay: Layout) -> dict[str, torch.Tensor]:
    if not lay.decoder:
        return dict(tok(list(data.eval["text"][:4]), return_tensors="pt", padding=True,
                        truncation=True, max_length=data.spec.max_length))
    ev = data.eval
    enc = encode(ev.select(range(min(len(ev), 32))), tok, data.spec.max_length)
    first = enc[0]
    return {"input_ids": torch.tensor([first["input_ids"]]),
            "attention_mask": torch.tensor([first["attention_mask"]])}


def reload_check(model: Any, lay: Layout, tok: Any, data: TaskData, task: str, out: Path,
                 trc: bool) -> tuple[float, dict[str, Any]]:
    """Reload the saved model; its outputs (and, for a decoder, its greedy generation) must
    match the in-memory pruned model's."""
    check = _check_batch(data, tok, lay)
    fwd = {**check, "use_cache": False} if lay.decoder else check
    with torch.inference_mode():
        expect = model(**fwd).logits
        reloaded = load_model(str(out), task, data.num_labels, trust_remote_code=trc)
        got = reloaded(**fwd).logits
    tol = 1e-4 * max(1.0, float(expect.abs().max()))
    if got.shape != expect.shape or (diff := float((got - expect).abs().max())) > tol:
        raise StageError("prune: the saved model does not reload to the pruned one "
                         "(from_pretrained gives different outputs)")
    extra: dict[str, Any] = {}
    if lay.decoder:
        prompt = check["input_ids"][:, : min(8, check["input_ids"].shape[1])]
        kw = {"attention_mask": torch.ones_like(prompt), "max_new_tokens": 4, "min_new_tokens": 4,
              "do_sample": False, "pad_token_id": tok.pad_token_id}
        try:
            with torch.inference_mode():
                a = model.generate(prompt, **kw)
                b = reloaded.generate(prompt, **kw)
        except Exception as e:  # the cache or masks disagree with the new shapes
            raise StageError(f"prune: the pruned model cannot generate after reload: "
                             f"{first_line(e, 200)}") from None
        if not torch.equal(a, b):
            raise StageError("prune: the reloaded model generates different tokens from the "
                             "pruned one")
        extra["generate_check_tokens"] = int(b.shape[1] - prompt.shape[1])
    return diff, extra
