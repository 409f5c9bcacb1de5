"""Property tests (hypothesis) of image decoding: random bytes and mutated valid files.

Whatever the bytes, `load_image` returns one model input of the preprocessing's shape with
finite values, or raises `InputError` with a one-line reason; nothing else. Derandomized and
bounded (max_examples, no deadline), so CI runs the same cases in a few seconds.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from aae_runtime.contract.errors import InputError
from aae_runtime.images import load_image
from aae_runtime.contract.preprocessing import Preprocessing
from tests.hostile_inputs import encode

# CI: a fixed, derandomized set of cases. A longer hunt: AAE_FUZZ_EXAMPLES=20000 AAE_FUZZ_RANDOM=1.
EXAMPLES = int(os.environ.get("AAE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("AAE_FUZZ_RANDOM"), database=None,
                suppress_health_check=[HealthCheck.too_slow])
pytestmark = pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")

GRAY = Preprocessing("L", 28, 28, "bilinear", 1 / 255, 0.0)
RGB = Preprocessing("RGB", 16, 12, "nearest", 2 / 255, -1.0)
_DIR: Path  # a folder of this module's own, removed after its tests (see _folder)


@pytest.fixture(scope="module", autouse=True)
def _folder(tmp_path_factory):
    global _DIR
    _DIR = tmp_path_factory.mktemp("fuzz-images")
    yield
    shutil.rmtree(_DIR, ignore_errors=True)


def _seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (20, 24), dtype=np.uint8)
    rgb = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    rgba = np.dstack([rgb, gray])
    gif = io.BytesIO()
    Image.fromarray(gray).save(gif, format="GIF", save_all=True, append_images=[Image.fromarray(255 - gray)])
    return {
        "png_gray": encode(gray, "PNG"),
        "png_rgba": encode(rgba, "PNG"),
        "png_16bit": encode(gray.astype(np.uint16) * 257, "PNG"),
        "png_palette": encode(Image.fromarray(rgb).quantize(8), "PNG"),
        "jpeg": encode(rgb, "JPEG", quality=80),
        "jpeg_progressive": encode(rgb, "JPEG", progressive=True),
        "jpeg_cmyk": encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "gif": gif.getvalue(),
        "tiff": encode(rgb, "TIFF"),
        "tiff_float": encode(Image.fromarray(gray.astype(np.float32)), "TIFF"),
        "bmp": encode(rgb, "BMP"),
        "webp": encode(rgb, "WEBP"),
        "ppm": encode(rgb, "PPM"),
    }


SEEDS = _seeds()


def check(data: bytes, pre: Preprocessing) -> str:
    """Decode ``data`` from a real file; 'ok' or 'error', and the contract holds either way."""
    path = _DIR / "fuzz.img"
    path.write_bytes(data)
    try:
        x = load_image(path, pre)
    except InputError as exc:
        text = str(exc)
        assert text and "\n" not in text and len(text) < 400, text
        return "error"
    assert x.shape == pre.shape and x.dtype == np.float32 and np.isfinite(x).all()
    return "ok"


@FUZZ
@given(st.binary(min_size=0, max_size=2048))
def test_random_bytes(data):
    check(data, GRAY)


@settings(FUZZ, max_examples=max(1, EXAMPLES // 3))
@given(st.binary(min_size=0, max_size=512))
def test_random_bytes_behind_real_magic_numbers(tail):
    for magic in (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"II*\x00", b"MM\x00*", b"BM", b"RIFF\x00\x00\x00\x00WEBP", b"P6\n"):
        check(magic + tail, RGB)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20)),
    st.tuples(st.just("insert"), st.tuples(st.integers(0, 1 << 20), st.binary(min_size=1, max_size=64))),
    st.tuples(st.just("delete"), st.tuples(st.integers(0, 1 << 20), st.integers(1, 64))),
    st.tuples(st.just("overwrite"), st.tuples(st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16))),
)


def mutate(data: bytes, how) -> bytes:
    kind, arg = how
    out = bytearray(data)
    if not out:
        return data
    if kind == "flip":
        for pos, mask in arg:
            out[pos % len(out)] ^= mask
    elif kind == "truncate":
        del out[arg % len(out):]
    elif kind == "insert":
        pos, blob = arg
        out[pos % len(out):pos % len(out)] = blob
    elif kind == "delete":
        pos, n = arg
        del out[pos % len(out):pos % len(out) + n]
    else:
        pos, blob = arg
        pos %= len(out)
        out[pos:pos + len(blob)] = blob
    return bytes(out)


@FUZZ
@given(st.sampled_from(sorted(SEEDS)), st.lists(mutation, min_size=1, max_size=3), st.booleans())
def test_mutated_valid_files(seed, mutations, rgb):
    data = SEEDS[seed]
    for how in mutations:
        data = mutate(data, how)
    check(data, RGB if rgb else GRAY)


def png(width: int, height: int, bit_depth: int, color_type: int, body: bytes) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(body)) + chunk(b"IEND", b"")


@FUZZ
@given(st.integers(0, 1 << 31), st.integers(0, 1 << 31), st.sampled_from([1, 2, 4, 8, 16, 3, 0]),
       st.sampled_from([0, 2, 3, 4, 6, 1, 5, 7]), st.binary(max_size=256))
def test_png_headers_with_any_dimensions_and_modes(width, height, bit_depth, color_type, body):
    """Well-formed PNG chunks (valid CRCs) declaring any size and pixel format: bombs included."""
    check(png(width, height, bit_depth, color_type, body), GRAY)


def test_the_seeds_themselves_decode():
    for name, data in SEEDS.items():
        assert check(data, GRAY) == "ok", name
        assert check(data, RGB) == "ok", name
