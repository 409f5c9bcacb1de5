"""The model folder: its one layout, how every writer updates it and how every reader opens it.

::

    model/
      MODEL.json           the pointer, replaced atomically: {"layout": "aae-model-folder",
                           "layout_version": 1, "current": "versions/0003-1b06ce759486"}
      versions/
        0002-1b06ce759486/ the previous model, kept for readers that opened it before the switch
        0003-1b06ce759486/ the current one: encoder.onnx, decoder.onnx, scorer.onnx and metadata.json
      .lock                writers hold it (an exclusive ``flock``); readers never touch it
      .staging-XXXX/       a version being written; one left by a writer that died is removed
                           by the next writer

**Readers** (`current_version`) read ``MODEL.json`` once and open the graphs of the version it
names; they never write (a device may mount the folder read-only). **Writers** (`write_version`:
aae-export, aae-run calibrate, the server's reload) take the lock, write the new version's files
into a staging folder, flush them to disk, rename the folder into ``versions/`` and then replace
``MODEL.json`` in one atomic rename; only then are the versions but the new one and the one
current before it removed. So a reader sees the old model or the new, never a mix; two writers
are serialised by the lock; a writer killed at any instant leaves ``MODEL.json`` naming a
complete version, and what it left (its staging folder, the pointer's temporary, a version
renamed into ``versions/`` that the pointer never named) is removed by the next writer. A
writer refuses a folder inside another's ``versions/``: a version looks like a folder of the
layout before versions, and converting it would delete its graphs.

A folder without ``MODEL.json`` holds its graphs at the top level (exported before this layout):
it loads as before, and its first update writes the versioned layout and removes the top-level
graphs after the pointer names the new version.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from aae_runtime.contract.errors import ModelError
from aae_runtime.contract.fileio import DISK_ERRORS, atomic_write, remove_stale_temporaries

POINTER = "MODEL.json"
VERSIONS = "versions"
LOCK = ".lock"
STAGING_PREFIX = ".staging-"
LAYOUT, LAYOUT_VERSION = "aae-model-folder", 1
MAX_POINTER_BYTES = 4096
_NO_LOCKS = {getattr(errno, name) for name in ("ENOLCK", "ENOSYS", "EOPNOTSUPP", "ENOTSUP", "EINVAL") if hasattr(errno, name)}
LOCK_TIMEOUT_S = 120.0  # a writer waits this long for another one to finish, then fails cleanly
WAIT_NOTICE_S = 1.0  # a writer blocked this long says that it waits (writer_lock's ``waiting``)
GRAPH_NAMES = ("encoder.onnx", "decoder.onnx", "scorer.onnx")  # the graphs a version may hold
METADATA_JSON = "metadata.json"  # the graphs' metadata as a file too, for clients that cannot read it from a graph
_VERSION_NAME = re.compile(r"^(\d{4,})-[0-9A-Za-z]{1,32}$")


def current_version(model_dir: str | Path) -> Path:
    """The folder holding the current graph files of ``model_dir``: the version ``MODEL.json``
    names, or ``model_dir`` itself for a folder of the layout before versions. Raises
    ModelError when the pointer is damaged or names a version that is not there."""
    model_dir = Path(model_dir)
    pointer = model_dir / POINTER
    try:
        with open(pointer, "rb") as f:
            raw = f.read(MAX_POINTER_BYTES + 1)
    except FileNotFoundError:
        return model_dir
    except IsADirectoryError:
        raise ModelError(f"{pointer} is damaged (a folder, not the pointer file): export the model again") from None
    except OSError as exc:
        raise ModelError(f"cannot read {pointer} ({exc.strerror or exc}): check the folder's permissions") from None
    try:
        if len(raw) > MAX_POINTER_BYTES:
            raise ValueError("too large")
        doc = json.loads(raw.decode("utf-8-sig"))  # a byte-order mark: the pointer edited on Windows
        name = doc["current"]
        if doc.get("layout") != LAYOUT or not isinstance(name, str):
            raise ValueError("not a model folder pointer")
        name = name.rstrip("/")
        folder, version = name.split("/") if name.count("/") == 1 else ("", "")
        if folder != VERSIONS or not _VERSION_NAME.match(version):
            raise ValueError(f"names {name!r}, not a version folder")
        layout_version = doc.get("layout_version", 0)
        if type(layout_version) is not int:
            raise ValueError(f"layout_version {layout_version!r} is not a whole number")
        if layout_version > LAYOUT_VERSION:
            raise ModelError(f"{pointer} is of layout version {doc['layout_version']}, newer than this runtime's "
                             f"{LAYOUT_VERSION}: upgrade aae-toolkit")
    except ModelError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"{pointer} is damaged ({exc}): {_repair(model_dir)}") from None
    target = model_dir / VERSIONS / version
    if not target.is_dir():
        raise ModelError(f"{pointer} names {name}, which is missing: {_repair(model_dir)}")
    return target


def _versions(model_dir: Path) -> list[Path]:
    """The version folders of ``model_dir``, oldest first."""
    try:
        found = [p for p in (model_dir / VERSIONS).iterdir() if _VERSION_NAME.match(p.name)]
    except OSError:
        return []
    return sorted(found, key=_number)


def _number(version: Path) -> int:
    return int(version.name.split("-")[0])


def _repair(model_dir: Path) -> str:
    """How to mend a folder whose pointer is damaged or names a missing version: name the newest
    version it holds (a device may have neither torch nor the checkpoint to export again)."""
    held = [v for v in _versions(model_dir) if (v / GRAPH_NAMES[0]).is_file()]
    if not held:
        return "export the model again"
    return (f"export the model again, or go back to a version the folder holds ({', '.join(v.name for v in held)}) by "
            f"writing into {POINTER}: {' '.join(pointer_text(held[-1].name).split())}")


def pointer_text(version: str) -> str:
    """``MODEL.json`` naming the version folder ``version`` (its name under ``versions/``)."""
    return json.dumps({"layout": LAYOUT, "layout_version": LAYOUT_VERSION, "current": f"{VERSIONS}/{version}"}, indent=1) + "\n"


def write_metadata_json(version: Path, metadata: dict) -> Path:
    """``metadata.json`` beside a version's graphs (the same document as their ``aae`` entry)."""
    path = version / METADATA_JSON
    path.write_text(json.dumps(metadata, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def holds_model(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds a model (either layout)."""
    model_dir = Path(model_dir)
    return (model_dir / POINTER).exists() or any((model_dir / n).exists() for n in GRAPH_NAMES)


@contextlib.contextmanager
def writer_lock(model_dir: Path, timeout_s: float = LOCK_TIMEOUT_S, busy: str | None = None,
                waiting: Callable[[str], None] | None = None) -> Iterator[bool]:
    """Hold the folder's writer lock (an exclusive flock on ``.lock``, released by the OS when
    the process dies). Waits up to ``timeout_s`` for another writer, then raises ModelError
    (``busy``: its message); ``waiting`` hears once, after WAIT_NOTICE_S, that it waits.
    Yields whether the lock is exclusive: False where the file system (or Windows) has no
    flock, so other writers may be at work meanwhile."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; writers are not serialised there
        yield False
        return
    try:
        fd = os.open(model_dir / LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # never follow it: a folder from elsewhere could make a writer create any file
            raise ModelError(f"{model_dir / LOCK} is a link, not the folder's lock file: remove it") from None
        raise ModelError(f"cannot write to {model_dir} ({exc.strerror or exc}): it is read-only or not yours") from None
    try:
        start = time.monotonic()
        deadline, notice = start + timeout_s, waiting
        exclusive = True
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if not isinstance(exc, BlockingIOError):
                    if exc.errno in _NO_LOCKS:  # a file system without flock (some NFS, Lustre, FUSE): as on Windows
                        exclusive = False
                        break
                    raise ModelError(f"cannot lock {model_dir / LOCK} ({exc.strerror or exc})") from None
                if time.monotonic() >= deadline:
                    raise ModelError(busy or f"another process has been writing to {model_dir} for over {timeout_s:.0f} s "
                                     "(an export or calibration): wait for it to end, then run this again") from None
                if notice is not None and time.monotonic() - start >= WAIT_NOTICE_S:
                    notice(f"waiting for another process writing to {model_dir} (an export or calibration), "
                           f"for up to {timeout_s:.0f} s")
                    notice = None
                time.sleep(0.05)
        try:
            held, named = os.fstat(fd), os.stat(model_dir / LOCK, follow_symlinks=False)
            same = not held.st_ino or os.path.samestat(held, named)  # (no inode numbers: not comparable)
        except OSError:
            same = False
        if not same:  # a writer that had created the folder removed it (it failed) while this one waited
            raise ModelError(f"{model_dir} was removed by the writer this one waited for (it failed): run this again")
        yield exclusive
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def write_version(model_dir: str | Path, label: str, new_only: bool = False,
                  waiting: Callable[[str], None] | None = None,
                  switching: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Write a new version of the model in ``model_dir`` (created if missing, its parent must
    exist): yields an empty staging folder to put the graph files in; on a normal exit the
    version becomes current atomically (see the module docstring); on an exception nothing
    changes. ``label`` (e.g. the export id) names the version after its number. ``new_only``:
    refuse (ModelError) a folder that holds a model, checked under the lock, so of two writers
    racing for a new folder one wins and the other is refused. ``waiting``: as for `writer_lock`;
    ``switching`` hears the new version's name just before the pointer is replaced (so that a
    caller stopped then can tell from the pointer whether the switch happened)."""
    model_dir = Path(model_dir)
    outer = enclosing_model(model_dir)
    if outer is not None:
        raise ModelError(f"{model_dir} lies inside the versions of the model folder {outer}, which only its writers "
                         f"change: give {outer} itself (or another folder)")
    created = not model_dir.exists()
    try:
        model_dir.mkdir(exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create {model_dir} ({exc.strerror or exc})") from None
    with writer_lock(model_dir, waiting=waiting) as exclusive, _removed_unless_written(model_dir, created):
        if new_only and holds_model(model_dir):
            raise ModelError(f"{model_dir} already holds a model (written while this one was made): choose another "
                             "--out, or give --overwrite to replace it")
        previous = _tidy(model_dir, exclusive)
        try:
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=model_dir))
            try:
                yield staging
                _commit(model_dir, staging, label, previous, exclusive, switching)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        except OSError as exc:
            if exc.errno not in DISK_ERRORS:
                raise
            raise ModelError(f"cannot write a new version into {model_dir} ({exc.strerror or exc}): the model it "
                             "holds is unchanged; free space (or fix the folder's permissions) and run this again") from None


@contextlib.contextmanager
def _removed_unless_written(model_dir: Path, created: bool) -> Iterator[None]:
    """A folder this writer created is removed again when it fails before its version is named
    (under the lock; its lock file goes too, and a writer waiting on it is told to run again)."""
    try:
        yield
    except BaseException:
        if created and not (model_dir / POINTER).exists():
            shutil.rmtree(model_dir / VERSIONS, ignore_errors=True)
            (model_dir / LOCK).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                model_dir.rmdir()  # not empty: someone else's files
        raise


def enclosing_model(path: str | Path) -> Path | None:
    """The model folder whose ``versions/`` holds ``path`` (a version, or a folder in one, reached
    by any link), or None: such a folder looks like a model of the layout before versions, and a
    writer converting it would delete the graphs of the version it is."""
    path = Path(os.path.realpath(path))
    for folder in (path, *path.parents):
        if folder.name == VERSIONS and (folder.parent / POINTER).is_file():
            return folder.parent
    return None


def _tidy(model_dir: Path, exclusive: bool) -> str | None:
    """Under the lock, before a write: remove what writers that died left (staging folders, the
    pointer's temporaries, versions written but never named by the pointer); the name of the
    current version, None when the folder has no pointer (or a damaged one: nothing is removed).
    Without an ``exclusive`` lock nothing is removed: it may be another writer's work in progress."""
    if not exclusive:
        try:
            return current_version(model_dir).name if (model_dir / POINTER).exists() else None
        except ModelError:
            return None
    for stale in model_dir.glob(STAGING_PREFIX + "*"):  # left by a writer that died (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    remove_stale_temporaries([model_dir / POINTER])
    if not (model_dir / POINTER).exists():
        for orphan in _versions(model_dir):  # an interrupted first write, of a folder of the old layout
            shutil.rmtree(orphan, ignore_errors=True)
        return None
    try:
        current = current_version(model_dir)
    except ModelError:  # damaged: nothing removed, and the newest version is kept as the one before
        held = _versions(model_dir)
        return held[-1].name if held else None
    for orphan in _versions(model_dir):  # renamed into versions/, killed before the pointer named it
        if _number(orphan) > _number(current):
            shutil.rmtree(orphan, ignore_errors=True)
    return current.name


def _commit(model_dir: Path, staging: Path, label: str, previous: str | None, exclusive: bool,
            switching: Callable[[str], None] | None) -> None:
    files = sorted(p for p in staging.iterdir())
    if not any(p.name == "encoder.onnx" for p in files):
        raise ModelError(f"internal: a model version without encoder.onnx for {model_dir}")
    for path in files:  # the files' bytes reach the disk before the pointer names them
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    versions = model_dir / VERSIONS
    versions.mkdir(exist_ok=True)
    tag = re.sub(r"[^0-9A-Za-z]", "", label)[:12] or "model"
    name = f"{max(map(_number, _versions(model_dir)), default=0) + 1:04d}-{tag}"
    os.chmod(staging, 0o777 & ~_umask())
    renamed = False
    try:
        os.replace(staging, versions / name)
        renamed = True
        _fsync_dir(versions)
        text = pointer_text(name).encode()
        if switching is not None:
            switching(name)
        atomic_write(model_dir / POINTER, lambda f: f.write(text), fsync=True)
    except BaseException:  # unless the pointer was replaced (a signal just after the rename), it was never current
        try:
            named = current_version(model_dir).name
        except ModelError:
            named = None
        if renamed and named != name:
            shutil.rmtree(versions / name, ignore_errors=True)
        raise
    _fsync_dir(model_dir)
    keep = {name, previous}
    if not exclusive:  # other writers may be between their rename and their switch: keep the newest two too
        keep |= {v.name for v in _versions(model_dir)[-2:]}
    _prune(model_dir, keep)


def _prune(model_dir: Path, keep: set[str | None]) -> None:
    """After a switch: the top-level graphs of the old layout go, and every version but those in
    ``keep`` (the new one and the one current before it: readers may still hold that one open).
    Never raises: the switch is done, and what cannot be removed now is removed by a later writer."""
    for name in GRAPH_NAMES:
        with contextlib.suppress(OSError):
            (model_dir / name).unlink(missing_ok=True)
    for old in _versions(model_dir):
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
