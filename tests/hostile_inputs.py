"""Hostile image folders, generated at test time (no binaries are committed).

`make_hostile_folder` writes every kind of file an unattended inspection device may find in
its input folder: valid images in every mode Pillow reads, broken and truncated files,
decompression bombs, things that are not regular files, symlink loops, odd names. It returns
what each file must become: ``"ok"`` (scored), ``"error"`` (its own error row) or ``"any"``
(either is correct: e.g. a JPEG with flipped scan bits still decodes to *some* picture).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

OK, ERROR, ANY = "ok", "error", "any"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int, color_type: int = 0, rows: int = 64) -> bytes:
    """A few hundred bytes declaring a ``width`` x ``height`` 8-bit PNG (0: gray, 2: RGB, 6: RGBA);
    the first ``rows`` rows are real (zeros, compressed ~1000:1), the rest is missing."""
    bands = {0: 1, 2: 3, 6: 4}[color_type]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    body = zlib.compress(b"\0" * ((width * bands + 1) * min(rows, height)), 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")


def jpeg_bomb(width: int, height: int) -> bytes:
    """A valid small JPEG whose SOF0 header is patched to declare ``width`` x ``height``."""
    data = bytearray(encode(np.zeros((8, 8), np.uint8), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def tiff_with_a_bad_tag() -> bytes:
    """A TIFF with one tag pointing past the end of the file (Pillow: "Tag data larger than file")."""
    data = bytearray(encode(np.full((20, 24, 3), 128, np.uint8), "TIFF"))
    count = struct.unpack_from("<H", data, struct.unpack_from("<I", data, 4)[0])[0]
    first = struct.unpack_from("<I", data, 4)[0] + 2
    for i in range(count):  # the first tag stored out of line: make its offset point beyond the end
        entry = first + 12 * i
        tag, kind, n = struct.unpack_from("<HHI", data, entry)
        if n * {1: 1, 2: 1, 3: 2, 4: 4, 5: 8}.get(kind, 1) > 4:
            struct.pack_into("<I", data, entry + 8, len(data) + 1000)
            break
    return bytes(data)


def raw_tiff(pixels: np.ndarray, sample_format: int) -> bytes:
    """An uncompressed one-strip grayscale TIFF of ``pixels`` (little-endian) with any sample
    format (1 unsigned, 2 signed, 3 IEEE float, 6 complex float): for the formats Pillow cannot
    write, such as the 64-bit floats and complex samples of scientific cameras."""
    h, w = pixels.shape
    data = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    tags = [(256, w), (257, h), (258, pixels.dtype.itemsize * 8), (259, 1), (262, 1), (273, 8), (277, 1), (278, h),
            (279, len(data)), (339, sample_format)]
    out = b"II*\x00" + struct.pack("<I", 8 + len(data)) + data + struct.pack("<H", len(tags))
    for tag, value in tags:  # LONG for the offsets and byte counts, SHORT for the others
        out += struct.pack("<HHII", tag, 4, 1, value) if tag in (273, 279) else struct.pack("<HHIHH", tag, 3, 1, value, 0)
    return out + struct.pack("<I", 0)


def encode(pixels: np.ndarray | Image.Image, fmt: str, **kw) -> bytes:
    img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def flip_bytes(data: bytes, start: int, every: int = 7) -> bytes:
    out = bytearray(data)
    for i in range(start, len(out), every):
        out[i] ^= 0x5A
    return bytes(out)


def valid_images(digit: np.ndarray) -> dict[str, bytes]:
    """Valid files of every common kind, all showing ``digit`` (28x28 uint8)."""
    rgb = np.stack([digit, digit // 2, 255 - digit], axis=-1)
    big = np.asarray(Image.fromarray(digit).resize((300, 200)))
    rgba = np.dstack([rgb, np.where(digit > 0, 255, 0).astype(np.uint8)])
    pal = Image.fromarray(rgb).quantize(16)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    frames = [Image.fromarray(digit), Image.fromarray(255 - digit)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    return {
        "gray.png": encode(digit, "PNG"),
        "gray16.png": encode((digit.astype(np.uint16) * 257), "PNG"),  # mode I;16
        "rgb.png": encode(rgb, "PNG"),
        "rgba.png": encode(rgba, "PNG"),
        "la.png": encode(Image.fromarray(rgba).convert("LA"), "PNG"),
        "palette.png": encode(pal, "PNG"),
        "palette_transparent.png": encode(pal_t, "PNG", transparency=0),
        "bilevel.png": encode(Image.fromarray(digit).convert("1"), "PNG"),
        "gray.jpg": encode(digit, "JPEG", quality=95),
        "rgb.jpeg": encode(rgb, "JPEG"),
        "cmyk.jpg": encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "float32.tif": encode(Image.fromarray(digit.astype(np.float32) / 255), "TIFF"),
        "int32.tif": encode(Image.fromarray(digit.astype(np.int32) * 100), "TIFF"),
        "cmyk.tif": encode(Image.fromarray(rgb).convert("CMYK"), "TIFF"),
        "ycbcr.jpg": encode(Image.fromarray(rgb).convert("YCbCr"), "JPEG"),
        "animated.gif": gif.getvalue(),
        "image.bmp": encode(rgb, "BMP"),
        "image.webp": encode(rgb, "WEBP", lossless=True),
        "image.pgm": encode(digit, "PPM"),
        "larger_300x200.png": encode(big, "PNG"),
        "png_named.jpg": encode(digit, "PNG"),  # content decides, not the name
    }


# An EPS file: opening it with Pillow's EPS plugin would run Ghostscript on it.
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\n"
       b"(aae-hostile-marker) (w) file closefile\nshowpage\n%%EOF\n")


def make_hostile_folder(root: Path, digits: np.ndarray) -> dict[str, str]:
    """Fill ``root`` with hostile and valid files; returns {path relative to root: OK|ERROR|ANY}.

    ``digits``: a few real 28x28 uint8 images (MNIST) used as picture content.
    """
    root.mkdir(parents=True, exist_ok=True)
    expect: dict[str, str] = {}

    def put(rel: str, data: bytes, outcome: str) -> Path:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        expect[rel] = outcome
        return p

    for name, data in valid_images(digits[0]).items():
        put(name, data, OK)
    png, jpg = encode(digits[1], "PNG"), encode(np.dstack([digits[1]] * 3), "JPEG", quality=90)
    # Nested folders, odd names (non-ASCII, spaces, Rich markup, a newline), a hidden file.
    put("nested/deeper/still/digit.png", png, OK)
    put("données/数字 ü ñ.png", png, OK)
    put("[bold red]markup[/] [/].png", png, OK)
    put("line\nbreak.png", png, OK)
    put(".hidden.png", png, OK)
    put("UPPER.PNG", png, OK)
    # Broken files.
    put("zero_bytes.png", b"", ERROR)
    put("zero_bytes.jpg", b"", ERROR)
    put("text.png", b"this is not a picture\n" * 20, ERROR)
    put("html.jpg", b"<html><body>404 not found</body></html>", ERROR)
    put("truncated_half.png", png[: len(png) // 2], ERROR)
    put("truncated_header.png", png[:20], ERROR)
    put("truncated.jpg", jpg[: len(jpg) // 2], ERROR)
    put("truncated_header.jpg", jpg[:12], ERROR)
    put("corrupt_idat.png", flip_bytes(png, 60), ERROR)  # CRC / zlib errors
    put("corrupt_scan.jpg", flip_bytes(jpg, len(jpg) // 2, every=97), ANY)  # libjpeg may still decode
    put("png_magic_only.png", b"\x89PNG\r\n\x1a\n", ERROR)
    put("jpeg_magic_only.jpg", b"\xff\xd8\xff\xe0", ERROR)
    put("zero_width.png", png_bomb(0, 28), ERROR)
    put("tiff_bad_tag.tif", tiff_with_a_bad_tag(), ANY)  # Pillow warns about it; the CLI stays quiet
    # Sample formats Pillow does not decode (a camera's float64 or complex TIFF), and one it does.
    put("float64.tif", raw_tiff(digits[2].astype(np.float64) / 255, 3), ERROR)
    put("complex64.tif", raw_tiff(digits[2].astype(np.complex64), 6), ERROR)
    put("raw_float32.tif", raw_tiff(digits[2].astype(np.float32) / 255, 3), OK)
    put("random_bytes.png", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), ERROR)
    # Decompression bombs: tiny files declaring images far larger than any camera.
    put("bomb_png_100kx100k.png", png_bomb(100_000, 100_000), ERROR)
    put("bomb_png_rgba_16kx16k.png", png_bomb(16_000, 16_000, color_type=6), ERROR)  # 256 MP
    put("bomb_jpeg_65kx65k.jpg", jpeg_bomb(65_000, 65_000), ERROR)
    put("bomb_png_rgba_14kx14k.png", png_bomb(14_000, 14_000, color_type=6), ERROR)  # 196 MP, 784 MB as RGBA
    # Under the limits, 64 rows of 8000 present, the zlib stream complete: Pillow decodes the
    # missing rows as black without an error, so it is scored (and the model flags it).
    put("rows_missing_8kx8k.png", png_bomb(8_000, 8_000), ANY)
    # Formats that run more than a decoder: EPS is handed to Ghostscript, a PostScript interpreter.
    put("postscript.png", EPS, ERROR)
    put("icon.png", encode(Image.fromarray(digits[0]), "ICO"), ERROR)  # a real image, not an accepted format
    # Not regular files: a FIFO (opening it would block forever), a directory named like an image
    # (just a folder: walked), a character device, symlinks that loop or dangle.
    os.mkfifo(root / "fifo.png")
    expect["fifo.png"] = ERROR
    (root / "dir.png").mkdir()
    put("dir.png/inside.png", png, OK)
    os.symlink("/dev/zero", root / "dev_zero.png")
    expect["dev_zero.png"] = ERROR
    os.symlink("loop_b.png", root / "loop_a.png")
    os.symlink("loop_a.png", root / "loop_b.png")
    expect["loop_a.png"] = expect["loop_b.png"] = ERROR
    os.symlink("does_not_exist.png", root / "dangling.png")
    expect["dangling.png"] = ERROR
    os.symlink(".", root / "dir_loop")  # a directory symlink loop: must not be walked forever
    os.symlink("gray.png", root / "link_to_gray.png")
    expect["link_to_gray.png"] = OK
    # /proc/self/mem is a regular file whose first read fails with EIO, even for root.
    os.symlink("/proc/self/mem", root / "io_error.png")
    expect["io_error.png"] = ERROR
    # Not images by suffix: never picked up by a folder walk.
    put("notes.txt", b"hello", "skip")
    del expect["notes.txt"]
    return expect


def unreadable_file(root: Path, digit: np.ndarray) -> Path:
    """A valid PNG with mode 000 (unreadable unless the reader is root)."""
    p = root / "unreadable.png"
    p.write_bytes(encode(digit, "PNG"))
    p.chmod(0)
    return p


def non_utf8_name(root: Path, digit: np.ndarray) -> Path | None:
    """A valid PNG whose name is not valid UTF-8 (possible on Linux); None where unsupported."""
    try:
        name = os.fsdecode(b"bad_\xff\xfe_name.png")
        p = root / name
        p.write_bytes(encode(digit, "PNG"))
        return p
    except (OSError, UnicodeError):
        return None
