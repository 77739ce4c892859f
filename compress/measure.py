"""Measurement primitives: latency percentiles, peak memory, and the environment they ran in."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import threading
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "asimd",
             "sve", "i8mm")
PACKAGES = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime",
            "torch-pruning", "accelerate", "datasets", "prefect", "bitsandbytes")


T = TypeVar("T")
NOISY = 1.2  # rounds whose medians differ by more than this factor: the figure is noisy


class Latency(BaseModel):
    runtime: str  # "torch" or "onnxruntime"
    batch_size: int
    sequence_length: int
    length: str = "max"  # which length: "max" (data.max_length or latency.sequence_length),
    # "median" or "p95" of the eval texts' token counts (dynamic shapes)
    threads: int
    warmup: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    round_p50s_ms: list[float] = []  # the runs in consecutive rounds: each round's median
    noisy: bool = False  # the rounds disagree by more than NOISY: do not trust a ratio of it


def time_calls(fn: Callable[[], Any], *, warmup: int, runs: int) -> list[float]:
    """Milliseconds per call, after `warmup` untimed calls (first calls allocate and JIT)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def round_medians(samples_ms: list[float], rounds: int = 5) -> list[float]:
    """Medians of `rounds` consecutive slices of the runs: a machine that got busy part of the
    way through shows up as rounds that disagree."""
    chunks = [c for c in np.array_split(np.asarray(samples_ms, dtype=np.float64),
                                        min(rounds, len(samples_ms))) if len(c)]
    return [round(float(np.median(c)), 4) for c in chunks]


def spread(values: list[float]) -> float:
    """max / min of positive values (1.0: they agree)."""
    return max(values) / max(min(values), 1e-12) if values else 1.0


def latency_stats(samples_ms: list[float], **info: Any) -> Latency:
    a = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    rounds = round_medians(samples_ms)
    return Latency(p50_ms=round(float(p50), 4), p90_ms=round(float(p90), 4),
                   p99_ms=round(float(p99), 4), mean_ms=round(float(a.mean()), 4),
                   runs=len(samples_ms), round_p50s_ms=rounds,
                   noisy=len(rounds) > 1 and spread(rounds) > NOISY, **info)


def in_turns(calls: dict[str, Callable[[], T]], rounds: int) -> dict[str, list[T]]:
    """Each call once a round, in turns (A, B, then B, A: no fixed first mover), returning
    what each call measured: both see the same machine, so a ratio of them is not a ratio of
    two different moments."""
    out: dict[str, list[T]] = {name: [] for name in calls}
    for r in range(rounds):
        for name in list(calls) if r % 2 == 0 else list(reversed(calls)):
            out[name].append(calls[name]())
    return out


def interleaved(calls: dict[str, Callable[[], Any]], *, rounds: int = 7, runs: int = 10,
                warmup: int = 3, min_round_s: float = 0.2) -> dict[str, list[float]]:
    """Per-round median milliseconds of each call, timed in turns (`in_turns`).

    A round of each call lasts at least `min_round_s` (more runs for a fast call): ten runs of
    a 1.5 ms model are 15 ms, short enough for one hiccup of another process (an embedded
    Prefect server posting logs) to move the round's median, which read 1.4x-8.8x rounds for
    one pair of models on a quiet 2-core machine."""
    n: dict[str, int] = {}
    for name, fn in calls.items():
        for _ in range(max(warmup - 1, 0)):
            fn()
        one = time_calls(fn, warmup=0, runs=1)[0] / 1000
        n[name] = max(runs, math.ceil(min_round_s / max(one, 1e-6)))
    return in_turns({name: (lambda fn=fn, k=n[name]: float(np.median(
        time_calls(fn, warmup=0, runs=k)))) for name, fn in calls.items()}, rounds)


class PeakMemory:
    """Peak RSS over a block, sampled by a thread (ru_maxrss never goes down, so it can't
    attribute a peak to one stage); plus CUDA max-allocated when a GPU is in use."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.start_mb = self.peak_mb = 0.0
        self.cuda_peak_mb: float | None = None
        self._stop = threading.Event()

    @staticmethod
    def _rss_mb() -> float:
        import psutil

        return psutil.Process().memory_info().rss / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, self._rss_mb())

    def __enter__(self) -> PeakMemory:
        self.start_mb = self.peak_mb = self._rss_mb()
        if _cuda():
            import torch

            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss_mb())
        if _cuda():
            import torch

            self.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and val.strip():
                    model = val.strip()
                elif key in ("flags", "Features"):
                    flags = set(val.split())
                if model and flags:
                    break
    except OSError:
        pass
    return {"model": model, "arch": platform.machine(), "logical_cores": os.cpu_count(),
            "flags": [f for f in CPU_FLAGS if f in flags]}


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=os.path.dirname(__file__))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5,
                               cwd=os.path.dirname(__file__)).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "n/a"
    except (OSError, subprocess.SubprocessError):
        return "n/a"


def environment(threads: int) -> dict[str, Any]:
    """Where numbers were measured: they mean little without it."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "cpu": cpu_info(), "threads": threads, "packages": versions,
                           "git_commit": git_commit()}
    if _cuda():
        import torch

        env["gpu"] = torch.cuda.get_device_name(0)
    return env
