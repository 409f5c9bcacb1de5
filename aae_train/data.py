"""Training data as float32 arrays in the model's input format, with a held-out validation split.

Pixels become model inputs through `aae_runtime.images.pixels_to_input`, the same function the
runtime uses, so training and deployment preprocess identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aae_runtime.images import pixels_to_input
from aae_runtime.metadata import Preprocessing
from aae_train.config import DataConfig
from aae_train.mnist import DataError, ensure_mnist, load_mnist

MNIST_PREPROCESSING = Preprocessing(color_mode="L", height=28, width=28, resample="bilinear", scale=1 / 255, offset=0.0)


@dataclass(frozen=True)
class Dataset:
    train: np.ndarray  # (N, C, H, W) float32
    val: np.ndarray  # (M, C, H, W) float32, held out from the training images
    train_labels: np.ndarray | None
    val_labels: np.ndarray | None
    preprocessing: Preprocessing
    path: str  # where the images were read from


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation of range(n) cut into (train, validation); at least one of each."""
    if n < 2:
        raise DataError(f"need at least 2 images to hold out a validation split, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, int(round(n * val_fraction))))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def select_mnist(labels: np.ndarray, classes: tuple[int, ...] | None, limit: int | None, seed: int) -> np.ndarray:
    """Indices of the images of ``classes`` (all if None), at most ``limit`` of them, in file order."""
    idx = np.arange(len(labels)) if classes is None else np.flatnonzero(np.isin(labels, classes))
    if classes is not None and len(idx) == 0:
        raise DataError(f"no MNIST images of classes {list(classes)}: classes are digits 0-9")
    if limit is not None and limit < len(idx):
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=limit, replace=False))
    return idx


def load_mnist_dataset(cfg: DataConfig, data_dir: str | None = None, progress=None) -> Dataset:
    """The MNIST training images of ``cfg``, split into train and validation."""
    directory = ensure_mnist(data_dir if data_dir is not None else cfg.path, progress=progress)
    pixels, labels = load_mnist(directory, "train")
    chosen = select_mnist(labels, cfg.classes, cfg.limit, cfg.split_seed)
    tr, va = split_indices(len(chosen), cfg.val_fraction, cfg.split_seed)
    pre = MNIST_PREPROCESSING
    return Dataset(
        train=pixels_to_input(pixels[chosen[tr]], pre),
        val=pixels_to_input(pixels[chosen[va]], pre),
        train_labels=labels[chosen[tr]].astype(np.int64),
        val_labels=labels[chosen[va]].astype(np.int64),
        preprocessing=pre,
        path=str(directory),
    )


def load_dataset(cfg: DataConfig, data_dir: str | None = None, progress=None) -> Dataset:
    if cfg.source == "mnist":
        return load_mnist_dataset(cfg, data_dir, progress)
    raise DataError(f"unknown data source {cfg.source!r}")
