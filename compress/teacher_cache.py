"""Offline distillation: the teacher's top-k logits, computed once and read back every epoch.

Why: in logit distillation the teacher forward pass costs as much as (often more than) the
student's, and its output never changes between epochs. Running the teacher once over the
training set and storing its top-k logits removes that pass from every epoch; training then reads
a few KB per example from a memory-mapped file instead. Only the top k of V entries are kept, so
the loss is :func:`compress.losses.topk_kd_kl_loss`, which renormalises both the teacher and the
student over the kept k entries (an exact KL on that k-element support).

Layout of a cache folder (rows are ragged: one per real token for a causal LM, one per example
for a classifier, i.e. a length-1 "sequence"):

- ``values.npy``  (total_rows, k) float16: top-k teacher logits, largest first (fp16 halves the
  disk and page-cache footprint; the loss tolerates the ~1e-3 relative rounding).
- ``indices.npy`` (total_rows, k) int32: their vocab ids.
- ``offsets.npy`` (num_examples + 1,) int64: example i owns rows ``offsets[i]:offsets[i+1]``, in
  the order of its selected (masked-in) positions.
- ``meta.json``   ``{k, num_examples, total_rows, format_version}``, written last.

The folder only appears under its final name once complete: :class:`TopKCacheWriter` writes it
through compress.manifest's `finished_dir` (a temp folder beside it, fsynced, a manifest of sizes
and digests written last, renamed). ``meta.json`` present == complete, so :meth:`TopKCache.open`
returns None for a missing or half-written folder and the caller rebuilds; the caller verifies
the manifest first (compress.distillation.build_teacher_cache), so a damaged cache is set aside
and rebuilt rather than read.
Name the folder with :func:`cache_key` so a different teacher, data set, k or max_length never
reads a stale cache.

Rows are stored per example without their positions: :meth:`TopKCache.batch` lays them out
left-aligned (position 0 upward). That matches the student's logits for right-padded batches
(the usual layout, and the only one for classifiers); left-padded data must be re-aligned by the
caller.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from compress.artifact import canonical_hash
from compress.atomic import atomic_write_json
from compress.manifest import finished_dir

FORMAT_VERSION = 1
META_FILE = "meta.json"
VALUES_FILE = "values.npy"
INDICES_FILE = "indices.npy"
OFFSETS_FILE = "offsets.npy"
_FP16_MAX = float(np.finfo(np.float16).max)


def cache_key(teacher_hash: str, data_fingerprint: str, k: int, max_length: int) -> str:
    """sha256 naming a cache: anything that changes the stored logits changes the key."""
    return canonical_hash(
        {
            "kind": "teacher_topk",
            "teacher_hash": teacher_hash,
            "data_fingerprint": data_fingerprint,
            "k": k,
            "max_length": max_length,
            "format_version": FORMAT_VERSION,
        }
    )


def _is_complete(folder: Path) -> bool:
    return (Path(folder) / META_FILE).is_file()


class TopKCacheWriter:
    """Collects teacher top-k rows batch by batch (any order), then writes the folder atomically.

    Rows are buffered in memory per example id, because training loaders shuffle and the file
    layout is by id; at k=8-64 that is tens to hundreds of bytes per token.
    """

    def __init__(self, folder: Path, num_examples: int, k: int) -> None:
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 0:
            raise ValueError(f"num_examples must be an int >= 0, got {num_examples!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"k must be a positive int, got {k!r}")
        self.folder = Path(folder)
        self.num_examples = num_examples
        self.k = k
        self._rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._finished = False

    def add(
        self,
        example_ids: Sequence[int],
        logits: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Store top-k of ``logits`` (B, L, V) or (B, V) at the positions ``mask`` (B, L) selects.

        Top-k is taken on float32 (bf16/fp16 logits tie too often to rank reliably), then values
        are stored as fp16 (clamped to its finite range) and indices as int32.
        """
        if self._finished:
            raise RuntimeError("add() after finish()")
        ids = [int(i) for i in example_ids]
        if logits.dim() == 2:
            logits = logits.unsqueeze(1)
            if mask is not None and mask.dim() == 1:
                mask = mask.unsqueeze(1)
        if logits.dim() != 3:
            raise ValueError(f"logits must be (B, L, V) or (B, V), got {tuple(logits.shape)}")
        b, length, vocab = logits.shape
        if len(ids) != b:
            raise ValueError(f"{len(ids)} example ids for a batch of {b}")
        if self.k > vocab:
            raise ValueError(f"k={self.k} exceeds vocab {vocab}")
        if mask is None:
            mask = torch.ones(b, length, dtype=torch.bool)
        if tuple(mask.shape) != (b, length):
            raise ValueError(f"mask shape {tuple(mask.shape)} must be {(b, length)}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate example ids within one batch: {ids}")
        for i in ids:
            if not 0 <= i < self.num_examples:
                raise ValueError(f"example id {i} outside [0, {self.num_examples})")
            if i in self._rows:
                raise ValueError(f"example id {i} added twice")

        mask = mask.detach().to(device="cpu", dtype=torch.bool)
        with torch.no_grad():
            # Only the real tokens go through topk: padding costs nothing and is never stored.
            selected = logits.detach()[mask.to(logits.device)].float()  # (N, V), row-major
            values, indices = torch.topk(selected, self.k, dim=-1)
        values = values.clamp(-_FP16_MAX, _FP16_MAX).cpu().numpy().astype(np.float16)
        indices = indices.cpu().numpy().astype(np.int32)
        counts = mask.sum(dim=1).tolist()
        start = 0
        for i, n in zip(ids, counts, strict=True):
            self._rows[i] = (values[start : start + n].copy(), indices[start : start + n].copy())
            start += n

    def finish(self) -> Path:
        """Lay rows out by id and publish the folder atomically; returns the folder.

        If another writer already published a complete folder under the same name (same key, so
        the same content), ours is discarded and theirs kept.
        """
        if self._finished:
            raise RuntimeError("finish() called twice")
        missing = self.num_examples - len(self._rows)
        if missing:
            first = [i for i in range(self.num_examples) if i not in self._rows][:5]
            raise ValueError(
                f"{missing} of {self.num_examples} example ids were never added (first: {first})"
            )
        counts = np.array([len(self._rows[i][0]) for i in range(self.num_examples)], np.int64)
        offsets = np.zeros(self.num_examples + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        total = int(offsets[-1])
        values = np.zeros((total, self.k), dtype=np.float16)
        indices = np.zeros((total, self.k), dtype=np.int32)
        for i in range(self.num_examples):
            v, x = self._rows[i]
            values[offsets[i] : offsets[i + 1]] = v
            indices[offsets[i] : offsets[i + 1]] = x
        meta = {
            "k": self.k,
            "num_examples": self.num_examples,
            "total_rows": total,
            "format_version": FORMAT_VERSION,
        }

        final = self.folder
        with finished_dir(final) as tmp:  # a concurrent run that finished first keeps its copy
            np.save(tmp / VALUES_FILE, values)
            np.save(tmp / INDICES_FILE, indices)
            np.save(tmp / OFFSETS_FILE, offsets)
            atomic_write_json(tmp / META_FILE, meta)  # last: marks it complete
        self._finished = True
        self._rows.clear()
        return final


class TopKCache:
    """Read side: memory-mapped top-k rows, padded into (B, L, k) batches for the loss."""

    def __init__(
        self, folder: Path, values: np.ndarray, indices: np.ndarray, offsets: np.ndarray, k: int
    ) -> None:
        self.folder = Path(folder)
        self._values = values
        self._indices = indices
        self._offsets = offsets
        self._k = k

    @classmethod
    def open(cls, folder: Path) -> TopKCache | None:
        """The cache in ``folder``, or None when it is missing or incomplete (so: rebuild it)."""
        folder = Path(folder)
        if not _is_complete(folder):
            return None
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{folder}: teacher cache format_version {meta.get('format_version')!r}, "
                f"this code reads {FORMAT_VERSION}"
            )
        # Zero-size arrays cannot be mmapped; they are empty anyway.
        mode = "r" if meta["total_rows"] > 0 else None
        values = np.load(folder / VALUES_FILE, mmap_mode=mode)
        indices = np.load(folder / INDICES_FILE, mmap_mode=mode)
        offsets = np.load(folder / OFFSETS_FILE, mmap_mode="r" if meta["num_examples"] else None)
        k, n, rows = int(meta["k"]), int(meta["num_examples"]), int(meta["total_rows"])
        if (
            values.shape != (rows, k)
            or indices.shape != (rows, k)
            or offsets.shape != (n + 1,)
            or int(offsets[-1]) != rows
        ):
            raise ValueError(f"{folder}: teacher cache files do not match meta.json {meta}")
        return cls(folder, values, indices, offsets, k)

    @property
    def k(self) -> int:
        """How many teacher entries are kept per row."""
        return self._k

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def num_rows(self, example_id: int) -> int:
        """Stored rows (real tokens) of one example."""
        return int(self._offsets[example_id + 1] - self._offsets[example_id])

    def batch(
        self, example_ids: Sequence[int], seq_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values float32 (B, L, k), indices int64 (B, L, k), mask bool (B, L)) for the loss.

        L is ``seq_len`` (pass the student batch's length so shapes line up) or the longest
        example here; padding rows are 0 with mask False, so the loss never sees them. A
        classifier cache gives (B, 1, k): squeeze dim 1.
        """
        ids = [int(i) for i in example_ids]
        n = len(self)
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"example id {i} outside [0, {n})")
        starts = [int(self._offsets[i]) for i in ids]
        ends = [int(self._offsets[i + 1]) for i in ids]
        lengths = [e - s for s, e in zip(starts, ends, strict=True)]
        longest = max(lengths, default=0)
        length = longest if seq_len is None else seq_len
        if longest > length:
            worst = ids[lengths.index(longest)]
            raise ValueError(
                f"example {worst} has {longest} cached rows, more than seq_len={seq_len}: "
                "the cache was built with a different max_length or mask"
            )
        values = np.zeros((len(ids), length, self._k), dtype=np.float32)
        indices = np.zeros((len(ids), length, self._k), dtype=np.int64)
        mask = np.zeros((len(ids), length), dtype=bool)
        for row, (s, e) in enumerate(zip(starts, ends, strict=True)):
            values[row, : e - s] = self._values[s:e]
            indices[row, : e - s] = self._indices[s:e]
            mask[row, : e - s] = True
        return torch.from_numpy(values), torch.from_numpy(indices), torch.from_numpy(mask)
