"""Atomic file writes: a crash never leaves a half-written file under the final name.

Each write goes to a temporary file in the same directory, is flushed to disk, then renamed over
the target with ``os.replace`` (atomic on POSIX and Windows).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path


TEMP_SUFFIX = ".tmp"
# what atomic_path names its temporary files: "." + target name + "." + mkstemp's 8 characters
TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}" + re.escape(TEMP_SUFFIX) + "$")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates the file 0600, and a writer may replace it by a file of its own
        # (safetensors does): give the result the permissions a plain open() would (0666 -
        # umask) once written, so every run file and report is readable alike.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def stale_temps(folder: str | os.PathLike) -> list[Path]:
    """The temporary files :func:`atomic_path` left in ``folder`` (not its subfolders) when its
    process was killed mid-write. Only the folder's one writer may remove them (a live writer's
    file looks the same)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if TEMP_NAME.match(p.name) and p.is_file())


def check_writable(folder: str | os.PathLike) -> None:
    """Raise the ``OSError`` a write into ``folder`` would meet (read-only, no space for a new
    file, not a folder), by creating and removing one empty temporary file there."""
    fd, tmp = tempfile.mkstemp(prefix=".write-check.", suffix=TEMP_SUFFIX, dir=folder)
    os.close(fd)
    os.remove(tmp)


def sha256_file(path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (what ``sha256sum`` prints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
