"""make gpu-check's scripts, on a machine without a GPU: it says so and exits 0, and every
package it lays over a GPU machine's torch has a pin in constraints.txt (an unpinned name would
install whatever version the machine's index has, or, offline, fetch nothing)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_gpu_check_without_a_gpu_says_so_and_exits_0():
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0
    assert r.stdout.startswith("gpu-check: no CUDA GPU on this machine")


def test_every_package_the_gpu_check_installs_is_pinned():
    script = ("source benchmarks/gpu_packages.sh; "
              "for d in $GPU_PINNED $GPU_IF_MISSING $GPU_OFFLINE; do echo \"$d=$(pin $d)\"; done")
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    unpinned = [line.split("=")[0] for line in out if line.endswith("=")]
    assert len(out) > 20 and unpinned == []


def test_gpu_wheels_never_replaces_a_folder_it_did_not_make(tmp_path):
    theirs = tmp_path / "wheels"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("someone else's")
    r = subprocess.run(["bash", "benchmarks/gpu_wheels.sh", str(theirs)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"gpu_wheels: {theirs} exists and was not made by this script; name a new folder"]
    assert (theirs / "keep.txt").read_text() == "someone else's"
