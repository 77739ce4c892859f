"""Lineage ids and atomic outputs."""

from __future__ import annotations

import shutil

import pytest

from compress.artifact import ModelRef, canonical_hash, read_ref, source_ref, write_ref
from compress.atomic import staged_dir
from compress.stages.prune import PruneConfig

pytestmark = pytest.mark.unit


def test_hash_ignores_key_order_and_tracks_every_input():
    cfg = PruneConfig(ffn=0.5, heads=0.25)
    a = cfg.output_id("p", "d")
    assert canonical_hash({"a": 1, "b": 2}) == canonical_hash({"b": 2, "a": 1})
    assert a == PruneConfig(heads=0.25, ffn=0.5).output_id("p", "d")
    assert a == PruneConfig(ffn=0.5, heads=0.25, name="renamed").output_id("p", "d")  # not hashed
    assert a != cfg.output_id("q", "d")
    assert a != PruneConfig(ffn=0.5, heads=0.5).output_id("p", "d")
    assert a != cfg.output_id("p", "e")
    assert canonical_hash(1) != canonical_hash("1")


def test_source_hash_follows_content_not_location(tmp_path):
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"abc")
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    assert source_ref(str(src), "t").hash == source_ref(str(copy), "t").hash
    (copy / "model.safetensors").write_bytes(b"abd")
    assert source_ref(str(src), "t").hash != source_ref(str(copy), "t").hash


def test_staged_dir_publishes_only_on_success(tmp_path):
    final = tmp_path / "prune-abc"
    with pytest.raises(RuntimeError), staged_dir(final) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with staged_dir(final) as tmp:
        (tmp / "x").write_text("1")
        write_ref(tmp, ModelRef(path=str(final), format="hf", task="t", hash="h", stage="s"))
    assert read_ref(final).hash == "h" and (final / "x").read_text() == "1"
