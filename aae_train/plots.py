"""Run-folder plots drawn with Pillow: loss curves and latent codes coloured by label.

Pillow is already a dependency of the runtime; these two plain charts do not justify pulling
matplotlib (and its five compiled dependencies) into the training install. Sample and
reconstruction grids are written by `aae_runtime.images.save_grid`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from aae_runtime.images import save_png

LOSS_CURVES_NAME = "loss_curves.png"
LATENT_NAME = "latent.png"
SAMPLES_NAME = "samples.png"
RECONSTRUCTIONS_NAME = "reconstructions.png"
PLOT_NAMES = (LOSS_CURVES_NAME, LATENT_NAME, SAMPLES_NAME, RECONSTRUCTIONS_NAME)

# Ten distinguishable colours (one per MNIST digit), then repeated.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
PANEL = (360, 240)  # width, height of one chart
MARGIN = (48, 22, 12, 30)  # left, top, right, bottom space around the plot area of a panel
# Loss-curve panels: title and the metrics.jsonl keys drawn in it.
LOSS_PANELS = (
    ("reconstruction loss", ("recon_loss", "val_recon_loss")),
    ("adversarial losses", ("disc_loss", "gen_loss")),
    ("discriminator accuracy", ("disc_acc",)),
    ("prior match: MMD^2 (codes vs prior)", ("prior_mmd",)),
)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _axes(draw: ImageDraw.ImageDraw, left: int, top: int, title: str, lo: tuple[float, float], hi: tuple[float, float],
          xlabel: str) -> tuple[int, int, int, int]:
    """Frame, title and range labels of one panel at (left, top); returns the plot area box."""
    w, h = PANEL
    x0, y0, x1, y1 = left + MARGIN[0], top + MARGIN[1], left + w - MARGIN[2], top + h - MARGIN[3]
    font = _font()
    draw.text((left + 6, top + 4), title, fill="black", font=font)
    draw.rectangle((x0, y0, x1, y1), outline=(90, 90, 90))
    draw.text((left + 2, y0), _fmt(hi[1]), fill="black", font=font)
    draw.text((left + 2, y1 - 10), _fmt(lo[1]), fill="black", font=font)
    draw.text((x0, y1 + 4), _fmt(lo[0]), fill="black", font=font)
    draw.text((x1 - 6 * len(_fmt(hi[0])), y1 + 4), _fmt(hi[0]), fill="black", font=font)
    draw.text(((x0 + x1) // 2 - 3 * len(xlabel), y1 + 14), xlabel, fill=(70, 70, 70), font=font)
    return x0, y0, x1, y1


def _to_px(v: np.ndarray, lo: float, hi: float, a: int, b: int) -> np.ndarray:
    span = hi - lo if hi > lo else 1.0
    return a + (np.asarray(v, dtype=np.float64) - lo) / span * (b - a)


def plot_losses(history: list[dict], path: str | Path) -> Path:
    """One panel per entry of LOSS_PANELS, values against epoch; written as a PNG."""
    cols = 2
    rows = math.ceil(len(LOSS_PANELS) / cols)
    img = Image.new("RGB", (PANEL[0] * cols, PANEL[1] * rows), "white")
    draw = ImageDraw.Draw(img)
    epochs = np.array([m["epoch"] for m in history], dtype=np.float64)
    for i, (title, keys) in enumerate(LOSS_PANELS):
        left, top = (i % cols) * PANEL[0], (i // cols) * PANEL[1]
        series = {k: np.array([m.get(k, np.nan) for m in history], dtype=np.float64) for k in keys}
        finite = np.concatenate([v[np.isfinite(v)] for v in series.values()] + [np.zeros(0)])
        ylo, yhi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if yhi - ylo < 1e-12:
            ylo, yhi = ylo - 0.5, yhi + 0.5
        xlo, xhi = (float(epochs.min()), float(epochs.max())) if len(epochs) else (0.0, 1.0)
        x0, y0, x1, y1 = _axes(draw, left, top, title, (xlo, ylo), (xhi, yhi), "epoch")
        for j, (key, values) in enumerate(series.items()):
            ok = np.isfinite(values)
            xs = _to_px(epochs[ok], xlo, xhi, x0 + 4, x1 - 4)
            ys = _to_px(values[ok], ylo, yhi, y1 - 4, y0 + 4)
            points = list(zip(xs.tolist(), ys.tolist()))
            colour = PALETTE[j]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for x, y in points:
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
            draw.text((x1 - 110, y0 + 4 + 12 * j), key, fill=colour, font=_font())
    return save_png(img, path)


def project_2d(z: np.ndarray) -> tuple[np.ndarray, str]:
    """Codes (N, D) as 2-D points: themselves if D <= 2, else their first two principal components."""
    z = np.asarray(z, dtype=np.float64)
    if z.shape[1] == 1:
        return np.concatenate([z, np.zeros_like(z)], axis=1), "1-D codes (y = 0)"
    if z.shape[1] == 2:
        return z, "2-D codes"
    centred = z - z.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    share = float((s[:2] ** 2).sum() / max((s ** 2).sum(), 1e-12))
    return centred @ _two_axes(vt).T, f"{z.shape[1]}-D codes, PCA to 2-D ({share:.0%} of variance)"


def _two_axes(vt: np.ndarray) -> np.ndarray:
    """The first two principal axes (2, D); fewer codes than two give zero rows for the missing ones."""
    axes = np.zeros((2, vt.shape[1]))
    axes[: min(2, len(vt))] = vt[:2]
    return axes


def plot_latent(codes: np.ndarray, labels: np.ndarray | None, path: str | Path, prior_samples: np.ndarray | None = None,
                class_names: tuple[str, ...] | None = None, size: int = 480) -> Path:
    """Scatter of held-out codes coloured by label, over prior samples in grey (same projection)."""
    codes = np.asarray(codes, dtype=np.float64)
    if prior_samples is not None and codes.shape[1] > 2:
        # Project both with the codes' principal axes, so the two clouds are comparable.
        mean = codes.mean(0)
        _, _, vt = np.linalg.svd(codes - mean, full_matrices=False)
        axes = _two_axes(vt)
        pts, title = (codes - mean) @ axes.T, project_2d(codes)[1]
        prior_pts = (np.asarray(prior_samples, dtype=np.float64) - mean) @ axes.T
    else:
        pts, title = project_2d(codes)
        prior_pts = project_2d(np.asarray(prior_samples, dtype=np.float64))[0] if prior_samples is not None else None
    everything = pts if prior_pts is None else np.concatenate([pts, prior_pts])
    everything = everything[np.all(np.isfinite(everything), axis=1)]
    lo = np.percentile(everything, 0.5, axis=0) if len(everything) else np.zeros(2)
    hi = np.percentile(everything, 99.5, axis=0) if len(everything) else np.ones(2)
    img = Image.new("RGB", (size + 120, size), "white")
    draw = ImageDraw.Draw(img)
    box = (30, 24, size - 10, size - 20)
    draw.text((6, 4), title + ("; grey: prior samples" if prior_pts is not None else ""), fill="black", font=_font())
    draw.rectangle(box, outline=(90, 90, 90))

    def dots(p: np.ndarray, colours: list[tuple[int, int, int]], r: int) -> None:
        xs = _to_px(p[:, 0], lo[0], hi[0], box[0] + 4, box[2] - 4)
        ys = _to_px(p[:, 1], lo[1], hi[1], box[3] - 4, box[1] + 4)
        for x, y, c in zip(xs, ys, colours):
            if box[0] <= x <= box[2] and box[1] <= y <= box[3]:
                draw.ellipse((x - r, y - r, x + r, y + r), fill=c)

    if prior_pts is not None:
        dots(prior_pts, [(200, 200, 200)] * len(prior_pts), 1)
    if labels is None:
        dots(pts, [PALETTE[0]] * len(pts), 2)
    else:
        labels = np.asarray(labels)
        dots(pts, [PALETTE[int(c) % len(PALETTE)] if c >= 0 else (0, 0, 0) for c in labels], 2)
        for i, c in enumerate(sorted(set(labels.tolist()))):
            name = class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)
            colour = PALETTE[int(c) % len(PALETTE)] if c >= 0 else (0, 0, 0)
            draw.rectangle((size + 4, 30 + 14 * i, size + 12, 38 + 14 * i), fill=colour)
            draw.text((size + 16, 28 + 14 * i), name[:16], fill="black", font=_font())
    return save_png(img, path)
