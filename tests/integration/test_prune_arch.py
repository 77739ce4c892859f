"""Pruning beyond BERT: DistilBERT, Llama-family decoders with GQA, depth by importance, MACs.

The stage's `apply` is called directly (no evaluation) so each test stays a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from compress import pruning
from compress.data import load_task_data
from compress.errors import RecipeError, StageError
from compress.pipeline import make_plan
from compress.recipe import load_recipe
from compress.stage import StageContext
from compress.stages.prune import PruneConfig
from compress.testing import make_text_file, make_tiny_llama

pytestmark = pytest.mark.integration


def run_prune(tmp_path: Path, model: Path, data: Path, stage: dict,
              task: str | None = None) -> tuple[dict, Path]:
    """Plan a one-stage recipe and run the prune stage's apply into a fresh folder."""
    section = {"path": str(model), **({"task": task} if task else {})}
    recipe = {"name": "arch", "model": section, "data": {"path": str(data), "max_length": 32},
              "stages": [{"kind": "prune", **stage}], "output_root": str(tmp_path / "out")}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    plan = make_plan(load_recipe(path))
    data_ = load_task_data(plan.recipe.data, plan.recipe.model.num_labels or plan.num_labels,
                           plan.recipe.model.task)
    ctx = StageContext(recipe=plan.recipe, data=data_, reference=plan.source)
    out = tmp_path / "pruned"
    out.mkdir()
    cfg = PruneConfig.model_validate({"kind": "prune", **stage})
    return cfg.apply(plan.source, ctx, out), out


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    return make_text_file(tmp_path_factory.mktemp("text") / "lm.txt", lines=120)


def make_tiny_distilbert(path: Path) -> Path:
    """DistilBERT classifier, random weights, word-level vocabulary (as make_tiny_bert)."""
    from transformers import (
        DistilBertConfig,
        DistilBertForSequenceClassification,
        DistilBertTokenizerFast,
    )

    from compress.testing import WORDS

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = DistilBertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=len(vocab), dim=64, n_layers=3, n_heads=4,
                              hidden_dim=128, max_position_embeddings=128, dropout=0.0,
                              attention_dropout=0.0, num_labels=2)
    DistilBertForSequenceClassification(config).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def test_distilbert_heads_ffn_and_layers_reload(tmp_path, tiny_data):
    model = make_tiny_distilbert(tmp_path / "distilbert")
    info, out = run_prune(tmp_path, model, tiny_data,
                          {"heads": 0.5, "ffn": 0.5, "drop_layers": [1], "importance": "l2"})
    after = AutoModelForSequenceClassification.from_pretrained(out)
    assert after.config.n_layers == 2 and after.config.hidden_dim == 64
    layer = after.distilbert.transformer.layer[0]
    assert layer.ffn.lin1.weight.shape == (64, 64) and layer.ffn.lin2.weight.shape == (64, 64)
    assert layer.attention.n_heads == 2 and layer.attention.q_lin.weight.shape == (32, 64)
    assert info["after"]["heads_per_layer"] == [2, 2] and info["layers_dropped"] == [1]
    assert info["reload_max_diff"] < 1e-5
    assert info["macs"]["after"] < info["macs"]["before"]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_decoder_gqa_heads_and_ffn_reload_and_generate(tmp_path, text_data, model_type):
    model = make_tiny_llama(tmp_path / model_type, heads=4, kv_heads=2, model_type=model_type)
    info, out = run_prune(tmp_path, model, text_data,
                          {"heads": 0.5, "ffn": 0.25, "round_to": 8}, task="causal-lm")
    after = AutoModelForCausalLM.from_pretrained(out).eval()
    c = after.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 1, 16)
    assert c.intermediate_size == 96
    for layer in after.model.layers:
        a = layer.self_attn
        assert a.q_proj.weight.shape == (32, 64) and a.k_proj.weight.shape == (16, 64)
        assert a.v_proj.weight.shape == (16, 64) and a.o_proj.weight.shape == (64, 32)
        assert layer.mlp.gate_proj.weight.shape == (96, 64)
        assert layer.mlp.down_proj.weight.shape == (64, 96)
    if model_type == "qwen2":
        assert after.model.layers[0].self_attn.q_proj.bias.shape == (32,)
    assert info["after"]["kv_heads_per_layer"] == [1] * 4
    assert info["before"]["kv_heads_per_layer"] == [2] * 4
    assert all(len(v) == 2 for v in info["heads_removed"].values())  # one group = 2 q heads
    assert info["reload_max_diff"] == 0.0 and info["generate_check_tokens"] == 4
    assert info["macs"]["after"] < info["macs"]["before"]
    assert info["macs"]["sequence_length"] == 32
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        again = AutoModelForCausalLM.from_pretrained(out).eval()
        assert torch.equal(after(input_ids=ids).logits, again(input_ids=ids).logits)
        gen = after.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                             min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 7)


def test_gqa_ratio_that_splits_a_group_is_refused(tmp_path, text_data):
    model = make_tiny_llama(tmp_path / "llama6", layers=2, heads=6, kv_heads=3, hidden=48)
    with pytest.raises(StageError, match=r"prune.heads: 0.15 does not remove a whole number of "
                       r"the 3 key/value groups; ratios that work: 0.333, 0.667"):
        run_prune(tmp_path, model, text_data, {"heads": 0.15}, task="causal-lm")
    assert pruning._kv_groups_to_remove(0.333, 3) == 1  # the printed ratios are accepted
    assert pruning._kv_groups_to_remove(2 / 3, 3) == 2


def test_depth_drops_the_layer_that_does_nothing(tmp_path, text_data):
    path = make_tiny_llama(tmp_path / "qwen", layers=4, model_type="qwen2")
    model = AutoModelForCausalLM.from_pretrained(path)
    planted = model.model.layers[2]
    with torch.no_grad():  # an identity layer: both residual branches add zero
        planted.self_attn.o_proj.weight.zero_()
        planted.mlp.down_proj.weight.zero_()
    model.save_pretrained(path, safe_serialization=True)
    info, out = run_prune(tmp_path, path, text_data, {"depth": 1}, task="causal-lm")
    assert info["layers_dropped"] == [2]
    assert min(info["layer_scores"], key=info["layer_scores"].get) == "2"
    assert info["layer_scores"]["2"] < 1e-3
    after = AutoModelForCausalLM.from_pretrained(out)
    assert after.config.num_hidden_layers == 3 and len(after.config.layer_types) == 3
    assert [x.self_attn.layer_idx for x in after.model.layers] == [0, 1, 2]
    assert info["generate_check_tokens"] == 4


def test_depth_after_drop_layers_reports_original_indices(tmp_path, text_data):
    path = make_tiny_llama(tmp_path / "llama", layers=4)
    info, _ = run_prune(tmp_path, path, text_data,
                        {"drop_layers": [0], "depth": 1, "layer_importance": "block_influence"},
                        task="causal-lm")
    assert set(info["layer_scores"]) == {"1", "2", "3"}
    assert len(info["layers_dropped"]) == 2 and info["layers_dropped"][0] == 0
    assert info["after"]["layers"] == 2
    with pytest.raises(StageError, match="prune.depth: cannot drop 3 of the 3 layers left"):
        run_prune(tmp_path / "again", path, text_data, {"drop_layers": [0], "depth": 3},
                  task="causal-lm")


@pytest.mark.parametrize("importance", ["activation", "taylor", "random"])
def test_decoder_importances_run(tmp_path, text_data, importance):
    path = make_tiny_llama(tmp_path / "llama", layers=2)
    info, _ = run_prune(tmp_path, path, text_data,
                        {"heads": 0.5, "ffn": 0.5, "importance": importance,
                         "calibration_samples": 8}, task="causal-lm")
    assert info["after"]["ffn"] == 64 and info["after"]["heads_per_layer"] == [2, 2]


def test_activation_importance_on_bert(tmp_path, tiny_model, tiny_data):
    info, out = run_prune(tmp_path, tiny_model, tiny_data,
                          {"heads": 0.5, "ffn": 0.5, "importance": "activation", "depth": 1,
                           "calibration_samples": 16})
    assert info["after"]["heads_per_layer"] == [2, 2, 2] and info["after"]["ffn"] == 64
    assert len(info["layer_scores"]) == 4 and len(info["layers_dropped"]) == 1
    assert info["macs"]["after"] < info["macs"]["before"]
    assert AutoModelForSequenceClassification.from_pretrained(out).config.intermediate_size == 64


def test_distilbert_depth_and_activation_heads(tmp_path, tiny_data):
    model = make_tiny_distilbert(tmp_path / "distilbert")
    info, out = run_prune(tmp_path, model, tiny_data,
                          {"heads": 0.25, "depth": 1, "importance": "activation",
                           "calibration_samples": 16})
    assert len(info["layer_scores"]) == 3 and info["after"]["heads_per_layer"] == [3, 3]
    assert AutoModelForSequenceClassification.from_pretrained(out).config.n_layers == 2


def test_unsupported_architecture_is_named(tmp_path, text_data):
    from transformers import GPT2Config, GPT2LMHeadModel

    from compress.testing import _word_tokenizer

    path = tmp_path / "gpt2"
    tok = _word_tokenizer(path)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=32, n_head=2,
                               n_positions=64)).save_pretrained(path)
    tok.save_pretrained(path)
    # refused when the recipe is planned, before any work (the layout refuses it too)
    with pytest.raises(RecipeError, match=r"stages\[0\] \(prune\): architecture 'gpt2' is not "
                       r"supported \(supported: bert, .*distilbert, llama, mistral, qwen2, "
                       r"qwen3, gemma3_text, phi3\)"):
        run_prune(tmp_path, path, text_data, {"ffn": 0.5}, task="causal-lm")
    from compress.arch import layout_for

    with pytest.raises(StageError, match="prune: architecture 'gpt2' is not supported"):
        layout_for(GPT2LMHeadModel.from_pretrained(path))
