"""Scores, thresholds, normalisation and the ONNX metadata rewrite: numpy-level, no model needed."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from aae_runtime.contract.modelfolder import current_version
from aae_runtime.calibration import f1_threshold, normalise, percentile_threshold, threshold_at_percentile
from aae_runtime.contract.errors import InputError, ModelError
from aae_runtime.contract.priors import make_prior_spec, sample_prior
from aae_runtime.contract.onnxwire import set_metadata_prop
from aae_runtime.contract.scores import SCORES, ScoreParts, evaluate_score, fit_score, prior_nll

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from one_class import auroc  # noqa: E402


def test_prior_nll_is_the_gaussian_density_and_a_mixture_of_its_components():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 3)) * 3
    g = make_prior_spec("gaussian", 3, std=5.0)
    expected = -np.log(np.prod(np.exp(-0.5 * (z / 5) ** 2) / (5 * math.sqrt(2 * math.pi)), axis=1))
    np.testing.assert_allclose(prior_nll(z, g), expected, rtol=1e-10)
    m = make_prior_spec("mog", 3)
    draws = sample_prior(m, 4000, rng)
    # codes drawn from the mixture are likelier under it than codes far away from every component
    assert np.median(prior_nll(draws, m)) < np.median(prior_nll(draws * 3, m))
    with pytest.raises(ModelError, match="gaussian, mog or fitted_gaussian"):
        prior_nll(z[:, :2], make_prior_spec("swissroll", 2))


def _parts(rng, n, shift=0.0):
    z = rng.normal(size=(n, 4)) + shift
    err = rng.gamma(2.0, 0.01, size=(n, 6, 6)).astype(np.float32) * (1 + shift)
    return ScoreParts(z.astype(np.float32), err, err.reshape(n, -1).mean(1).astype(np.float64), rng.uniform(0.1, 0.3, n))


@pytest.mark.parametrize("name", sorted(SCORES))
def test_every_score_fits_on_normal_data_and_ranks_shifted_data_higher(name):
    rng = np.random.default_rng(1)
    normal, odd = _parts(rng, 400), _parts(rng, 400, shift=2.0)
    block = fit_score(name, normal, make_prior_spec("gaussian", 4))
    json.dumps(block)  # it goes into the metadata
    s_normal, s_odd = evaluate_score(block, normal, {"name": "gaussian", "dim": 4}), evaluate_score(block, odd, {"name": "gaussian", "dim": 4})
    if name.endswith("-prior"):  # the reversed term exists for encoders that pull anomalies to the centre
        return
    assert auroc(np.r_[s_normal, s_odd], np.r_[np.zeros(400, bool), np.ones(400, bool)]) > 0.9
    if len(block["terms"]) > 1:  # standardised terms: each is about 0 +- 1 on normal data
        assert abs(np.mean(s_normal)) < 1.5


@pytest.mark.parametrize("name", sorted(SCORES))
@pytest.mark.parametrize("n", [1, 2])
def test_every_score_fits_on_the_one_or_two_images_a_small_hold_out_gives(name, n):
    """Export fits the score on the held-out images, which may be one or two: a term without a
    spread (or one of rounding) is not standardised, never divided by ~0 and never an error."""
    block = fit_score(name, _parts(np.random.default_rng(3), n), make_prior_spec("gaussian", 4))
    assert all(t["std"] > 1e-6 for t in block["terms"])
    scores = evaluate_score(block, _parts(np.random.default_rng(4), 50, shift=1.0), {"name": "gaussian", "dim": 4})
    assert np.isfinite(scores).all() and np.abs(scores).max() < 1e6


def test_auroc_matches_pair_counting_with_ties():
    rng = np.random.default_rng(2)
    s = rng.integers(0, 5, 60).astype(float)  # many ties
    y = rng.random(60) < 0.4
    pos, neg = s[y], s[~y]
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert auroc(s, y) == pytest.approx(pairs)
    assert auroc([1, 2, 3, 4], [False, False, True, True]) == 1.0


def test_percentile_threshold_records_stats_and_moves_to_other_percentiles():
    s = np.random.default_rng(3).normal(size=2000)
    t = percentile_threshold(s, 99.0)
    st = t["stats"]
    assert t["value"] == pytest.approx(np.percentile(s, 99)) and st["count"] == 2000
    assert {"min", "max", "mean", "std", "percentiles", "quantiles"} <= set(st) and "50" in st["percentiles"]
    for p in (50, 90, 95, 99.5):
        assert threshold_at_percentile(t, p) == pytest.approx(np.percentile(s, p), abs=0.02)
    with pytest.raises(InputError):
        threshold_at_percentile(t, 101)
    with pytest.raises(ModelError, match="recalibrate"):
        threshold_at_percentile({"value": 1.0}, 95)


def test_f1_threshold_separates_separable_sets_and_says_what_it_did():
    normal, bad = np.linspace(0, 1, 50), np.linspace(2, 3, 10)
    t = f1_threshold(normal, bad)
    assert t["method"] == "f1" and t["f1"] == 1.0 and 1 < t["value"] < 2 and t["anomaly_count"] == 10
    overlap = f1_threshold(np.r_[normal, 2.5], bad)
    assert overlap["f1"] < 1.0 and np.sum(np.r_[normal, 2.5] > overlap["value"]) >= 0


def test_normalised_score_is_half_at_the_threshold_zero_at_the_median_and_clamped():
    stats = percentile_threshold(np.arange(101.0), 99)["stats"]
    n = normalise(np.array([50.0, 99.0, 148.0, -1e9, 1e9]), 99.0, stats)
    np.testing.assert_allclose(n, [0.0, 0.5, 1.0, 0.0, 1.0])
    assert np.all(np.isfinite(normalise(np.array([1.0]), 10.0, {"percentiles": {"50": 10.0}})))  # threshold at the median


def test_metadata_rewrite_changes_only_the_metadata(tiny_model_dir):
    data = (current_version(tiny_model_dir) / "encoder.onnx").read_bytes()
    new = set_metadata_prop(data, "aae", '{"x": 1}')
    new = set_metadata_prop(new, "other", "kept")
    session = ort.InferenceSession(new, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["aae"] == '{"x": 1}' and meta["other"] == "kept"
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    before = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    np.testing.assert_array_equal(session.run(None, {"image": x})[0], before)
    with pytest.raises(ModelError):
        set_metadata_prop(data[: len(data) // 2], "aae", "{}")


def test_fitted_gaussian_prior_samples_and_density_match_the_codes_it_was_fitted_on():
    # The plain autoencoder's prior: a full-covariance Gaussian fitted to held-out codes.
    from aae_runtime.contract.priors import fit_gaussian_prior

    rng = np.random.default_rng(2)
    mix = np.array([[2.0, 0.0, 0.0], [1.5, 0.5, 0.0], [0.0, 0.0, 0.2]])
    codes = rng.normal(size=(5000, 3)) @ mix.T + np.array([1.0, -2.0, 0.5])
    spec = fit_gaussian_prior(codes, "5000 test codes")
    draws = sample_prior(spec, 100_000, np.random.default_rng(3)).astype(np.float64)
    np.testing.assert_allclose(draws.mean(0), codes.mean(0), atol=0.05)
    np.testing.assert_allclose(np.cov(draws, rowvar=False), np.cov(codes, rowvar=False), rtol=0.05, atol=0.02)
    cov = np.cov(codes, rowvar=False)
    u = codes[:5] - codes.mean(0)
    expected = 0.5 * np.einsum("ni,ij,nj->n", u, np.linalg.inv(cov), u) + 0.5 * np.log(np.linalg.det(2 * np.pi * cov))
    np.testing.assert_allclose(prior_nll(codes[:5], spec), expected, rtol=1e-4)
    with pytest.raises(ModelError, match="fitted_gaussian"):
        sample_prior(dict(spec, scale_tril=[[1.0]]), 2, rng)
