"""Model references and lineage: models move between stages as directories, never as modules.

An output's id is hash(parent id, stage kind, stage config, data fingerprint) (the rule itself is
`StageConfig.output_id`): it names the output folder, so a re-run finds what is already done and
skips it. A folder only appears under its final name once complete (compress.atomic).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from compress.atomic import atomic_write_text
from compress.errors import RecipeError

LINEAGE_FILE = "lineage.json"
INFO_FILE = "stage_info.json"  # what a stage reports about its output (for its card)
ONNX_FILE = "model.onnx"


class ModelRef(BaseModel):
    """A saved model: a folder plus what produced it. Small, hashable, safe to pass to tasks."""

    model_config = ConfigDict(frozen=True)

    path: str
    format: Literal["hf", "onnx"]
    task: str
    hash: str
    stage: str  # "source" for the model a recipe starts from
    parent: str | None = None  # parent hash
    config: dict[str, Any] = {}
    onnx_file: str | None = None  # file name inside path, for format "onnx"

    @property
    def dir(self) -> Path:
        return Path(self.path)

    @property
    def onnx_path(self) -> Path:
        if self.onnx_file is None:
            raise ValueError(f"{self.path} is not an ONNX model")
        return self.dir / self.onnx_file

    @property
    def short(self) -> str:
        return self.hash[:12]


def canonical_hash(*parts: Any) -> str:
    """sha256 of canonical JSON: the same config always hashes the same, whatever key order."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def files_hash(paths: list[Path], root: Path) -> str:
    """Content hash of files (names relative to root): a moved or copied model keeps its id."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.relative_to(root)).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def dir_bytes(path: Path, suffixes: tuple[str, ...] | None = None) -> int:
    """Bytes on disk of a folder's files (only those with the given suffixes, when set)."""
    total = 0
    for p in Path(path).rglob("*"):
        if p.is_file() and (suffixes is None or p.name.endswith(suffixes)):
            total += p.stat().st_size
    return total


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".onnx_data", ".onnx.data", ".gguf", ".pt")


def source_ref(path: str, task: str, revision: str | None = None) -> ModelRef:
    """The recipe's starting model: a local folder (hashed by content) or a hub id."""
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise RecipeError(f"model.path: {p} is not a model folder (no config.json)")
        files = [f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")]
        onnx = sorted(f.name for f in p.glob("*.onnx"))
        return ModelRef(
            path=str(p.resolve()),
            format="onnx" if onnx and not any(f.suffix == ".safetensors" for f in files) else "hf",
            task=task,
            hash=files_hash(files, p),
            stage="source",
            onnx_file=onnx[0] if onnx else None,
        )
    return ModelRef(
        path=path, format="hf", task=task, hash=canonical_hash("hub", path, revision or "main"),
        stage="source",
    )


def read_ref(folder: Path) -> ModelRef | None:
    """The reference stored in a finished output folder, or None if it is not (yet) one."""
    f = Path(folder) / LINEAGE_FILE
    if not f.is_file():
        return None
    try:
        return ModelRef.model_validate_json(f.read_text())
    except ValueError:
        return None


# What a stage writes about its output, and what compress.manifest writes: never copied along.
OWN_FILES = (LINEAGE_FILE, INFO_FILE, "manifest.json")


def copy_side_files(ref: ModelRef, out: Path) -> None:
    """Tokenizer, config and session settings travel with an ONNX model to the next stage's
    folder; the input's ONNX weights and this tool's own records do not."""
    import shutil

    onnx_names = {p.name for p in ref.dir.glob("*.onnx")}
    for f in ref.dir.iterdir():
        weights = f.suffix == ".onnx" or any(f.name.startswith(o) for o in onnx_names)
        if f.is_file() and not weights and f.name not in OWN_FILES \
                and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)


def write_ref(folder: Path, ref: ModelRef) -> None:
    atomic_write_text(Path(folder) / LINEAGE_FILE, ref.model_dump_json(indent=2))
