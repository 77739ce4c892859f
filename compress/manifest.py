"""Manifests: what a finished folder holds (names, sizes, sha256), written last, checked before
anything in it is trusted again.

Nightly runs reuse what earlier runs made and publish what they reuse, so a file truncated by a
full disk, overwritten by a stray process or half-copied by hand must never be taken as done.
Every folder this tool finishes (stage outputs, teacher caches, checkpoints, `latest/`) gets a
`manifest.json` as its last file, inside the staging folder, so it is renamed into place with
the files it describes. `verify` compares the folder with it: sizes always (cheap, catches
truncation), sha256 when asked (before a stage output is reused, always before publishing).

A folder that fails is never deleted and never used: `quarantine` moves it aside, under the
root's `quarantine/` folder with a timestamp, and the caller rebuilds it and says so on the card.
Single JSON files (metric caches) carry their digest inside them instead (`seal` / `unseal`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from compress.atomic import OWNER_FILE, atomic_write_json, fsync_path, staged_dir

MANIFEST_FILE = "manifest.json"
FORMAT = 1
QUARANTINE = "quarantine"
_IGNORED = {MANIFEST_FILE, OWNER_FILE}


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() not in _IGNORED)


def write_manifest(folder: Path) -> dict[str, Any]:
    """Describe every file under `folder` (written last: the folder is complete)."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size,
                                                 "sha256": file_digest(p)}
             for p in _files(folder)}
    manifest = {"format": FORMAT, "files": files,
                "written_at": datetime.now(UTC).isoformat(timespec="seconds")}
    atomic_write_json(folder / MANIFEST_FILE, manifest)
    return manifest


@contextlib.contextmanager
def finished_dir(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """compress.atomic's staged_dir, with the manifest written last inside the staging folder:
    every folder this tool finishes goes through here."""
    with staged_dir(final, replace=replace, before_rename=write_manifest) as tmp:
        yield tmp


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        m = json.loads((Path(folder) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or not isinstance(m.get("files"), dict):
        return None
    return m


def verify(folder: Path, *, digests: bool = True) -> list[str]:
    """What is wrong with a finished folder (empty: it is what its manifest says)."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is missing"]
    m = read_manifest(folder)
    if m is None:
        return [f"{folder.name}: no readable {MANIFEST_FILE} (unfinished, damaged, or made "
                "before outputs were verified)"]
    problems = []
    listed = m["files"]
    for name, want in listed.items():
        p = folder / name
        if not p.is_file():
            problems.append(f"{name}: missing")
            continue
        size = p.stat().st_size
        if size != want.get("size"):
            problems.append(f"{name}: {size} bytes, expected {want.get('size')}")
        elif digests and file_digest(p) != want.get("sha256"):
            problems.append(f"{name}: content differs from its recorded sha256")
    extra = [p.relative_to(folder).as_posix() for p in _files(folder)
             if p.relative_to(folder).as_posix() not in listed]
    problems += [f"{name}: not in the manifest" for name in extra]
    return problems


def quarantine(path: Path, root: Path) -> Path:
    """Move a damaged folder or file aside (never delete it): root/quarantine/<name>-<time>."""
    path, dest_root = Path(path), Path(root) / QUARANTINE
    dest_root.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    name = f"{path.stem}-{stamp}{path.suffix}" if path.is_file() else f"{path.name}-{stamp}"
    dest = dest_root / name
    os.rename(path, dest)
    fsync_path(dest_root)
    return dest


def check(folder: Path, root: Path, *, digests: bool = True, what: str = "output"
          ) -> str | None:
    """Verify a finished folder; if it fails, quarantine it and return the warning for the card
    (None: it verifies, or there is nothing there)."""
    folder = Path(folder)
    if not folder.exists():
        return None
    problems = verify(folder, digests=digests)
    if not problems:
        return None
    moved = quarantine(folder, root)
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return (f"{what} {folder.name} failed verification ({problems[0]}{more}): moved to "
            f"{moved} and rebuilt")


# ----------------------------------------------------------------------------- single files


def seal(payload: Any) -> str:
    """JSON text that carries the sha256 of its own payload."""
    body = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return json.dumps({"sha256": hashlib.sha256(body.encode()).hexdigest(), "payload": payload},
                      indent=1, default=str)


def unseal(text: str) -> Any | None:
    """The payload of a sealed file, or None if it is damaged (not JSON, wrong digest)."""
    try:
        doc = json.loads(text)
        payload = doc["payload"]
        body = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
        ok = hashlib.sha256(body.encode()).hexdigest() == doc["sha256"]
    except (ValueError, KeyError, TypeError):
        return None
    return payload if ok else None
