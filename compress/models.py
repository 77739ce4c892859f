"""Loading and saving models and tokenizers, with one-line errors instead of library tracebacks."""

from __future__ import annotations

import os
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


def count_parameters(model: Any) -> int:
    """Real parameter count; transformers' own counter unpacks bitsandbytes 4-bit storage."""
    if getattr(model, "is_quantized", False) and hasattr(model, "num_parameters"):
        return int(model.num_parameters())
    return sum(p.numel() for p in model.parameters())


def check_weights(folder: Path) -> None:
    """Read every safetensors header (cheap) so a corrupt file fails validation, not a stage."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise RecipeError(f"model.path: cannot load a model from {folder}: {f.name} is "
                              f"corrupt ({e})") from None
