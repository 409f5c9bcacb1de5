"""The torch modules families export as graphs: wrappers that give each graph its named outputs.

All run in eval mode, on the deterministic encoder path. The per-pixel error is the formula of
`aae_runtime.contract.scores.pixel_error` (same clipping for bce), so a fused scorer graph and
the runtime's two-graph path agree to float32 rounding; export checks that on real images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aae_runtime.contract.scores import SSIM_C1, SSIM_C2, SSIM_WINDOW

_EPS = 1e-6  # = aae_runtime.contract.scores._EPS: the bce clip


def pixel_error(x: torch.Tensor, r: torch.Tensor, name: str) -> torch.Tensor:
    """Per-pixel error (B, H, W) of reconstructions ``r`` of ``x`` (B, C, H, W), averaged over channels."""
    if name == "mse":
        err = (x - r) ** 2
    elif name == "mae":
        err = (x - r).abs()
    elif name == "ssim":
        err = 1.0 - ssim_map(x, r)
    elif name == "bce":
        rc = r.clamp(_EPS, 1 - _EPS)
        err = -(x * rc.log() + (1 - x) * (1 - rc).log())
    else:
        raise ValueError(f"no per-pixel error {name!r} of a reconstruction; choose one of mse, mae, ssim, bce")
    return err.mean(dim=1)


def ssim_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM (B, C, H, W): `aae_runtime.contract.scores.ssim_map` in torch (a loss, and the graphs)."""
    # (co)variances from each image centred on its own mean (per channel): in float32,
    # E[x^2] - E[x]^2 loses the digits a smooth patch's small variance needs unless x is near 0
    # (variances and covariance do not change when x and y are shifted, the means are shifted back)
    ox, oy = x.mean(dim=(2, 3), keepdim=True), y.mean(dim=(2, 3), keepdim=True)
    xc, yc = x - ox, y - oy
    mxc, myc = _box(xc), _box(yc)
    vx, vy, cxy = _box(xc * xc) - mxc * mxc, _box(yc * yc) - myc * myc, _box(xc * yc) - mxc * myc
    mx, my = mxc + ox, myc + oy
    return (2 * mx * my + SSIM_C1) * (2 * cxy + SSIM_C2) / ((mx * mx + my * my + SSIM_C1) * (vx + vy + SSIM_C2))


def _box(a: torch.Tensor) -> torch.Tensor:
    r = SSIM_WINDOW // 2
    return F.avg_pool2d(F.pad(a, (r, r, r, r), mode="reflect"), SSIM_WINDOW, stride=1)


class ClassifyingEncoder(nn.Module):
    """Encoder with a class head -> (style code (B, latent), class probabilities (B, K))."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor):
        z, logits = self.encoder.codes(x)
        return z, torch.softmax(logits, dim=1)


class Scorer(nn.Module):
    """image -> (latent, pixel_error, reconstruction_error): encoder + decoder + error in one graph.
    With a class head the decoder gets the encoder's class probabilities, which are output too."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, pixel_error: str, classifies: bool = False):
        super().__init__()
        self.encoder, self.decoder, self.pixel_error, self.classifies = encoder, decoder, pixel_error, classifies

    def forward(self, x: torch.Tensor):
        if self.classifies:
            z, logits = self.encoder.codes(x)
            probs = torch.softmax(logits, dim=1)
            r = self.decoder(z, probs)
        else:
            z = self.encoder(x)  # (B, latent)
            r = self.decoder(z)  # (B, C, H, W)
        err = pixel_error(x, r, self.pixel_error)  # (B, H, W)
        outputs = (z, err, err.flatten(1).mean(dim=1))
        return (*outputs, probs) if self.classifies else outputs


class BestLabelScorer(nn.Module):
    """A conditional decoder's scorer: each image is reconstructed under every label and scored
    with the one that reconstructs it best -> (latent, pixel_error, reconstruction_error, best_label)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, pixel_error: str, n_classes: int):
        super().__init__()
        self.encoder, self.decoder, self.pixel_error, self.n_classes = encoder, decoder, pixel_error, n_classes

    def forward(self, x: torch.Tensor):
        k = self.n_classes
        z = self.encoder(x)  # (B, latent)
        b = z.shape[0]
        zz = z[:, None, :].expand(b, k, z.shape[1]).reshape(b * k, z.shape[1])
        labels = torch.eye(k, dtype=z.dtype, device=z.device)[None].expand(b, k, k).reshape(b * k, k)
        xx = x[:, None].expand(b, k, *x.shape[1:]).reshape(b * k, *x.shape[1:])
        err = pixel_error(xx, self.decoder(zz, labels), self.pixel_error)  # (B*K, H, W)
        per = err.flatten(1).mean(dim=1).view(b, k)
        best = per.argmin(dim=1)  # (B,)
        maps = err.view(b, k, *err.shape[1:])[torch.arange(b, device=x.device), best]
        return z, maps, per.min(dim=1).values, best


class SegmentScorer(nn.Module):
    """image -> (latent, pixel_error, reconstruction_error) of the draem family: the per-pixel map
    is the segmenter's probability that a pixel belongs to a defect, from the image (and, with
    ``with_reconstruction``, the autoencoder's reconstruction of it beside it)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, segmenter: nn.Module, with_reconstruction: bool):
        super().__init__()
        self.encoder, self.decoder, self.segmenter, self.with_reconstruction = encoder, decoder, segmenter, with_reconstruction

    def forward(self, x: torch.Tensor):
        z = self.encoder(x)
        seen = torch.cat([x, self.decoder(z)], dim=1) if self.with_reconstruction else x
        probability = torch.sigmoid(self.segmenter(seen))[:, 0]  # (B, H, W)
        return z, probability, probability.flatten(1).mean(dim=1)
