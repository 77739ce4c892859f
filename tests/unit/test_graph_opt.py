"""Unit tests for compress.graph_opt: fusions on a tiny BERT exported with optimum."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from compress.errors import StageError
from compress.graph_opt import (
    attention_shape,
    dynamic_axes,
    fuse,
    fused_op_counts,
    max_abs_diff,
    quantize_dynamic_fused,
    session,
    synthetic_feeds,
)
from compress.testing import make_tiny_bert

pytestmark = pytest.mark.unit

BERT = {"model_type": "bert", "num_attention_heads": 4, "hidden_size": 64,
        "num_hidden_layers": 4, "vocab_size": 40}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, dict]:
    from optimum.exporters.onnx import main_export

    root = tmp_path_factory.mktemp("graph")
    model = make_tiny_bert(root / "tiny")
    main_export(str(model), output=root / "onnx", task="text-classification",
                do_validation=False, library_name="transformers")
    onnx_path = root / "onnx" / "model.onnx"
    return onnx_path, json.loads((root / "onnx" / "config.json").read_text())


@pytest.fixture(scope="module")
def fused(exported, tmp_path_factory) -> tuple[Path, dict]:
    onnx_in, config = exported
    out = tmp_path_factory.mktemp("fused") / "model.onnx"
    return out, fuse(onnx_in, out, config, level="basic")


def test_attention_shape_from_configs():
    assert attention_shape(BERT) == {"num_heads": 4, "head_size": 16, "hidden_size": 64,
                                     "layers": 4}
    distil = {"model_type": "distilbert", "n_heads": 12, "dim": 768, "n_layers": 6}
    assert attention_shape(distil)["num_heads"] == 12
    pruned = {**BERT, "pruned_heads": {str(i): [0, 2] for i in range(4)}}
    assert attention_shape(pruned) == {"num_heads": 2, "head_size": 16, "hidden_size": 64,
                                       "layers": 4}
    with pytest.raises(StageError, match="differ by layer"):
        attention_shape({**BERT, "pruned_heads": {"1": [0]}})
    with pytest.raises(StageError, match="model_type 'llama'"):
        attention_shape({"model_type": "llama"})


def test_fuse_counts_parity_and_dynamic_axes(exported, fused):
    onnx_in, _ = exported
    out, facts = fused
    counts = fused_op_counts(out)
    assert counts == facts["fused_ops"]
    assert counts["EmbedLayerNormalization"] == 1 and counts["Attention"] == 4
    assert counts["SkipLayerNormalization"] == 8 and counts["BiasGelu"] == 4
    assert fused_op_counts(onnx_in)["Attention"] == 0
    assert facts["fully_fused"] and facts["nodes_after"] < facts["nodes_before"] / 4
    assert facts["parity"]["max_abs_diff"] < 1e-5
    for dims in dynamic_axes(out).values():  # batch and sequence stay symbolic
        assert all(isinstance(d, str) for d in dims)
    # batch 1 and lengths the self-check did not use, including length 1
    probe = session(out)
    feeds = [synthetic_feeds(probe, 40, b, n, seed=b * n) for b, n in ((1, 1), (1, 64), (5, 33))]
    feeds.append(synthetic_feeds(probe, 40, 4, 40, left=True, seed=7))
    assert max_abs_diff(onnx_in, out, feeds) < 1e-5


def test_index_mask_is_wrong_for_left_padding(exported, tmp_path):
    """Why mask='raw' is the default: the 1-D mask index assumes right padding."""
    onnx_in, config = exported
    out = tmp_path / "index.onnx"
    facts = fuse(onnx_in, out, config, level=0, mask="index")
    assert facts["parity"]["max_abs_diff"] < 1e-5  # checked on right padding only
    probe = session(out)
    left = [synthetic_feeds(probe, 40, 4, 24, left=True, seed=s) for s in range(3)]
    assert max_abs_diff(onnx_in, out, left) > 1e-3


def test_refusals(exported, tmp_path):
    onnx_in, config = exported
    for level in ("all", 99):
        with pytest.raises(StageError, match="CPU-specific"):
            fuse(onnx_in, tmp_path / "x.onnx", config, level=level)
    with pytest.raises(StageError, match="mask"):
        fuse(onnx_in, tmp_path / "x.onnx", config, mask="left")
    with pytest.raises(StageError, match="differ by layer"):
        fuse(onnx_in, tmp_path / "x.onnx", {**config, "pruned_heads": {"0": [1]}})


def test_quantize_fused_graph(exported, fused, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx_in, _ = exported
    out, _ = fused
    # the pitfall: plain quantize_dynamic cannot type the contrib ops' outputs
    with pytest.raises(RuntimeError, match="Unable to find data type"):
        quantize_dynamic(str(out), str(tmp_path / "plain.onnx"), weight_type=QuantType.QInt8)
    q = tmp_path / "q.onnx"
    quantize_dynamic_fused(out, q, weight_type=QuantType.QInt8)
    counts = fused_op_counts(q)
    assert counts["QAttention"] == 4 and counts["QEmbedLayerNormalization"] == 1
    probe = session(q)
    feeds = [synthetic_feeds(probe, 40, 1, 9, seed=1), synthetic_feeds(probe, 40, 3, 21, seed=2)]
    ref = session(onnx_in)
    for f in feeds:
        a, b = ref.run(None, f)[0], probe.run(None, f)[0]
        assert a.shape == b.shape and np.abs(a - b).max() < 0.1
