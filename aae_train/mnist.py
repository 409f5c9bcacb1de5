"""MNIST: find the four IDX files, download them when missing (verified), and read them.

Where the files are looked for, in order: ``--data-dir``, ``$AAE_DATA_DIR``, the shared data
folder beside the project (``../shared/data/mnist`` from the working directory, or beside the
source checkout) when it holds all four files, then a per-user cache directory
(``$XDG_CACHE_HOME/aae/mnist``, default ``~/.cache/aae/mnist``). Files may be gzipped or not.
Only the cache directory is downloaded into, and only when the files are missing.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np

from aae_runtime.contract.errors import AAEError

ENV_DATA_DIR = "AAE_DATA_DIR"
SHARED_SUBDIR = Path("shared") / "data" / "mnist"  # the project's shared data folder, beside its root
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# SHA-256 of the canonical files' decompressed bytes, so that any gzip of them verifies.
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)


class DataError(AAEError):
    """MNIST cannot be found, downloaded or read."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "aae" / "mnist"


def shared_data_dirs() -> tuple[Path, ...]:
    """The shared MNIST folders beside the project: from the working directory (the repository
    root, as the README's commands run) and beside this source checkout."""
    here = Path(__file__).resolve().parents[2]  # aae_train/mnist.py -> the checkout's parent
    return (Path("..") / SHARED_SUBDIR, here / SHARED_SUBDIR)


def resolve_data_dir(data_dir: str | Path | None) -> tuple[Path, bool]:
    """The directory to read MNIST from, and whether it is the cache (the only one we download into)."""
    if data_dir is not None:
        return Path(data_dir).expanduser(), False
    if os.environ.get(ENV_DATA_DIR):
        return Path(os.environ[ENV_DATA_DIR]).expanduser(), False
    for shared in shared_data_dirs():
        if all(find_file(shared, stem) is not None for stem in FILES.values()):
            return shared, False
    return default_cache_dir(), True


def find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def ensure_mnist(data_dir: str | Path | None = None, mirrors: tuple[str, ...] = MIRRORS,
                 progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Return a directory holding all four MNIST files, downloading into the cache if needed."""
    directory, is_cache = resolve_data_dir(data_dir)
    missing = [stem for stem in FILES.values() if find_file(directory, stem) is None]
    if not missing:
        return directory
    if not is_cache:
        raise DataError(
            f"MNIST files missing in {directory}: {', '.join(m + '.gz' for m in missing)}; "
            f"put the four IDX files there (gzipped or not) or unset --data-dir/${ENV_DATA_DIR} to download"
        )
    for stem in missing:
        download(stem + ".gz", directory, mirrors, progress)
    return directory


def download(name: str, directory: Path, mirrors: tuple[str, ...], progress=None) -> Path:
    """Fetch ``name`` from the first mirror that answers, verify its SHA-256, then rename into place."""
    directory.mkdir(parents=True, exist_ok=True)
    errors = []
    for base in mirrors:
        try:
            return _fetch_verified(base + name, directory / name, SHA256[name.removesuffix(".gz")], progress)
        except (OSError, ValueError) as exc:
            errors.append(f"{base}: {getattr(exc, 'reason', None) or exc}")
    raise DataError(
        f"could not download {name} ({'; '.join(errors)}); offline? put the four MNIST IDX files "
        f"in {directory} or pass --data-dir DIR"
    )


def _fetch_verified(url: str, target: Path, sha256: str, progress) -> Path:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as resp, os.fdopen(fd, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            while chunk := resp.read(1 << 16):
                f.write(chunk)
                done += len(chunk)
                if progress:
                    progress(target.name, done, total)
        got = sha256_of_content(Path(tmp))
        if got != sha256:
            raise ValueError(f"checksum mismatch for {target.name} (got {got[:12]}…, expected {sha256[:12]}…)")
        os.replace(tmp, target)
        return target
    finally:
        Path(tmp).unlink(missing_ok=True)


def sha256_of_content(path: Path) -> str:
    """SHA-256 of a file's bytes after gunzip."""
    digest = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except (OSError, EOFError) as exc:
        raise ValueError(f"not a valid gzip file ({exc})") from None
    return digest.hexdigest()


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) of unsigned bytes into an array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path} ({exc}): replace it with an intact copy") from None
    if len(data) < 4 or data[0:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes: replace it with the standard MNIST file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated ({body.size} of {int(np.prod(dims))} bytes): replace it")
    return body.reshape(dims)


def load_mnist(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of the ``train`` or ``test`` split."""
    prefix = "train" if split == "train" else "test"
    images = read_idx(find_file(directory, FILES[f"{prefix}_images"]) or directory / FILES[f"{prefix}_images"])
    labels = read_idx(find_file(directory, FILES[f"{prefix}_labels"]) or directory / FILES[f"{prefix}_labels"])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"MNIST {split} files in {directory} do not match each other: replace them")
    return images, labels
