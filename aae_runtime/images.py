"""Image files in and out: decoding to the model's input, one way every time, and PNG grids.

`load_image` is the one definition of how a file becomes a model input (colour mode, size,
scale); training on image folders uses it too, so the exported model sees what it was
trained on. Everything a file can do wrong becomes an `InputError` with a readable reason.
"""

from __future__ import annotations

import errno
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from aae_runtime.errors import InputError
from aae_runtime.metadata import Preprocessing

# Larger than any inspection camera (~150 MP), small enough that decoding stays bounded in memory.
MAX_IMAGE_PIXELS = 200_000_000
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm"})
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey image


def load_image(path: str | Path, pre: Preprocessing) -> np.ndarray:
    """Decode ``path`` into one model input of shape (C, H, W), float32, as ``pre`` says."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise InputError(f"image too large ({width}x{height} pixels, limit {MAX_IMAGE_PIXELS:,})")
                img.load()
                return image_to_array(img, pre)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError("file not found") from None
    except IsADirectoryError:
        raise InputError("is a directory") from None
    except PermissionError:
        raise InputError("permission denied (cannot read the file)") from None
    except UnidentifiedImageError:
        size = _size_or_none(path)
        reason = "empty file" if size == 0 else "not an image, or a format Pillow cannot read"
        raise InputError(reason) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"image too large (decompression bomb guard, limit {MAX_IMAGE_PIXELS:,} pixels)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError("symlink loop") from None
        text = str(exc) or type(exc).__name__
        if "truncated" in text.lower():
            raise InputError("truncated or corrupt image data") from None
        raise InputError(f"cannot decode image ({text})") from None
    except (ValueError, SyntaxError, EOFError, MemoryError, Image.UnidentifiedImageError) as exc:
        raise InputError(f"corrupt image ({type(exc).__name__}: {exc})") from None


def image_to_array(img: Image.Image, pre: Preprocessing) -> np.ndarray:
    """Convert a decoded PIL image to one model input, (C, H, W) float32."""
    img = _to_8bit(img)
    if img.mode != pre.color_mode:
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = _flatten_alpha(img)
        img = img.convert(pre.color_mode)
    if img.size != (pre.width, pre.height):
        img = img.resize((pre.width, pre.height), resample=RESAMPLE[pre.resample])
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels_to_input(pixels[None], pre)[0]


def pixels_to_input(pixels: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """uint8 pixels (N, H, W) or (N, H, W, C) -> model inputs (N, C, H, W) float32."""
    x = pixels.astype(np.float32) * np.float32(pre.scale) + np.float32(pre.offset)
    if x.ndim == 3:
        return x[:, None, :, :]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float images are scaled to 8 bits over their full range, not clipped."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        wide = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or wide.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(np.rint(wide * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "F":
        wide = np.nan_to_num(np.asarray(img, dtype=np.float64))
        top = 1.0 if wide.max(initial=0) <= 1.0 else 255.0
        return Image.fromarray(np.clip(np.rint(wide * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    return img


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite a transparent image on black, so transparent areas read as background."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def save_grid(images: np.ndarray, path: str | Path, ncols: int | None = None, pad: int = 2) -> Path:
    """Write images (N, C, H, W) with values in [0, 1] as one PNG grid; returns the path."""
    images = np.clip(np.nan_to_num(np.asarray(images, dtype=np.float32)), 0.0, 1.0)
    n, c, h, w = images.shape
    ncols = ncols or max(1, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    grid = np.zeros((c, nrows * (h + pad) + pad, ncols * (w + pad) + pad), dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, ncols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = images[i]
    pixels = np.rint(grid * 255).astype(np.uint8)
    img = Image.fromarray(pixels[0] if c == 1 else pixels.transpose(1, 2, 0), mode="L" if c == 1 else "RGB")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def save_image(image: np.ndarray, path: str | Path) -> Path:
    """Write one image (C, H, W) in [0, 1] as an 8-bit PNG (grayscale or RGB)."""
    return save_grid(image[None], path, ncols=1, pad=0)


def find_images(paths: list[str | Path]) -> list[Path]:
    """Expand files and folders (recursively, image suffixes only) into a sorted, de-duplicated list.

    A path given explicitly is kept whatever its suffix, so that it gets a row of its own.
    Folder walks skip symlinked directories, so a symlink loop cannot trap them.
    """
    found: list[Path] = []
    seen: set[str] = set()
    for entry in paths:
        p = Path(entry)
        if p.is_dir():
            files = sorted(_walk(p))
        else:
            files = [p]
        for f in files:
            key = str(f)
            if key not in seen:
                seen.add(key)
                found.append(f)
    return found


def _walk(root: Path):
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return
    for e in entries:
        try:
            if e.is_symlink() and e.is_dir():
                continue
            if e.is_dir():
                yield from _walk(e)
            elif e.suffix.lower() in IMAGE_SUFFIXES:
                yield e
        except OSError:
            yield e
