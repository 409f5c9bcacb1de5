"""Example inputs for trying the runtime: real MNIST test digits and noise images as PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from aae_train.mnist import ensure_mnist, load_mnist


def write_demo_images(out: str | Path, data_dir: str | None = None, digits: int = 8, noise: int = 4, seed: int = 0) -> list[Path]:
    """Write ``digits`` MNIST test images (never seen in training) and ``noise`` uniform-noise images."""
    out = Path(out)
    images, labels = load_mnist(ensure_mnist(data_dir), "test")
    rng = np.random.default_rng(seed)
    written = []
    for i in rng.choice(len(images), size=digits, replace=False):
        written.append(_save(images[i], out / "digits" / f"test{i:05d}_digit{labels[i]}.png"))
    for k in range(noise):
        written.append(_save(rng.integers(0, 256, (28, 28), dtype=np.uint8), out / "noise" / f"noise{k}.png"))
    return written


def _save(pixels: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="L").save(path)
    return path
