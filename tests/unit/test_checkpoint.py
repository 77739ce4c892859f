"""Checkpoints: exact resume, atomic saves, pruning, weights_only loading, tied weights."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from compress.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from compress.testing import dead_owner_folder

pytestmark = pytest.mark.unit

TOTAL, CUT = 20, 8


def _build(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / TOTAL))
    return model, opt, sched


def _train(model, opt, sched, steps: int, losses: list[float]) -> None:
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 6)  # data drawn from the torch RNG inside the loop
        y = x.sum(dim=1, keepdim=True) + 0.1 * float(np.random.randn()) + random.random()
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    _seed_all(0)
    model, opt, sched = _build(0)
    full: list[float] = []
    _train(model, opt, sched, TOTAL, full)
    full_weights = {k: v.clone() for k, v in model.state_dict().items()}

    _seed_all(0)
    model, opt, sched = _build(0)
    first: list[float] = []
    _train(model, opt, sched, CUT, first)
    path = save_checkpoint(tmp_path, CUT, model=model, optimizer=opt, scheduler=sched,
                           extra={"epoch": 0, "batches": CUT, "losses": first})
    assert path == tmp_path / f"step-{CUT:08d}"
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json", "model.safetensors", "optimizer.pt", "rng.pt", "scheduler.pt",
        "state.json"]
    # The "interrupted" process goes on consuming RNG before dying.
    _train(model, opt, sched, 3, [])

    _seed_all(123)
    model, opt, sched = _build(123)  # different init
    assert not torch.equal(model[0].weight, full_weights["0.weight"])
    state = load_checkpoint(latest_checkpoint(tmp_path), model=model, optimizer=opt,
                            scheduler=sched)
    assert state == {"step": CUT, "extra": {"epoch": 0, "batches": CUT, "losses": first}}
    rest: list[float] = []
    _train(model, opt, sched, TOTAL - CUT, rest)

    assert first == full[:CUT]
    assert rest == full[CUT:]  # bit-identical losses for steps 9..20
    for k, v in model.state_dict().items():
        assert torch.equal(v, full_weights[k]), k


def test_keep_prunes_older_checkpoints(tmp_path):
    model, opt, _ = _build(0)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000004"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000004"
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path, 5, model=model, optimizer=opt, keep=0)


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = _build(0)
    save_checkpoint(tmp_path, 5, model=model, optimizer=opt, scheduler=sched)

    def boom(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError, match="disk gone"):
        save_checkpoint(tmp_path, 10, model=model, optimizer=opt, scheduler=sched)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000005"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000005"

    # A folder left by a killed process (no rename, no cleanup) is ignored, then swept; one we
    # did not make (no owner record) is never touched.
    dead = dead_owner_folder(tmp_path / ".tmp-step-00000010-abc")
    (dead / "state.json").write_text("{}")
    (tmp_path / ".tmp-step-foreign").mkdir()
    (tmp_path / "step-00000011").mkdir()  # incomplete: no state.json
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000005"
    save_checkpoint(tmp_path, 12, model=model, optimizer=opt, scheduler=sched)
    assert [p.name for p in tmp_path.glob(".tmp-*")] == [".tmp-step-foreign"]


def test_latest_checkpoint_missing_folder(tmp_path):
    assert latest_checkpoint(tmp_path / "nope") is None
    assert latest_checkpoint(tmp_path) is None


def test_files_load_with_weights_only(tmp_path):
    _seed_all(1)
    model, opt, sched = _build(1)
    _train(model, opt, sched, 2, [])
    path = save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched)
    for name in ("rng.pt", "optimizer.pt", "scheduler.pt"):
        torch.load(path / name, weights_only=True)  # raises on any non-allowlisted class
    rng = torch.load(path / "rng.pt", weights_only=True)
    assert torch.equal(rng["torch"], torch.get_rng_state())
    assert json.loads((path / "state.json").read_text()) == {"step": 2, "extra": {}}

    # RNG restore is exact for torch, Python random and numpy.
    expected = (torch.rand(3), random.random(), np.random.rand(3))
    load_checkpoint(path, model=model)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]
    assert np.array_equal(np.random.rand(3), expected[2])

    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 3, model=model, optimizer=opt, extra={"bad": object()})
    assert latest_checkpoint(tmp_path) == path


def test_tied_weights_roundtrip(tmp_path):
    def tied():
        m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        m[1].weight = m[0].weight
        m.register_buffer("bias_head", m[0].bias.detach()[:2])  # shares storage, different view
        return m

    torch.manual_seed(0)
    model = tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=opt)
    with safe_open(path / "model.safetensors", framework="pt") as f:
        stored = set(f.keys())
    assert "0.weight" in stored and "1.weight" not in stored  # tied weight stored once

    torch.manual_seed(1)
    fresh = tied()
    load_checkpoint(path, model=fresh, optimizer=torch.optim.SGD(fresh.parameters(), lr=0.1))
    assert fresh[1].weight is fresh[0].weight
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_resave_same_step_replaces(tmp_path):
    model, opt, _ = _build(0)
    save_checkpoint(tmp_path, 3, model=model, optimizer=opt, extra={"v": 1})
    save_checkpoint(tmp_path, 3, model=model, optimizer=opt, extra={"v": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000003"]
    assert load_checkpoint(tmp_path / "step-00000003", model=model)["extra"] == {"v": 2}
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "step-00000003", model=model,
                        scheduler=_build(0)[2])
