"""quantize: ONNX Runtime dynamic INT8 through optimum's ORTQuantizer and a target preset.

The preset (avx2, avx512, avx512_vnni, arm64) picks the operators and int formats the target's
kernels are fast at; the quantization config travels with the model (ort_config.json).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from pathlib import Path
from typing import Any

from compress.artifact import LINEAGE_FILE, ModelRef
from compress.errors import StageError
from compress.recipe import QuantizeConfig
from compress.stages import StageContext


def apply(ref: ModelRef, cfg: QuantizeConfig, ctx: StageContext, out: Path) -> dict[str, Any]:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    if ref.format != "onnx":
        raise StageError("quantize: needs an ONNX model; add an export stage before it")
    preset = getattr(AutoQuantizationConfig, cfg.target)
    qconfig = preset(is_static=False, per_channel=cfg.per_channel)
    logging.getLogger("optimum").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quantizer = ORTQuantizer.from_pretrained(ref.dir, file_name=ref.onnx_file)
            written = Path(quantizer.quantize(qconfig, save_dir=out, file_suffix="int8"))
    except Exception as e:
        raise StageError(f"quantize: ONNX Runtime could not quantize {ref.onnx_path}: "
                         f"{str(e).strip().splitlines()[0][:300]}") from None
    onnx_files = sorted(p.name for p in out.glob("*.onnx"))
    if not onnx_files:
        raise StageError("quantize: the quantizer wrote no ONNX file")
    # Tokenizer and config travel with the model.
    for f in ref.dir.iterdir():
        if f.is_file() and f.suffix != ".onnx" and f.name != LINEAGE_FILE \
                and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
    return {"onnx_file": written.name if written.suffix == ".onnx" else onnx_files[0],
            "quantization": {"method": cfg.method, "target": cfg.target,
                             "per_channel": cfg.per_channel, "weights": "int8",
                             "activations": "int8 (dynamic, per batch)"}}
