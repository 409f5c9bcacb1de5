"""AAEModel on a real (tiny) exported model: arrays, files, sampling, errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from aae_runtime.contract.modelfolder import current_version
from aae_runtime import AAEModel, InputError, ModelError
from aae_runtime.images import load_image
from tests.conftest import write_png


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AAEModel.load(tiny_model_dir, device="cpu")


def test_runs_on_the_cpu_and_reports_it(model):
    assert model.providers[0] == "CPUExecutionProvider"
    assert model.input_shape == (1, 28, 28)


def test_scores_of_arrays_match_scores_of_the_same_images_as_files(model, mnist_test, tmp_path):
    images, _ = mnist_test
    paths = [write_png(tmp_path / f"{i}.png", images[i]) for i in range(5)]
    from_files = [r.score for r in model.score_paths(paths)]
    from aae_runtime.contract.preprocessing import pixels_to_input  # the files' exact preprocessing: x * (1/255), not x / 255

    from_arrays = model.score(pixels_to_input(images[:5], model.metadata.preprocessing))
    np.testing.assert_allclose(from_files, from_arrays, rtol=1e-6)


def test_digits_score_lower_than_noise(model, mnist_test):
    images, _ = mnist_test
    digits = model.score(images[:200, None].astype(np.float32) / 255)
    noise = model.score(np.random.default_rng(0).random((200, 1, 28, 28), dtype=np.float32))
    assert np.median(digits) < np.min(noise)


def test_batch_size_does_not_change_scores(model, mnist_test, tmp_path):
    images, _ = mnist_test
    for i in range(9):
        write_png(tmp_path / f"{i}.png", images[i])
    a = [r.score for r in model.score_paths([tmp_path], batch_size=1)]
    b = [r.score for r in model.score_paths([tmp_path], batch_size=64)]
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_a_broken_file_gets_an_error_row_and_the_rest_are_scored(model, mnist_test, tmp_path):
    images, _ = mnist_test
    write_png(tmp_path / "a.png", images[0])
    (tmp_path / "b.png").write_bytes(b"definitely not a png")
    write_png(tmp_path / "c.png", images[1])
    rows = model.score_paths([tmp_path])
    assert [r.ok for r in rows] == [True, False, True]
    assert "not an image" in rows[1].error


def test_threshold_override_changes_flags(tiny_model_dir, mnist_test):
    images, _ = mnist_test
    x = images[:20, None].astype(np.float32) / 255
    everything = AAEModel.load(tiny_model_dir, device="cpu", threshold=-1.0)
    assert everything.is_anomaly(everything.score(x)).all()


def test_sample_shape_and_range(model):
    s = model.sample(10, seed=1)
    assert s.shape == (10, 1, 28, 28) and s.min() >= 0 and s.max() <= 1
    np.testing.assert_array_equal(s, model.sample(10, seed=1))


def test_images_of_another_size_and_mode_are_converted(model, mnist_test, tmp_path):
    from PIL import Image

    images, _ = mnist_test
    big = Image.fromarray(images[0]).convert("RGB").resize((56, 56))
    big.save(tmp_path / "big.png")
    x = load_image(tmp_path / "big.png", model.metadata.preprocessing)
    assert x.shape == (1, 28, 28) and x.dtype == np.float32
    assert model.score_paths([tmp_path / "big.png"])[0].ok


def test_wrong_array_shape_is_an_input_error(model):
    with pytest.raises(InputError, match="shape"):
        model.score(np.zeros((2, 28, 28), np.float32))


def test_missing_model_dir_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        AAEModel.load(tmp_path / "nope")


def test_encoder_and_decoder_of_different_exports_are_refused(tiny_run, tiny_model_dir, tmp_path):
    from export.onnx_export import export_checkpoint

    other = tmp_path / "other"
    export_checkpoint(tiny_run.checkpoint, other, log=lambda s: None)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(current_version(tiny_model_dir) / "encoder.onnx", mixed)
    shutil.copy(current_version(other) / "decoder.onnx", mixed)
    with pytest.raises(ModelError, match="different exports"):
        AAEModel.load(mixed, device="cpu")
