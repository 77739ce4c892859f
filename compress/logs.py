"""One way to quiet the libraries we call, restoring exactly what it changed.

transformers, optimum, onnxruntime's quantizer and datasets log and print a lot that the report
card explains better ("weights newly initialized", "consider pre-processing", progress bars).
Each call site used to silence them its own way, and one never restored the level it changed;
`quiet` is the one context manager for all of them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator

LIBRARIES = ("transformers", "optimum", "onnxruntime", "datasets")


@contextlib.contextmanager
def quiet(*loggers: str, root: bool = False, stdout: bool = False, stderr: bool = False,
          progress_bars: bool = False, level: int = logging.ERROR) -> Iterator[None]:
    """Raise these loggers (default: LIBRARIES; `root` for the root logger) to `level`, ignore
    warnings, and optionally swallow stdout/stderr and datasets' progress bars; every change is
    undone on exit, even when the block raises."""
    names = list(loggers or LIBRARIES) + ([""] if root else [])
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    bars = _datasets_bars() if progress_bars else None
    with contextlib.ExitStack() as stack:
        for log, _ in saved:
            log.setLevel(level)
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        if stdout:
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        if stderr:
            stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
        if bars is not None:
            bars(False)
        try:
            yield
        finally:
            for log, old in saved:
                log.setLevel(old)
            if bars is not None:
                bars(True)


def _datasets_bars():  # noqa: ANN202 - a setter, or None when datasets is not installed
    """A function that turns datasets' progress bars off (False) and back to what they were."""
    try:
        from datasets.utils import logging as ds_logging
    except ImportError:
        return None
    was_enabled = ds_logging.is_progress_bar_enabled()

    def set_(on: bool) -> None:
        if on and was_enabled:
            ds_logging.enable_progress_bar()
        elif not on:
            ds_logging.disable_progress_bar()

    return set_
