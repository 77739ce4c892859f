"""prune: structured pruning that reloads with plain `from_pretrained` (no custom code).

Families (one `Layout` each says where the parts live and which config keys size them):
BERT family (bert, roberta, xlm-roberta, camembert, electra), DistilBERT, and Llama-family
decoders (llama, mistral, qwen2).

- Layers: dropped by index (`drop_layers`) and/or by importance (`depth`): each layer is scored by
  how much it changes its input on calibration data (angular distance, or ShortGPT's block
  influence) and the least useful go. The layer count in the config shrinks; decoders renumber
  each attention's `layer_idx` (the KV cache is indexed by it) and slice `layer_types`.
- Attention heads, encoders: scored per head, removed with the model's own `prune_heads`, which
  records them in `config.pruned_heads`; `from_pretrained` re-applies that, the only way these
  configs can describe fewer heads of the same size (checked for DistilBERT on transformers 4.57).
- Attention heads, decoders: whole key/value groups go, each with all its query heads, so the
  query-per-kv ratio (`num_key_value_groups`) is unchanged; q/k/v/o (and biases) are sliced and
  `num_attention_heads`, `num_key_value_heads` and `head_dim` are written to the config (head_dim
  explicitly: otherwise a reload would derive hidden_size // heads, a different size).
- FFN channels: torch-pruning's dependency graph finds everything coupled to each channel
  (BERT: over the whole model, as before; DistilBERT and decoders: over each layer's FFN module
  alone, which is fast and safe, whereas a graph over a whole GQA decoder has hung). Every layer
  keeps the same count, rounded to a multiple of `round_to`, so `intermediate_size` describes it.

Global (non-uniform, per-layer) sizes are refused by design and have no recipe field: these
configs hold one head count and one FFN width for all layers, so only uniform pruning is what
`from_pretrained` rebuilds without custom modelling code.

The saved model is reloaded and compared with the in-memory one (a decoder must also generate the
same tokens) before the stage succeeds. MACs for one sequence of `max_length` tokens go on the card.
"""

from __future__ import annotations

import math
from operator import attrgetter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.artifact import ModelRef
from compress.errors import StageError
from compress.models import count_parameters, load_model, load_tokenizer, save_hf
from compress.recipe import PruneConfig
from compress.stages import StageContext

BERT_FAMILY = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
DECODERS = ("llama", "mistral", "qwen2")
SUPPORTED = (*BERT_FAMILY, "distilbert", *DECODERS)


class Layout:
    """Where the parts live in one architecture family (dotted paths from the base model and
    from each layer), and the config keys that size them."""

    decoder = False
    layers_key = "num_hidden_layers"
    heads_key = "num_attention_heads"
    ffn_key = "intermediate_size"
    layers_path = ""
    attention_paths: tuple[str, str, str, str] = ("", "", "", "")  # q, k, v, output
    up_path = ""  # the linear whose output channels are the FFN width
    down_path = ""  # the linear whose input is the activated FFN channels
    block_path: str | None = None  # the whole FFN, taking hidden states (None: graph the model)

    def __init__(self, model: Any) -> None:
        self.model = model

    @property
    def layers(self) -> nn.ModuleList:
        return attrgetter(self.layers_path)(self.model.base_model)

    def _replace_layers(self, layers: list[nn.Module]) -> None:
        parent, _, name = self.layers_path.rpartition(".")
        owner = attrgetter(parent)(self.model.base_model) if parent else self.model.base_model
        setattr(owner, name, nn.ModuleList(layers))

    def keep_layers(self, keep: list[int]) -> None:
        """Keep only the layers at these (current) indices and make the config say so."""
        self._replace_layers([self.layers[i] for i in keep])
        setattr(self.model.config, self.layers_key, len(keep))

    def attention(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        q, k, v, o = (attrgetter(p)(layer) for p in self.attention_paths)
        return q, k, v, o

    def ffn_up(self, layer: nn.Module) -> nn.Linear:
        return attrgetter(self.up_path)(layer)

    def ffn_down(self, layer: nn.Module) -> nn.Linear:
        return attrgetter(self.down_path)(layer)

    def ffn_block(self, layer: nn.Module) -> nn.Module | None:
        return attrgetter(self.block_path)(layer) if self.block_path else None

    def shape(self) -> dict[str, Any]:
        c = self.model.config
        return {"layers": getattr(c, self.layers_key), "heads_per_layer": self.heads_per_layer(),
                "ffn": getattr(c, self.ffn_key), "parameters": count_parameters(self.model)}

    def heads_per_layer(self) -> list[int]:
        raise NotImplementedError


class EncoderLayout(Layout):
    """Encoders prune heads with `prune_heads`; `config.pruned_heads` follows dropped layers."""

    def heads_left(self, layer: nn.Module, total: int) -> list[int]:
        """Original indices of the heads still present, in their current order."""
        gone = {int(h) for h in layer.attention.pruned_heads}
        return [h for h in range(total) if h not in gone]

    def heads_per_layer(self) -> list[int]:
        total = getattr(self.model.config, self.heads_key)
        return [len(self.heads_left(layer, total)) for layer in self.layers]

    def keep_layers(self, keep: list[int]) -> None:
        super().keep_layers(keep)
        old = {int(k): v for k, v in (self.model.config.pruned_heads or {}).items()}
        self.model.config.pruned_heads = {new: old[i] for new, i in enumerate(keep) if i in old}


class BertLayout(EncoderLayout):
    layers_path = "encoder.layer"
    attention_paths = ("attention.self.query", "attention.self.key", "attention.self.value",
                       "attention.output.dense")
    up_path, down_path = "intermediate.dense", "output.dense"


class DistilBertLayout(EncoderLayout):
    layers_key = "n_layers"
    heads_key = "n_heads"
    ffn_key = "hidden_dim"
    layers_path = "transformer.layer"
    attention_paths = ("attention.q_lin", "attention.k_lin", "attention.v_lin",
                       "attention.out_lin")
    up_path, down_path, block_path = "ffn.lin1", "ffn.lin2", "ffn"

    def _replace_layers(self, layers: list[nn.Module]) -> None:
        super()._replace_layers(layers)
        self.model.base_model.transformer.n_layers = len(layers)


class DecoderLayout(Layout):
    """Llama-family decoders: GQA attention sliced by key/value group, gated MLP."""

    decoder = True
    layers_path = "layers"
    attention_paths = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                       "self_attn.o_proj")
    up_path, down_path, block_path = "mlp.up_proj", "mlp.down_proj", "mlp"

    def keep_layers(self, keep: list[int]) -> None:
        super().keep_layers(keep)
        c = self.model.config
        for new, layer in enumerate(self.layers):
            layer.self_attn.layer_idx = new  # the KV cache is indexed by it
        if getattr(c, "layer_types", None) is not None:
            c.layer_types = [c.layer_types[i] for i in keep]
            if hasattr(self.model.base_model, "has_sliding_layers"):
                self.model.base_model.has_sliding_layers = "sliding_attention" in c.layer_types

    @property
    def head_dim(self) -> int:
        c = self.model.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def heads_per_layer(self) -> list[int]:
        return [self.attention(layer)[0].out_features // self.head_dim for layer in self.layers]

    def shape(self) -> dict[str, Any]:
        d = self.head_dim
        return {**super().shape(), "head_dim": d,
                "kv_heads_per_layer": [self.attention(layer)[1].out_features // d
                                       for layer in self.layers]}


def layout_for(model: Any) -> Layout:
    """The family's layout, or a clear refusal naming what is supported."""
    mt = getattr(model.config, "model_type", "?")
    if mt in BERT_FAMILY:
        return BertLayout(model)
    if mt == "distilbert":
        return DistilBertLayout(model)
    if mt in DECODERS:
        return DecoderLayout(model)
    raise StageError(f"prune: architecture {mt!r} is not supported "
                     f"(supported: {', '.join(SUPPORTED)})")


# --- calibration -------------------------------------------------------------------------------

def _forward_inputs(batch: dict[str, Any], lay: Layout) -> dict[str, Any]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if lay.decoder:
        inputs["use_cache"] = False
    return inputs


def _token_mask(batch: dict[str, Any]) -> torch.Tensor:
    ids = batch["input_ids"]
    return batch.get("attention_mask", torch.ones_like(ids)).float()


def _calibrate(model: Any, batches: list[dict[str, Any]]) -> None:
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

def _drop_layers(lay: Layout, drop: list[int]) -> None:
    n = len(lay.layers)
    if drop[-1] >= n:
        raise StageError(f"prune.drop_layers: layer {drop[-1]} does not exist "
                         f"(the model has {n} layers, 0-{n - 1})")
    if len(drop) >= n:
        raise StageError(f"prune.drop_layers: cannot drop all {n} layers")
    lay.keep_layers([i for i in range(n) if i not in drop])


def _drop_by_importance(lay: Layout, cfg: PruneConfig, batches: list[dict[str, Any]],
                        original: list[int]) -> tuple[dict[str, float], list[int]]:
    """Drop the `depth` layers that change their input least; returns scores and the dropped
    layers, both by original index."""
    n = len(lay.layers)
    if cfg.depth >= n:
        left = " left after drop_layers" if cfg.drop_layers else ""
        raise StageError(f"prune.depth: cannot drop {cfg.depth} of the {n} layers{left}; "
                         "at least one must stay")
    scores = _layer_scores(lay.model, lay, batches, cfg.layer_importance)
    worst = sorted(torch.argsort(torch.tensor(scores), stable=True)[: cfg.depth].tolist())
    lay.keep_layers([i for i in range(n) if i not in worst])
    return ({str(original[i]): round(s, 6) for i, s in enumerate(scores)},
            [original[i] for i in worst])


# --- heads -------------------------------------------------------------------------------------

def _prune_encoder_heads(lay: EncoderLayout, cfg: PruneConfig, gen: torch.Generator,
                         batches: Any) -> dict[int, list[int]]:
    model = lay.model
    total = getattr(model.config, lay.heads_key)
    counts = [len(lay.heads_left(layer, total)) for layer in lay.layers]
    acts = (_mean_abs_inputs(model, lay, batches(), [lay.attention(x)[3] for x in lay.layers],
                             counts) if cfg.importance == "activation" else None)
    plan: dict[int, list[int]] = {}
    for li, layer in enumerate(lay.layers):
        present = lay.heads_left(layer, total)
        n = len(present)
        k = round(cfg.heads * n)
        if k == 0:
            raise StageError(f"prune.heads: {cfg.heads} of {n} heads rounds to none; "
                             f"the smallest useful ratio is {1 / n:.3f}")
        if k >= n:
            raise StageError(f"prune.heads: {cfg.heads} would remove all {n} heads of layer {li}")
        if acts is not None:
            scores = acts[li]
        else:
            q, k_, v, o = lay.attention(layer)
            scores = _score([(q.weight, 0), (k_.weight, 0), (v.weight, 0), (o.weight, 1)],
                            cfg.importance, n, gen)
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


def _prune_decoder_heads(lay: DecoderLayout, cfg: PruneConfig, gen: torch.Generator,
                         batches: Any) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """Remove the same number of key/value groups (each with its query heads) in every layer;
    returns (query heads removed, kv groups removed) per layer."""
    model, c = lay.model, lay.model.config
    d = lay.head_dim
    nh, nkv = c.num_attention_heads, c.num_key_value_heads
    r = nh // nkv  # query heads per group: q head j reads kv head j // r (repeat_kv)
    k = _kv_groups_to_remove(cfg.heads, nkv)
    acts = (_mean_abs_inputs(model, lay, batches(), [lay.attention(x)[3] for x in lay.layers],
                             nkv) if cfg.importance == "activation" else None)
    heads_removed: dict[int, list[int]] = {}
    groups_removed: dict[int, list[int]] = {}
    for li, layer in enumerate(lay.layers):
        q, k_, v, o = lay.attention(layer)
        if acts is not None:
            scores = acts[li]
        else:
            scores = _score([(q.weight, 0), (k_.weight, 0), (v.weight, 0), (o.weight, 1)],
                            cfg.importance, nkv, gen)
        worst = sorted(torch.argsort(scores)[:k].tolist())
        keep = [g for g in range(nkv) if g not in worst]
        q_idx = torch.tensor([i for g in keep for i in range(g * r * d, (g + 1) * r * d)])
        kv_idx = torch.tensor([i for g in keep for i in range(g * d, (g + 1) * d)])
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

def _ffn_keep(width: int, cfg: PruneConfig) -> int:
    keep = max(cfg.round_to, round(width * (1 - cfg.ffn) / cfg.round_to) * cfg.round_to)
    if keep >= width:
        raise StageError(f"prune.ffn: {cfg.ffn} of {width} channels, rounded to a multiple of "
                         f"{cfg.round_to}, removes nothing; raise ffn or lower round_to")
    return keep


def _group_importance(importance: str) -> Any:
    import torch_pruning as tp

    return {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "taylor": tp.importance.GroupTaylorImportance,
    }.get(importance, lambda: None)()


def _prune_ffn(lay: Layout, cfg: PruneConfig, example: dict[str, torch.Tensor],
               gen: torch.Generator, batches: Any) -> int:
    """FFN channels, the same count kept in every layer; the dependency graph slices every
    tensor coupled to a channel."""
    import torch_pruning as tp

    model = lay.model
    width = getattr(model.config, lay.ffn_key)
    keep = _ffn_keep(width, cfg)
    imp = _group_importance(cfg.importance)
    per_layer = lay.ffn_block(lay.layers[0]) is not None
    if per_layer:  # one small graph per FFN module (a whole-decoder graph can hang)
        graphs = [tp.DependencyGraph().build_dependency(
            lay.ffn_block(layer), example_inputs=torch.randn(1, 4, lay.ffn_up(layer).in_features),
            verbose=False) for layer in lay.layers]
    else:
        whole = tp.DependencyGraph().build_dependency(model, example_inputs=example,
                                                      verbose=False)
        graphs = [whole] * len(lay.layers)
    if cfg.importance == "taylor":
        _calibrate(model, batches())
    acts = (_mean_abs_inputs(model, lay, batches(), [lay.ffn_down(x) for x in lay.layers], width)
            if cfg.importance == "activation" else None)
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


# --- MACs --------------------------------------------------------------------------------------

def _macs(model: Any, length: int) -> tuple[int, str]:
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
    from compress.evaluate import linear_macs_per_token  # the card's own count

    return linear_macs_per_token(model) * length, "linear layers"


# --- checks ------------------------------------------------------------------------------------

def _check_batch(ctx: StageContext, tok: Any, lay: Layout) -> dict[str, torch.Tensor]:
    if not lay.decoder:
        return dict(tok(list(ctx.data.eval["text"][:4]), return_tensors="pt", padding=True,
                        truncation=True, max_length=ctx.data.spec.max_length))
    from compress.data import encode_lm

    ev = ctx.data.eval
    enc = encode_lm(ev.select(range(min(len(ev), 32))), tok, ctx.data.spec.max_length)
    first = enc[0]
    return {"input_ids": torch.tensor([first["input_ids"]]),
            "attention_mask": torch.tensor([first["attention_mask"]])}


def _reload_check(model: Any, lay: Layout, tok: Any, ctx: StageContext, ref: ModelRef,
                  out: Path, trc: bool) -> tuple[float, dict[str, Any]]:
    """Reload the saved model; its outputs (and, for a decoder, its greedy generation) must
    match the in-memory pruned model's."""
    check = _check_batch(ctx, tok, lay)
    fwd = {**check, "use_cache": False} if lay.decoder else check
    with torch.inference_mode():
        expect = model(**fwd).logits
        reloaded = load_model(str(out), ref.task, ctx.data.num_labels, trust_remote_code=trc)
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
                             f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
                             ) from None
        if not torch.equal(a, b):
            raise StageError("prune: the reloaded model generates different tokens from the "
                             "pruned one")
        extra["generate_check_tokens"] = int(b.shape[1] - prompt.shape[1])
    return diff, extra


# --- the stage ---------------------------------------------------------------------------------

def apply(ref: ModelRef, cfg: PruneConfig, ctx: StageContext, out: Path) -> dict[str, Any]:
    """Layers (by index, then by importance), then heads, then FFN channels: depth is scored on
    the full-width model, and width scores see the layers that remain."""
    trc = ctx.recipe.model.trust_remote_code
    model = load_model(ref.path, ref.task, ctx.data.num_labels, trust_remote_code=trc)
    tok = load_tokenizer(ref.path, trust_remote_code=trc)
    lay = layout_for(model)
    before = lay.shape()
    gen = torch.Generator().manual_seed(cfg.seed)
    length = min(ctx.data.spec.max_length,
                 getattr(model.config, "max_position_embeddings", None) or 10**9)
    macs_before, counted_by = _macs(model, length)

    cache: list[list[dict[str, Any]]] = []

    def batches() -> list[dict[str, Any]]:
        """Calibration batches, made once and only if some importance needs data."""
        if not cache:
            from compress.data import calibration_batches

            cache.append(calibration_batches(ctx.data, tok, cfg.calibration_samples,
                                             8 if lay.decoder else 16))
        return cache[0]

    original = list(range(len(lay.layers)))
    dropped: list[int] = []
    if cfg.drop_layers:
        _drop_layers(lay, cfg.drop_layers)
        dropped = list(cfg.drop_layers)
        original = [i for i in original if i not in cfg.drop_layers]
    layer_scores: dict[str, float] = {}
    if cfg.depth:
        layer_scores, by_score = _drop_by_importance(lay, cfg, batches(), original)
        dropped = sorted(dropped + by_score)
        original = [i for i in original if i not in by_score]

    heads_removed: dict[int, list[int]] = {}
    groups_removed: dict[int, list[int]] = {}
    if cfg.heads:
        if cfg.importance == "taylor":
            _calibrate(model, batches())
        if isinstance(lay, DecoderLayout):
            heads_removed, groups_removed = _prune_decoder_heads(lay, cfg, gen, batches)
        else:
            assert isinstance(lay, EncoderLayout)
            heads_removed = _prune_encoder_heads(lay, cfg, gen, batches)
    if cfg.ffn:
        example = {} if lay.ffn_block(lay.layers[0]) is not None else dict(
            tok(["a short example", "another one"], return_tensors="pt", padding=True))
        _prune_ffn(lay, cfg, example, gen, batches)
    model.zero_grad(set_to_none=True)
    model.eval()
    after = lay.shape()
    macs_after, _ = _macs(model, length)

    save_hf(model, tok, out)
    diff, checks = _reload_check(model, lay, tok, ctx, ref, out, trc)
    removed = 1 - after["parameters"] / before["parameters"]
    warnings = []
    if removed > 1 / 3:
        warnings.append(f"one prune step removed {removed:.0%} of the parameters; Minitron's "
                        "guidance is at most about a third per step, with distillation between")
    info: dict[str, Any] = {
        "before": before, "after": after, "parameters_removed": round(removed, 4),
        "heads_removed": {str(k): v for k, v in heads_removed.items()},
        "importance": cfg.importance, "reload_max_diff": diff,
        "macs": {"before": macs_before, "after": macs_after, "sequence_length": length,
                 "counted_by": counted_by},
        "warnings": warnings, **checks}
    if groups_removed:
        info["kv_groups_removed"] = {str(k): v for k, v in groups_removed.items()}
    if dropped:
        info["layers_dropped"] = dropped
    if layer_scores:
        info["layer_scores"] = layer_scores
        info["layer_importance"] = cfg.layer_importance
    return info
