"""Atomic file writes: a temporary file beside the target, renamed over it when complete.

A process killed mid-write leaves the previous file (or none), never a half-written one.
"""

from __future__ import annotations

import errno
import glob
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


TEMPORARY_SUFFIX = ".tmp"
# What a full, read-only or failing disk (or a file-size limit) raises: the user's to fix, not a bug.
DISK_ERRORS = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EFBIG", "EIO")
                        if hasattr(errno, name))


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], fsync: bool = False) -> Path:
    """Call ``write(f)`` on a temporary binary file, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=TEMPORARY_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(targets: list[str | Path]) -> list[Path]:
    """Delete the temporaries a killed ``atomic_write`` left beside ``targets``; returns them.

    Call it only where one process owns the files (a training run in its run folder): a
    temporary of a writer still running would be taken from under it.
    """
    removed = []
    for target in map(Path, targets):
        if not target.parent.is_dir():
            continue
        for tmp in target.parent.glob(f"{glob.escape(_temporary_prefix(target))}*{TEMPORARY_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
