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
