"""Images whose channels differ from the model's: converted as the metadata says.

A tiny RGB model (trained on a folder of coloured real MNIST digits, exported without the fused
graph) scores grayscale, palette, RGBA and CMYK files through `aae-run score`; the grayscale
tiny model scores RGB files. Each file's score equals the score of its converted pixels.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from aae_runtime import AAEModel
from aae_runtime.images import load_image


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory, mnist_test):
    from aae_runtime.contract.priors import make_prior_spec
    from aae_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from aae_train.train import train
    from export.onnx_export import export_checkpoint

    images, _ = mnist_test
    data = tmp_path_factory.mktemp("rgb_data")
    tint = np.array([1.0, 0.6, 0.3])
    for i in range(120):
        Image.fromarray((images[i][..., None] * tint).astype(np.uint8)).save(data / f"{i}.png")
    cfg = RunConfig(
        model=ModelConfig(image_shape=(3, 16, 16), latent_dim=2, hidden=16, prior=make_prior_spec("gaussian", 2, std=1.0)),
        data=DataConfig(source="folder", path=str(data), image_size=(16, 16), color_mode="RGB", val_fraction=0.25),
        train=TrainConfig(epochs=1, batch_size=30, seed=0, device="cpu"),
    )
    run = train(cfg, tmp_path_factory.mktemp("rgb_run"), data_dir=str(data))
    out = tmp_path_factory.mktemp("rgb_model")
    export_checkpoint(run.checkpoint, out, data_dir=str(data), log=lambda s: None, fused=False)
    return out


def score_cli(model, folder, out):
    r = subprocess.run(["aae-run", "score", str(folder), "--model", str(model), "--device", "cpu", "-o", str(out)],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    return {os.path.basename(row["path"]): row["score"] for row in json.loads(out.read_text())}


def test_other_channel_layouts_are_converted_for_an_rgb_model(rgb_model, mnist_test, tmp_path):
    digit = mnist_test[0][0]
    rgb = np.stack([digit, digit // 2, 255 - digit], axis=-1)
    files = {
        "gray.png": Image.fromarray(digit),
        "palette.png": Image.fromarray(rgb).quantize(16),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full_like(digit, 255)])),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "gray16.png": Image.fromarray(digit.astype(np.uint16) * 257),
    }
    for name, img in files.items():
        img.save(tmp_path / name)
    scores = score_cli(rgb_model, tmp_path, tmp_path.parent / "rows.json")
    model = AAEModel.load(rgb_model, device="cpu")
    assert model.input_shape == (3, 16, 16)
    for name in files:
        x = load_image(tmp_path / name, model.metadata.preprocessing)
        assert x.shape == (3, 16, 16)
        assert scores[name] == pytest.approx(float(model.score(x[None])[0]), rel=1e-5), name
    gray = load_image(tmp_path / "gray.png", model.metadata.preprocessing)
    assert np.array_equal(gray[0], gray[1]) and np.array_equal(gray[1], gray[2])  # L -> RGB: three equal channels
    assert np.allclose(load_image(tmp_path / "gray16.png", model.metadata.preprocessing), gray, atol=1e-7)


def test_rgb_files_are_converted_for_a_grayscale_model(tiny_model_dir, mnist_test, tmp_path):
    digit = mnist_test[0][1]
    rgb = np.stack([digit, digit, digit], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(digit).save(tmp_path / "gray.png")
    scores = score_cli(tiny_model_dir, tmp_path, tmp_path.parent / "rows.json")
    assert scores["rgb.png"] == pytest.approx(scores["gray.png"], rel=1e-6)  # equal channels -> the same L image
