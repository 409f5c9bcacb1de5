"""benchmarks/digit_classifier.py: a tiny real training run (1 epoch, 8,000 images, ~10 s on one thread)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from aae_runtime.contract.preprocessing import pixels_to_input
from aae_train.data import MNIST_PREPROCESSING
from tests.conftest import REPO

# Training images of the tiny run: enough for well above chance after one epoch (about 90 %).
LIMIT = 8000


@pytest.fixture(scope="module")
def dc():
    path = REPO / "benchmarks" / "digit_classifier.py"
    spec = importlib.util.spec_from_file_location("digit_classifier_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(dc, mnist_dir, tmp_path_factory):
    """(record, weights path) of one epoch on LIMIT training images, one thread."""
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("digit-classifier") / "cnn.pt"
    try:
        record = dc.train_classifier(mnist_dir, out, epochs=1, seed=0, threads=1, limit=LIMIT)
    finally:
        torch.set_num_threads(threads)
    return record, out


def test_classifies_real_test_digits_well_above_chance(dc, tiny, mnist_test):
    record, out = tiny
    images, labels = mnist_test
    x = pixels_to_input(images[:1000], MNIST_PREPROCESSING)
    pred = dc.predict(dc.load_classifier(out), x, batch=300)
    assert pred.shape == (1000,) and pred.dtype == np.int64 and set(np.unique(pred)) <= set(range(10))
    assert (pred == labels[:1000]).mean() > 0.8
    assert record["train_images"] == LIMIT and record["test_images"] == 10000 and record["test_accuracy"] > 0.8


def test_load_classifier_round_trips_the_weights(dc, tiny, mnist_test):
    _, out = tiny
    x = pixels_to_input(mnist_test[0][:500], MNIST_PREPROCESSING)
    a, b = dc.load_classifier(out), dc.load_classifier(out)
    saved = dc.load_checkpoint(out)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in a.state_dict().items())
    np.testing.assert_array_equal(dc.predict(a, x), dc.predict(b, x, batch=7))


def test_a_finished_run_is_recognised_by_its_settings_only(dc, tiny):
    record, out = tiny
    assert dc.finished_record(out, dc.settings(1, 0, LIMIT)) == record
    assert dc.finished_record(out, dc.settings(2, 0, LIMIT)) is None
    assert dc.finished_record(out.with_name("missing.pt"), dc.settings(1, 0, LIMIT)) is None


def test_random_shift_moves_each_image_by_at_most_two_pixels(dc):
    x = torch.zeros(64, 1, 28, 28)
    x[:, 0, 10:18, 12:16] = torch.rand(64, 8, 4) + 0.1  # inside the 4-pixel empty border, like MNIST
    y = dc.random_shift(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    torch.testing.assert_close(y.sum((1, 2, 3)), x.sum((1, 2, 3)))  # nothing is cut off
    rows = [torch.nonzero(y[i, 0].sum(1))[0].item() - 10 for i in range(64)]
    assert set(rows) <= set(range(-2, 3)) and len(set(rows)) > 1


def test_predict_rejects_images_of_the_wrong_shape(dc, tiny):
    with pytest.raises(ValueError, match="28, 28"):
        dc.predict(dc.load_classifier(tiny[1]), np.zeros((2, 28, 28), np.float32))
