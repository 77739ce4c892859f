"""Architecture knowledge, in one place: where the parts of each model family live.

Pruning slices attention and FFN weights by these paths; distillation counts heads per layer;
bitsandbytes keeps the heads in float; quantization keeps an LM's head and embeddings in float;
the diagnosis groups ONNX nodes by layer. Each used to carry its own copy of some of this.

Families (one `Layout` each says where the parts live and which config keys size them):
BERT family (bert, roberta, xlm-roberta, camembert, electra), DistilBERT, Llama-family
decoders (llama, mistral, qwen2, qwen3, gemma3_text: separate q/k/v and gate/up projections;
Qwen3's and Gemma 3's per-head q/k norms span head_dim, which pruning never changes) and Phi-3
(one fused qkv_proj, rows [q | k | v], and one fused gate_up_proj, rows [gate | up]).
"""

from __future__ import annotations

import re
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from compress.errors import StageError
from compress.models import count_parameters

if TYPE_CHECKING:  # torch is imported by whoever hands us a model; this module stays light
    from torch import nn

BERT_FAMILY = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")
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
    fused_qkv = False  # q, k and v are rows [q | k | v] of one linear (attention_paths[0])
    fused_gate_up = False  # the up linear's rows are [gate | up], each FFN-width wide

    def __init__(self, model: Any) -> None:
        self.model = model

    @property
    def base(self) -> nn.Module:
        """The base model under the task head. Gemma 3's causal LM declares no prefix, so its
        `base_model` is the head model itself; the decoder is then at `.model`."""
        base = self.model.base_model
        return base.model if base is self.model and hasattr(base, "model") else base

    @property
    def layers(self) -> nn.ModuleList:
        return attrgetter(self.layers_path)(self.base)

    def _replace_layers(self, layers: list[nn.Module]) -> None:
        parent, _, name = self.layers_path.rpartition(".")
        owner = attrgetter(parent)(self.base) if parent else self.base
        from torch import nn

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
        self.base.transformer.n_layers = len(layers)


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
            if hasattr(self.base, "has_sliding_layers"):
                self.base.has_sliding_layers = "sliding_attention" in c.layer_types

    @property
    def head_dim(self) -> int:
        c = self.model.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def heads_per_layer(self) -> list[int]:
        # o_proj reads every query head's output, fused or not
        return [self.attention(layer)[3].in_features // self.head_dim for layer in self.layers]

    def kv_heads(self, layer: nn.Module) -> int:
        q, k, _, o = self.attention(layer)
        if self.fused_qkv:
            return (q.out_features - o.in_features) // (2 * self.head_dim)
        return k.out_features // self.head_dim

    def shape(self) -> dict[str, Any]:
        return {**super().shape(), "head_dim": self.head_dim,
                "kv_heads_per_layer": [self.kv_heads(layer) for layer in self.layers]}


class Phi3Layout(DecoderLayout):
    attention_paths = ("self_attn.qkv_proj", "self_attn.qkv_proj", "self_attn.qkv_proj",
                       "self_attn.o_proj")
    up_path, down_path, block_path = "mlp.gate_up_proj", "mlp.down_proj", "mlp"
    fused_qkv = fused_gate_up = True


def layout_for(model: Any) -> Layout:
    """The family's layout, or a clear refusal naming what is supported."""
    mt = getattr(model.config, "model_type", "?")
    if mt in BERT_FAMILY:
        return BertLayout(model)
    if mt == "distilbert":
        return DistilBertLayout(model)
    if mt == "phi3":
        return Phi3Layout(model)
    if mt in DECODERS:
        return DecoderLayout(model)
    raise StageError(f"prune: architecture {mt!r} is not supported "
                     f"(supported: {', '.join(SUPPORTED)})")


# Output heads kept in float by 8/4-bit weight formats: small, and the costliest to quantize.
HEAD_MODULES = ("classifier", "score", "lm_head")


def supported(model_type: str) -> bool:
    return model_type in SUPPORTED


def attention_heads(model: Any, layer: int) -> int:
    """Attention heads in one layer (0-based), after any pruning: the layout's count for a
    family we know, else the config's count less `pruned_heads`."""
    mt = getattr(model.config, "model_type", "?")
    if supported(mt):
        return layout_for(model).heads_per_layer()[layer]
    c = model.config
    return c.num_attention_heads - len((getattr(c, "pruned_heads", None) or {}).get(layer, []))


# ----------------------------------------------------------------------------- ONNX graphs

_ONNX_LAYER = re.compile(r"^(.*?/(?:layers?|h|blocks?)[._]\d+)(?:/|$)")


def onnx_layer_group(node_name: str) -> str:
    """`/bert/encoder/layer.3/attention/self/query/MatMul` -> `/bert/encoder/layer.3`;
    outside the layers, the first two name parts (`/bert/embeddings`, `/classifier`)."""
    m = _ONNX_LAYER.match(node_name)
    if m:
        return m.group(1)
    parts = node_name.split("/")
    if len(parts) <= 2:  # unnamed or flat names: one group for all of them
        return "(other)"
    return "/".join(parts[:3]) if len(parts) > 3 else "/".join(parts[:2])


def graph_nodes(model: Any) -> list[Any]:
    """Every node of an ONNX model, subgraphs included."""
    out, stack = [], [model.graph]
    while stack:
        g = stack.pop()
        for n in g.node:
            out.append(n)
            for a in n.attribute:
                if a.g is not None and a.g.node:
                    stack.append(a.g)
                stack.extend(a.graphs)
    return out


def lm_head_and_embeddings(model: Any, embeddings: bool) -> list[str]:
    """ONNX node names of a causal LM's lm_head (the MatMul named *lm_head*, or the one that
    produces `logits`) and, when asked, its token-embedding Gathers (a Gather whose table is a
    2-D initializer): what weight quantization keeps in float by default."""
    nodes = graph_nodes(model)
    out = [n.name for n in nodes if "lm_head" in n.name and n.op_type in ("MatMul", "Gemm")]
    if not out:
        producer = {o: n for n in nodes for o in n.output}
        n = producer.get("logits")
        while n is not None and n.op_type not in ("MatMul", "Gemm"):
            n = producer.get(n.input[0]) if n.input else None
        if n is not None:
            out.append(n.name)
    if embeddings:
        tables = {i.name for i in model.graph.initializer if len(i.dims) == 2}
        out += [n.name for n in nodes if n.op_type == "Gather" and n.input[0] in tables]
    return out
