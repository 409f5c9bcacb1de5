"""Shared fixtures: real MNIST from ../shared/data/mnist and a tiny model trained and exported once.

The tiny model (hidden 64, a few hundred images, 2 epochs) trains in seconds; it is good enough
to tell digits from noise and exercises every code path of the real pipeline.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = Path(os.environ.get("AAE_TEST_MNIST", REPO.parent / "shared" / "data" / "mnist"))


def pytest_configure(config):
    # The tests run the real console scripts (aae-train, aae-export, aae-run) by name: put this
    # interpreter's scripts folder first on PATH, so `.venv/bin/python -m pytest` finds them too.
    scripts = str(Path(sys.executable).parent)
    os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists() and not (MNIST_DIR / "train-images-idx3-ubyte").exists():
        raise pytest.UsageError(f"real MNIST not found in {MNIST_DIR}: set AAE_TEST_MNIST to the folder with the four IDX files")


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    return MNIST_DIR


@pytest.fixture(scope="session")
def mnist_test():
    """(images (10000, 28, 28) uint8, labels (10000,) uint8) of the real MNIST test split."""
    from aae_train.mnist import load_mnist

    return load_mnist(MNIST_DIR, "test")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, mnist_dir):
    """A checkpoint of a small AAE trained briefly on real MNIST (library API, CPU)."""
    from aae_runtime.contract.priors import make_prior_spec
    from aae_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from aae_train.train import train

    cfg = RunConfig(
        model=ModelConfig(latent_dim=4, hidden=64, prior=make_prior_spec("gaussian", 4, std=1.0)),
        data=DataConfig(source="mnist", path=str(mnist_dir), limit=800, val_fraction=0.2),
        train=TrainConfig(epochs=2, batch_size=50, seed=0, device="cpu"),
    )
    run_dir = tmp_path_factory.mktemp("tiny_run")
    return train(cfg, run_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_run) -> Path:
    """The tiny checkpoint exported to ONNX (encoder.onnx, decoder.onnx)."""
    from export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("tiny_model")
    export_checkpoint(tiny_run.checkpoint, out, log=lambda s: None)
    return out


def write_png(path: Path, pixels: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def calibrate_copy(model_dir: Path, photos: list[np.ndarray], work: Path, *options: str):
    """`aae-run calibrate` run on ``photos`` (written as PNGs under ``work/line``) over a copy of
    ``model_dir``: the reloaded copy and each photo's score by it."""
    import shutil

    from PIL import Image
    from typer.testing import CliRunner

    from aae_runtime import AAEModel
    from aae_runtime.cli import app

    copy = work / "model"
    shutil.copytree(model_dir, copy)
    paths = [write_png(work / "line" / f"{i}.png", p) for i, p in enumerate(photos)]
    r = CliRunner().invoke(app, ["calibrate", str(work / "line"), "--model", str(copy), *options])
    assert r.exit_code == 0, r.output
    m = AAEModel.load(copy, device="cpu")
    return m, [m.score_photo(np.asarray(Image.open(p), np.float32)[None] / 255)[0] for p in paths]
