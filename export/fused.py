"""The fused scoring graph: image batch -> latent code, per-pixel error map and mean error.

One ONNX Runtime call per batch instead of two (encoder, decoder) plus numpy: the runtime uses
``scorer.onnx`` transparently when a model folder has one. The per-pixel error is the same
formula as `aae_runtime.contract.scores.pixel_error` (same clipping for bce), so the two paths agree to
float32 rounding; export checks that on real images before writing the file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np
import onnx
import torch
from torch import nn

from aae_runtime.contract.metadata import IMAGE_INPUT, LATENT_OUTPUT, PIXEL_ERROR_OUTPUT, RECONSTRUCTION_ERROR_OUTPUT

FUSED_TOLERANCE = 1e-4  # largest difference allowed between the two paths (see fused_parity)
_EPS = 1e-6  # = aae_runtime.contract.scores._EPS: the bce clip


class FusedScorer(nn.Module):
    """encoder + decoder + per-pixel error, in eval mode (deterministic encoder path)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, pixel_error: str):
        super().__init__()
        self.encoder, self.decoder, self.pixel_error = encoder, decoder, pixel_error

    def forward(self, x: torch.Tensor):
        z = self.encoder(x)  # (B, latent)
        r = self.decoder(z)  # (B, C, H, W)
        if self.pixel_error == "mse":
            err = (x - r) ** 2
        elif self.pixel_error == "mae":
            err = (x - r).abs()
        else:  # bce
            rc = r.clamp(_EPS, 1 - _EPS)
            err = -(x * rc.log() + (1 - x) * (1 - rc).log())
        err = err.mean(dim=1)  # (B, H, W), averaged over channels
        return z, err, err.flatten(1).mean(dim=1)


def fused_onnx(encoder: nn.Module, decoder: nn.Module, pixel_error: str, example: torch.Tensor) -> onnx.ModelProto:
    """Export the fused scorer with a dynamic batch axis, weights inline."""
    module = FusedScorer(encoder, decoder, pixel_error).eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    names = [LATENT_OUTPUT, PIXEL_ERROR_OUTPUT, RECONSTRUCTION_ERROR_OUTPUT]
    torch_logger = logging.getLogger("torch")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (example,), dynamo=True, input_names=[IMAGE_INPUT], output_names=names,
                                        dynamic_shapes=({0: batch},), verbose=False, optimize=True)
    finally:
        torch_logger.setLevel(level)
    proto = program.model_proto
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    for out in proto.graph.output:
        out.type.tensor_type.shape.dim[0].dim_param = "batch"
    return proto


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
