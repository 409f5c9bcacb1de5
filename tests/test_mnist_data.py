"""MNIST location, download (from a real HTTP server on loopback), checksum and IDX parsing."""

from __future__ import annotations

import gzip
import http.server
import shutil
import threading
from functools import partial

from pathlib import Path

import numpy as np
import pytest

from aae_train import mnist
from aae_train.config import DataConfig
from aae_train.data import load_mnist_dataset, split_indices

REAL_SHARED_DATA_DIRS = mnist.shared_data_dirs


@pytest.fixture(autouse=True)
def no_shared_folder(tmp_path, monkeypatch):
    """These tests pick where MNIST is looked for: the project's real shared folder stays out."""
    monkeypatch.setattr(mnist, "shared_data_dirs", lambda: (tmp_path / "no-shared",))


@pytest.fixture
def mirror(tmp_path, mnist_dir):
    """A real HTTP server on 127.0.0.1 serving the MNIST files (gzipped)."""
    root = tmp_path / "mirror"
    shutil.copytree(mnist_dir, root)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_downloads_into_the_cache_with_progress_and_verifies(tmp_path, monkeypatch, mirror):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(mnist.ENV_DATA_DIR, raising=False)
    seen = []
    directory = mnist.ensure_mnist(None, mirrors=(mirror[1],), progress=lambda name, done, total: seen.append(name))
    assert directory == tmp_path / "cache" / "aae" / "mnist"
    assert sorted(p.name for p in directory.iterdir()) == sorted(f + ".gz" for f in mnist.FILES.values())
    assert set(seen) == {f + ".gz" for f in mnist.FILES.values()}
    images, labels = mnist.load_mnist(directory, "test")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)


def test_a_corrupted_download_is_rejected_and_not_kept(tmp_path, monkeypatch, mirror):
    root, url = mirror
    data = bytearray(gzip.decompress((root / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    data[100] ^= 1
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(mnist.DataError, match="checksum mismatch"):
        mnist.download("t10k-labels-idx1-ubyte.gz", tmp_path / "d", (url,))
    assert not any((tmp_path / "d").iterdir())


def test_offline_fails_with_one_line_saying_where_to_put_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(mnist.ENV_DATA_DIR, raising=False)
    with pytest.raises(mnist.DataError) as info:
        mnist.ensure_mnist(None, mirrors=("http://127.0.0.1:9/",))
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "cache" / "aae" / "mnist") in message and "--data-dir" in message


def test_data_dir_then_environment_then_shared_folder_then_cache(tmp_path, monkeypatch):
    shared, half = tmp_path / "shared", tmp_path / "half"
    for folder, stems in ((shared, mnist.FILES.values()), (half, list(mnist.FILES.values())[:3])):
        folder.mkdir()
        for stem in stems:
            (folder / (stem + ".gz")).write_bytes(b"")
    monkeypatch.setattr(mnist, "shared_data_dirs", lambda: (half, shared))
    monkeypatch.setenv(mnist.ENV_DATA_DIR, str(tmp_path / "env"))
    assert mnist.resolve_data_dir(tmp_path / "flag") == (tmp_path / "flag", False)
    assert mnist.resolve_data_dir(None) == (tmp_path / "env", False)
    monkeypatch.delenv(mnist.ENV_DATA_DIR)
    assert mnist.resolve_data_dir(None) == (shared, False)  # the first shared folder holding all four files
    monkeypatch.setattr(mnist, "shared_data_dirs", lambda: (half,))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert mnist.resolve_data_dir(None) == (tmp_path / "c" / "aae" / "mnist", True)


def test_the_shared_folder_beside_the_repository_root_is_found_from_the_root():
    """The README's `aae-train mnist ...` runs offline from the repository root: ../shared/data/mnist."""
    assert Path("..") / "shared" / "data" / "mnist" in REAL_SHARED_DATA_DIRS()
    assert all(d.parts[-3:] == ("shared", "data", "mnist") for d in REAL_SHARED_DATA_DIRS())


def test_missing_files_in_a_given_dir_are_not_downloaded(tmp_path):
    with pytest.raises(mnist.DataError, match="missing"):
        mnist.ensure_mnist(tmp_path)


def test_reads_uncompressed_files_too(tmp_path, mnist_dir):
    for stem in mnist.FILES.values():
        (tmp_path / stem).write_bytes(gzip.decompress((mnist_dir / f"{stem}.gz").read_bytes()))
    images, labels = mnist.load_mnist(tmp_path, "train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8 and labels.max() == 9


def test_truncated_idx_is_a_clear_error(tmp_path, mnist_dir):
    raw = gzip.decompress((mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "bad").write_bytes(raw[:500])
    with pytest.raises(mnist.DataError, match="truncated"):
        mnist.read_idx(tmp_path / "bad")


def test_classes_limit_and_split_are_respected(mnist_dir):
    data = load_mnist_dataset(DataConfig(path=str(mnist_dir), classes=(0, 3), limit=500, val_fraction=0.2))
    assert len(data.train) == 400 and len(data.val) == 100
    assert set(np.unique(np.concatenate([data.train_labels, data.val_labels]))) == {0, 3}
    assert data.train.dtype == np.float32 and 0 <= data.train.min() and data.train.max() <= 1


def test_split_is_disjoint_and_seeded():
    tr, va = split_indices(100, 0.1, seed=3)
    assert len(va) == 10 and not set(tr) & set(va) and len(set(tr) | set(va)) == 100
    np.testing.assert_array_equal(va, split_indices(100, 0.1, seed=3)[1])
