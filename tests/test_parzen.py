"""benchmarks/parzen.py: the Parzen-window estimate against a direct computation, and a real run."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def parzen():
    spec = importlib.util.spec_from_file_location("parzen_benchmark", REPO / "benchmarks" / "parzen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _direct(x: np.ndarray, s: np.ndarray, sigma: float) -> np.ndarray:
    """log (1/M) sum_j N(x; s_j, sigma^2 I), straight from the definition, float64."""
    d = x.shape[1]
    sq = ((x[:, None, :].astype(np.float64) - s[None, :, :]) ** 2).sum(-1)
    a = -sq / (2 * sigma**2)
    top = a.max(1, keepdims=True)
    return (top[:, 0] + np.log(np.exp(a - top).sum(1))) - math.log(len(s)) - 0.5 * d * math.log(2 * math.pi * sigma**2)


def test_chunked_estimate_matches_the_definition(parzen):
    rng = np.random.default_rng(0)
    x, s = rng.random((37, 50), dtype=np.float32), rng.random((120, 50), dtype=np.float32)
    sigmas = np.array([0.1, 0.3, 1.0])
    got = parzen.parzen_log_likelihood(x, s, sigmas, chunk=8)
    for i, sigma in enumerate(sigmas):
        np.testing.assert_allclose(got[i], _direct(x, s, sigma), rtol=1e-5, atol=1e-3)


def test_sigma_is_the_validation_maximum(parzen):
    rng = np.random.default_rng(1)
    s = rng.normal(0.5, 0.2, (300, 10)).astype(np.float32)
    val = rng.normal(0.5, 0.2, (100, 10)).astype(np.float32)
    sigma, curve = parzen.choose_sigma(val, s)
    assert sigma == parzen.SIGMA_GRID[int(np.argmax(curve))]
    assert parzen.SIGMA_GRID[0] < sigma < parzen.SIGMA_GRID[-1]


def test_benchmark_runs_on_a_checkpoint_and_reports_mean_and_error(parzen, tiny_run, mnist_dir, capsys):
    code = parzen.main([str(tiny_run.checkpoint), "--data-dir", str(mnist_dir), "--samples", "300", "--val-size", "100",
                        "--threads", "1", "--no-write"])
    assert code == 0
    line = capsys.readouterr().out
    value, error = (float(v) for v in line.split(":")[1].split("nats")[0].split("±"))
    assert math.isfinite(value) and -5000 < value < 1000 and 0 < error < 50


def test_reconstruction_bound_scores_above_the_prior_samples(parzen, tiny_run, mnist_dir, capsys):
    """Reconstructions of training images sit on the data; the tiny model's prior samples do not."""
    common = ["--data-dir", str(mnist_dir), "--samples", "300", "--val-size", "100", "--threads", "1", "--no-write"]
    assert parzen.main([str(tiny_run.checkpoint), *common]) == 0
    assert parzen.main([str(tiny_run.checkpoint), "--reconstructions", *common]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    prior, recon = (float(line.split(":")[1].split("±")[0]) for line in lines[-2:])
    assert "-reconstructions:" in lines[-1] and recon > prior


def test_sample_std_diagnostic_changes_the_draws_and_says_so_in_the_label(parzen, tiny_run, mnist_dir, capsys):
    common = ["--data-dir", str(mnist_dir), "--samples", "200", "--val-size", "100", "--threads", "1", "--no-write"]
    assert parzen.main([str(tiny_run.checkpoint), "--sample-std", "0.01", *common]) == 0
    assert parzen.main([str(tiny_run.checkpoint), *common]) == 0
    narrow, default = capsys.readouterr().out.strip().splitlines()[-2:]
    assert narrow.split(":")[0].endswith("-sample-std0.01") and narrow.split(":")[1] != default.split(":")[1]


def test_code_jitter_moves_reconstructions_off_the_codes_and_lowers_the_score(parzen, tiny_run, mnist_dir, capsys):
    common = ["--data-dir", str(mnist_dir), "--samples", "300", "--val-size", "100", "--threads", "1", "--no-write",
              "--reconstructions"]
    assert parzen.main([str(tiny_run.checkpoint), *common]) == 0
    assert parzen.main([str(tiny_run.checkpoint), "--code-jitter", "20", *common]) == 0
    exact, jittered = capsys.readouterr().out.strip().splitlines()[-2:]
    assert jittered.split(":")[0].endswith("-reconstructions-jitter20")
    assert float(jittered.split(":")[1].split("±")[0]) < float(exact.split(":")[1].split("±")[0])
    with pytest.raises(SystemExit):  # the jitter means nothing for prior samples
        parzen.main([str(tiny_run.checkpoint), "--code-jitter", "1", *common[:-1]])
