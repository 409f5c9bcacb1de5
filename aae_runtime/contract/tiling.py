"""Tiled scoring of whole photos: how a model trained on crops turns a photo into one map and one score.

A model trained with ``aae-train folder --crop 64`` sees 64 x 64 crops; a photo on the line is
512 x 512 to 2048 x 2048. Resizing the photo to 64 x 64 would erase every defect, so such a
model carries a ``tiling`` block in its metadata (and ``"tiling"`` in its ``requires`` list, so
a runtime that does not know tiling refuses the model instead of resizing):

- the photo, at its own resolution, is cut into overlapping tiles of the model's input size,
  ``stride`` apart, the last row and column of tiles flush with the photo's edge;
- each tile's per-pixel error map (the model's pixel error: mse, ssim, ...) is pasted back, and
  where tiles overlap their errors are averaged: the *stitched* errors, the photo's height x width;
- they are smoothed with a Gaussian of ``smooth_sigma`` pixels (one speck of sensor noise is not
  a defect; a defect covers a few pixels): the photo's *map* (what ``--maps`` draws and
  ``--maps-raw`` saves);
- the image score is the maximum of the map: a photo is as abnormal as its worst place. The
  threshold applies to the map too: the *regions* of a photo are where its map exceeds the
  threshold, so a photo is flagged exactly when it has at least one region.

Memory is bounded by the photo: tiles are cut and scored ``batch`` at a time; the stitched sum
and its smoothed copy (two float32 arrays of the photo's size, plus one padded copy while
smoothing) are the only full-size buffers, and photos above MAX_TILED_PIXELS are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from aae_runtime.contract.errors import InputError, ModelError

TILING = "tiling"  # the feature name in the metadata's "requires" list
IMAGE_SCORES = ("max_smoothed_map",)
MAX_SIGMA = 64.0
MAX_TILED_PIXELS = 64_000_000  # an 8000 x 8000 photo: its map needs ~0.8 GB; larger ones are refused
DEFAULT_SMOOTH_SIGMA = 4.0  # pixels: a defect covers a few pixels, sensor noise one


@dataclass(frozen=True)
class Tiling:
    """The metadata's ``tiling`` block."""

    tile: tuple[int, int]  # (height, width) of a tile: the model's input size
    stride: tuple[int, int]  # (rows, columns) between tile origins; <= tile, so tiles cover the photo
    smooth_sigma: float  # std of the Gaussian, in pixels, that smooths the stitched errors (0: none)
    image_score: str = "max_smoothed_map"

    def to_dict(self) -> dict:
        return {"tile": list(self.tile), "stride": list(self.stride), "smooth_sigma": self.smooth_sigma,
                "image_score": self.image_score,
                "definition": "maximum over the photo of the Gaussian-smoothed map of per-pixel errors, "
                              "tiles averaged where they overlap"}

    @classmethod
    def from_dict(cls, d, source: str) -> "Tiling":
        try:
            tile, stride, sigma = tuple(d["tile"]), tuple(d["stride"]), d["smooth_sigma"]
            kind = d.get("image_score", "max_smoothed_map")
            ok = all(isinstance(v, int) and not isinstance(v, bool) for v in tile + stride)  # no silent truncation
            ok = ok and isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and kind in IMAGE_SCORES
            ok = ok and len(tile) == len(stride) == 2 and all(1 <= s <= t for s, t in zip(stride, tile))
            ok = ok and math.isfinite(sigma) and 0.0 <= sigma <= MAX_SIGMA
        except (KeyError, TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise ModelError(f"{source} metadata has a malformed 'tiling' block (tile and stride: two positive "
                             f"integers, stride <= tile; smooth_sigma in [0, {MAX_SIGMA:g}]): re-export the model")
        return cls(tile, stride, float(sigma), kind)  # type: ignore[arg-type]

    def check(self, height: int, width: int) -> None:
        """Raise InputError unless a photo of this size can be tiled."""
        if height < self.tile[0] or width < self.tile[1]:
            raise InputError(f"the photo is {width} x {height} pixels, smaller than the model's {self.tile[1]} x "
                             f"{self.tile[0]} tile: use photos at least as large as the crops it was trained on")
        if height * width > MAX_TILED_PIXELS:
            raise InputError(f"the photo is {width} x {height} pixels, more than the {MAX_TILED_PIXELS:,} a tiled model "
                             "scores at once: cut it into parts")

    def origins(self, height: int, width: int) -> list[tuple[int, int]]:
        """Top-left corners (row, column) of the tiles covering a photo of this size."""
        self.check(height, width)
        rows, cols = tile_starts(height, self.tile[0], self.stride[0]), tile_starts(width, self.tile[1], self.stride[1])
        return [(r, c) for r in rows for c in cols]

    def tiles(self, photo: np.ndarray, batch: int) -> Iterator[tuple[list[tuple[int, int]], np.ndarray]]:
        """(origins, tiles (n, C, th, tw)) of ``photo`` (C, H, W), ``batch`` tiles at a time."""
        th, tw = self.tile
        origins = self.origins(photo.shape[1], photo.shape[2])
        for i in range(0, len(origins), batch):
            chunk = origins[i : i + batch]
            yield chunk, np.stack([photo[:, r : r + th, c : c + tw] for r, c in chunk])

    def stitch(self, photo: np.ndarray, pixel_errors: Callable[[np.ndarray], np.ndarray], batch: int,
               progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """The stitched errors (H, W) float32: ``pixel_errors`` (tiles (n, C, th, tw) -> (n, th, tw))
        of every tile, averaged where tiles overlap. ``progress(done, of)`` hears of each batch of tiles."""
        th, tw = self.tile
        h, w = photo.shape[1:]
        total = np.zeros((h, w), dtype=np.float32)
        done = 0
        for chunk, tiles in self.tiles(photo, batch):  # (a photo smaller than a tile is refused here)
            errors = pixel_errors(tiles)
            for (r, c), e in zip(chunk, errors):
                total[r : r + th, c : c + tw] += e
            done += len(chunk)
            if progress is not None:
                progress(done, len(tile_starts(h, th, self.stride[0])) * len(tile_starts(w, tw, self.stride[1])))
        # tiles lie on a grid, so the overlap count is an outer product: no third photo-sized array
        rows = _coverage(h, th, self.stride[0])
        cols = _coverage(w, tw, self.stride[1])
        total /= rows[:, None]
        total /= cols[None, :]
        return total

    def smooth(self, raw: np.ndarray) -> np.ndarray:
        return gaussian_smooth(raw, self.smooth_sigma)

    def score_of(self, smoothed: np.ndarray) -> float:
        """The image score of a photo's (smoothed) map."""
        return float(np.max(smoothed))


def _coverage(length: int, tile: int, stride: int) -> np.ndarray:
    """How many tiles cover each position along one axis (float32, >= 1)."""
    count = np.zeros(length, dtype=np.float32)
    for start in tile_starts(length, tile, stride):
        count[start : start + tile] += 1
    return count


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts along one axis: 0, stride, ..., and one flush with the end."""
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def gaussian_kernel(sigma: float) -> np.ndarray:
    """A normalised 1-D Gaussian, truncated at 3 sigma (float64)."""
    radius = max(1, int(3 * sigma + 0.5))  # scipy.ndimage's rounding of truncate * sigma
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_smooth(values: np.ndarray, sigma: float) -> np.ndarray:
    """``values`` (H, W) blurred by a Gaussian of ``sigma`` pixels, edges reflected; float32.

    Separable: one weighted sum of shifted copies per axis (whole-array numpy operations, no
    per-pixel Python), so a 2048 x 2048 map smooths in well under a second.
    """
    if sigma <= 0:
        return values.astype(np.float32, copy=True)
    k = gaussian_kernel(sigma)
    r = len(k) // 2
    out = values if values.dtype == np.float32 else values.astype(np.float32)
    for axis in (0, 1):
        n = out.shape[axis]
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        padded = np.pad(out, pad, mode="symmetric")  # any size, even a map narrower than the kernel
        acc = np.zeros_like(out)
        window = [slice(None), slice(None)]
        for j, w in enumerate(k):
            window[axis] = slice(j, j + n)
            acc += np.float32(w) * padded[tuple(window)]
        out = acc
    return out
