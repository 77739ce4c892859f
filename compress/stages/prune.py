"""prune: structured pruning of encoders (BERT family) that reloads with `from_pretrained`.

- Layers: dropped by index; `num_hidden_layers` shrinks.
- Attention heads: scored per head (q/k/v rows and output columns), removed with the model's own
  `prune_heads`, which records them in `config.pruned_heads`; `from_pretrained` re-applies that,
  which is the only way BERT's config can describe fewer heads of the same size.
- FFN channels: torch-pruning's dependency graph finds everything coupled to each intermediate
  channel, its group importance scores them, and every layer keeps the same count (rounded to a
  multiple of `round_to`) so `intermediate_size` describes the result.
The saved model is reloaded and checked against the in-memory one before the stage succeeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.artifact import ModelRef
from compress.errors import StageError
from compress.models import count_parameters, load_classifier, load_tokenizer, save_hf
from compress.recipe import PruneConfig
from compress.stages import StageContext

BERT_FAMILY = ("bert", "roberta", "xlm-roberta", "camembert", "electra")


@dataclass
class Layout:
    """Where the parts live in a BERT-family encoder."""

    model: Any

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.base_model.encoder.layer

    def set_layers(self, layers: list[nn.Module]) -> None:
        self.model.base_model.encoder.layer = nn.ModuleList(layers)

    @staticmethod
    def attention(layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        s = layer.attention.self
        return s.query, s.key, s.value, layer.attention.output.dense

    @staticmethod
    def heads_left(layer: nn.Module, total: int) -> list[int]:
        """Original indices of the heads still present, in their current order."""
        gone = set(layer.attention.pruned_heads)
        return [h for h in range(total) if h not in gone]

    @staticmethod
    def ffn_up(layer: nn.Module) -> nn.Linear:
        return layer.intermediate.dense


def layout_for(model: Any) -> Layout:
    mt = getattr(model.config, "model_type", "?")
    if mt not in BERT_FAMILY:
        raise StageError(f"prune: architecture {mt!r} is not supported yet "
                         f"(supported: {', '.join(BERT_FAMILY)})")
    return Layout(model)


def _shape(model: Any) -> dict[str, Any]:
    c = model.config
    lay = layout_for(model)
    heads = [len(lay.heads_left(layer, c.num_attention_heads)) for layer in lay.layers]
    return {"layers": c.num_hidden_layers, "heads_per_layer": heads,
            "ffn": c.intermediate_size, "parameters": count_parameters(model)}


def _calibrate(model: Any, tok: Any, ctx: StageContext, n: int) -> None:
    """Populate .grad with the task loss on a few training examples (for taylor scores)."""
    from compress.data import encode, loader

    model.zero_grad(set_to_none=True)
    rows = ctx.data.train.select(range(min(n, len(ctx.data.train))))
    for batch in loader(encode(rows, tok, ctx.data.spec.max_length), tok, 16):
        model(**batch).loss.backward()


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
        per_unit = t.movedim(dim, 0).reshape(n, -1).sum(1)
        score += per_unit if importance != "l2" else per_unit
    return score.sqrt() if importance == "l2" else score


def _drop_layers(model: Any, lay: Layout, drop: list[int]) -> None:
    n = len(lay.layers)
    if drop[-1] >= n:
        raise StageError(f"prune.drop_layers: layer {drop[-1]} does not exist "
                         f"(the model has {n} layers, 0-{n - 1})")
    if len(drop) >= n:
        raise StageError(f"prune.drop_layers: cannot drop all {n} layers")
    keep = [i for i in range(n) if i not in drop]
    lay.set_layers([lay.layers[i] for i in keep])
    model.config.num_hidden_layers = len(keep)
    old = {int(k): v for k, v in (model.config.pruned_heads or {}).items()}
    model.config.pruned_heads = {new: old[i] for new, i in enumerate(keep) if i in old}


def _prune_heads(model: Any, lay: Layout, cfg: PruneConfig, gen: torch.Generator) -> dict:
    total = model.config.num_attention_heads
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
        q, k_, v, o = lay.attention(layer)
        scores = _score([(q.weight, 0), (k_.weight, 0), (v.weight, 0), (o.weight, 1)],
                        cfg.importance, n, gen)
        worst = torch.argsort(scores)[:k].tolist()
        plan[li] = sorted(present[i] for i in worst)
    model.prune_heads(plan)
    return plan


def _prune_ffn(model: Any, lay: Layout, cfg: PruneConfig, example: dict[str, torch.Tensor],
               gen: torch.Generator) -> int:
    import torch_pruning as tp

    width = model.config.intermediate_size
    keep = max(cfg.round_to, round(width * (1 - cfg.ffn) / cfg.round_to) * cfg.round_to)
    if keep >= width:
        raise StageError(f"prune.ffn: {cfg.ffn} of {width} channels, rounded to a multiple of "
                         f"{cfg.round_to}, removes nothing; raise ffn or lower round_to")
    imp: Any = {
        "l1": tp.importance.GroupMagnitudeImportance(p=1),
        "l2": tp.importance.GroupMagnitudeImportance(p=2),
        "taylor": tp.importance.GroupTaylorImportance(),
        "random": None,
    }[cfg.importance]
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    for layer in lay.layers:
        up = lay.ffn_up(layer)
        group = graph.get_pruning_group(up, tp.prune_linear_out_channels, idxs=list(range(width)))
        scores = torch.rand(width, generator=gen) if imp is None else imp(group)
        drop = torch.argsort(scores.float().cpu())[: width - keep].tolist()
        graph.get_pruning_group(up, tp.prune_linear_out_channels, idxs=drop).prune()
    model.config.intermediate_size = keep
    return keep


def apply(ref: ModelRef, cfg: PruneConfig, ctx: StageContext, out: Path) -> dict[str, Any]:
    trc = ctx.recipe.model.trust_remote_code
    model = load_classifier(ref.path, ctx.data.num_labels, trust_remote_code=trc)
    tok = load_tokenizer(ref.path, trust_remote_code=trc)
    lay = layout_for(model)
    before = _shape(model)
    gen = torch.Generator().manual_seed(cfg.seed)

    if cfg.drop_layers:
        _drop_layers(model, lay, cfg.drop_layers)
    heads_removed: dict[int, list[int]] = {}
    if cfg.heads:
        if cfg.importance == "taylor":
            _calibrate(model, tok, ctx, cfg.calibration_samples)
        heads_removed = _prune_heads(model, lay, cfg, gen)
    if cfg.ffn:
        if cfg.importance == "taylor":
            _calibrate(model, tok, ctx, cfg.calibration_samples)
        example = dict(tok(["a short example", "another one"], return_tensors="pt",
                           padding=True))
        _prune_ffn(model, lay, cfg, example, gen)
    model.zero_grad(set_to_none=True)
    model.eval()
    after = _shape(model)

    save_hf(model, tok, out)
    check = dict(tok(list(ctx.data.eval["text"][:4]), return_tensors="pt", padding=True,
                     truncation=True, max_length=ctx.data.spec.max_length))
    with torch.inference_mode():
        expect = model(**check).logits
        got = load_classifier(str(out), ctx.data.num_labels, trust_remote_code=trc)(**check).logits
    if got.shape != expect.shape or (diff := float((got - expect).abs().max())) > 1e-4:
        raise StageError("prune: the saved model does not reload to the pruned one "
                         "(from_pretrained gives different outputs)")
    removed = 1 - after["parameters"] / before["parameters"]
    warnings = []
    if removed > 1 / 3:
        warnings.append(f"one prune step removed {removed:.0%} of the parameters; Minitron's "
                        "guidance is at most about a third per step, with distillation between")
    return {"before": before, "after": after, "parameters_removed": round(removed, 4),
            "heads_removed": {str(k): v for k, v in heads_removed.items()},
            "importance": cfg.importance, "reload_max_diff": diff, "warnings": warnings}
