"""The fused scoring graph against the runtime's two-graph path.

The fused graph (``scorer.onnx``; modules in `aae_train.graphs`) gives a batch's codes, per-pixel
error maps and mean errors in one ONNX Runtime call instead of two plus numpy; the runtime uses
it transparently when a model folder has one. Export checks on real images that both paths
give the same numbers (to float32 rounding) before writing the file.
"""

from __future__ import annotations

import numpy as np

FUSED_TOLERANCE = 1e-4  # largest difference allowed between the two paths (see fused_parity)


def fused_parity(fused_model, two_graph_model, images: np.ndarray) -> dict[str, float]:
    """Largest differences between the fused and the two-graph path on batches of 1, 7 and 64:
    latent codes (absolute), per-pixel errors (absolute), mean errors (relative)."""
    worst = {"latent": 0.0, "pixel_error": 0.0, "reconstruction_error": 0.0}
    for size in (1, 7, 64):
        x = np.resize(images, (size, *images.shape[1:])) if len(images) < size else images[:size]
        a, b = fused_model.score_parts(x), two_graph_model.score_parts(x)
        worst["latent"] = max(worst["latent"], float(np.abs(a.latent - b.latent).max()))
        worst["pixel_error"] = max(worst["pixel_error"], float(np.abs(a.pixel_error - b.pixel_error).max()))
        rel = np.abs(a.reconstruction - b.reconstruction) / np.maximum(np.abs(b.reconstruction), 1e-6)
        worst["reconstruction_error"] = max(worst["reconstruction_error"], float(rel.max()))
    return worst
