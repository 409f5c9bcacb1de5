"""Anomaly thresholds from scores of held-out images, and normalised scores (numpy only).

Two methods:

- ``percentile`` (default): the threshold is a percentile of the scores of normal images, so
  about (100 - percentile) % of normal images are flagged. Needs no defect examples.
- ``f1``: with labelled anomalous images, the threshold that maximises F1 (anomaly = positive)
  on normal + anomalous scores. Without anomalies F1 is undefined, so it is never the default.

The metadata stores the statistics of the normal scores (count, min, max, mean, std, several
percentiles and a quantile table), so the threshold can be moved to another percentile at run
time without the images, and scores can be normalised:

    normalised = clip(0.5 + 0.5 * (score - threshold) / (threshold - median), 0, 1)

where ``median`` is the median normal score: 0 at the typical normal image, 0.5 at the
threshold, 1 at the threshold plus the threshold's distance from the median.
"""

from __future__ import annotations

import numpy as np

from aae_runtime.contract.errors import InputError, ModelError

DEFAULT_PERCENTILE = 99.0
REPORTED_PERCENTILES = (1, 5, 25, 50, 75, 90, 95, 99, 99.5, 99.9)
# Percentile grid of the stored quantile table: dense near the top, where thresholds live.
QUANTILE_GRID = tuple(float(p) for p in np.round(np.concatenate(
    [np.arange(0, 90, 1.0), np.arange(90, 99, 0.25), np.arange(99, 100.0001, 0.05)]), 4))
METHODS = ("percentile", "f1")


def score_statistics(scores: np.ndarray) -> dict:
    """Summary of a set of scores, as stored in the metadata."""
    s = np.asarray(scores, dtype=np.float64)
    stats = {"count": int(s.size), "min": float(s.min()), "max": float(s.max()), "mean": float(s.mean()), "std": float(s.std())}
    stats["percentiles"] = {_key(p): float(np.percentile(s, p)) for p in REPORTED_PERCENTILES}
    stats["quantiles"] = {"percent": list(QUANTILE_GRID), "value": [float(v) for v in np.percentile(s, QUANTILE_GRID)]}
    return stats


def percentile_threshold(normal_scores: np.ndarray, percentile: float = DEFAULT_PERCENTILE) -> dict:
    """Threshold at ``percentile`` of normal scores: about (100 - percentile)% false alarms."""
    s = _finite(normal_scores, "normal")
    _check_percentile(percentile)
    return {
        "value": float(np.percentile(s, percentile)),
        "method": "percentile",
        "percentile": float(percentile),
        "source": "held-out normal images",
        "stats": score_statistics(s),
    }


def f1_threshold(normal_scores: np.ndarray, anomaly_scores: np.ndarray) -> dict:
    """The threshold (flag = score > threshold) that maximises F1 with anomalies as positives."""
    neg, pos = _finite(normal_scores, "normal"), _finite(anomaly_scores, "anomalous")
    s = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(len(pos), bool), np.zeros(len(neg), bool)])
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[s[1:] != s[:-1], True]  # cut only between distinct scores
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    f1 = 2 * tp / (tp + fp + len(pos))  # 2TP / (2TP + FP + FN), FN = P - TP
    best = int(np.argmax(f1))
    cut_scores = s[last]
    # Between the lowest flagged score and the next lower one, so that both sides are exact.
    lower = cut_scores[best + 1] if best + 1 < len(cut_scores) else cut_scores[best] - max(abs(cut_scores[best]), 1.0)
    value = float(0.5 * (cut_scores[best] + lower))
    return {
        "value": value,
        "method": "f1",
        "f1": float(f1[best]),
        "percentile": float(100.0 * np.mean(neg <= value)),  # share of normal images below it
        "anomaly_count": int(len(pos)),
        "source": "held-out normal images and labelled anomalous images",
        "stats": score_statistics(neg),
    }


def threshold_at_percentile(threshold: dict, percentile: float) -> float:
    """The threshold at another percentile of the stored normal scores (quantile table)."""
    _check_percentile(percentile)
    q = (threshold.get("stats") or {}).get("quantiles")
    if not q:
        raise ModelError("this model's metadata has no stored score quantiles: recalibrate it (aae-run calibrate) "
                         "or give --threshold as a value")
    return float(np.interp(percentile, q["percent"], q["value"]))


def normalise(scores: np.ndarray, threshold: float, stats: dict | None) -> np.ndarray:
    """Scores mapped to [0, 1] with 0.5 at the threshold (formula in the module docstring)."""
    s = np.asarray(scores, dtype=np.float64)
    median = None
    if stats:
        median = (stats.get("percentiles") or {}).get("50", stats.get("mean"))
    scale = threshold - median if median is not None else 0.0
    if not scale > 0:  # threshold at or below the median (e.g. overridden): fall back to a unit scale
        scale = float(stats.get("std", 0.0)) if stats else 0.0
        scale = scale if scale > 0 else max(abs(threshold), 1e-12)
    return np.clip(0.5 + 0.5 * (s - threshold) / scale, 0.0, 1.0)


def _key(p: float) -> str:
    return f"{p:g}"


def _finite(scores: np.ndarray, kind: str) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size == 0 or not np.all(np.isfinite(s)):
        raise InputError(f"cannot calibrate: need at least one finite score of a {kind} image")
    return s


def _check_percentile(percentile: float) -> None:
    if not 0 <= percentile <= 100:
        raise InputError(f"percentile must be between 0 and 100, got {percentile}")
