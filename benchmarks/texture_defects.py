"""Texture-defect test data: real texture photographs, disjoint regions, synthetic defects with masks.

The benchmark trains an anomaly detector on one real texture photograph shipped with scikit-image
(``grass``, ``gravel``, ``brick``: 512 x 512 uint8 grayscale) and tests it on windows of a part of
the same photograph that it never saw, some of them carrying one synthetic defect with a
ground-truth mask. This module builds the data; it trains nothing.

Data design:

- Each photograph is cut into three disjoint horizontal bands, top to bottom: ``train`` (first
  56.25 % of the rows, 288 of 512), ``val`` (next 18.75 %, 96 rows) and ``test`` (the rest, 128
  rows). Bands share no pixel, so no test pixel was ever a training or validation pixel, while the
  material (its statistics, lighting, scale) is the same: the detector must generalise within a
  texture, not memorise one.
- The validation band exists so that every choice made after seeing data (the score threshold,
  the epoch kept, the normalisation statistics) is made on pixels the weights were not fitted to
  and that the final test never sees; choosing them on test windows would report a number tuned on
  the test set. The trainer receives ``trainval`` (train and val bands as one photograph, rows
  0..383) and holds out its bottom rows itself, which are the val band.
- Test windows are cut at random positions inside the test band only. They may overlap each other
  (a 128-row band holds few disjoint windows, and overlap only repeats unseen normal texture), but
  never reach into the train or val bands.
- The first half of a test set is normal windows (empty mask); the second half carries exactly one
  defect each, the kinds of ``KINDS`` cycling evenly. A defect lies fully inside its window, at
  least ``MARGIN`` pixels from the border, and its mask is its footprint as an annotator would draw
  it: every pixel the defect set out to change, including blurred or stained pixels whose value
  happens to change little.

Defect sizes are absolute pixels of the photograph (designed for 96 x 96 windows): a defect's size
is a property of the material's scale, not of the window cut around it. Footprints are about 40 to
600 pixels. Every defect blends a target image into the window with a soft alpha,
``out = window + alpha * (target - window)``; the mask is ``alpha > MASK_ALPHA``. A draw that
changes too little to be seen (a blur on a flat brick face) is redrawn, up to VISIBLE_TRIES times.

    python benchmarks/texture_defects.py /tmp/defects_preview.png   # a grid of every kind on every texture
"""

from __future__ import annotations

import csv
import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

TEXTURES = ("grass", "gravel", "brick")
KINDS = ("scratch", "hole", "foreign", "blur", "stain")
# Fractions of the photograph's rows in the train and val bands; the test band is the rest.
TRAIN_FRACTION = 0.5625
VAL_FRACTION = 0.1875
# Smallest distance, in pixels, from a defect's outermost changed pixel to the window border.
MARGIN = 4
# A pixel is in the mask where the defect's alpha exceeds this. Low on purpose: outside the mask a
# pixel moves by at most MASK_ALPHA times the defect's contrast (<= 0.1 of the [0, 1] range), so a
# detector that lights up on the faint rim is never scored against a pixel that visibly changed.
MASK_ALPHA = 0.1
# A defect is redrawn (new place, size, material) until its mean |change| over its mask reaches
# VISIBLE_CHANGE, at most VISIBLE_TRIES times: 0.06 is about the median change of a blur on grass.
VISIBLE_CHANGE = 0.06
VISIBLE_TRIES = 8

Defect = Callable[[np.ndarray, np.random.Generator], "tuple[np.ndarray, np.ndarray]"]


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value to compare by
class TestImage:
    """One test window: a normal one (kind None, empty mask) or one with exactly one defect."""

    __test__ = False  # not a pytest test class, despite the name

    name: str  # "normal_0000", "scratch_0107": kind and index in the test set, unique
    image: np.ndarray  # (size, size) uint8
    mask: np.ndarray  # (size, size) bool, True on the defect's footprint
    kind: str | None  # one of KINDS, or None for a normal window


# ---------------------------------------------------------------- photographs and regions


def load_texture(spec: str) -> np.ndarray:
    """The photograph ``spec`` as (H, W) uint8: one of TEXTURES (scikit-image's), or the path of
    an image file of one's own (a photo of another material), read by the runtime's decoder,
    turned upright by its EXIF tag and converted to 8-bit grayscale."""
    if spec in TEXTURES:
        return _skimage_photo(spec)
    if not Path(spec).is_file():
        raise ValueError(f"unknown texture {spec!r}: choose one of {', '.join(TEXTURES)}, or give the path of a photograph")
    from aae_runtime.images import load_gray

    return load_gray(spec, turn_by_tag=True)


def texture_name(spec: str) -> str:
    """What a texture is called in run folders and reports: its own name, or its file's stem."""
    return spec if spec in TEXTURES else Path(spec).stem


@functools.lru_cache(maxsize=None)
def _skimage_photo(name: str) -> np.ndarray:
    import skimage.data  # only here: loading the photographs is all this module needs it for

    photo = np.asarray(getattr(skimage.data, name)())
    if photo.ndim != 2 or photo.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name}() is {photo.dtype} {photo.shape}, expected (H, W) uint8")
    photo.setflags(write=False)  # cached and shared: nobody may edit it in place
    return photo


def fit_rows(height: int, train: float = TRAIN_FRACTION, val: float = VAL_FRACTION) -> tuple[int, int, int]:
    """Rows (train, val, test) of a photograph ``height`` rows tall; each band gets at least one."""
    if not (train > 0 and val > 0 and train + val < 1):
        raise ValueError(f"fractions train={train}, val={val} must be positive and sum to less than 1")
    train_rows, val_rows = round(height * train), round(height * val)
    if min(train_rows, val_rows, height - train_rows - val_rows) < 1:
        raise ValueError(f"a photograph of {height} rows is too short for train={train}, val={val}")
    return train_rows, val_rows, height - train_rows - val_rows


def split_regions(photo: np.ndarray, train: float = TRAIN_FRACTION, val: float = VAL_FRACTION) -> dict[str, np.ndarray]:
    """Disjoint horizontal bands "train", "val", "test" (top to bottom) and "trainval" = train + val.

    The bands are views of ``photo``, not copies.
    """
    if photo.ndim != 2:
        raise ValueError(f"expected a grayscale (H, W) photograph, got shape {photo.shape}")
    train_rows, val_rows, _ = fit_rows(photo.shape[0], train, val)
    cut = train_rows + val_rows
    return {"train": photo[:train_rows], "val": photo[train_rows:cut], "test": photo[cut:], "trainval": photo[:cut]}


# ---------------------------------------------------------------- shapes


def _smoothstep(x: np.ndarray) -> np.ndarray:
    """0 below 0, 1 above 1, a smooth S between: the soft edge of every defect."""
    x = np.clip(x, 0.0, 1.0)
    return (x * x * (3.0 - 2.0 * x)).astype(np.float32)


def _place(shape: tuple[int, int], reach: float, rng: np.random.Generator) -> np.ndarray:
    """A random centre (y, x) such that everything within ``reach`` of it is MARGIN px inside."""
    lo = MARGIN + reach
    hi = np.array(shape, dtype=np.float64) - 1 - MARGIN - reach
    if np.any(hi < lo):
        raise ValueError(f"a {shape[0]}x{shape[1]} window is too small for a defect reaching {reach:.0f} px "
                         f"with a {MARGIN} px margin: use windows of at least {int(2 * lo + 2)} px")
    return rng.uniform(lo, hi)


def _blob(shape, centre, diameters, angle, edge, power=2.0, wobble=(0.0, 0.0)) -> np.ndarray:
    """Soft alpha (H, W) of a rotated super-ellipse: 1 inside, 0 outside, an ``edge`` px ramp inward.

    power 2 is an ellipse, 4 a rounded rectangle. wobble (c2, c3) bends the outline by the 2nd and
    3rd angular harmonics, for blobs that are only roughly elliptical. Nothing beyond the nominal
    outline (times 1 + |c2| + |c3|) is touched, so the outline bounds the defect's reach.
    """
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    dy, dx = yy - centre[0], xx - centre[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    a, b = diameters[0] / 2, diameters[1] / 2
    r = (np.abs(u / a) ** power + np.abs(v / b) ** power) ** (1 / power)
    theta = np.arctan2(v, u)
    r = r / (1 + wobble[0] * np.cos(2 * theta) + wobble[1] * np.cos(3 * theta + 1.0))
    return _smoothstep((1 - r) * min(a, b) / edge)  # (1 - r) * min radius ~ px inside the outline


def _reach(diameters, wobble=(0.0, 0.0)) -> float:
    return max(diameters) / 2 * (1 + abs(wobble[0]) + abs(wobble[1])) + 1


def _ellipse_size(rng, lo, hi, max_product=np.inf) -> tuple[float, float]:
    """Diameters (major, minor) in [lo, hi], minor <= major, major * minor within max_product."""
    major = rng.uniform(lo, hi)
    return major, rng.uniform(lo, min(major, max_product / major))  # callers keep lo * hi <= max_product


def _blend(window: np.ndarray, alpha: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(window + alpha * (target - window) clipped to [0, 1], mask alpha > MASK_ALPHA)."""
    out = np.clip(window + alpha * (target - window), 0.0, 1.0).astype(np.float32)
    return out, alpha > MASK_ALPHA


# ---------------------------------------------------------------- defect kinds


def _scratch_once(window: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin (1-3 px) straight or gently curved line 15-40 px long, clearly lighter or darker."""
    width = rng.uniform(1.0, 3.0)
    # A 1 px line needs more length to reach the 40 px footprint the benchmark counts as a defect.
    length = rng.uniform(max(15.0, 48.0 / (width + 0.6)), 40.0)
    curve = _bezier(length, rng)  # (K, 2) points around (0, 0)
    reach = np.abs(curve).max() + width / 2 + 1
    curve = curve + _place(window.shape, reach, rng)
    dist = _distance_to_points(window.shape, curve)
    alpha = _smoothstep(width / 2 + 0.5 - dist)  # a 1 px ramp around the line's edge
    return _blend(window, alpha, _contrasting_level(window[alpha > 0], rng))


def _bezier(length: float, rng: np.random.Generator) -> np.ndarray:
    """Points every 0.25 px along a quadratic Bezier of chord ``length``, centred on (0, 0)."""
    angle, bend = rng.uniform(0, np.pi), rng.uniform(-0.3, 0.3)  # |bend| small: nearly straight
    direction = np.array([np.sin(angle), np.cos(angle)])
    normal = np.array([direction[1], -direction[0]])
    p0, p2 = -direction * length / 2, direction * length / 2
    p1 = normal * bend * length
    t = np.linspace(0, 1, int(4 * length) + 1)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _distance_to_points(shape: tuple[int, int], points: np.ndarray) -> np.ndarray:
    """(H, W) distance from each pixel centre to the nearest of ``points`` (K, 2)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d2 = (yy[..., None] - points[:, 0]) ** 2 + (xx[..., None] - points[:, 1]) ** 2  # (H, W, K)
    return np.sqrt(d2.min(-1))


def _contrasting_level(under: np.ndarray, rng: np.random.Generator) -> float:
    """A gray level 0.35-0.55 lighter or darker than the mean of ``under``; flipped if that clips."""
    mean, sign, step = float(under.mean()), rng.choice([-1.0, 1.0]), rng.uniform(0.35, 0.55)
    level = float(np.clip(mean + sign * step, 0.02, 0.98))
    if abs(level - mean) < 0.25:  # pushed against 0 or 1: the other direction has room
        level = float(np.clip(mean - sign * step, 0.02, 0.98))
    return level


def _hole_once(window: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark, roughly elliptical blob 5-14 px across with a soft edge and a trace of texture."""
    minor = rng.uniform(5.0, 14.0)
    diameters = (rng.uniform(max(minor, 64.0 / minor), 14.0), minor)  # major * minor >= 64: >= 40 px
    wobble = tuple(rng.uniform(-0.1, 0.1, 2))
    centre = _place(window.shape, _reach(diameters, wobble), rng)
    alpha = _blob(window.shape, centre, diameters, rng.uniform(0, np.pi), 1.0, wobble=wobble)
    return _blend(window, alpha, rng.uniform(0.02, 0.1) + 0.15 * window)


def _foreign_once(window: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A patch 8-18 px across of another material, pasted with a soft rounded-rectangle mask.

    The material is a crop of scikit-image's ``camera`` photograph, a smooth gradient, or this
    window rotated by 90 degrees and enlarged 2-3x (same material, wrong orientation and scale).
    """
    diameters = (rng.uniform(8.0, 18.0), rng.uniform(8.0, 18.0))
    centre = _place(window.shape, _reach(diameters) * np.sqrt(2), rng)  # a rotated square's corner
    alpha = _blob(window.shape, centre, diameters, rng.uniform(0, np.pi), 1.5, power=4.0)
    source = FOREIGN_SOURCES[rng.integers(len(FOREIGN_SOURCES))]
    return _blend(window, alpha, source(window, centre, rng))


def _camera_crop(window: np.ndarray, centre: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    camera = _skimage_photo("camera")
    y, x = (rng.integers(0, s - w + 1) for s, w in zip(camera.shape, window.shape))
    return camera[y : y + window.shape[0], x : x + window.shape[1]].astype(np.float32) / 255


def _gradient(window: np.ndarray, centre: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A linear ramp through ``centre`` between gray levels at least 0.3 apart, across ~18 px."""
    lo = rng.uniform(0.05, 0.6)
    hi = rng.uniform(lo + 0.3, 0.95)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[: window.shape[0], : window.shape[1]]
    along = np.cos(angle) * (xx - centre[1]) + np.sin(angle) * (yy - centre[0])  # px from centre
    return (lo + (hi - lo) * np.clip(0.5 + along / 18.0, 0, 1)).astype(np.float32)


def _rotated_zoom(window: np.ndarray, centre: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    big = ndimage.zoom(np.rot90(window), rng.uniform(2.0, 3.0), order=1)
    y, x = (rng.integers(0, s - w + 1) for s, w in zip(big.shape, window.shape))
    return big[y : y + window.shape[0], x : x + window.shape[1]]


FOREIGN_SOURCES = (_camera_crop, _gradient, _rotated_zoom)


def _blur_once(window: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A 12-24 px elliptical region Gaussian-blurred (sigma 2-4), blended in over a 2 px edge."""
    diameters = _ellipse_size(rng, 12.0, 24.0)
    centre = _place(window.shape, _reach(diameters), rng)
    alpha = _blob(window.shape, centre, diameters, rng.uniform(0, np.pi), 2.0)
    blurred = ndimage.gaussian_filter(window, rng.uniform(2.0, 4.0), mode="reflect")
    return _blend(window, alpha, blurred)


def _stain_once(window: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A 12-28 px soft blob whose intensity is scaled or shifted by 25-40 %, fading smoothly out.

    25-40 %, not 15-35 %: a 15 % stain vanishes in busy grass (measured: 24 of 60 grass stains
    missed the visibility bar at 15-35 %, 6 of 60 at 25-40 %)."""
    # major * minor <= 700 keeps the footprint (pi / 4 * major * minor) under 600 px.
    diameters = _ellipse_size(rng, 12.0, 28.0, 700.0)
    wobble = tuple(rng.uniform(-0.08, 0.08, 2))
    centre = _place(window.shape, _reach(diameters, wobble), rng)
    # The alpha ramps over the outer 30 % of the radius: a stain has no hard edge, but a wider ramp
    # fades it into busy texture (grass, gravel) until nobody sees it.
    alpha = _blob(window.shape, centre, diameters, rng.uniform(0, np.pi), 0.3 * min(diameters) / 2, wobble=wobble)
    strength = rng.choice([-1.0, 1.0]) * rng.uniform(0.25, 0.4)
    # Scaled: the texture's contrast scales too. Shifted: by the same fraction of the local mean,
    # so both change the brightness alike (an absolute 0.35 would turn dark texture black).
    shift = strength * float(window[alpha > 0].mean())
    target = window * (1 + strength) if rng.random() < 0.5 else window + shift
    return _blend(window, alpha, target)


def _visible(draw: Defect, relative: float = 0.0) -> Defect:
    """``draw`` retried until its mean |change| over its mask reaches VISIBLE_CHANGE and ``relative``
    times the texture's standard deviation there (at most VISIBLE_TRIES draws; else the most visible).

    A blur on a flat brick face, or a foreign patch that happens to match the local gray, changes
    nothing that a person or a detector could see; a 15 % stain vanishes in busy grass.
    """

    @functools.wraps(draw)
    def defect(window: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        best, best_margin = None, -np.inf
        for _ in range(VISIBLE_TRIES):
            out, mask = draw(window, rng)
            need = max(VISIBLE_CHANGE, relative * float(window[mask].std()))
            margin = float(np.abs(out - window)[mask].mean()) - need
            if margin >= 0:
                return out, mask
            if margin > best_margin:
                best, best_margin = (out, mask), margin
        return best

    defect.__name__ = defect.__qualname__ = draw.__name__.strip("_").removesuffix("_once")
    return defect


scratch = _visible(_scratch_once)
# A hole, a foreign patch or a stain must outdo the texture's own spread, or busy texture hides it.
hole, foreign = _visible(_hole_once, relative=1.0), _visible(_foreign_once, relative=1.0)
stain = _visible(_stain_once, relative=1.0)
blur = _visible(_blur_once)
DEFECTS: dict[str, Defect] = {"scratch": scratch, "hole": hole, "foreign": foreign, "blur": blur, "stain": stain}
assert tuple(DEFECTS) == KINDS


# ---------------------------------------------------------------- test sets


def make_test_set(region: np.ndarray, n: int, size: int, seed: int) -> list[TestImage]:
    """``n`` windows size x size at random positions in ``region`` (uint8): the first n // 2 normal,
    the rest with one defect each, kinds cycling through KINDS. Deterministic given ``seed``.
    """
    if region.ndim != 2 or region.dtype != np.uint8:
        raise ValueError(f"expected a (H, W) uint8 region, got {region.dtype} {region.shape}")
    if size > min(region.shape):
        raise ValueError(f"windows of {size} px do not fit in a {region.shape[0]}x{region.shape[1]} region")
    # One child generator per window: window i is the same whatever n is, and needs no other window.
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]
    kinds = [None] * (n // 2) + [KINDS[i % len(KINDS)] for i in range(n - n // 2)]
    return [_test_image(region, size, i, kind, rng) for i, (kind, rng) in enumerate(zip(kinds, rngs))]


def _test_image(region, size, index, kind, rng) -> TestImage:
    y, x = (int(rng.integers(0, s - size + 1)) for s in region.shape)
    window = region[y : y + size, x : x + size].astype(np.float32) / 255
    if kind is None:
        return TestImage(f"normal_{index:04d}", _to_uint8(window), np.zeros((size, size), bool), None)
    defective, mask = DEFECTS[kind](window, rng)
    return TestImage(f"{kind}_{index:04d}", _to_uint8(defective), mask, kind)


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)


def write_test_set(images: Sequence[TestImage], root: Path) -> Path:
    """Write root/normal/NAME.png, root/anomalous/NAME.png, root/masks/NAME.png (0/255) and
    root/index.csv (name, kind, path, mask; paths relative to root, kind and mask empty for normal
    windows). The index is written last, so a folder with an index is complete. Returns its path.
    """
    root = Path(root)
    for folder in ("normal", "anomalous", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    rows = [_write_one(image, root) for image in images]
    index = root / "index.csv"
    with open(index, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "kind", "path", "mask"])
        writer.writerows(rows)
    return index


def _write_one(image: TestImage, root: Path) -> list[str]:
    if image.kind is None:
        path, mask = f"normal/{image.name}.png", ""
    else:
        path, mask = f"anomalous/{image.name}.png", f"masks/{image.name}.png"
        Image.fromarray(image.mask.astype(np.uint8) * 255, mode="L").save(root / mask)
    Image.fromarray(image.image, mode="L").save(root / path)
    return [image.name, image.kind or "", path, mask]


def read_test_set(root: Path) -> list[TestImage]:
    """The test set that write_test_set wrote to ``root``, in index order."""
    root = Path(root)
    with open(root / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [_read_one(row, root) for row in rows]


def _read_one(row: dict[str, str], root: Path) -> TestImage:
    image = np.asarray(Image.open(root / row["path"]).convert("L"))
    if not row["mask"]:
        return TestImage(row["name"], image, np.zeros(image.shape, bool), None)
    mask = np.asarray(Image.open(root / row["mask"]).convert("L")) > 127
    return TestImage(row["name"], image, mask, row["kind"])


# ---------------------------------------------------------------- preview


def preview(seed: int = 0, size: int = 96) -> np.ndarray:
    """A uint8 grid for eyes: one row per texture, for each kind the defective window of the test
    band and its mask (white on black) side by side."""
    rows = []
    for t, name in enumerate(TEXTURES):
        window = split_regions(load_texture(name))["test"][:size, :size].astype(np.float32) / 255
        cells = [_preview_pair(window, kind, np.random.default_rng([seed, t, k])) for k, kind in enumerate(KINDS)]
        rows.append(np.concatenate(cells, axis=1))
    return np.concatenate(rows, axis=0)


def _preview_pair(window, kind, rng) -> np.ndarray:
    defective, mask = DEFECTS[kind](window, rng)
    gap = np.full((window.shape[0], 4), 0.5, np.float32)  # gray gutters between the panels
    return _to_uint8(np.concatenate([defective, gap[:, :1], mask.astype(np.float32), gap], axis=1))


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "defects_preview.png")
    grid = preview()
    Image.fromarray(np.kron(grid, np.ones((2, 2), np.uint8)), mode="L").save(out)  # 2x: small defects
    print(f"wrote {out} ({grid.shape[1]}x{grid.shape[0]}, shown 2x)")
