"""export: ONNX through optimum's exporter, then a parity check on real eval inputs.

No ONNX file leaves this stage unchecked: the max abs difference of the logits against PyTorch
goes on the report card, and above the tolerance the stage fails (and keeps nothing).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from compress.artifact import ONNX_FILE, ModelRef
from compress.errors import StageError
from compress.recipe import ExportConfig
from compress.stages import StageContext

TASKS = {"sequence-classification": "text-classification"}


def apply(ref: ModelRef, cfg: ExportConfig, ctx: StageContext, out: Path) -> dict[str, Any]:
    from optimum.exporters.onnx import main_export

    from compress.data import encode, loader
    from compress.evaluate import OrtPredictor, TorchPredictor
    from compress.measure import default_threads
    from compress.models import load_classifier, load_tokenizer

    if ref.format != "hf":
        raise StageError("export: the input is already ONNX")
    trc = ctx.recipe.model.trust_remote_code
    log = logging.getLogger("optimum")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            main_export(ref.path, output=out, task=TASKS[ref.task], opset=cfg.opset,
                        do_validation=False, trust_remote_code=trc, library_name="transformers")
    except Exception as e:  # optimum raises many kinds; the card needs the reason in one line
        raise StageError(f"export: optimum could not export {ref.path}: "
                         f"{str(e).strip().splitlines()[0][:300]}") from None
    finally:
        log.setLevel(level)
    if not (out / ONNX_FILE).is_file():
        raise StageError(f"export: optimum wrote no {ONNX_FILE}")

    threads = default_threads()
    tok = load_tokenizer(ref.path, trust_remote_code=trc)
    torch_pred = TorchPredictor(load_classifier(ref.path, ctx.data.num_labels,
                                                trust_remote_code=trc), threads)
    ort_pred = OrtPredictor(str(out / ONNX_FILE), threads)
    n = min(cfg.parity_samples, len(ctx.data.eval))
    enc = encode(ctx.data.eval.select(range(n)), tok, ctx.data.spec.max_length)
    diff, agree = 0.0, 0
    for batch in loader(enc, tok, 16, tensors="np"):
        batch.pop("labels")
        a, b = torch_pred.logits(batch), ort_pred.logits(batch)
        diff = max(diff, float(np.abs(a - b).max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
    if not diff <= cfg.atol:
        raise StageError(f"export: ONNX output differs from PyTorch by {diff:.3g} "
                         f"(atol {cfg.atol:g}) on {n} eval examples")
    return {"onnx_file": ONNX_FILE, "parity": {"max_abs_diff": diff, "atol": cfg.atol,
                                               "samples": n, "argmax_agreement": agree / n}}
