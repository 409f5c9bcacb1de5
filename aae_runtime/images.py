"""Image files in and out: decoding to the model's input, one way every time, and PNG grids.

`load_image` is the one definition of how a file becomes a model input (colour mode, size,
scale); training on image folders uses it too, so the exported model sees what it was
trained on. Everything a file can do wrong becomes an `InputError` with a readable reason.
"""

from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import stat
import threading
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from aae_runtime.contract.errors import InputError, first_line
from aae_runtime.contract.fileio import atomic_write
from aae_runtime.contract.preprocessing import RESAMPLE_FILTERS, Preprocessing, pixels_to_input

# Larger than any inspection camera (~150 MP), small enough that decoding stays bounded in memory.
MAX_IMAGE_PIXELS = 200_000_000
# Decoded size limit: 8-bit RGB at MAX_IMAGE_PIXELS. Pillow allocates the whole image before it
# decodes a byte, so a 100-byte PNG declaring 14000 x 14000 RGBA would cost 784 MB without it.
MAX_DECODED_BYTES = 3 * MAX_IMAGE_PIXELS
LARGE_IMAGE_BYTES = 64 << 20  # images above this decode one at a time, whatever the thread count
_LARGE_DECODE = threading.Lock()
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm"})
# The only decoders ever run, whatever a file's name says. Pillow's others include EPS, which
# hands the file to Ghostscript (a PostScript interpreter), and formats no camera writes.
# (JPEG includes the multi-picture MPO files some cameras write.)
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
RESAMPLE = {name: Image.Resampling[name.upper()] for name in RESAMPLE_FILTERS}  # metadata name -> PIL filter
EXIF_ORIENTATION = 0x0112  # the EXIF tag of how the stored pixels are turned
# EXIF orientation -> the transpose that shows the stored pixels as viewers do (as PIL.ImageOps.exif_transpose)
TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
         5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
         8: Image.Transpose.ROTATE_90}
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}

_PILLOW_READY = False


def _configure_pillow() -> None:
    """Pillow's limits for untrusted input, set on first use rather than at import (importing the
    runtime changes no process-wide state). The explicit size checks in `_open_image` hold even
    where a caller changes these back."""
    global _PILLOW_READY
    if not _PILLOW_READY:
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey image
        _PILLOW_READY = True


def load_image(path: str | Path, pre: Preprocessing, native: bool = False) -> np.ndarray:
    """Decode ``path`` into one model input of shape (C, H, W), float32, as ``pre`` says
    (``native``: at the file's own size, not resized: a photo for tiled scoring).

    Only regular files in `FORMATS` are decoded; images above `MAX_IMAGE_PIXELS` or
    `MAX_DECODED_BYTES` are refused from their header, before any pixel memory is allocated.
    Raises `InputError` with a readable reason for everything else a file can do wrong.
    """
    _configure_pillow()
    path = Path(path)
    with _open_regular_file(path) as f:
        return _decode(f, pre, native)


def decode_image(data: bytes, pre: Preprocessing, native: bool = False, max_pixels: int | None = None) -> np.ndarray:
    """`load_image` for bytes already in memory (an HTTP upload): the same formats, limits and
    conversion, the same `InputError` reasons; ``max_pixels`` lowers the size limit (a service
    bounds the work one request can ask for)."""
    _configure_pillow()
    return _decode(io.BytesIO(data), pre, native, max_pixels)


def header_pixels(data: bytes) -> int:
    """The pixels an image in memory declares in its header (nothing is decoded); 0 when it has
    no readable header (decoding it then says why)."""
    _configure_pillow()
    try:
        img, _ = _open_image(io.BytesIO(data))
    except InputError:
        return 0
    with img:
        return img.size[0] * img.size[1]


def load_gray(path: str | Path, turn_by_tag: bool = False, mask: bool = False) -> np.ndarray:
    """An image file as 8-bit grayscale (H, W) uint8, read with `load_image`'s formats, size
    limits and errors (`InputError`); ``turn_by_tag``: turned upright by its own EXIF orientation
    tag, as viewers show it. ``mask`` (a defect mask): a palette image (VOC, labelme: class
    indices) is 255 wherever its index is not 0, and a colour one takes its brightest channel (a
    red defect on black is 255, not the 76 of its luminance)."""
    _configure_pillow()
    with _open_regular_file(Path(path)) as f:
        img, _ = _open_image(f)
        _load(img)
        try:
            if img.mode.startswith("I;16") and int(np.asarray(img).max(initial=0)) <= 255:  # 0/255 saved as 16-bit
                gray = Image.fromarray(np.asarray(img).astype(np.uint8), mode="L")
            elif mask and img.mode in ("P", "PA"):
                gray = Image.fromarray(np.where(np.asarray(img.getchannel(0) if img.mode == "PA" else img) != 0, 255, 0)
                                       .astype(np.uint8), mode="L")
            elif mask and img.mode in ("RGB", "RGBA", "RGBX"):
                gray = Image.fromarray(np.asarray(img.convert("RGB")).max(axis=2), mode="L")
            else:
                gray = _to_8bit(img).convert("L")
            return np.asarray(upright(gray, orientation_of(img) if turn_by_tag else 1))
        except (ValueError, OSError) as exc:
            raise InputError(f"cannot convert a {img.mode} image to grayscale ({first_line(exc)})") from None
        finally:
            img.close()


def photo_size(path: str | Path, upright_photo: bool = False) -> tuple[int, int] | None:
    """(height, width) of an image from its header, as viewers show it with ``upright_photo``
    (an EXIF turn of 90 degrees swaps them); None when it cannot be read (scoring then gives it
    its error row)."""
    _configure_pillow()
    try:
        with _open_regular_file(Path(path)) as f:
            img, _ = _open_image(f)
            with img:
                width, height = img.size
                turned = upright_photo and orientation_of(img) in (5, 6, 7, 8)
                return (width, height) if turned else (height, width)
    except (InputError, OSError):
        return None


def _decode(f, pre: Preprocessing, native: bool, max_pixels: int | None = None) -> np.ndarray:
    img, decoded_bytes = _open_image(f, max_pixels)
    # Files are decoded on several threads (model.py); one large image at a time keeps the
    # peak near one MAX_DECODED_BYTES image instead of one per thread.
    with _LARGE_DECODE if decoded_bytes > LARGE_IMAGE_BYTES else contextlib.nullcontext():
        _load(img)
        try:
            return image_to_array(img, pre, resize=not native, turn=orientation_of(img) if pre.orientation == "exif" else 1)
        except (ValueError, OSError) as exc:  # e.g. a colour mode Pillow cannot convert
            raise InputError(f"cannot convert a {img.mode} image to {pre.color_mode} ({first_line(exc)})") from None
        except MemoryError:
            raise InputError("out of memory converting the image") from None
        finally:
            img.close()


def _open_regular_file(path: Path):
    """Open ``path`` for reading, refusing anything but a regular file.

    O_NONBLOCK: opening a FIFO would otherwise wait forever for a writer; the check runs on
    the opened descriptor, so the file cannot be swapped between check and read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        reason = "dangling symlink (its target does not exist)" if path.is_symlink() else "file not found"
        raise InputError(reason) from None
    except IsADirectoryError:
        raise InputError(_directory_problem(path)) from None
    except PermissionError:
        raise InputError(_directory_problem(path) if _is_dir(path) else "permission denied (cannot read the file)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError("symlink loop") from None
        raise InputError(f"cannot open the file ({exc.strerror or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise InputError(_directory_problem(path))
        if not stat.S_ISREG(mode):
            raise InputError(f"not a regular file (a {_file_kind(mode)})")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _open_image(f, max_pixels: int | None = None) -> tuple[Image.Image, int]:
    """Read the header of the open file ``f`` and check the size: (lazy image, bytes it decodes to)."""
    try:
        img = Image.open(f, formats=FORMATS)
    except UnidentifiedImageError:
        size = _size_or_none(f)
        if size == 0:
            raise InputError("empty file (0 bytes)") from None
        raise InputError(_unidentified(f)) from None
    except Exception as exc:  # Pillow's header parsers raise a zoo of types on hostile bytes
        raise InputError(_decode_failure(exc, "image header")) from None
    try:
        width, height = img.size
        if width < 1 or height < 1:
            raise InputError(f"image has no pixels ({width}x{height})")
        if width * height > MAX_IMAGE_PIXELS:
            raise InputError(f"image too large ({width}x{height} pixels, limit {MAX_IMAGE_PIXELS:,})")
        if max_pixels is not None and width * height > max_pixels:
            raise InputError(f"image too large for this service ({width}x{height} pixels, limit {max_pixels:,}): "
                             "send a smaller image, or raise the server's --max-megapixels")
        _check_tiff_turn(img)
        decoded = width * height * _BYTES_PER_PIXEL.get(img.mode, 4)
        if decoded > MAX_DECODED_BYTES:
            raise InputError(f"image too large ({width}x{height} {img.mode}, {decoded / 1e6:,.0f} MB decoded, "
                             f"limit {MAX_DECODED_BYTES / 1e6:,.0f} MB)")
        return img, decoded
    except InputError:
        img.close()
        raise
    except Exception as exc:
        img.close()
        raise InputError(_decode_failure(exc, "image header")) from None


# File signatures of the accepted formats: a file that starts like one but that Pillow cannot
# identify is a variant it does not decode, or a damaged header, not "not an image"
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
               (b"II+\x00", "BigTIFF"), (b"MM\x00+", "BigTIFF"), (b"GIF8", "GIF"), (b"BM", "BMP"))


def _unidentified(f) -> str:
    """Why Pillow could not identify the open file ``f``, from its first bytes."""
    try:
        f.seek(0)
        head = f.read(12)
    except (OSError, ValueError):
        head = b""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        kind = "WEBP"
    else:
        kind = next((name for sig, name in _SIGNATURES if head.startswith(sig)), None)
    if kind in ("TIFF", "BigTIFF"):
        return (f"a {kind} file whose pixel format cannot be decoded (e.g. 64-bit float or complex samples) or whose "
                "header is damaged: save it with 8- or 16-bit integer or 32-bit float samples")
    if kind is not None:
        return f"a {kind} file whose header cannot be decoded (damaged, or a variant of {kind} that is not supported)"
    return f"not an image, or not one of the accepted formats ({', '.join(FORMATS)})"


def _check_tiff_turn(img: Image.Image) -> None:
    """Pillow (13) turns a TIFF by its orientation tag as it reads it, and for an uncompressed one
    whose tag swaps width and height (5-8) it gives scrambled pixels: refused, never scored."""
    if img.format != "TIFF" or not img.tile or img.tile[0][0] != "raw":
        return
    turn = getattr(img, "tag_v2", {}).get(EXIF_ORIENTATION)
    if turn in (5, 6, 7, 8):
        raise InputError(f"an uncompressed TIFF whose orientation tag ({turn}) turns it sideways, which the image "
                         "library decodes scrambled: save it upright (orientation 1) or compressed (e.g. LZW)")


def _load(img: Image.Image) -> None:
    """Decode the pixels; the image is closed when that fails."""
    try:
        img.load()
    except BaseException as exc:
        img.close()
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise InputError(_decode_failure(exc)) from None


def _decode_failure(exc: BaseException, part: str = "image data") -> str:
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"image too large (more than {MAX_IMAGE_PIXELS:,} pixels; a decompression bomb?): cut it into parts"
    if isinstance(exc, MemoryError):
        return "out of memory decoding the image"
    text = first_line(exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"cannot read the file ({exc.strerror or text})"
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return f"truncated file: {part} ends early ({_describe(exc)})"
    return f"corrupt {part} ({_describe(exc)})"


def _describe(exc: BaseException) -> str:
    text = first_line(exc)
    return text if text == type(exc).__name__ else f"{type(exc).__name__}: {text}"


def _directory_problem(path: Path) -> str:
    try:
        with os.scandir(path):
            return "is a directory"
    except OSError as exc:
        return f"folder cannot be listed ({exc.strerror or exc}): its images were not scored"


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def orientation_of(img: Image.Image) -> int:
    """The EXIF orientation tag of ``img`` (1: upright; 2-8: mirrored and/or turned, as
    `TURNS`); 1 when it has none or its EXIF block is damaged (which says nothing about turning)."""
    try:
        value = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # Pillow's EXIF parser raises a zoo of types on damaged blocks
        return 1
    return value if isinstance(value, int) and value in TURNS else 1


def upright(img: Image.Image, turn: int) -> Image.Image:
    """``img`` turned as EXIF orientation ``turn`` says viewers show it (the same image for 1)."""
    return img.transpose(TURNS[turn]) if turn in TURNS else img


def image_to_array(img: Image.Image, pre: Preprocessing, resize: bool = True, turn: int = 1) -> np.ndarray:
    """Convert a decoded PIL image to one model input, (C, H, W) float32 (resized to ``pre``'s
    size unless not ``resize``), turned upright as EXIF orientation ``turn`` says (after the
    conversion to 8 bits and the model's colour mode: the copy a turn makes is the smallest one)."""
    img = _to_8bit(img)
    if img.mode != pre.color_mode:
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = _flatten_alpha(img)
        img = img.convert(pre.color_mode)
    img = upright(img, turn)
    if resize and img.size != (pre.width, pre.height):
        img = img.resize((pre.width, pre.height), resample=RESAMPLE[pre.resample])
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels_to_input(pixels[None], pre)[0]


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float images to 8 bits, scaled from the range their values
    say they use, never clipped at the top: integers up to 255 as they are, up to 65535 as 16-bit
    (a 16-bit camera's full range); floats up to 1.0 as [0, 1], up to 255 as [0, 255], up to
    65535 as 16-bit. Values beyond (a 32-bit count) and NaN or infinite values are an
    `InputError` naming them, never a silently white or black image; negative values read as 0.

    Works in bands of rows, so a large 16-bit image costs ~1 extra byte per pixel, not the
    8-byte float copy per pixel a one-shot conversion would.
    """
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        wide = np.asarray(img)
        if img.mode.startswith("I;16"):
            top = 65535
        else:  # 32-bit integers: the range their values use
            highest = int(wide.max(initial=0))
            if highest > 65535:
                raise InputError(f"a 32-bit integer image with values up to {highest}: this reader takes integer samples "
                                 "of at most 16 bits (0-65535); save it as 8- or 16-bit")
            top = 65535 if highest > 255 else 255
        return Image.fromarray(_rescale_rows(wide, lambda a: (np.clip(a, 0, top).astype(np.int64) * 255 + top // 2) // top),
                               mode="L")
    if img.mode == "F":
        wide = np.asarray(img)
        highest = float(wide.max(initial=0))  # NaN when any value is (max propagates it): no full-size mask
        if not (math.isfinite(highest) and math.isfinite(float(wide.min(initial=0)))):
            raise InputError("a float image holding NaN or infinite values: replace them (e.g. by 0) before scoring")
        if highest > 65535.0:
            raise InputError(f"a float image with values up to {highest:.6g}: this reader takes float samples in [0, 1], "
                             "[0, 255] or [0, 65535]; scale them into one of these ranges")
        top = 1.0 if highest <= 1.0 else 255.0 if highest <= 255.0 else 65535.0
        return Image.fromarray(_rescale_rows(wide, lambda a: np.clip(np.rint(a.astype(np.float64) * (255.0 / top)), 0, 255)),
                               mode="L")
    return img


def _rescale_rows(wide: np.ndarray, to_8bit, band_pixels: int = 1 << 20) -> np.ndarray:
    out = np.empty(wide.shape, dtype=np.uint8)
    step = max(1, band_pixels // max(1, wide.shape[1]))
    for top in range(0, wide.shape[0], step):
        out[top : top + step] = to_8bit(wide[top : top + step])
    return out


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite a transparent image on black, so transparent areas read as background."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _size_or_none(f) -> int | None:
    if isinstance(f, io.BytesIO):  # an upload
        return f.getbuffer().nbytes
    try:
        return os.fstat(f.fileno()).st_size
    except (OSError, ValueError, io.UnsupportedOperation):
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
    return save_png(img, path)


def save_png(img: Image.Image, path: str | Path) -> Path:
    """Write ``img`` as a PNG atomically: a run killed mid-write never leaves a broken picture."""
    return atomic_write(path, lambda f: img.save(f, format="PNG"))


def save_image(image: np.ndarray, path: str | Path) -> Path:
    """Write one image (C, H, W) in [0, 1] as an 8-bit PNG (grayscale or RGB)."""
    return save_grid(image[None], path, ncols=1, pad=0)


def file_identity(path: str | Path) -> tuple[int, int] | None:
    """The file a path names (device, inode), links followed (hard links and symlinks alike);
    None when it cannot be seen or the file system numbers no inodes (0: never taken for links)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino) if st.st_ino else None


def _same_file_key(path: Path):
    """What makes a file itself, however a path spells it: `file_identity`, else its resolved path."""
    return file_identity(path) or os.path.realpath(path)


def first_shared(first: list[Path], second: list[Path]) -> Path | None:
    """The first file of ``second`` that is also in ``first`` (the same file, however each path
    spells it, symlinks and hard links included), or None: an image given as normal and as anomalous."""
    seen = {_same_file_key(p) for p in first}
    return next((p for p in second if _same_file_key(p) in seen), None)


def distinct_files(paths: list[Path]) -> list[Path]:
    """``paths`` without the later spellings of a file already listed (a folder given twice, a
    file also reached through its folder, a link): each image counts once in a calibration or
    an evaluation."""
    return _unique(paths, _same_file_key)


def _unique(items, key) -> list:
    """``items`` in order, each ``key`` once (its first item)."""
    seen, kept = set(), []
    for item in items:
        k = key(item)
        if k not in seen:
            seen.add(k)
            kept.append(item)
    return kept


def find_images(paths: list[str | Path], follow_links: bool = True) -> list[Path]:
    """Expand files and folders (recursively, image suffixes only) into a sorted, de-duplicated list.

    A path given explicitly is kept whatever its suffix, so that it gets a row of its own.
    Folder walks follow symlinked folders but enter each folder once (by device and inode), so
    a symlink loop cannot trap them and a folder linked twice is not listed twice; without
    ``follow_links`` they skip symlinked folders (training's listing, on which the hold-out
    splits of existing checkpoints were drawn).
    """
    found: list[Path] = []
    for entry in paths:
        p = Path(entry)
        found += sorted(_walk(p, follow_links)) if _is_dir(p) else [p]
    return _unique(found, str)


def _is_dir(path: Path) -> bool:
    """`Path.is_dir` that answers False instead of raising (it raises e.g. PermissionError on
    /proc/1/cwd); whatever stops us from seeing it a folder becomes the file's error row."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _walk(root: Path, follow_links: bool = True):
    """Image files under ``root``, depth first with an explicit stack (a folder tree thousands of
    levels deep must not exhaust Python's recursion limit)."""
    stack, entered = [root], set()
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in entered:  # a loop, or a folder reached before by another way
                continue
            entered.add((st.st_dev, st.st_ino))
            entries = sorted(folder.iterdir())
        except OSError:
            yield folder  # a folder that cannot be listed gets an error row, not silence
            continue
        subfolders = []
        for e in entries:
            try:
                if e.is_symlink() and e.is_dir() and not follow_links:
                    continue
                if e.is_dir():
                    subfolders.append(e)
                elif e.suffix.lower() in IMAGE_SUFFIXES:
                    yield e
            except OSError:
                yield e
        stack.extend(reversed(subfolders))
