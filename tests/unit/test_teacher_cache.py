"""Unit tests for compress.teacher_cache on tiny random logits (V=11, k=3), checked against topk."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compress import teacher_cache
from compress.losses import topk_kd_kl_loss
from compress.teacher_cache import TopKCache, TopKCacheWriter, cache_key

pytestmark = pytest.mark.unit

V, K = 11, 3


def ragged_lm(lengths=(2, 6, 1, 4, 3), max_len: int = 6, seed: int = 0):
    """Right-padded LM-style teacher logits (n, max_len, V) and a mask of `lengths` real tokens."""
    g = torch.Generator().manual_seed(seed)
    n = len(lengths)
    logits = torch.randn(n, max_len, V, generator=g) * 3
    mask = torch.zeros(n, max_len, dtype=torch.bool)
    for i, length in enumerate(lengths):
        mask[i, :length] = True
    return logits, mask, lengths


def write(folder, logits, mask, order, batch_size=2):
    """Add examples in `order`, each batch trimmed to its own longest length (like a collator)."""
    writer = TopKCacheWriter(folder, num_examples=len(logits), k=K)
    for s in range(0, len(order), batch_size):
        ids = order[s : s + batch_size]
        b_len = int(mask[ids].sum(1).max())
        writer.add(ids, logits[ids, :b_len], mask[ids, :b_len])
    return writer.finish()


def test_round_trip_ragged_shuffled_matches_topk(tmp_path):
    logits, mask, lengths = ragged_lm()
    order = [3, 0, 4, 1, 2]
    folder = write(tmp_path / "cache", logits, mask, order)
    assert folder == tmp_path / "cache"

    cache = TopKCache.open(folder)
    assert cache is not None and cache.k == K and len(cache) == 5
    meta = json.loads((folder / "meta.json").read_text())
    assert meta == {"k": K, "num_examples": 5, "total_rows": sum(lengths), "format_version": 1}
    offsets = np.load(folder / "offsets.npy")
    assert offsets.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    assert np.load(folder / "values.npy").dtype == np.float16
    assert np.load(folder / "indices.npy").dtype == np.int32

    values, indices, got_mask = cache.batch([0, 1, 2, 3, 4], seq_len=6)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert torch.equal(got_mask, mask)
    ref_v, ref_i = torch.topk(logits, K, dim=-1)
    assert torch.equal(indices[mask], ref_i[mask])
    torch.testing.assert_close(values[mask], ref_v[mask], atol=1e-2, rtol=1e-3)
    assert torch.equal(values[~mask], torch.zeros_like(values[~mask]))


def test_classifier_logits_b_v(tmp_path):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, V, generator=g)
    writer = TopKCacheWriter(tmp_path / "cls", num_examples=4, k=K)
    writer.add([2, 0], logits[[2, 0]])
    writer.add([3, 1], logits[[3, 1]])
    cache = TopKCache.open(writer.finish())
    assert cache is not None

    values, indices, mask = cache.batch([1, 3, 0])
    assert values.shape == (3, 1, K) and indices.shape == (3, 1, K) and mask.shape == (3, 1)
    assert mask.all()
    ref_v, ref_i = torch.topk(logits[[1, 3, 0]], K, dim=-1)
    assert torch.equal(indices.squeeze(1), ref_i)
    torch.testing.assert_close(values.squeeze(1), ref_v, atol=1e-2, rtol=1e-3)


def test_batch_pads_to_longest_or_seq_len(tmp_path):
    logits = torch.arange(3 * 2 * V, dtype=torch.float32).reshape(3, 2, V)
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    writer = TopKCacheWriter(tmp_path / "c", num_examples=3, k=K)
    writer.add([0, 1, 2], logits, mask)
    cache = TopKCache.open(writer.finish())

    values, indices, got = cache.batch([1, 2])  # longest here is 1 row
    assert values.shape == (2, 1, K)
    assert got.tolist() == [[True], [False]]
    # ascending logits: the top 3 of a row are its last 3 vocab ids, largest first
    assert indices[0, 0].tolist() == [10, 9, 8]
    assert values[0, 0].tolist() == logits[1, 0, [10, 9, 8]].tolist()
    assert values[1].abs().sum() == 0 and indices[1].abs().sum() == 0

    values, indices, got = cache.batch([0, 1], seq_len=4)
    assert values.shape == (2, 4, K) and indices.shape == (2, 4, K)
    assert got.tolist() == [[True, True, False, False], [True, False, False, False]]
    assert values[0, 2:].abs().sum() == 0 and indices[1, 1:].abs().sum() == 0

    with pytest.raises(ValueError, match="seq_len=1"):
        cache.batch([0], seq_len=1)


def test_missing_ids_raise_naming_count(tmp_path):
    writer = TopKCacheWriter(tmp_path / "c", num_examples=5, k=K)
    writer.add([0, 3], torch.randn(2, V))
    with pytest.raises(ValueError, match="3 of 5"):
        writer.finish()
    assert not (tmp_path / "c").exists()


def test_duplicate_id_raises(tmp_path):
    writer = TopKCacheWriter(tmp_path / "c", num_examples=3, k=K)
    writer.add([0, 1], torch.randn(2, V))
    with pytest.raises(ValueError, match="twice"):
        writer.add([1], torch.randn(1, V))
    with pytest.raises(ValueError, match="duplicate"):
        writer.add([2, 2], torch.randn(2, V))


def test_crash_before_or_during_finish_leaves_no_folder(tmp_path, monkeypatch):
    folder = tmp_path / "c"
    writer = TopKCacheWriter(folder, num_examples=2, k=K)
    writer.add([0, 1], torch.randn(2, V))
    del writer  # "crash" before finish: nothing on disk
    assert not folder.exists() and TopKCache.open(folder) is None

    writer = TopKCacheWriter(folder, num_examples=2, k=K)
    writer.add([0, 1], torch.randn(2, V))
    real_save, calls = np.save, []

    def crash_on_second(path, array):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(path, array)

    monkeypatch.setattr(teacher_cache.np, "save", crash_on_second)
    with pytest.raises(OSError, match="disk full"):
        writer.finish()
    assert TopKCache.open(folder) is None
    assert list(tmp_path.iterdir()) == []  # the temp folder was cleaned up too


def test_second_writer_keeps_existing_complete_folder(tmp_path):
    folder = tmp_path / "c"
    first = TopKCacheWriter(folder, num_examples=2, k=K)
    first.add([0, 1], torch.zeros(2, V))
    first.finish()
    before = np.load(folder / "values.npy").copy()

    second = TopKCacheWriter(folder, num_examples=2, k=K)
    second.add([0, 1], torch.randn(2, V) + 5)
    assert second.finish() == folder
    assert np.array_equal(np.load(folder / "values.npy"), before)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no leftover .tmp-*


def test_open_incomplete_folder_returns_none(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "values.npy").write_bytes(b"")
    assert TopKCache.open(tmp_path / "c") is None
    assert TopKCache.open(tmp_path / "absent") is None


def test_cache_key_changes_with_each_argument():
    base = ("teacher-a", "data-a", 3, 128)
    key = cache_key(*base)
    assert len(key) == 64 and key == cache_key(*base)
    variants = [
        ("teacher-b", "data-a", 3, 128),
        ("teacher-a", "data-b", 3, 128),
        ("teacher-a", "data-a", 4, 128),
        ("teacher-a", "data-a", 3, 256),
    ]
    keys = {cache_key(*v) for v in variants}
    assert key not in keys and len(keys) == 4


def test_loss_from_cache_matches_uncached_topk(tmp_path):
    logits, mask, _ = ragged_lm(lengths=(3, 5, 1, 2), max_len=5, seed=2)
    folder = write(tmp_path / "c", logits, mask, order=[2, 0, 3, 1], batch_size=3)
    cache = TopKCache.open(folder)

    student = torch.randn(4, 5, V, generator=torch.Generator().manual_seed(3))
    values, indices, cached_mask = cache.batch([0, 1, 2, 3], seq_len=5)
    ref_v, ref_i = torch.topk(logits, K, dim=-1)
    cached = topk_kd_kl_loss(student, values, indices, temperature=2.0, mask=cached_mask)
    direct = topk_kd_kl_loss(student, ref_v, ref_i, temperature=2.0, mask=mask)
    assert direct > 0
    assert abs(cached.item() - direct.item()) < 1e-3
