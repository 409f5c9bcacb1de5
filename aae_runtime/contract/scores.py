"""Anomaly scores (numpy; higher = more abnormal): their definitions, fitting and evaluation.

A score is a sum of *terms*, each a raw per-image quantity, optionally log-transformed and
standardised by the mean and std it has on normal validation images:

- ``reconstruction``: mean per-pixel error between image and reconstruction (mse, mae or bce);
- ``relative``: that error divided by the image's mean intensity (on a 0..1 scale, plus 0.01):
  an image with little ink (a thin "1" scored by a model of "8"s) has few pixels to get wrong,
  so its absolute error is small even when its shape is wrong; relative to the ink it is not;
- ``prior``: negative log-likelihood of the latent code under the model's prior;
- ``codes``: squared Mahalanobis distance of the code to a Gaussian fitted to the codes of
  normal validation images (the encoder never matches the prior exactly; this measures
  distance to where normal images actually land).

Plain reconstruction scores (``mse``, ``mae``, ``bce``) are one unstandardised term, so their
values are the familiar mean errors. The score a model uses -- names, transforms, fitted
statistics -- is written into its metadata by export (or ``aae-run calibrate``) and read back
here, so the score has exactly one definition.

Why the latent terms are risky: the adversarial regulariser pulls every code towards the
prior, so an unusual input is often mapped *closer* to the prior's centre than normal ones
and gets a *lower* latent score. Combined scores therefore weigh a latent term only as one
standardised vote beside the reconstruction, and the benchmark (benchmarks/one_class.py)
measures each option rather than trusting the intuition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from aae_runtime.contract.errors import ModelError
from aae_runtime.contract.priors import FITTED_GAUSSIAN

_EPS = 1e-6
_LOG_FLOOR = 1e-12  # keeps log(reconstruction error) finite for a perfect reconstruction
_SHRINK = 1e-3  # ridge on the code covariance, as a share of its mean variance: invertible always
INTENSITY_FLOOR = 0.01  # added to the mean intensity in the relative error: a blank image stays finite

RECONSTRUCTION_SCORES = ("mse", "mae", "bce", "ssim")
# SSIM (Wang et al. 2004) as a per-pixel error, 1 - SSIM over a SSIM_WINDOW x SSIM_WINDOW uniform
# window (edges reflected), for textures (Bergmann et al. 2019): a reconstruction that keeps the
# local mean but loses the structure (blur, a scratch in a regular pattern) has a small squared
# error yet a low SSIM. Constants for inputs spanning 1 (pixels / 255).
SSIM_WINDOW = 7
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2
# The draem family's map: the probability that a pixel belongs to a defect, which only its
# scorer graph computes (the segmenter is not part of the encoder and decoder): a model scored
# so lists SEGMENTATION in its metadata's "requires".
SEGMENT = "segment"
SEGMENTATION = "segmentation"  # the feature name in the metadata's "requires" list
PIXEL_ERRORS = (*RECONSTRUCTION_SCORES, SEGMENT)  # every per-pixel map a score may be built on
LATENT_SOURCES = ("prior", "codes")
UNSTANDARDISED = ("reconstruction", "relative")  # alone, these keep their natural units

# name -> (pixel error, [(source, transform, weight), ...]); one entry per selectable score.
# weight "dev" is two-sided: |standardised term|, the deviation from normal in either direction.
def _build_scores() -> dict[str, tuple[str, list[tuple[str, str, float | str]]]]:
    table: dict[str, tuple[str, list]] = {"prior": ("mse", [("prior", "identity", 1.0)]),
                                          "codes": ("mse", [("codes", "log", 1.0)])}
    table[SEGMENT] = (SEGMENT, [("reconstruction", "identity", 1.0)])
    for pix in RECONSTRUCTION_SCORES:
        table[pix] = (pix, [("reconstruction", "identity", 1.0)])
        table[f"{pix}_rel"] = (pix, [("relative", "identity", 1.0)])
        # either error unusual: the relative one for thin shapes, the absolute one for bright junk
        # (noise has plenty of ink, so its relative error alone can look normal)
        table[f"{pix}_absrel"] = (pix, [("reconstruction", "log", 1.0), ("relative", "log", 1.0)])
        recon = ("reconstruction", "log", 1.0)
        table[f"{pix}+prior"] = (pix, [recon, ("prior", "identity", 1.0)])
        table[f"{pix}-prior"] = (pix, [recon, ("prior", "identity", -1.0)])  # codes pulled to the centre
        table[f"{pix}+prior_dev"] = (pix, [recon, ("prior", "identity", "dev")])
        table[f"{pix}+codes"] = (pix, [recon, ("codes", "log", 1.0)])
    return table


SCORES = _build_scores()
# How a score's standardised terms are combined: "sum" unless listed here.
COMBINE = {f"{pix}_absrel": "max" for pix in RECONSTRUCTION_SCORES}
DEFAULT_SCORE = "mse_absrel"  # best mean AUROC on the one-class benchmark (benchmarks/results/one_class.md)

PIXEL_DEFINITIONS = {
    "mse": "(x - decoder(encoder(x)))^2",
    "mae": "|x - decoder(encoder(x))|",
    "bce": "binary cross-entropy of x under decoder(encoder(x))",
    "ssim": f"1 - SSIM(x, decoder(encoder(x))) over {SSIM_WINDOW} x {SSIM_WINDOW} uniform windows (edges reflected)",
    SEGMENT: "probability that the pixel belongs to a defect: sigmoid(segmenter(x, decoder(encoder(x)))), from the scorer graph",
}
SOURCE_DEFINITIONS = {
    "reconstruction": "mean over pixels and channels of the per-pixel error",
    "relative": f"mean per-pixel error / (mean input intensity on a 0..1 scale + {INTENSITY_FLOOR})",
    "prior": "-log p(z) of the code z = encoder(x) under the prior",
    "codes": "squared Mahalanobis distance of z to the Gaussian fitted to normal validation codes",
}


def _define(pix: str, terms: list, combine: str = "sum") -> str:
    if len(terms) == 1 and terms[0][0] in UNSTANDARDISED:
        return f"{SOURCE_DEFINITIONS[terms[0][0]]}; per-pixel error {PIXEL_DEFINITIONS[pix]}"
    if combine == "max":
        inner = ", ".join(f"standardised {'log ' if tr == 'log' else ''}[{SOURCE_DEFINITIONS[src]}]" for src, tr, _ in terms)
        return f"max({inner}); per-pixel error {PIXEL_DEFINITIONS[pix]}"
    parts = []
    for src, transform, weight in terms:
        term = f"standardised {'log ' if transform == 'log' else ''}[{SOURCE_DEFINITIONS[src]}]"
        parts.append(f"+ |{term}|" if weight == "dev" else (f"- {term}" if weight == -1.0 else f"+ {term}"))
    return " ".join(parts).lstrip("+ ") + f"; per-pixel error {PIXEL_DEFINITIONS[pix]}"


SCORE_DEFINITIONS = {name: _define(pix, terms, COMBINE.get(name, "sum")) for name, (pix, terms) in SCORES.items()}


@dataclass(frozen=True)
class ScoreParts:
    """What one forward pass yields for a batch: everything any score and any map needs."""

    latent: np.ndarray  # (N, latent_dim) float32
    pixel_error: np.ndarray  # (N, H, W) float32, averaged over channels
    reconstruction: np.ndarray  # (N,) float64, mean of pixel_error per image
    intensity: np.ndarray  # (N,) float64, mean input intensity on a 0..1 scale
    class_probs: np.ndarray | None = None  # (N, K) float32, from a model with a class head (the same pass)


def pixel_error(x: np.ndarray, recon: np.ndarray, name: str) -> np.ndarray:
    """Per-pixel error (N, H, W), averaged over channels, for the score ``name``."""
    if name == "mse":
        err = (x - recon) ** 2
    elif name == "mae":
        err = np.abs(x - recon)
    elif name == "bce":
        r = np.clip(recon, _EPS, 1 - _EPS)
        err = -(x * np.log(r) + (1 - x) * np.log(1 - r))
    elif name == "ssim":
        err = 1.0 - ssim_map(x, recon)
    elif name == SEGMENT:
        raise ModelError("this model's maps come from its segmenter, which only its scorer graph (scorer.onnx) runs: "
                         "load the model with its scorer, or export it again")
    else:
        raise ValueError(f"unknown reconstruction score {name!r}; choose one of {', '.join(RECONSTRUCTION_SCORES)}")
    return err.mean(axis=1)


def ssim_map(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM (N, C, H, W) of two image batches; the formula `aae_train.graphs.ssim_map`
    builds into the graphs (same window, padding and constants), computed in float64."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    mx, my = _box(x), _box(y)
    vx, vy, cxy = _box(x * x) - mx * mx, _box(y * y) - my * my, _box(x * y) - mx * my
    num = (2 * mx * my + SSIM_C1) * (2 * cxy + SSIM_C2)
    return (num / ((mx * mx + my * my + SSIM_C1) * (vx + vy + SSIM_C2))).astype(np.float32)


def _box(a: np.ndarray) -> np.ndarray:
    """Mean over SSIM_WINDOW x SSIM_WINDOW windows of (N, C, H, W), edges reflected (torch's "reflect")."""
    r = SSIM_WINDOW // 2
    if min(a.shape[-2:]) <= r:
        raise ValueError(f"SSIM needs images larger than {r} pixels on each side")
    p = np.pad(a, [(0, 0), (0, 0), (r, r), (r, r)], mode="reflect")
    h, w = a.shape[-2:]
    rows = sum(p[:, :, j : j + h, :] for j in range(SSIM_WINDOW))
    return sum(rows[:, :, :, j : j + w] for j in range(SSIM_WINDOW)) / SSIM_WINDOW**2


def intensity(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """Mean intensity (N,) float64 of model inputs (N, C, H, W) whose values span [low, high]."""
    span = (high - low) or 1.0
    return (x.reshape(len(x), -1).mean(axis=1, dtype=np.float64) - low) / span


def per_image(pixel_err: np.ndarray) -> np.ndarray:
    """(N, H, W) per-pixel errors -> (N,) float64 means."""
    return pixel_err.reshape(len(pixel_err), -1).mean(axis=1, dtype=np.float64)


def prior_nll(z: np.ndarray, prior: dict) -> np.ndarray:
    """-log p(z) (N,) under a gaussian or mog prior spec (see aae_runtime.contract.priors)."""
    z = np.asarray(z, dtype=np.float64)
    d = z.shape[1]
    name = prior["name"]
    if name == "gaussian":
        std = float(prior.get("std", 1.0))
        u = (z - float(prior.get("mean", 0.0))) / std
        return 0.5 * (u**2).sum(axis=1) + d * math.log(std) + 0.5 * d * math.log(2 * math.pi)
    if name == FITTED_GAUSSIAN:
        tril = np.asarray(prior["scale_tril"], dtype=np.float64)
        u = np.linalg.solve(tril, (z - np.asarray(prior["mean"], dtype=np.float64)).T).T  # whitened
        return 0.5 * (u**2).sum(axis=1) + float(np.log(np.diag(tril)).sum()) + 0.5 * d * math.log(2 * math.pi)
    if name == "mog":
        k, radius, std = int(prior["components"]), float(prior["radius"]), float(prior["std"])
        angle = 2 * np.pi * np.arange(k) / k
        centres = np.zeros((k, d))
        centres[:, 0], centres[:, 1] = radius * np.cos(angle), radius * np.sin(angle)
        sq = ((z[:, None, :] - centres[None]) ** 2).sum(axis=2) / (2 * std**2)  # (N, k)
        lo = sq.min(axis=1)
        log_mix = -lo + np.log(np.exp(-(sq - lo[:, None])).mean(axis=1))  # stable log-mean-exp
        return -log_mix + d * math.log(std) + 0.5 * d * math.log(2 * math.pi)
    raise ModelError(f"the 'prior' score needs a gaussian, mog or fitted_gaussian prior, this model has {name!r}: choose another --score")


def fit_codes(z: np.ndarray) -> dict:
    """Mean and precision of a Gaussian fitted to normal codes (ridge-regularised)."""
    z = np.asarray(z, dtype=np.float64)
    mean = z.mean(axis=0)
    cov = np.atleast_2d(np.cov(z, rowvar=False)) if len(z) > 1 else np.eye(z.shape[1])
    ridge = _SHRINK * max(float(np.trace(cov)) / len(cov), _EPS)
    precision = np.linalg.inv(cov + ridge * np.eye(len(cov)))
    return {"mean": mean.tolist(), "precision": precision.tolist()}


def codes_distance(z: np.ndarray, codes: dict) -> np.ndarray:
    u = np.asarray(z, dtype=np.float64) - np.asarray(codes["mean"])
    return np.einsum("ni,ij,nj->n", u, np.asarray(codes["precision"]), u)


def score_spec(name: str) -> tuple[str, list]:
    if name not in SCORES:
        raise ModelError(f"unknown score {name!r}; choose one of {', '.join(SCORES)}")
    return SCORES[name]


DEGENERATE_SPREAD = 1e-7  # a spread at or below this share of the values: rounding, not a spread (no standardising, no threshold)


def fit_score(name: str, parts: ScoreParts, prior: dict) -> dict:
    """The metadata ``score`` block of score ``name``, its statistics fitted on normal ``parts``."""
    pix, terms = score_spec(name)
    block = {"name": name, "pixel_error": pix, "definition": SCORE_DEFINITIONS[name],
             "higher_is_more_anomalous": True, "fitted_on": int(len(parts.reconstruction)),
             "combine": COMBINE.get(name, "sum")}
    if any(src == "codes" for src, _, _ in terms):
        block["codes"] = fit_codes(parts.latent)
    block["terms"] = []
    standardise = len(terms) > 1 or terms[0][0] not in UNSTANDARDISED
    for src, transform, weight in terms:
        raw = _transform(_raw_term(src, parts, prior, block), transform)
        mean, std = (float(raw.mean()), float(raw.std())) if standardise else (0.0, 1.0)
        if std <= DEGENERATE_SPREAD * abs(mean):  # no spread, or one of rounding: as none (dividing by it makes 1e15s)
            std = 1.0
        block["terms"].append({"source": src, "transform": transform, "two_sided": weight == "dev",
                               "weight": 1.0 if weight == "dev" else float(weight), "mean": mean, "std": std})
    return block


def evaluate_score(block: dict, parts: ScoreParts, prior: dict) -> np.ndarray:
    """Scores (N,) float64 of ``parts`` under a fitted score block from the metadata."""
    terms = block.get("terms")
    if terms is None:  # a model exported before scores had terms: plain reconstruction error
        return parts.reconstruction
    values = []
    for t in terms:
        u = (_transform(_raw_term(t["source"], parts, prior, block), t["transform"]) - t["mean"]) / t["std"]
        values.append(float(t.get("weight", 1.0)) * (np.abs(u) if t.get("two_sided") else u))
    if block.get("combine") == "max":
        return np.max(values, axis=0)
    return np.sum(values, axis=0)


def validate_score_block(block: dict, source: str) -> None:
    """Raise ModelError unless the metadata's score block can be evaluated by this runtime."""
    pix = block.get("pixel_error", block.get("name"))
    if block.get("combine", "sum") not in ("sum", "max"):
        raise ModelError(f"{source} metadata combines score terms by {block.get('combine')!r}: upgrade aae or re-export the model")
    if pix not in PIXEL_ERRORS:
        raise ModelError(f"{source} metadata names an unknown pixel error {pix!r}: upgrade aae or re-export the model")
    for t in block.get("terms") or []:
        ok = (isinstance(t, dict) and t.get("source") in (*UNSTANDARDISED, *LATENT_SOURCES)
              and t.get("transform") in ("identity", "log")
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # mean, std: required
                      for v in (t.get("mean"), t.get("std"), t.get("weight", 1.0)))
              and t["std"] > 0)
        if not ok:
            raise ModelError(f"{source} metadata has a malformed score term {t!r}: re-export or recalibrate the model")
        if t["source"] == "codes" and not isinstance(block.get("codes"), dict):
            raise ModelError(f"{source} metadata lacks the fitted 'codes' statistics its score needs: recalibrate the model")


def _raw_term(source: str, parts: ScoreParts, prior: dict, block: dict) -> np.ndarray:
    if source == "reconstruction":
        return parts.reconstruction
    if source == "relative":
        return parts.reconstruction / (parts.intensity + INTENSITY_FLOOR)
    if source == "prior":
        return prior_nll(parts.latent, prior)
    return codes_distance(parts.latent, block["codes"])


def _transform(raw: np.ndarray, transform: str) -> np.ndarray:
    # log: reconstruction errors and distances are heavy-tailed; on a log scale one huge term
    # cannot drown the other when they are added.
    return np.log(np.maximum(raw, _LOG_FLOOR)) if transform == "log" else raw


# -- the score inside the fused graph ---------------------------------------------------------------
# For clients without Python (C++, C#, JavaScript ONNX Runtime), the fused scorer of an untiled
# model can also output the final score and the verdict (export/score_head.py builds the nodes).
# The score's statistics travel in one float32 initializer, HEAD_PARAMS, laid out as below, and
# the threshold in another, HEAD_THRESHOLD, which is also an optional graph input; aae-run
# calibrate rewrites both with the metadata. Up to two terms, each reconstruction or relative:
# every score without a latent term (mse, mae, bce, ssim, their _rel and _absrel forms).
HEAD_PARAMS, HEAD_THRESHOLD = "aae_score_params", "threshold"
SCORE_OUTPUT, ANOMALY_OUTPUT = "score", "anomaly"
# per term: [is reconstruction (else relative), is log, mean, std, weight, two-sided], x2, then
# [combine is max, second term added (sum of two terms)]
HEAD_TERM_FIELDS = 6
HEAD_LENGTH = 2 * HEAD_TERM_FIELDS + 2
LOG_FLOOR = _LOG_FLOOR


def head_params(block: dict) -> np.ndarray | None:
    """The HEAD_PARAMS vector (float32) of a score block, or None when the block has a term the
    graph's head cannot compute (a latent term, more than two terms)."""
    terms = block.get("terms")
    if terms is None:  # a block from before terms: the plain reconstruction error
        terms = [{"source": "reconstruction", "transform": "identity", "mean": 0.0, "std": 1.0, "weight": 1.0}]
    if not 1 <= len(terms) <= 2 or any(t["source"] not in ("reconstruction", "relative") for t in terms):
        return None
    rows = [[1.0 if t["source"] == "reconstruction" else 0.0, 1.0 if t["transform"] == "log" else 0.0, float(t["mean"]),
             float(t["std"]), float(t.get("weight", 1.0)), 1.0 if t.get("two_sided") else 0.0] for t in terms]
    is_max = block.get("combine") == "max"
    second = 1.0 if len(rows) == 2 and not is_max else 0.0
    if len(rows) == 1:
        rows.append(rows[0])  # max(w, w) = w; the sum leaves it out
    return np.array([*rows[0], *rows[1], 1.0 if is_max else 0.0, second], dtype=np.float32)
