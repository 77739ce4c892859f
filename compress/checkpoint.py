"""Training checkpoints: resume an interrupted stage exactly where it stopped.

Fine-tuning and distillation loops call `save_checkpoint` every N steps. A re-run of the stage
looks for `latest_checkpoint(folder)`, calls `load_checkpoint` and continues from the saved
step: weights, optimizer and scheduler state, every RNG (torch CPU/CUDA, Python `random`, numpy's
legacy global generator) and the data position the loop put in `extra` come back, so the rest of
the loss curve is the one an uninterrupted run with the same seed would have produced.

Atomic (compress.atomic's `staged_dir`): a checkpoint is written into an owned temp folder, every
file is fsynced, and only then is the folder renamed to `step-XXXXXXXX`. A crash mid-save leaves
at most a `.tmp-step-*` folder (ignored, and removed by a later save once its owner is gone),
never a partial `step-*`.

No pickle of arbitrary objects: weights are safetensors, and the `.pt` files hold only tensors,
numbers, strings, lists and dicts, so they are read with `torch.load(..., weights_only=True)`.

Layout::

    folder/
      step-00000800/
        model.safetensors   model.state_dict(); tied tensors stored once (aliases in metadata)
        optimizer.pt        optimizer.state_dict()
        scheduler.pt        scheduler.state_dict() (only when a scheduler was given)
        rng.pt              {"torch", "cuda", "python", "numpy"} states as tensors/ints/lists
        state.json          {"step": 800, "extra": {...}}; its presence marks a complete folder
      step-00001000/
      .tmp-step-00001200-x1y2z3/   a save in progress (or a crashed one)

One writer per folder: a save removes orphaned temp folders and prunes old `step-*`.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from compress.atomic import atomic_write_text, remove_orphans
from compress.manifest import finished_dir, quarantine, verify

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "state.json"

_STEP_RE = re.compile(r"step-(\d+)")
_ALIASES_KEY = "compress.aliases"


def save_checkpoint(
    folder: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    extra: dict | None = None,
    keep: int = 2,
) -> Path:
    """Atomically write `folder/step-{step:08d}` and prune all but the newest `keep` checkpoints.

    `extra` must be JSON-serialisable (data position, loss history...). Returns the new folder.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    folder = Path(folder)
    # Fail before touching the disk if `extra` cannot be stored.
    state_text = json.dumps({"step": int(step), "extra": extra or {}}, indent=2)
    remove_orphans(folder)
    final = folder / f"step-{step:08d}"
    # Same step saved again: swapped in, the old one kept until the new one is complete.
    with finished_dir(final, replace=True) as tmp:
        tensors, aliases = _dedupe_state_dict(model.state_dict())
        save_file(tensors, tmp / MODEL_FILE, metadata={"format": "pt",
                                                       _ALIASES_KEY: json.dumps(aliases)})
        _torch_save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        if scheduler is not None:
            _torch_save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        _torch_save(_get_rng_state(), tmp / RNG_FILE)
        atomic_write_text(tmp / STATE_FILE, state_text)  # last: marks the folder complete

    _prune(folder, keep=keep, protect=final)
    return final


def latest_checkpoint(folder: Path, *, quarantine_root: Path | None = None,
                      warnings: list[str] | None = None) -> Path | None:
    """The newest complete `step-*` folder whose manifest verifies (sizes and digests), or None.

    A damaged one is never resumed from: with `quarantine_root` it is moved aside there (and
    named in `warnings`), and the next newest is tried.
    """
    for _, path in reversed(_complete_checkpoints(Path(folder))):
        problems = verify(path, digests=True)
        if not problems:
            return path
        if quarantine_root is not None:
            moved = quarantine(path, quarantine_root)
            if warnings is not None:
                warnings.append(f"checkpoint {path.name} failed verification ({problems[0]}): "
                                f"moved to {moved}; resumed from an earlier one or the start")
    return None


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
) -> dict:
    """Load a checkpoint folder into `model` (strict), optimizer, scheduler, and the RNGs.

    Returns the state.json dict: {"step": int, "extra": dict}.
    """
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())

    weights = load_file(path / MODEL_FILE, device="cpu")
    with safe_open(path / MODEL_FILE, framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get(_ALIASES_KEY, "{}"))
    for alias, target in aliases.items():
        weights[alias] = weights[target]
    model.load_state_dict(weights, strict=True)

    if optimizer is not None:
        optimizer.load_state_dict(_torch_load(path / OPTIMIZER_FILE))
    if scheduler is not None:
        if not (path / SCHEDULER_FILE).exists():
            raise FileNotFoundError(f"{path} has no {SCHEDULER_FILE}: saved without a scheduler")
        scheduler.load_state_dict(_torch_load(path / SCHEDULER_FILE))
    if restore_rng:
        _set_rng_state(_torch_load(path / RNG_FILE))
    return state


# --- weights -----------------------------------------------------------------------------------


def _dedupe_state_dict(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Make a state dict safetensors accepts: tied tensors stored once, other shared views copied.

    Returns (tensors to write, {alias name: stored name}).
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    exact: dict[tuple, str] = {}  # identical view of the same storage -> first name
    storages: set[tuple] = set()
    for key, value in state_dict.items():
        t = value.detach()
        if t.numel() == 0 or t.device.type == "meta":
            tensors[key] = t.cpu().contiguous() if t.device.type != "meta" else t
            continue
        storage = (t.device, t.untyped_storage().data_ptr())
        view = (*storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in exact:
            aliases[key] = exact[view]
            continue
        shared = storage in storages
        exact[view] = key
        storages.add(storage)
        t = t.cpu()
        tensors[key] = t.clone(memory_format=torch.contiguous_format) if shared else t.contiguous()
    return tensors, aliases


# --- RNG ---------------------------------------------------------------------------------------


def _get_rng_state() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": int(version), "state": [int(x) for x in internal],
                   "gauss_next": gauss_next},
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                  "cached_gaussian": float(np_cached)},
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # different GPU count: restore what lines up
            for i, s in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))


# --- files -------------------------------------------------------------------------------------


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _complete_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _STEP_RE.fullmatch(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _prune(folder: Path, *, keep: int, protect: Path) -> None:
    steps = []
    for p in folder.iterdir():
        m = _STEP_RE.fullmatch(p.name)
        if m and p.is_dir():
            steps.append((int(m.group(1)), p))
    steps.sort(reverse=True)
    for _, p in steps[keep:]:
        if p != protect:
            shutil.rmtree(p, ignore_errors=True)
