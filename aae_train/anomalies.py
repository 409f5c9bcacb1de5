"""Synthetic defects for self-supervised training (the ``draem`` family): normal crops made
abnormal in random places, with the mask of where.

A line does not show its defects before they happen, so a model that must say *where* a photo
departs from normal learns it from defects made up on normal crops (DRAEM, Zavrtanik et al.
2021). What matters is variety, not likeness to any one kind of defect: the shapes are level
sets of smooth random fields (blobs of any size and outline, or thin curves), and what fills
them is one of four departures from the texture: another place of the material turned and
rescaled in contrast, the crop itself blurred, a flat level, or the crop's own intensity scaled
or shifted. A detector trained on these learns "this patch does not continue its surroundings",
which is what a scratch, a hole, a stain or a foreign body have in common.

The random draws are made on the host (`draw`, from the loop's seeded stream: resume stays
exact) and applied on the training device (`synthesize`, batched torch operations with no
branch on the data, so the step stays one fixed function of device tensors).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SCALES = (4, 8, 16)  # cells of a random field across a crop: large, middling and small blobs
FILLS = 4  # another place (turned, new contrast), blurred, flat, intensity scaled or shifted
BLUR_SIGMAS = (1.5, 3.0)
BLUR_REACH = int(3 * max(BLUR_SIGMAS))  # pixels a blur reaches (its edges are reflected: crops must be larger)
# The uniform draws of one crop, by column: which scale, the level (the blob's size), the curve's
# width, curve or blob, which fill, turned, mirrored, contrast, brightness, flat level, intensity
# factor, scaled or shifted, opacity, whether the crop gets a defect, which blur, and the place
# and size of the patch of the crop it is confined to.
(SCALE, LEVEL, WIDTH, CURVE, FILL, TURN, MIRROR, CONTRAST, BRIGHTNESS, FLAT, FACTOR, SCALED, OPACITY, HAS,
 BLUR, ROW, COLUMN, HEIGHT, WIDE, CORE) = range(20)
N_PARAMS = 20


def draw(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The host draws of ``n`` crops' defects: one smooth-field grid per scale, then the parameters."""
    fields = [rng.standard_normal((n, 1, s, s), dtype=np.float32) for s in SCALES]
    return [*fields, rng.random((n, N_PARAMS), dtype=np.float32)]


def synthesize(x: torch.Tensor, draws: list[torch.Tensor], share: float, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(crops with defects, masks (B, 1, H, W) in {0, 1}) of crops ``x`` (B, C, H, W), whose values
    lie in [low, high]; a ``share`` of the crops get one defect, the rest stay as they are."""
    *grids, p = draws
    b, c, h, w = x.shape

    def col(i: int) -> torch.Tensor:  # one parameter per crop, shaped to broadcast over (B, C, H, W)
        return p[:, i, None, None, None]

    def choice(i: int, k: int) -> torch.Tensor:  # one of k, one-hot (B, k)
        return F.one_hot((p[:, i] * k).long().clamp_max(k - 1), k).to(x.dtype)

    # The field: one of three scales, upsampled smoothly to the crop and brought to unit spread.
    smooth = [F.interpolate(g, size=(h, w), mode="bicubic", align_corners=False) for g in grids]
    field = sum(choice(SCALE, len(SCALES))[:, i, None, None, None] * f for i, f in enumerate(smooth))
    field = (field - field.mean(dim=(2, 3), keepdim=True)) / field.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    # Where: an elliptical patch, 8 % to 35 % of the crop's side in each direction, anywhere inside it.
    rows = torch.arange(h, dtype=x.dtype, device=x.device)[:, None] / h
    cols = torch.arange(w, dtype=x.dtype, device=x.device)[None, :] / w
    dist = torch.sqrt(((rows - 0.15 - 0.7 * col(ROW)) / (0.08 + 0.27 * col(HEIGHT))) ** 2 +
                      ((cols - 0.15 - 0.7 * col(COLUMN)) / (0.08 + 0.27 * col(WIDE))) ** 2)
    # The shape inside it: a blob (where the field is above a level, joined to a core of the
    # patch, so that there always is one) or a thin curve (a band around a level of the smoothest
    # field, about 1.5 to 6 pixels across at 64 x 64).
    level = 0.3 * (col(LEVEL) - 0.5)
    blob = ((field > level) & (dist < 1)) | (dist < 0.2 + 0.6 * col(CORE))
    coarse = smooth[0] / smooth[0].std(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    curve = ((coarse - level).abs() < 0.05 + 0.15 * col(WIDTH)) & (dist < 1)
    shape = torch.where(col(CURVE) < 0.3, curve, blob) & (col(HAS) < share)  # only a share of the crops get one
    mask = shape.to(x.dtype)
    # Blended in at an opacity of 0.6 to 1 with a one-pixel soft edge (no photograph has a sharp cut-out).
    alpha = F.avg_pool2d(F.pad(mask, (1, 1, 1, 1), mode="replicate"), 3, stride=1) * mask.clamp_min(0.5) * (0.6 + 0.4 * col(OPACITY))
    # The fill: another crop of the batch (another place of the material), turned and mirrored
    # at random, its contrast 0.3x to 1.5x and brightness moved; the crop blurred; a flat level;
    # the crop's own intensity scaled (0.4x to 1.6x) or shifted.
    span = high - low
    other = torch.roll(x, 1, dims=0)
    if h == w:
        other = torch.where(col(TURN) < 0.5, other, other.transpose(2, 3))
    other = torch.where(col(MIRROR) < 0.5, other, other.flip(3))
    mean = other.mean(dim=(1, 2, 3), keepdim=True)
    other = (other - mean) * (0.3 + 1.2 * col(CONTRAST)) + mean + span * 0.4 * (col(BRIGHTNESS) - 0.5)
    sharp = (col(BLUR) < 0.5).to(x.dtype)
    blurred = sharp * _blur(x, BLUR_SIGMAS[0]) + (1 - sharp) * _blur(x, BLUR_SIGMAS[1])
    flat = (low + span * col(FLAT)).expand_as(x)
    change = 1.2 * (col(FACTOR) - 0.5)  # -0.6 to 0.6
    shifted = torch.where(col(SCALED) < 0.5, x * (1 + change), x + span * 0.5 * change)
    fill = sum(choice(FILL, FILLS)[:, i, None, None, None] * f for i, f in enumerate((other, blurred, flat, shifted)))
    fill = fill.clamp(low, high)
    return x + alpha * (fill - x), mask


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of each channel, edges reflected."""
    r = int(3 * sigma)  # <= BLUR_REACH
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-t * t / (2 * sigma * sigma))
    g = g / g.sum()
    c = x.shape[1]
    y = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
