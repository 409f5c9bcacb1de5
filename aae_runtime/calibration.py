"""Anomaly thresholds from the scores of normal images (numpy only: recalibrate on a device)."""

from __future__ import annotations

import numpy as np

from aae_runtime.errors import InputError

DEFAULT_PERCENTILE = 99.0
REPORTED_PERCENTILES = (50, 90, 95, 99, 99.9)


def score_statistics(scores: np.ndarray) -> dict:
    """Summary of a set of scores, as stored in the metadata."""
    s = np.asarray(scores, dtype=np.float64)
    stats = {"count": int(s.size), "min": float(s.min()), "max": float(s.max()), "mean": float(s.mean()), "std": float(s.std())}
    stats["percentiles"] = {str(p): float(np.percentile(s, p)) for p in REPORTED_PERCENTILES}
    return stats


def percentile_threshold(normal_scores: np.ndarray, percentile: float = DEFAULT_PERCENTILE) -> dict:
    """Threshold at ``percentile`` of normal scores: about (100 - percentile)% false alarms."""
    s = np.asarray(normal_scores, dtype=np.float64)
    if s.size == 0 or not np.all(np.isfinite(s)):
        raise InputError("cannot calibrate: need at least one finite score of a normal image")
    if not 0 < percentile <= 100:
        raise InputError(f"percentile must be in (0, 100], got {percentile}")
    return {
        "value": float(np.percentile(s, percentile)),
        "method": "percentile",
        "percentile": float(percentile),
        "source": "held-out normal images",
        "stats": score_statistics(s),
    }
