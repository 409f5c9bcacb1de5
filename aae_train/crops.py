"""Training on random crops of whole photos (``aae-train folder DIR --crop 64``).

Inspection photos are 512 x 512 to 2048 x 2048; a defect is a few pixels of one. Resizing the
photo to the model's input would erase the defect, so the model learns crops at the photo's own
resolution, and the runtime tiles whole photos (aae_runtime.contract.tiling).

What is held out never overlaps a training crop:

- with two or more photos, whole photos are held out (``val_fraction`` of them, at least one);
- with a single photo, its bottom band of rows is (``val_fraction`` of its height, at least one
  crop high), and training crops come only from the rows above it.

Validation crops (the loss the loop reports and best.pt selects on) are a fixed grid of crops
of the held-out photos or band; the *calibration windows* (whole held-out photos, or square
windows of the band) are what export scores whole, by tiling, to set the threshold, so the
threshold is a statement about photos, not crops.

Training crops are drawn afresh every epoch from a stream seeded by (seed, epoch), so a resumed
run draws the same crops as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from aae_runtime.contract.tiling import tile_starts
from aae_train.mnist import DataError

AUGMENTATIONS = ("flip", "rot90", "scale")
SCALE_RANGE = 1.25  # "scale": each crop cut from a square 1/1.25 to 1.25 times its side, resized to it
EPOCH_CROPS = 8192  # default crops per epoch, over all training photos (at least one per photo)
MAX_VAL_CROPS = 4096  # validation crops kept (a fixed subset of the grid beyond this)
MAX_WINDOWS = 64  # calibration windows cut from a single photo's held-out band


@dataclass(frozen=True)
class CropSampler:
    """Random crops of the training photos, as model inputs (N, C, crop, crop) float32."""

    photos: tuple[np.ndarray, ...]  # (C, H, W) uint8 each: the training photos (or the training band)
    crop: int
    per_photo: int  # crops drawn from each photo per epoch
    augment: tuple[str, ...]  # among AUGMENTATIONS
    scale: float  # pixels -> inputs: value = pixel * scale + offset (the model's preprocessing)
    offset: float
    seed: int

    def __len__(self) -> int:
        return self.per_photo * len(self.photos)

    def draw(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        out = []
        for photo in self.photos:
            _, h, w = photo.shape
            if "scale" in self.augment:
                out.extend(_scaled_crops(photo, self.crop, self.per_photo, rng))
                continue
            rows = rng.integers(0, h - self.crop + 1, self.per_photo)
            cols = rng.integers(0, w - self.crop + 1, self.per_photo)
            out.extend(photo[:, r : r + self.crop, c : c + self.crop] for r, c in zip(rows, cols))
        crops = np.stack(out)
        crops = augment(crops, self.augment, rng)
        return _to_input(crops, self.scale, self.offset)


def _scaled_crops(photo: np.ndarray, crop: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` crops of a (C, H, W) photo, each cut from a random square whose side is ``crop`` times a
    factor drawn log-uniformly from [1 / SCALE_RANGE, SCALE_RANGE] (the upper end lowered to fit
    the photo's shorter side) and resized to ``crop`` x ``crop``: the part nearer to or farther from the camera. Bicubic,
    antialiased when shrinking (Pillow's resize), each channel alike."""
    from PIL import Image

    _, h, w = photo.shape
    top = min(SCALE_RANGE, min(h, w) / crop)  # a photo less than 1.25 crops high zooms out only as far as it can
    factors = np.exp(rng.uniform(-np.log(SCALE_RANGE), np.log(top), n))
    sides = np.clip(np.rint(crop * factors).astype(int), 1, min(h, w))
    rows, cols = rng.integers(0, h - sides + 1), rng.integers(0, w - sides + 1)
    out = []
    for side, r, c in zip(sides, rows, cols):
        square = photo[:, r : r + side, c : c + side]
        if side != crop:
            square = np.stack([np.asarray(Image.fromarray(channel).resize((crop, crop), Image.Resampling.BICUBIC))
                               for channel in square])
        out.append(square)
    return out


def augment(crops: np.ndarray, kinds: tuple[str, ...], rng: np.random.Generator) -> np.ndarray:
    """Random flips (horizontal and vertical) and quarter turns of (N, C, s, s) crops, as asked
    ("scale" is applied where the crops are cut: `_scaled_crops`)."""
    if "flip" in kinds:
        h = rng.random(len(crops)) < 0.5
        crops[h] = crops[h][..., ::-1]
        v = rng.random(len(crops)) < 0.5
        crops[v] = crops[v][..., ::-1, :]
    if "rot90" in kinds:
        turns = rng.integers(0, 4, len(crops))
        for k in (1, 2, 3):
            crops[turns == k] = np.rot90(crops[turns == k], k, axes=(2, 3))
    return crops


def parse_augment(text: str | None) -> tuple[str, ...]:
    """``"flip,rot90"`` -> ("flip", "rot90"); unknown names are a DataError naming the allowed ones."""
    if not text:
        return ()
    kinds = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [k for k in kinds if k not in AUGMENTATIONS]
    if unknown:
        raise DataError(f"--augment {text}: unknown {', '.join(unknown)}; choose from {', '.join(AUGMENTATIONS)} (comma-separated)")
    return kinds


@dataclass(frozen=True)
class CropSplit:
    sampler: CropSampler
    val: np.ndarray  # (M, C, crop, crop) float32: fixed validation crops
    windows: "PhotoInputs"  # held-out photos or band windows, scored whole at export
    note: str  # what was held out, for the user
    linked: int = 0  # training photos left out as another name (a link) of a held-out or earlier one


def once(keys, train, held_out) -> list:
    """``train`` (indices into ``keys``, one file identity each, None where unknown) without the
    files that are another listed one under a second name (a symbolic or hard link): an image
    held out is never also trained on, and none is trained on twice (``once(keys, held_out, [])``:
    none held out twice)."""
    seen = {keys[i] for i in held_out if keys[i] is not None}
    kept = []
    for i in train:
        if keys[i] is not None and keys[i] in seen:
            continue
        if keys[i] is not None:
            seen.add(keys[i])
        kept.append(i)
    return kept


def split_photos(photos: list[np.ndarray], names: list[str], crop: int, per_photo: int | None, augment_kinds: tuple[str, ...],
                 val_fraction: float, seed: int, scale: float, offset: float, keys: list | None = None) -> CropSplit:
    """Hold out whole photos (or one photo's bottom band), and a sampler over the rest; see the
    module doc. ``keys``: each photo's file identity, for `once` (applied after the split, so a
    run's held-out photos stay those it was trained with)."""
    small = [n for n, p in zip(names, photos) if min(p.shape[1:]) < crop]
    if small:
        raise DataError(f"{len(small)} photo(s) are smaller than --crop {crop} (first: {small[0]}): use a smaller crop "
                        "or remove them")
    if len(photos) >= 2:
        order = np.random.default_rng(seed).permutation(len(photos))
        n_val = min(len(photos) - 1, max(1, int(round(len(photos) * val_fraction))))
        kept = sorted(order[n_val:]) if keys is None else once(keys, sorted(order[n_val:]), order[:n_val])
        if not kept:
            raise DataError("every training photo is another name (a link) of a held-out one: remove the links, or add photos")
        held_out = sorted(order[:n_val]) if keys is None else once(keys, sorted(order[:n_val]), [])  # each held out once
        linked = len(photos) - len(held_out) - len(kept)
        train = [photos[i] for i in kept]
        held = [photos[i] for i in held_out]
        windows = held
        note = f"{len(held)} whole photos held out for validation and threshold"
    else:
        photo = photos[0]
        h = photo.shape[1]
        band = max(crop, int(round(h * val_fraction)))
        if h - band < crop:
            raise DataError(f"a single {photo.shape[2]} x {h} photo cannot give a training region and a held-out band "
                            f"of at least {crop} rows each: use a photo at least {2 * crop} pixels high, or more photos")
        train, held, linked = [photo[:, : h - band]], [photo[:, h - band :]], 0
        windows = band_windows(held[0], MAX_WINDOWS, crop)
        note = (f"a single photo: its bottom {band} rows held out for validation and threshold "
                f"({len(windows)} windows of {windows[0].shape[1]} x {windows[0].shape[2]}), training crops from the "
                f"{h - band} rows above")
    if per_photo is None:
        per_photo = max(1, math.ceil(EPOCH_CROPS / len(train)))
    sampler = CropSampler(tuple(train), crop, per_photo, augment_kinds, scale, offset, seed)
    places = [(i, r, c) for i, p in enumerate(held) for r, c in grid_origins(p, crop)]
    if len(places) > MAX_VAL_CROPS:  # choose before cutting: thousands of held-out photos stay cheap
        places = [places[k] for k in np.sort(np.random.default_rng(seed).choice(len(places), MAX_VAL_CROPS, replace=False))]
    val = np.stack([held[i][:, r : r + crop, c : c + crop] for i, r, c in places])
    return CropSplit(sampler, _to_input(val, scale, offset), PhotoInputs(tuple(windows), scale, offset, len(photos) == 1), note,
                     linked)


@dataclass(frozen=True)
class PhotoInputs:
    """Held-out photos kept as uint8 (one byte a pixel), given out one at a time as model inputs."""

    photos: tuple[np.ndarray, ...]  # (C, h, w) uint8
    scale: float
    offset: float
    from_band: bool = False  # windows of a single photo's held-out band, not whole photos

    def __len__(self) -> int:
        return len(self.photos)

    def __getitem__(self, i: int) -> np.ndarray:
        return _to_input(self.photos[i], self.scale, self.offset)


def _to_input(pixels: np.ndarray, scale: float, offset: float) -> np.ndarray:
    """uint8 pixels (any shape) -> model input values, float32 (the preprocessing's scale and offset)."""
    return (pixels.astype(np.float32) * np.float32(scale) + np.float32(offset)).astype(np.float32)


def grid_origins(photo: np.ndarray, crop: int) -> list[tuple[int, int]]:
    """Corners of crops of a (C, H, W) photo on a grid half a crop apart, the last row and column flush with its edges."""
    _, h, w = photo.shape
    rows, cols = tile_starts(h, crop, max(1, crop // 2)), tile_starts(w, crop, max(1, crop // 2))
    return [(r, c) for r in rows for c in cols]


def band_windows(band: np.ndarray, limit: int, crop: int) -> list[np.ndarray]:
    """Square windows of the band (the held-out "photos" of a single-photo run), three quarters of
    its height (at least a crop), on a grid that moves them down the band as well as along it:
    a photo of a patterned part (bricks, weave) can sit at any phase of the pattern, so the
    threshold must see the windows at several phases, not one. At most ``limit`` windows."""
    _, h, w = band.shape
    side = max(crop, min(w, (3 * h) // 4))
    rows = np.unique(np.linspace(0, h - side, min(4, h - side + 1)).round().astype(int))
    n_cols = max(1, min(limit // len(rows), w - side + 1))
    cols = np.unique(np.linspace(0, w - side, n_cols).round().astype(int))
    return [band[:, r : r + side, c : c + side] for r in rows for c in cols]

