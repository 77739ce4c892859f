"""export: ONNX through optimum's exporter, then a parity check on real eval inputs.

No ONNX file leaves this stage unchecked: the max abs difference of the logits against PyTorch
goes on the report card, and above the tolerance the stage fails (and keeps nothing). A causal LM
is exported with its KV cache (optimum's `text-generation-with-past`: one `model.onnx` whose
`past_key_values.*` inputs may be empty on the first step; `model.onnx_data` beside it when the
weights pass 2 GB) and must also reproduce PyTorch's greedy generations token for token: matching
logits on a prefill says nothing about the cache path that generation runs on.

Causal LMs have a second route, `route: genai`: onnxruntime-genai's model builder writes a graph
made for decoding (GroupQueryAttention and fused norms instead of optimum's op-by-op attention).
optimum's ORTModelForCausalLM runs it unchanged, so the same parity checks and every later stage
apply; on SmolLM2 its fp32 graph, INT4-quantized by the quantize stage, decoded 2.7x faster than
optimum's fp32 graph where optimum's own graph INT4-quantized reached 1.8x (interleaved runs).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from compress.artifact import ONNX_FILE, ModelRef
from compress.errors import StageError, first_line
from compress.logs import quiet
from compress.stage import StageConfig, StageContext

TASKS = {"sequence-classification": "text-classification",
         "causal-lm": "text-generation-with-past"}
GEN_PROMPTS, GEN_PROMPT_TOKENS, GEN_NEW_TOKENS = 3, 8, 8
# Files the tokenizer and generation need next to the ONNX model (optimum normally copies them).
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
              "tokenizer.model", "added_tokens.json", "chat_template.jinja")


class ExportConfig(StageConfig):
    """ONNX export through optimum, checked against PyTorch on real eval inputs."""

    kind: Literal["export"] = "export"
    opset: int | None = Field(None, ge=11)
    atol: float = Field(1e-4, gt=0, description="Max abs difference of logits vs PyTorch.")
    parity_samples: int = Field(32, ge=1)
    route: Literal["optimum", "genai"] = Field(
        "optimum", description="Causal LMs: optimum's exporter, or onnxruntime-genai's model "
        "builder (a graph made for decoding: fused attention; Llama-family models).")

    output_format: ClassVar[str] = "onnx"

    def check(self, recipe: Any, index: int) -> None:
        earlier = [i for i, s in enumerate(recipe.stages[:index]) if s.kind == self.kind]
        if earlier:
            raise ValueError(f"{self.where(index)}: the model is already exported at "
                             f"stages[{earlier[0]}]")
        if self.route == "genai" and recipe.model.task != "causal-lm":
            raise ValueError(f"{self.where(index)}.route: genai builds causal LMs; classifiers "
                             "export with optimum")

    def notes(self, info: dict[str, Any]) -> list[str]:
        return ["built by onnxruntime-genai's model builder (fused decoding graph), checked "
                "against PyTorch like any export"] if self.route == "genai" else []

    def apply(self, ref: ModelRef, ctx: StageContext, out: Path) -> dict[str, Any]:
        if ref.format != "hf":
            raise StageError("export: the input is already ONNX")
        if ref.task not in TASKS:
            raise StageError(f"export: no ONNX export for task {ref.task!r}")
        trc = ctx.recipe.model.trust_remote_code
        if self.route == "genai":
            _build_genai(ref, out)
        else:
            _export(ref, TASKS[ref.task], self, out, trc)
        if ref.task == "causal-lm":
            return _check_causal_lm(ref, self, ctx, out, trc)
        return _check_classifier(ref, self, ctx, out, trc)


def greedy(model: Any, prompts: list[list[int]], pad_id: int | None,
           new_tokens: int = GEN_NEW_TOKENS) -> list[list[int]]:
    """Greedy continuations (new tokens only), one prompt at a time so no padding is involved;
    EOS is held off until `new_tokens` (min_new_tokens) so every cache step gets compared."""
    import torch

    out = []
    for p in prompts:
        ids = torch.tensor([p], dtype=torch.long)
        with torch.inference_mode(), quiet(stdout=True):
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, num_beams=1, pad_token_id=pad_id)
        out.append([int(t) for t in gen[0, len(p):]])
    return out


def _build_genai(ref: ModelRef, out: Path) -> None:
    """onnxruntime-genai's builder, fp32 (the quantize stage does INT4, with its options)."""
    import subprocess
    import sys
    import tempfile

    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        raise StageError("export.route: genai needs onnxruntime-genai (pip install "
                         "onnxruntime-genai==0.15.2)") from None
    with tempfile.TemporaryDirectory(prefix="genai-cache-") as cache:
        r = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i",
                            str(ref.dir), "-o", str(out), "-p", "fp32", "-e", "cpu", "-c",
                            cache], capture_output=True, text=True)
    if r.returncode != 0 or not (out / ONNX_FILE).is_file():
        why = next((ln for ln in reversed(r.stderr.splitlines()) if ln.strip()), "no output")
        raise StageError(f"export: onnxruntime-genai's builder could not build {ref.path}: "
                         f"{why[:300]}")
    for name in ("config.json", "generation_config.json"):  # what optimum's loader reads
        if (ref.dir / name).is_file():
            shutil.copy2(ref.dir / name, out / name)


def _export(ref: ModelRef, task: str, cfg: ExportConfig, out: Path, trc: bool) -> None:
    from optimum.exporters.onnx import main_export

    try:
        with quiet(stdout=True):
            main_export(ref.path, output=out, task=task, opset=cfg.opset, do_validation=False,
                        trust_remote_code=trc, library_name="transformers")
    except Exception as e:  # optimum raises many kinds; the card needs the reason in one line
        raise StageError(f"export: optimum could not export {ref.path}: "
                         f"{first_line(e)}") from None
    if not (out / ONNX_FILE).is_file():
        raise StageError(f"export: optimum wrote no {ONNX_FILE}")


def _check_classifier(ref: ModelRef, cfg: ExportConfig, ctx: StageContext, out: Path,
                      trc: bool) -> dict[str, Any]:
    from compress.evaluate import OrtPredictor, TorchPredictor, logit_parity
    from compress.measure import default_threads
    from compress.models import load_model, load_tokenizer

    threads = default_threads()
    tok = load_tokenizer(ref.path, trust_remote_code=trc)
    torch_pred = TorchPredictor(load_model(ref.path, ref.task, ctx.data.num_labels,
                                           trust_remote_code=trc), threads)
    p = logit_parity(torch_pred, OrtPredictor(str(out / ONNX_FILE), threads), ctx.data, tok,
                     cfg.parity_samples)
    if not p["max_abs_diff"] <= cfg.atol:
        raise StageError(f"export: ONNX output differs from PyTorch by {p['max_abs_diff']:.3g} "
                         f"(atol {cfg.atol:g}) on {p['samples']} eval examples")
    return {"onnx_file": ONNX_FILE, "parity": {**p, "atol": cfg.atol}}


def _ensure_side_files(src: Path, out: Path, tok: Any) -> None:
    """Tokenizer, config and generation config next to the ONNX file (generate needs them);
    the tokenizer is saved afresh when the source (a hub id) has no such files here."""
    for name in SIDE_FILES:
        if (src / name).is_file() and not (out / name).exists():
            shutil.copy2(src / name, out / name)
    if not (out / "tokenizer_config.json").is_file():
        tok.save_pretrained(out)


def _check_causal_lm(ref: ModelRef, cfg: ExportConfig, ctx: StageContext, out: Path,
                     trc: bool) -> dict[str, Any]:
    import numpy as np
    import torch

    from compress.data import encode, loader
    from compress.evaluate import ort_causal_lm
    from compress.measure import default_threads
    from compress.models import load_model, load_tokenizer

    threads = default_threads()
    torch.set_num_threads(threads)
    tok = load_tokenizer(ref.path, trust_remote_code=trc)
    _ensure_side_files(ref.dir, out, tok)
    pt = load_model(ref.path, "causal-lm", trust_remote_code=trc)
    onnx_lm = ort_causal_lm(out, ONNX_FILE, threads)

    enc = encode(ctx.data.eval, tok, ctx.data.spec.max_length)
    n = min(cfg.parity_samples, len(enc))
    enc = enc.select(range(n))
    diff, agree, tokens = 0.0, 0, 0
    for batch in loader(enc, tok, 8):
        feed = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.inference_mode():
            a = pt(**feed).logits.float().numpy()
            b = onnx_lm(**feed, use_cache=False).logits
        b = b.float().numpy() if hasattr(b, "numpy") else np.asarray(b)
        real = feed["attention_mask"].numpy().astype(bool)
        diff = max(diff, float(np.abs(a - b)[real].max()))
        agree += int((a.argmax(-1) == b.argmax(-1))[real].sum())
        tokens += int(real.sum())
    if not diff <= cfg.atol:
        raise StageError(f"export: ONNX output differs from PyTorch by {diff:.3g} "
                         f"(atol {cfg.atol:g}) on {n} eval blocks")

    k = min(GEN_PROMPT_TOKENS, max(1, len(enc[0]["input_ids"]) // 2))
    prompts = [list(enc[i]["input_ids"][:k]) for i in range(min(GEN_PROMPTS, n))]
    want = greedy(pt, prompts, tok.pad_token_id)
    got = greedy(onnx_lm, prompts, tok.pad_token_id)
    for i, (a_ids, b_ids) in enumerate(zip(want, got, strict=True)):
        if a_ids != b_ids:
            raise StageError(
                f"export: greedy generation differs from PyTorch on prompt {i + 1} of "
                f"{len(prompts)}: PyTorch {a_ids} vs ONNX {b_ids} (logits max abs diff "
                f"{diff:.3g}); the exported KV-cache path does not match the model")
    return {"onnx_file": ONNX_FILE,
            "parity": {"max_abs_diff": diff, "atol": cfg.atol, "samples": n,
                       "argmax_agreement": agree / max(tokens, 1),
                       "generation": {"prompts": prompts, "max_new_tokens": GEN_NEW_TOKENS,
                                      "torch": want, "onnx": got, "match": True}},
            "use_cache": True,
            "onnx_files": sorted(p.name for p in out.iterdir() if ".onnx" in p.name)}
