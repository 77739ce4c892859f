"""Where inputs go on a GPU machine, checked on a CPU: a model reporting another device (meta)
must get its generate inputs there; bitsandbytes-placed models are never moved; a compiled
trainer sees static shapes. (The first `make gpu-check` on an H100 failed on each of these.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from compress.decode import _greedy_kwargs
from compress.models import device_of, on_accelerator, placed_as_loaded

pytestmark = pytest.mark.unit


def test_greedy_inputs_follow_the_model_device():
    model = SimpleNamespace(device=torch.device("meta"),
                            generation_config=SimpleNamespace(pad_token_id=0))
    kw = _greedy_kwargs(model, torch.tensor([[1, 2, 3]]), 4)
    assert kw["input_ids"].device.type == "meta"
    assert kw["attention_mask"].device.type == "meta"


def test_device_of_reads_the_attribute_then_the_parameters():
    assert device_of(SimpleNamespace(device=torch.device("meta"))).type == "meta"
    assert device_of(torch.nn.Linear(2, 2, device="meta")).type == "meta"
    assert device_of(object()).type == "cpu"  # no parameters (an ORT wrapper, say)


def test_bitsandbytes_placed_models_are_not_moved():
    assert placed_as_loaded(SimpleNamespace(is_loaded_in_8bit=True))
    assert placed_as_loaded(SimpleNamespace(hf_device_map={"a": 0, "b": 1}))
    assert not placed_as_loaded(torch.nn.Linear(2, 2))

    class Refuses(torch.nn.Linear):
        is_loaded_in_8bit = True

        def to(self, *a, **k):  # what transformers does for 8-bit models
            raise ValueError("`.to` is not supported for `8-bit` bitsandbytes models")

    m = Refuses(2, 2)
    with on_accelerator(m) as inside:  # a no-op for it, with or without CUDA
        assert inside is m


def test_on_accelerator_returns_the_model_home():
    m = torch.nn.Linear(2, 2)
    with on_accelerator(m) as inside:
        assert device_of(inside).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert device_of(m).type == "cpu"


def test_static_shapes_pad_to_64_and_drop_the_short_batch(tmp_path):
    import datasets
    from transformers import AutoTokenizer

    from compress.data import loader
    from compress.testing import make_tiny_bert

    tok = AutoTokenizer.from_pretrained(make_tiny_bert(tmp_path / "m"))
    rows = [tok(t) for t in ["a b c", "d e", "f g h i j", "k", "l m", "n o p"]]
    enc = datasets.Dataset.from_list([{"input_ids": r["input_ids"],
                                       "attention_mask": r["attention_mask"]} for r in rows])
    eager = list(loader(enc, tok, 4))
    static = list(loader(enc, tok, 4, static_shapes=True))
    assert [len(b["input_ids"]) for b in eager] == [4, 2]
    assert [tuple(b["input_ids"].shape) for b in static] == [(4, 64)]
    assert int(static[0]["attention_mask"].sum()) == int(eager[0]["attention_mask"].sum())
