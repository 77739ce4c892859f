"""Loading and saving models and tokenizers, with one-line errors instead of library tracebacks."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from compress.errors import RecipeError, first_line
from compress.logs import quiet


def _explain(path: str, e: Exception) -> RecipeError:
    first = first_line(e, 240)
    if not Path(path).exists():
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            return RecipeError(f"model.path: {path!r} is not a local folder and not in the hub "
                               "cache (HF_HUB_OFFLINE=1): download it first or give a folder")
        return RecipeError(f"model.path: cannot load hub model {path!r}: {first}")
    return RecipeError(f"model.path: cannot load a model from {path}: {first}")


AUTO_CLASSES = {"sequence-classification": "AutoModelForSequenceClassification",
                "causal-lm": "AutoModelForCausalLM"}


def load_model(path: str, task: str, num_labels: int | None = None, *,
               trust_remote_code: bool = False, revision: str | None = None,
               **extra: Any) -> Any:
    """The model class a task needs, in float32 eval mode unless a dtype or quantization was
    asked for: a classifier (with a fresh head when the checkpoint has none: `num_labels`), or
    a causal LM (`num_labels` ignored)."""
    import transformers

    auto = getattr(transformers, AUTO_CLASSES[task])
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, **extra}
    if num_labels and task != "causal-lm":
        kwargs["num_labels"] = num_labels
    if revision:
        kwargs["revision"] = revision
    from safetensors import SafetensorError

    try:
        with quiet("transformers"):
            model = auto.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise _explain(path, e) from None
    if "dtype" in kwargs or getattr(model, "is_quantized", False):
        return model.eval()  # asked for this precision (bitsandbytes weights cannot be cast)
    return model.float().eval()


def load_tokenizer(path: str, *, trust_remote_code: bool = False,
                   revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    try:
        with quiet("transformers"):
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                revision=revision)
    except (OSError, ValueError, KeyError) as e:
        raise _explain(path, e) from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def is_main_process() -> bool:
    """False on the other ranks of an `accelerate launch`/torchrun job: they never write."""
    return int(os.environ.get("RANK", "0")) == 0


def is_distributed() -> bool:
    """Started by torchrun/`accelerate launch` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def wait_for_everyone() -> None:
    """A barrier across the ranks of a distributed launch; nothing in a single process."""
    if is_distributed():
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


def save_hf(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """save_pretrained in safetensors; the config carries every size a reload needs."""
    if not is_main_process():
        return
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def device_of(model: Any) -> Any:
    """The torch device a model's inputs must be on: `.device` (HF and optimum's ORT models
    have one), else its first parameter's, else the CPU. Inputs built on the CPU and fed to a
    model on a GPU fail in the first embedding lookup, so every generate/forward we call moves
    its tensors here first."""
    import torch

    d = getattr(model, "device", None)
    if isinstance(d, torch.device):
        return d
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def placed_as_loaded(model: Any) -> bool:
    """True for models whose weights bitsandbytes (or a device map) placed: `.to()` refuses
    them (`.to` is not supported for 8-bit models) and they already sit where they run."""
    return bool(getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(model, "is_loaded_in_4bit", False)
                or len(getattr(model, "hf_device_map", None) or {}) > 1)


@contextmanager
def on_accelerator(model: Any) -> Iterator[Any]:
    """The model on the GPU for a one-off inference job (the teacher's top-k cache, its
    generations), back on its own device after, so it does not hold GPU memory while the
    student trains. A no-op without CUDA or for models bitsandbytes placed."""
    import torch

    if not torch.cuda.is_available() or placed_as_loaded(model):
        yield model
        return
    home = device_of(model)
    try:
        yield model.to("cuda")
    finally:
        model.to(home)


def count_parameters(model: Any) -> int:
    """Real parameter count; transformers' own counter unpacks bitsandbytes 4-bit storage."""
    if getattr(model, "is_quantized", False) and hasattr(model, "num_parameters"):
        return int(model.num_parameters())
    return sum(p.numel() for p in model.parameters())


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.onnx", "*.pt")


def check_model_folder(path: Path) -> dict[str, Any]:
    """What validation can know about a model folder without loading it: a readable
    config.json (returned, for the stages' architecture checks), weights present, and every
    safetensors file whole (its header parses and its data fills the file). Each problem is one
    RecipeError line, before any work."""
    p = Path(path)
    if p.is_file():
        if p.suffix == ".gguf":
            raise RecipeError(f"model.path: {p} is a GGUF file; convert it to a save_pretrained "
                              "folder first (compress.assets.convert_gguf does it for you)")
        raise RecipeError(f"model.path: {p} is a file; point at a model folder "
                          "(save_pretrained layout)")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise RecipeError(f"model.path: {p} is not a model folder (no config.json)")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise RecipeError(f"model.path: {cfg_file} is not valid JSON "
                          f"({first_line(e, 120)})") from None
    if not isinstance(config, dict):
        raise RecipeError(f"model.path: {cfg_file} is not a JSON object")
    weights = [f for pattern in WEIGHT_FILES for f in p.glob(pattern)]
    if not weights:
        raise RecipeError(f"model.path: {p} has a config.json but no weights "
                          "(*.safetensors, *.bin or *.onnx)")
    check_weights(p)
    return config


def check_weights(folder: Path) -> None:
    """Read every safetensors header (cheap) and compare the data it declares with the file's
    size, so a corrupt or truncated file fails validation, not a stage."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
            end = _safetensors_end(f)
        except (SafetensorError, OSError, ValueError) as e:
            raise RecipeError(f"model.path: cannot load a model from {folder}: {f.name} is "
                              f"corrupt ({first_line(e, 160)})") from None
        if end is not None and end != f.stat().st_size:
            raise RecipeError(f"model.path: cannot load a model from {folder}: {f.name} is "
                              f"truncated or padded ({f.stat().st_size} bytes, its header "
                              f"says {end})")


def _safetensors_end(f: Path) -> int | None:
    """The byte where a safetensors file's declared data ends (8-byte header length, JSON
    header, then the tensors' data_offsets)."""
    import struct

    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)
