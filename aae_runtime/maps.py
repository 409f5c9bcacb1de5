"""Anomaly maps: per-pixel reconstruction error as a heat map PNG beside and over the image.

Each map is one PNG of three panels, left to right: the model input, the heat map, the heat
map blended over the input. Colours use one fixed scale per model (the 99.9th percentile of
per-pixel errors of normal validation images, stored at calibration), so maps of different
images compare: only errors that are rare on normal images look hot. Small images are enlarged
(nearest neighbour) so that a 28x28 defect stays visible.

A tiled model's map (a model trained on crops: aae_runtime.contract.tiling) has the photo's own
resolution: the smoothed map whose maximum is the photo's score, coloured from 0 to twice the
threshold, so the threshold sits mid-ramp. With ``raw`` the map's values are also saved as
``NAME.npy`` (float32, the photo's height x width; an untiled model's: its input's size).

File names map back to the inputs: the path relative to the inputs' common folder, with
separators replaced by ``__`` (``lineA/img_001.png`` -> ``lineA__img_001.png.map.png``), so
equal names in different folders cannot collide; ``maps.csv`` lists input -> map (and raw_map).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from aae_runtime.contract.errors import InputError
from aae_runtime.contract.fileio import atomic_write_bytes, atomic_write_text
from aae_runtime.console import display_path

MIN_PANEL = 112  # pixels: smaller inputs are enlarged to at least this
OVERLAY_ALPHA = 0.55
INDEX_NAME = "maps.csv"
# A perceptually ordered black -> purple -> red -> yellow -> white ramp (anchor colours).
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (H, W) -> RGB uint8 (H, W, 3) along the ramp."""
    v = np.clip(np.nan_to_num(values.astype(np.float32)), 0.0, 1.0) * np.float32(len(_RAMP) - 1)
    lo = np.floor(v).astype(np.int8).clip(0, len(_RAMP) - 2)
    frac = (v - lo)[..., None]
    ramp = _RAMP.astype(np.float32)  # float32 throughout: a 2048 x 2048 map draws in ~10 photo-sized arrays, not ~80
    return np.rint(ramp[lo] * (1 - frac) + ramp[lo + 1] * frac).astype(np.uint8)


def render_map(image: np.ndarray, error: np.ndarray, scale: float) -> Image.Image:
    """Three panels (input | heat | overlay) of one model input (C, H, W in [0, 1]) and its
    per-pixel error (H, W), colours saturating at ``scale``."""
    c, h, w = image.shape
    rgb = np.clip(image, 0, 1).transpose(1, 2, 0)
    rgb = np.repeat(rgb, 3, axis=2) if c == 1 else rgb[..., :3]
    base = np.rint(rgb * 255).astype(np.uint8)
    heat = heat_colours(error / scale if scale > 0 else error)
    overlay = np.rint((1 - OVERLAY_ALPHA) * base.astype(np.float32) + OVERLAY_ALPHA * heat.astype(np.float32)).astype(np.uint8)
    gap = np.full((h, max(1, w // 14), 3), 255, dtype=np.uint8)
    img = Image.fromarray(np.concatenate([base, gap, heat, gap, overlay], axis=1), mode="RGB")
    factor = max(1, -(-MIN_PANEL // max(h, 1)))
    return img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST) if factor > 1 else img


class MapWriter:
    """Writes one map per scored image into ``out_dir`` and, on close, the index CSV."""

    def __init__(self, out_dir: str | Path, inputs: list[str | Path], scale: float, value_range: tuple[float, float],
                 raw: bool = False):
        self.out_dir = Path(out_dir)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"--maps {out_dir}: cannot create the folder ({exc.strerror or exc})") from None
        self.scale = scale
        self.low, self.high = value_range
        self.root = _common_root(inputs)
        self.raw = raw
        self.rows: list[tuple[str, ...]] = []
        self.used: set[str] = set()

    def name_for(self, path: str) -> str:
        try:
            rel = os.path.relpath(os.path.abspath(path), self.root)
        except ValueError:  # another drive (Windows)
            rel = os.path.abspath(path)
        stem = _short(rel.replace("\\", "/").lstrip("./").replace("/", "__") or "image")
        name, k = f"{stem}.map.png", 2
        while name in self.used:  # the same file given twice
            name, k = f"{stem}.{k}.map.png", k + 1
        self.used.add(name)
        return name

    def write(self, path: str, image: np.ndarray, error: np.ndarray) -> Path:
        # inputs back to [0, 1] for display, whatever the model's value range
        shown = (image - self.low) / (self.high - self.low) if self.high != self.low else image
        name = self.name_for(path)
        buf = io.BytesIO()
        render_map(shown, error, self.scale).save(buf, format="PNG")
        target = atomic_write_bytes(self.out_dir / name, buf.getvalue())
        if self.raw:
            raw_name = name[: -len(".map.png")] + ".npy"
            npy = io.BytesIO()
            np.save(npy, np.ascontiguousarray(error, dtype=np.float32))
            atomic_write_bytes(self.out_dir / raw_name, npy.getvalue())
            self.rows.append((display_path(path), display_path(name), display_path(raw_name)))
        else:
            self.rows.append((display_path(path), display_path(name)))
        return target

    def close(self) -> Path:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["image", "map", "raw_map"] if self.raw else ["image", "map"])
        writer.writerows(self.rows)
        return atomic_write_text(self.out_dir / INDEX_NAME, buf.getvalue())


# File names are at most 255 bytes on common file systems; a map's name adds ".map.png" or
# ".npy" (and ".2" for a repeat) to its stem, so a longer stem is cut and given a hash of the
# whole, deterministically: the same input always gets the same map name (listed in maps.csv).
MAX_STEM_BYTES = 200


def _short(stem: str) -> str:
    raw = stem.encode("utf-8", "surrogateescape")
    if len(raw) <= MAX_STEM_BYTES:
        return stem
    import hashlib  # only for names this long: it loads OpenSSL, some 5 ms of a cold start

    digest = hashlib.sha256(raw).hexdigest()[:16]
    head = raw[: MAX_STEM_BYTES - len(digest) - 1].decode("utf-8", "ignore")  # never half a character
    return f"{head}~{digest}"


def _common_root(inputs: list[str | Path]) -> str:
    """The folder all inputs lie in: a folder argument itself counts as a root."""
    dirs = [os.path.abspath(p) if Path(p).is_dir() else os.path.dirname(os.path.abspath(p)) for p in inputs]
    if not dirs:
        return os.getcwd()
    try:
        return os.path.commonpath(dirs)
    except ValueError:
        return os.path.abspath(os.sep)
