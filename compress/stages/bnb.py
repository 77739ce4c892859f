"""bnb: bitsandbytes 8-bit (LLM.int8) or 4-bit (NF4/FP4) weights, saved with save_pretrained.

The quantization config travels in config.json, so `from_pretrained` on the output loads the
quantized weights as they are. The head (classifier / score / lm_head) always stays in float: it is
small and quantizing it costs the most accuracy. On a machine without CUDA, bitsandbytes' CPU
backend is tried (0.49+ has one for both 8-bit and 4-bit); if it cannot do the job the stage says
so instead of failing deep inside the library.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from compress.arch import HEAD_MODULES
from compress.artifact import WEIGHT_SUFFIXES, ModelRef, dir_bytes
from compress.errors import StageError, first_line
from compress.logs import quiet
from compress.stage import StageConfig, StageContext

MB = 1e6


class BnbConfig(StageConfig):
    """bitsandbytes 8-bit or 4-bit weights for PyTorch GPU targets (saved with save_pretrained)."""

    kind: Literal["bnb"] = "bnb"
    bits: Literal[8, 4] = 8
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit only.")
    double_quant: bool = Field(True, description="4-bit only: quantize the scales too.")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    skip_modules: list[str] = Field(default_factory=list, description="Modules kept in float "
                                    "(the classifier head / lm_head always are).")

    def check(self, recipe: Any, index: int) -> None:
        if index != len(recipe.stages) - 1:
            raise ValueError(f"{self.where(index)}: bitsandbytes weights are a final, GPU-only "
                             "format; bnb must be the last stage")

    def apply(self, ref: ModelRef, ctx: StageContext, out: Path) -> dict[str, Any]:
        return _apply(ref, self, ctx, out)


def quantization_config(cfg: BnbConfig) -> Any:
    """The transformers BitsAndBytesConfig a BnbConfig stands for."""
    import torch
    from transformers import BitsAndBytesConfig

    skip = list(dict.fromkeys([*HEAD_MODULES, *cfg.skip_modules]))
    if cfg.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                              bnb_4bit_use_double_quant=cfg.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, cfg.compute_dtype),
                              llm_int8_skip_modules=skip)


def load_quantized(path: str, task: str, num_labels: int | None, qconfig: Any | None,
                   device_map: Any, dtype: Any, *, trust_remote_code: bool = False) -> Any:
    """from_pretrained with a quantization config (None: the one in config.json).

    Not `compress.models.load_model`: that casts to float32 (`.float()`), which transformers
    refuses for a quantized model.
    """
    import transformers

    auto = transformers.AutoModelForCausalLM if task == "causal-lm" else \
        transformers.AutoModelForSequenceClassification
    kwargs: dict[str, Any] = {"device_map": device_map, "dtype": dtype,
                              "trust_remote_code": trust_remote_code}
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    if num_labels and task != "causal-lm":
        kwargs["num_labels"] = num_labels
    with quiet("transformers"):
        return auto.from_pretrained(path, **kwargs).eval()


def linear_kinds(model: Any) -> dict[str, int]:
    """How many Linear layers are bnb 8-bit, bnb 4-bit, or still float."""
    import bitsandbytes as bnb
    from torch import nn

    out = {"int8": 0, "4bit": 0, "float": 0}
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            out["int8"] += 1
        elif isinstance(m, bnb.nn.Linear4bit):
            out["4bit"] += 1
        elif isinstance(m, nn.Linear):
            out["float"] += 1
    return out


def _sample_logits(model: Any, batch: dict[str, Any]) -> Any:
    import torch

    from compress.models import device_of

    device = device_of(model)
    with torch.inference_mode():
        return model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()


def _apply(ref: ModelRef, cfg: BnbConfig, ctx: StageContext, out: Path) -> dict[str, Any]:
    import torch

    from compress.models import load_tokenizer

    if ref.format != "hf":
        raise StageError("bnb: needs a PyTorch (Hugging Face) model, not ONNX")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise StageError("bnb: bitsandbytes is not installed (pip install bitsandbytes)") from None
    cuda = torch.cuda.is_available()
    device_map = {"": 0} if cuda else {"": "cpu"}
    dtype = getattr(torch, cfg.compute_dtype)
    trc = ctx.recipe.model.trust_remote_code
    num_labels = ctx.data.num_labels or None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        model = load_quantized(ref.path, ref.task, num_labels, quantization_config(cfg),
                               device_map, dtype, trust_remote_code=trc)
    except Exception as e:  # bitsandbytes raises many kinds; the card needs one line
        first = first_line(e)
        if not cuda:
            raise StageError(f"bnb: bitsandbytes {cfg.bits}-bit needs a CUDA GPU (none here) and "
                             f"its CPU backend failed: {first}; run this stage on a GPU "
                             "machine") from None
        raise StageError(f"bnb: bitsandbytes could not quantize {ref.path}: {first}") from None
    kinds = linear_kinds(model)
    if not kinds["int8"] + kinds["4bit"]:
        raise StageError("bnb: no Linear layer was quantized (all skipped?); check skip_modules")
    footprint = int(model.get_memory_footprint())
    cuda_peak = round(torch.cuda.max_memory_allocated() / MB, 1) if cuda else None
    tok = load_tokenizer(ref.path, trust_remote_code=trc)
    texts = [str(t) for t in ctx.data.eval["text"][:4]] or ["a test"]
    enc = tok(texts, padding=True, truncation=True, max_length=ctx.data.spec.max_length,
              return_tensors="pt")
    batch = {k: v for k, v in enc.items() if k in tok.model_input_names}
    before = _sample_logits(model, batch)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    del model
    try:
        again = load_quantized(str(out), ref.task, None, None, device_map, dtype,
                               trust_remote_code=trc)
    except Exception as e:
        raise StageError(f"bnb: the saved {cfg.bits}-bit model does not reload: "
                         f"{first_line(e)}") from None
    if linear_kinds(again) != kinds:
        raise StageError(f"bnb: the saved model reloads with other layer types "
                         f"({linear_kinds(again)} instead of {kinds})")
    diff = float((_sample_logits(again, batch) - before).abs().max())
    input_bytes = dir_bytes(ref.dir, WEIGHT_SUFFIXES)
    info: dict[str, Any] = {
        "bnb": {"bits": cfg.bits, "version": bnb.__version__, "device": "cuda" if cuda else "cpu",
                "compute_dtype": cfg.compute_dtype,
                "skip_modules": quantization_config(cfg).llm_int8_skip_modules,
                **({"quant_type": cfg.quant_type, "double_quant": cfg.double_quant}
                   if cfg.bits == 4 else {})},
        "linear_layers": kinds,
        "footprint_bytes": footprint,
        "input_weights_bytes": input_bytes,
        "footprint_ratio": round(input_bytes / max(footprint, 1), 3),
        "cuda_peak_mb": cuda_peak,
        "reload_max_diff": diff,
    }
    if not cuda:
        info["warnings"] = [f"bnb: quantized on CPU with bitsandbytes {bnb.__version__}'s CPU "
                            "backend; bitsandbytes models are meant for CUDA GPUs, and CPU "
                            "inference with them is slow"]
    return info
