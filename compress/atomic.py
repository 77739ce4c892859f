"""Atomic files and folders: the one write/swap mechanism behind stage outputs, checkpoints,
teacher caches, metric caches and `latest/`.

Readers must never see half of anything: a file is written to a temp file beside it, fsynced and
renamed; a folder is built in a temp folder beside its final name, fsynced and renamed; an
existing folder is replaced by a swap that keeps the old one until the new one is in place.

Every temp folder carries an owner record (tool, host, pid and the pid's start time). Cleanup
removes only folders that carry our record and whose owner process is gone, whatever their age:
a live run's staging folder is never touched, and nothing else in a folder we write into (a
user's home, a shared mount) ever is.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"  # a folder being built
OLD_PREFIX = ".old-"  # a folder displaced by a swap, until the new one is in place
OWNER_FILE = ".compress-owner.json"
TOOL = "compress"


# ----------------------------------------------------------------------------- files


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list is what makes a rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders; the data is still written
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------- ownership


def _pid_started(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - gone, or not ours to inspect
        return None


def owner_record() -> dict[str, Any]:
    """Who is building a folder: enough to tell later whether that process is still alive
    (a pid alone can be recycled; the pid's start time cannot)."""
    pid = os.getpid()
    return {"tool": TOOL, "host": socket.gethostname(), "pid": pid,
            "pid_started": _pid_started(pid)}


def write_owner(folder: Path) -> None:
    atomic_write_json(Path(folder) / OWNER_FILE, owner_record())


def read_owner(folder: Path) -> dict[str, Any] | None:
    try:
        rec = json.loads((Path(folder) / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("tool") == TOOL else None


def owner_alive(rec: dict[str, Any]) -> bool:
    """True unless we can be sure: same host, and the pid is gone or is another process now.
    A folder owned on another host is presumed alive (we cannot see its processes)."""
    if rec.get("host") != socket.gethostname():
        return True
    started = _pid_started(int(rec.get("pid", -1)))
    if started is None:
        return False
    want = rec.get("pid_started")
    return want is None or abs(started - float(want)) < 1.0


def remove_orphans(root: Path) -> list[Path]:
    """Remove our temp and displaced folders under `root` whose owner is gone; returns them.
    Folders without our owner record are never touched, however old."""
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for p in sorted([*root.glob(f"{TMP_PREFIX}*"), *root.glob(f"{OLD_PREFIX}*")]):
        rec = read_owner(p) if p.is_dir() else None
        if rec is not None and not owner_alive(rec):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# ----------------------------------------------------------------------------- folders


def fsync_tree(folder: Path) -> None:
    for dirpath, _, files in os.walk(folder):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def _restore_displaced(final: Path) -> None:
    """A swap killed between its two renames leaves `final` absent and the old copy aside:
    put it back, so the last good folder is never lost."""
    if final.exists():
        return
    for old in sorted(final.parent.glob(f"{OLD_PREFIX}{final.name}-*")):
        with contextlib.suppress(OSError):
            (old / OWNER_FILE).unlink(missing_ok=True)
            os.rename(old, final)
            return


def swap_in(new: Path, final: Path) -> None:
    """Replace the folder `final` by `new`: the old one is renamed aside (owned by us, so a
    crash leaves it recoverable), the new one renamed in, then the old one removed."""
    final = Path(final)
    old = None
    if final.exists():
        old = final.with_name(f"{OLD_PREFIX}{final.name}-{secrets.token_hex(4)}")
        os.rename(final, old)
        with contextlib.suppress(OSError):
            write_owner(old)
    try:
        os.rename(new, final)
    except BaseException:
        if old is not None and not final.exists():
            os.rename(old, final)
        raise
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(final: Path, *, replace: bool = False,
               before_rename: Callable[[Path], object] | None = None) -> Iterator[Path]:
    """A temp folder beside `final`, moved to `final` only if the block succeeds.

    replace=False: if `final` appeared meanwhile (a concurrent run finished the same work),
    theirs is kept and ours dropped. replace=True: `final` is swapped for ours (see swap_in).
    `before_rename(tmp)` runs last, inside the temp folder (compress.manifest writes the
    manifest there, so the manifest arrives with the files it describes). A crash or kill leaves
    at most an owned temp folder, removed by a later `remove_orphans`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if replace:
        _restore_displaced(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{TMP_PREFIX}{final.name}-"))
    try:
        write_owner(tmp)
        yield tmp
        (tmp / OWNER_FILE).unlink(missing_ok=True)
        if before_rename is not None:
            before_rename(tmp)
        fsync_tree(tmp)
        if replace:
            swap_in(tmp, final)
        else:
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # a concurrent run made it first
            fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
