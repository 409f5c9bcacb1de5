"""Anomaly scores from an image and its reconstruction (numpy; higher = more abnormal).

The score a model uses is named in its metadata (``{"name": "mse"}``); export computes the
threshold with these same functions, so the score has one definition.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-6


def pixel_error(x: np.ndarray, recon: np.ndarray, name: str) -> np.ndarray:
    """Per-pixel error (N, H, W), averaged over channels, for the score ``name``."""
    if name == "mse":
        err = (x - recon) ** 2
    elif name == "mae":
        err = np.abs(x - recon)
    elif name == "bce":
        r = np.clip(recon, _EPS, 1 - _EPS)
        err = -(x * np.log(r) + (1 - x) * np.log(1 - r))
    else:
        raise ValueError(f"unknown reconstruction score {name!r}; choose one of {', '.join(RECONSTRUCTION_SCORES)}")
    return err.mean(axis=1)


def reconstruction_score(x: np.ndarray, recon: np.ndarray, name: str) -> np.ndarray:
    """One score per image (N,), float64: the mean per-pixel error."""
    return pixel_error(x, recon, name).reshape(len(x), -1).mean(axis=1, dtype=np.float64)


RECONSTRUCTION_SCORES = ("mse", "mae", "bce")
SCORE_DEFINITIONS = {
    "mse": "mean over pixels and channels of (x - decoder(encoder(x)))^2",
    "mae": "mean over pixels and channels of |x - decoder(encoder(x))|",
    "bce": "mean over pixels and channels of the binary cross-entropy of x under decoder(encoder(x))",
}
