"""Latent priors, sampled with numpy from their description alone.

A prior is described by a small JSON-able dict (``{"name": "gaussian", "dim": 8, "std": 5.0}``)
that travels in the checkpoint and in the ONNX metadata. Training draws its "real" samples for
the discriminator from these same functions, so each prior has exactly one definition.
"""

from __future__ import annotations

import math

import numpy as np

from aae_runtime.contract.errors import ModelError

# Defaults for each prior's parameters; a spec names the prior and may override any of them.
PRIOR_DEFAULTS: dict[str, dict] = {
    "gaussian": {"mean": 0.0, "std": 1.0},
    # Components on a circle in the first two latent dimensions (the paper's figures use 10).
    "mog": {"components": 10, "radius": 4.0, "std": 0.5},
    "uniform": {"low": -1.0, "high": 1.0},
    # A 2-D spiral; `noise` is the std of Gaussian jitter around the curve.
    "swissroll": {"turns": 1.5, "radius": 4.0, "noise": 0.05},
}
PRIOR_NAMES = tuple(PRIOR_DEFAULTS)  # the priors training can impose
# Not imposed but measured: a Gaussian fitted to a trained model's held-out codes, for models
# without a prior (the plain autoencoder), so that they can be sampled. Full covariance, stored
# as its lower Cholesky factor ``scale_tril`` (dim x dim) beside ``mean`` (dim,).
FITTED_GAUSSIAN = "fitted_gaussian"
MAX_FITTED_DIM = 1024  # a larger fitted prior is a damaged block, not a model


def make_prior_spec(name: str, dim: int, **overrides: float) -> dict:
    """A complete prior spec: the name, the latent size and every parameter, defaults filled in."""
    if name not in PRIOR_DEFAULTS:
        raise ValueError(f"unknown prior {name!r}; choose one of {', '.join(PRIOR_NAMES)}")
    params = {k: v for k, v in overrides.items() if v is not None and k in PRIOR_DEFAULTS[name]}
    spec = {"name": name, "dim": int(dim), **PRIOR_DEFAULTS[name], **params}
    validate_prior(spec)
    return spec


def fit_gaussian_prior(codes: np.ndarray, fitted_on: str) -> dict:
    """The ``fitted_gaussian`` spec of codes (N, dim): their mean and covariance (ridge 1e-6 x the
    mean variance, so that it always factors), described by ``fitted_on``."""
    z = np.asarray(codes, dtype=np.float64)
    cov = np.atleast_2d(np.cov(z, rowvar=False)) if len(z) > 1 else np.eye(z.shape[1])
    cov = cov + 1e-6 * max(float(np.trace(cov)) / len(cov), 1e-12) * np.eye(len(cov))
    return {"name": FITTED_GAUSSIAN, "dim": int(z.shape[1]), "mean": z.mean(axis=0).tolist(),
            "scale_tril": np.linalg.cholesky(cov).tolist(), "fitted_on": fitted_on}


def _validate_fitted(spec: dict) -> None:
    dim = spec.get("dim")
    ok = isinstance(dim, int) and not isinstance(dim, bool) and 1 <= dim <= MAX_FITTED_DIM
    try:
        mean = np.asarray(spec["mean"], dtype=np.float64)
        tril = np.asarray(spec["scale_tril"], dtype=np.float64)
        ok = ok and mean.shape == (dim,) and tril.shape == (dim, dim)
        ok = ok and bool(np.isfinite(mean).all() and np.isfinite(tril).all()) and bool((np.diag(tril) > 0).all())
        ok = ok and not np.triu(tril, 1).any()  # lower-triangular: the density and sampling assume it
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ModelError("the fitted_gaussian prior needs 'mean' (dim,) and a lower-triangular 'scale_tril' (dim, dim) "
                         "with a positive diagonal, all finite: re-export the model")


def validate_prior(spec: object) -> None:
    """Raise ModelError unless ``spec`` describes a prior this runtime can sample."""
    if isinstance(spec, dict) and spec.get("name") == FITTED_GAUSSIAN:
        return _validate_fitted(spec)
    if not isinstance(spec, dict) or spec.get("name") not in PRIOR_DEFAULTS:
        name = spec.get("name") if isinstance(spec, dict) else spec
        raise ModelError(f"unknown prior {name!r}: this runtime knows {', '.join(PRIOR_NAMES)}; upgrade aae")
    dim = spec.get("dim")
    if not isinstance(dim, int) or dim < 1:
        raise ModelError(f"prior {spec['name']!r} needs a positive integer 'dim', got {dim!r}")
    if spec["name"] in ("mog", "swissroll") and dim < 2:
        raise ModelError(f"the {spec['name']} prior needs a latent size of at least 2")
    if spec["name"] == "swissroll" and dim != 2:
        raise ModelError("the swissroll prior is 2-D: use a latent size of 2")
    for key in PRIOR_DEFAULTS[spec["name"]]:
        value = spec.get(key, PRIOR_DEFAULTS[spec["name"]][key])
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ModelError(f"prior parameter {key!r} must be a finite number, got {value!r}")
    if spec["name"] == "uniform" and not spec.get("low", -1.0) < spec.get("high", 1.0):
        raise ModelError(f"the uniform prior needs low < high, got low {spec.get('low')!r} and high {spec.get('high')!r}")


def sample_prior(spec: dict, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``n`` latent codes, shape (n, dim), float32, from the prior ``spec``."""
    validate_prior(spec)
    if spec["name"] == FITTED_GAUSSIAN:
        tril = np.asarray(spec["scale_tril"], dtype=np.float64)
        z = np.asarray(spec["mean"], dtype=np.float64) + rng.standard_normal((n, spec["dim"])) @ tril.T
        return np.asarray(z, dtype=np.float32)
    p = {**PRIOR_DEFAULTS[spec["name"]], **spec}
    dim = p["dim"]
    if p["name"] == "gaussian":
        z = p["mean"] + p["std"] * rng.standard_normal((n, dim))
    elif p["name"] == "uniform":
        z = rng.uniform(p["low"], p["high"], size=(n, dim))
    elif p["name"] == "mog":
        k = int(p["components"])
        which = rng.integers(0, k, size=n)
        angle = 2 * np.pi * which / k
        z = p["std"] * rng.standard_normal((n, dim))
        z[:, 0] += p["radius"] * np.cos(angle)
        z[:, 1] += p["radius"] * np.sin(angle)
    else:  # swissroll
        u = np.sqrt(rng.uniform(0.0, 1.0, size=n))  # sqrt: uniform density along the spiral's area
        angle = 2 * np.pi * p["turns"] * u
        r = p["radius"] * u
        z = np.stack([r * np.cos(angle), r * np.sin(angle)], axis=1)
        z += p["noise"] * rng.standard_normal((n, 2))
    return np.asarray(z, dtype=np.float32)
