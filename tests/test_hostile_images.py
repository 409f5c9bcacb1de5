"""Hostile input folders through the real `aae-run score` and the `AAEModel` API.

Every valid file is scored, every invalid one gets its own row with a readable reason, no
traceback, bounded memory, nothing hangs, and the exit code says which of the three cases
happened. The files are generated here (tests/hostile_inputs.py), never committed.
"""

from __future__ import annotations

import csv
import ctypes
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from typer.testing import CliRunner

from aae_runtime import AAEModel, InputError
from aae_runtime.contract.errors import ModelError
from aae_runtime.cli import app
from aae_runtime.console import display_path
from aae_runtime.images import find_images, load_image
from aae_runtime.contract.preprocessing import Preprocessing
from tests.conftest import write_png
from tests.hostile_inputs import ANY, ERROR, OK, make_hostile_folder, non_utf8_name, unreadable_file

# As aae_runtime.images sets it for the runtime (pytest resets warning filters per test).
pytestmark = pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
CLI_TIMEOUT = 120  # a hang (e.g. on a FIFO) fails the test instead of stalling the suite


def run_cli(*args, preexec_fn=None):
    env = {**os.environ, "COLUMNS": "250"}
    return subprocess.run(["aae-run", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=CLI_TIMEOUT, preexec_fn=preexec_fn, errors="replace")


def no_traceback(r) -> None:
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, mnist_test):
    images, _ = mnist_test
    root = tmp_path_factory.mktemp("hostile")
    expect = make_hostile_folder(root, images[:4])
    odd = non_utf8_name(root, images[0])
    if odd is not None:
        expect[display_path(odd.relative_to(root))] = OK
    return root, expect


@pytest.fixture(scope="module")
def cli_rows(hostile, tiny_model_dir, tmp_path_factory):
    root, _ = hostile
    out = tmp_path_factory.mktemp("out")
    r = run_cli("score", root, "--model", tiny_model_dir, "--device", "cpu", "--show", "0",
                "-o", out / "rows.json")
    rows = json.loads((out / "rows.json").read_text())
    return r, {str(Path(row["path"]).relative_to(root)): row for row in rows}


def test_every_file_gets_exactly_its_own_row(hostile, cli_rows):
    root, expect = hostile
    r, rows = cli_rows
    no_traceback(r)
    assert set(rows) == set(expect), (set(rows) ^ set(expect))
    assert not any("dir_loop" in p for p in rows)  # the directory symlink loop was not walked


def test_valid_files_are_scored_and_invalid_ones_say_why(hostile, cli_rows):
    _, expect = hostile
    _, rows = cli_rows
    for rel, outcome in expect.items():
        row = rows[rel]
        if outcome == OK or (outcome == ANY and row["error"] is None):
            assert row["error"] is None and math.isfinite(row["score"]) and row["anomaly"] in (True, False), (rel, row)
        else:
            assert outcome in (ERROR, ANY), (rel, row)
            assert row["score"] is None and row["anomaly"] is None, (rel, row)
            reason = row["error"]
            assert isinstance(reason, str) and 8 <= len(reason) <= 300 and "\n" not in reason, (rel, reason)
            assert "Traceback" not in reason and "<" not in reason, (rel, reason)  # no reprs of objects


@pytest.mark.parametrize("name, words", [
    ("zero_bytes.png", "empty file"),
    ("text.png", "not an image"),
    ("truncated_half.png", "truncated"),
    ("truncated.jpg", "truncated"),
    ("corrupt_idat.png", "corrupt"),
    ("bomb_png_100kx100k.png", "too large"),
    ("bomb_jpeg_65kx65k.jpg", "too large"),
    ("bomb_png_rgba_14kx14k.png", "too large"),
    ("fifo.png", "not a regular file (a FIFO)"),
    ("dev_zero.png", "not a regular file (a character device)"),
    ("loop_a.png", "symlink loop"),
    ("dangling.png", "dangling symlink"),
    ("io_error.png", "cannot read the file"),
    ("postscript.png", "not one of the accepted formats"),
    ("icon.png", "not one of the accepted formats"),
    ("float64.tif", "TIFF file whose pixel format cannot be decoded"),
    ("complex64.tif", "save it with 8- or 16-bit integer or 32-bit float samples"),
    ("png_magic_only.png", "a PNG file whose header cannot be decoded"),
])
def test_reasons_name_the_problem(cli_rows, name, words):
    _, rows = cli_rows
    assert words in rows[name]["error"]


def test_exit_code_and_table_for_a_mixed_folder(hostile, cli_rows, tiny_model_dir, tmp_path):
    root, expect = hostile
    r, rows = cli_rows
    assert r.returncode == 1
    failed = sum(row["error"] is not None for row in rows.values())
    # stderr: the provider line and the output notice; no warnings (Pillow's included), no traceback
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("execution provider:") and lines[1].startswith(f"wrote {len(rows)} rows"), r.stderr
    assert f"scored {len(rows) - failed} images" in r.stdout and f"{failed} failed" in r.stdout
    # Names are printed literally: Rich markup is not interpreted, control characters escaped.
    assert "[bold red]markup[/] [/].png" in r.stdout
    assert "line\\x0abreak.png" in r.stdout and "line\nbreak" not in r.stdout
    # The same run as CSV (in-process): valid UTF-8 whatever the names, one record per file.
    csv_run = CliRunner().invoke(app, ["score", str(root), "--model", str(tiny_model_dir), "--device", "cpu",
                                       "-o", str(tmp_path / "rows.csv")])
    assert csv_run.exit_code == 1 and isinstance(csv_run.exception, SystemExit)
    with open(tmp_path / "rows.csv", newline="", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_api_gives_the_same_rows_as_the_cli(hostile, cli_rows, tiny_model_dir):
    root, _ = hostile
    _, rows = cli_rows
    model = AAEModel.load(tiny_model_dir, device="cpu")
    api = {display_path(Path(r.path).relative_to(root)): r for r in model.score_paths([root], batch_size=7)}
    assert set(api) == set(rows)
    for rel, r in api.items():
        assert (r.error is None) == (rows[rel]["error"] is None), rel
        if r.error is None:
            assert r.score == pytest.approx(rows[rel]["score"], rel=1e-5)


def test_conversions_follow_the_metadata(hostile, mnist_test):
    """16-bit, RGB(A), palette and CMYK files become the model's mode as Pillow converts them."""
    root, _ = hostile
    digit = mnist_test[0][0]
    gray = Preprocessing("L", 28, 28, "bilinear", 1 / 255, 0.0)
    rgb = Preprocessing("RGB", 28, 28, "bilinear", 1 / 255, 0.0)
    ref = digit.astype(np.float32) / 255
    np.testing.assert_allclose(load_image(root / "gray.png", gray)[0], ref, atol=1e-7)
    np.testing.assert_allclose(load_image(root / "gray16.png", gray)[0], ref, atol=1e-7)  # scaled, not clipped
    colour = np.stack([digit, digit // 2, 255 - digit], axis=-1)
    as_l = np.asarray(Image.fromarray(colour).convert("L"), dtype=np.float32) / 255
    np.testing.assert_allclose(load_image(root / "rgb.png", gray)[0], as_l, atol=1e-7)
    np.testing.assert_allclose(load_image(root / "rgb.png", rgb), colour.transpose(2, 0, 1) / 255, atol=1e-7)
    # Grayscale into an RGB model: three equal channels.
    three = load_image(root / "gray.png", rgb)
    assert three.shape == (3, 28, 28) and np.array_equal(three[0], three[2]) and np.allclose(three[0], ref)
    # Transparent pixels read as black background, opaque ones keep their colour.
    rgba = load_image(root / "rgba.png", rgb)
    assert np.all(rgba[:, digit == 0] == 0) and np.allclose(rgba[:, digit > 0], (colour.transpose(2, 0, 1) / 255)[:, digit > 0])
    for name in ("cmyk.jpg", "cmyk.tif", "palette.png", "palette_transparent.png", "la.png", "float32.tif",
                 "int32.tif", "bilevel.png", "animated.gif", "larger_300x200.png", "image.webp", "ycbcr.jpg"):
        for pre in (gray, rgb):
            x = load_image(root / name, pre)
            assert x.shape == pre.shape and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1, name


def test_wide_samples_are_scaled_from_their_range_or_refused_never_clipped(tmp_path, mnist_test):
    digit = mnist_test[0][0]
    gray = Preprocessing("L", 28, 28, "bilinear", 1 / 255, 0.0)
    ref = digit.astype(np.float32) / 255
    for name, pixels in (("unit.tif", digit.astype(np.float32) / 255), ("bytes.tif", digit.astype(np.float32)),
                         ("counts16.tif", digit.astype(np.int32) * 257)):
        Image.fromarray(pixels).save(tmp_path / name)
        np.testing.assert_allclose(load_image(tmp_path / name, gray)[0], ref, atol=1 / 255 + 1e-6)
    Image.fromarray(digit.astype(np.float32) * 257).save(tmp_path / "float16bit.tif")  # a 16-bit range in floats
    np.testing.assert_allclose(load_image(tmp_path / "float16bit.tif", gray)[0], ref, atol=1 / 255 + 1e-6)
    bad = {"above65535.tif": (digit.astype(np.float32) * 1000, "float image with values up to 255000"),
           "nan.tif": (np.where(digit > 0, np.nan, 0).astype(np.float32), "NaN or infinite"),
           "counts32.tif": (digit.astype(np.int32) * 1000, "32-bit integer image with values up to 255000")}
    for name, (pixels, words) in bad.items():
        Image.fromarray(pixels).save(tmp_path / name)
        with pytest.raises(InputError, match=words):
            load_image(tmp_path / name, gray)


def test_exif_orientation_turns_photos_upright_for_models_that_record_it(tmp_path):
    stored = np.zeros((20, 30), np.uint8)
    stored[:, :5] = 255  # a bright band along the stored image's left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to view": what a phone held upright writes
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    Image.fromarray(stored).save(tmp_path / "phone.png", exif=exif)
    Image.fromarray(stored).save(tmp_path / "phone.webp", exif=exif, lossless=True)
    Image.fromarray(np.dstack([stored] * 3)).save(tmp_path / "phone_rgb.jpg", exif=exif, quality=95)
    Image.fromarray(stored).save(tmp_path / "plain.png")
    upright = Preprocessing("L", 8, 8, "bilinear", 1 / 255, 0.0, orientation="exif")
    as_stored = Preprocessing("L", 8, 8, "bilinear", 1 / 255, 0.0)  # models exported before the field
    # (TIFF is left out: Pillow's TIFF reader applies the orientation tag itself as it loads)
    for name in ("phone.jpg", "phone.png", "phone.webp", "phone_rgb.jpg"):
        x = load_image(tmp_path / name, upright, native=True)[0]
        assert x.shape == (30, 20) and x[:5].mean() > 0.9 and x[-5:].mean() < 0.1, name  # the band is now along the top
        assert load_image(tmp_path / name, as_stored, native=True)[0].shape == (20, 30), name
    # TIFFs are turned by Pillow itself as it reads them; an uncompressed one turned sideways it scrambles: refused
    Image.fromarray(stored).save(tmp_path / "lzw.tif", tiffinfo={0x0112: 6}, compression="tiff_lzw")
    x = load_image(tmp_path / "lzw.tif", upright, native=True)[0]
    assert x.shape == (30, 20) and x[:5].mean() > 0.9 and x[-5:].mean() < 0.1
    Image.fromarray(stored).save(tmp_path / "raw.tif", tiffinfo={0x0112: 6})
    with pytest.raises(InputError, match=r"uncompressed TIFF whose orientation tag \(6\) turns it sideways"):
        load_image(tmp_path / "raw.tif", upright)
    # resized to the model's input after turning, not before (8 x 8 here: the band is the top rows)
    small = load_image(tmp_path / "phone.png", upright)[0]
    assert small[0].mean() > 0.9 and small[-1].mean() < 0.1
    assert load_image(tmp_path / "plain.png", upright, native=True)[0].shape == (20, 30)  # no tag: as stored
    old_metadata = {k: v for k, v in upright.to_dict().items() if k != "orientation"}
    assert Preprocessing.from_dict(old_metadata).orientation == "stored"
    assert Preprocessing.from_dict(upright.to_dict()) == upright
    with pytest.raises(ModelError, match="unsupported preprocessing"):
        Preprocessing.from_dict({**upright.to_dict(), "orientation": "sideways"})


def test_exit_codes_all_scored_and_could_not_run(tmp_path, tiny_model_dir, mnist_test):
    good = tmp_path / "good"
    write_png(good / "a.png", mnist_test[0][0])
    r = run_cli("score", good, "--model", tiny_model_dir, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    r = run_cli("score", empty, "--model", tiny_model_dir, "--device", "cpu")
    assert r.returncode == 2 and "no image file among the given paths" in r.stderr and "check the paths" in r.stderr
    r = run_cli("score", good, "--model", tmp_path / "nope", "--device", "cpu")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    no_traceback(r)
    help_text = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "300"}).output
    assert "Exit codes" in help_text and "1 some files could not be scored" in help_text


def _drop_file_permission_override() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so that even
    root is refused a mode-000 file (root ignores file modes otherwise)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mode-000 files and capabilities as on Linux")
def test_unreadable_file_and_folder_get_error_rows(tmp_path, tiny_model_dir, mnist_test):
    root = tmp_path / "imgs"
    root.mkdir()
    write_png(root / "ok.png", mnist_test[0][0])
    unreadable_file(root, mnist_test[0][0])
    locked = root / "locked"
    write_png(locked / "inside.png", mnist_test[0][0])
    locked.chmod(0)
    preexec = _drop_file_permission_override if os.geteuid() == 0 else None
    try:
        r = run_cli("score", root, "--model", tiny_model_dir, "--device", "cpu", "-o", tmp_path / "rows.json",
                    preexec_fn=preexec)
    finally:
        locked.chmod(0o755)
    no_traceback(r)
    rows = {Path(row["path"]).name: row for row in json.loads((tmp_path / "rows.json").read_text())}
    assert r.returncode == 1
    assert rows["ok.png"]["error"] is None
    assert rows["unreadable.png"]["error"] == "permission denied (cannot read the file)"
    assert "folder cannot be listed" in rows["locked"]["error"]


MEASURE_RSS = """
import resource, sys
from aae_runtime import AAEModel
m = AAEModel.load(sys.argv[1], device="cpu")
rows = m.score_paths(sys.argv[2:])
print(sum(r.ok for r in rows), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_memory_stays_bounded_on_decompression_bombs(hostile, tiny_model_dir, tmp_path):
    """Peak RSS of scoring the bombs (each a few hundred bytes declaring 0.2-10 gigapixels) stays
    within 64 MB of scoring one normal image: they are refused from their headers."""
    root, _ = hostile
    bombs = [root / n for n in ("bomb_png_100kx100k.png", "bomb_png_rgba_16kx16k.png", "bomb_png_rgba_14kx14k.png",
                                "bomb_jpeg_65kx65k.jpg")]
    assert all(p.stat().st_size < 16_000 for p in bombs)

    def peak(paths):
        r = subprocess.run([sys.executable, "-c", MEASURE_RSS, str(tiny_model_dir), *map(str, paths)],
                           capture_output=True, text=True, timeout=CLI_TIMEOUT)
        assert r.returncode == 0, r.stderr
        ok, kib = map(int, r.stdout.split())
        return ok, kib / 1024

    ok_base, base = peak([root / "gray.png"])
    ok_bombs, bombs_mb = peak(bombs)
    assert ok_base == 1 and ok_bombs == 0
    assert bombs_mb - base < 64, (base, bombs_mb)


def test_find_images_never_loops_and_keeps_explicit_files(hostile):
    root, expect = hostile
    found = find_images([root, root / "gray.png", root / "notes.txt"])
    rel = [str(p.relative_to(root)) for p in found]
    assert len(rel) == len(set(rel))  # gray.png given twice: one row
    assert "notes.txt" in rel  # named explicitly: gets its own (error) row
    assert not any(r.startswith("dir_loop") for r in rel)


SYSTEM_PATHS = ["/", "/dev/null", "/dev/zero", "/dev/stdin", "/proc/version", "/proc/self/mem", "/proc/1/cwd",
                "/proc/1/environ", "/sys/kernel/notes", "/no/such/path.png"]


def test_load_image_raises_only_input_error(hostile):
    root, expect = hostile
    pre = Preprocessing("L", 28, 28, "bilinear", 1 / 255, 0.0)
    for path in [*sorted(root.rglob("*")), *map(Path, SYSTEM_PATHS)]:
        try:
            load_image(path, pre)
        except InputError as exc:
            assert str(exc) and "\n" not in str(exc)


def test_a_name_that_is_not_utf8_is_escaped_in_the_maps_index_and_the_regions(tmp_path, tiny_model_dir, mnist_test):
    (tmp_path / "in").mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)  # far from a digit: it has regions
    odd = non_utf8_name(tmp_path / "in", noise)
    if odd is None:
        pytest.skip("this file system refuses names that are not UTF-8")
    r = run_cli("score", tmp_path / "in", "--model", tiny_model_dir, "--device", "cpu", "--maps", tmp_path / "maps",
                "--maps-raw", "--regions", tmp_path / "regions.csv")
    no_traceback(r)
    assert r.returncode == 0, r.stderr
    index = (tmp_path / "maps" / "maps.csv").read_text(encoding="utf-8")
    assert "bad_\\xff\\xfe_name.png" in index and (tmp_path / "maps" / os.fsdecode(b"bad_\xff\xfe_name.png.map.png")).is_file()
    regions = (tmp_path / "regions.csv").read_text(encoding="utf-8").splitlines()
    assert len(regions) > 1 and all(line.startswith("path,") or "bad_\\xff\\xfe_name.png" in line for line in regions)


def test_result_files_that_would_overwrite_each_other_or_the_model_are_refused(tmp_path, tiny_model_dir, mnist_test):
    image = write_png(tmp_path / "a.png", mnist_test[0][0])
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    pointer = (model / "MODEL.json").read_bytes()
    for extra, words in (((("--output", tmp_path / "x.csv"), ("--regions", tmp_path / "x.csv")), "also the file of --output"),
                         ((("--maps", tmp_path / "m"), ("--output", tmp_path / "m" / "maps.csv")), "also the file of --maps"),
                         ((("--output", model / "MODEL.json"),), "inside the model folder")):
        r = run_cli("score", image, "--model", model, "--device", "cpu", *[v for pair in extra for v in pair])
        no_traceback(r)
        assert r.returncode == 2 and words in r.stderr and r.stderr.count("error:") == 1, r.stderr
    assert (model / "MODEL.json").read_bytes() == pointer and not (tmp_path / "x.csv").exists()


def test_symlinked_folders_are_walked_once_and_loops_end(tmp_path, mnist_test):
    shots = tmp_path / "shots"
    write_png(shots / "a.png", mnist_test[0][0])
    inbox = tmp_path / "inbox"
    write_png(inbox / "b.png", mnist_test[0][1])
    os.symlink(shots, inbox / "line2")  # a camera's folder linked in: its images are scored
    os.symlink(shots, inbox / "again")  # the same folder a second time: listed once
    os.symlink(".", inbox / "loop")
    names = [p.relative_to(inbox).as_posix() for p in find_images([inbox])]
    assert names == ["again/a.png", "b.png"], names


def test_bidirectional_overrides_in_a_name_are_escaped_on_the_terminal():
    assert display_path("photo\u202egnp.exe", controls=True) == "photo\\u202egnp.exe"
    assert display_path("a\u2066b\u2069", controls=True) == "a\\u2066b\\u2069"
    assert display_path("photo\u202egnp.exe") == "photo\u202egnp.exe"  # files (CSV, JSON) keep the name as it is


def test_calibrating_with_one_folder_as_normal_and_anomalous_is_refused(tmp_path, tiny_model_dir, mnist_test):
    for i in range(3):
        write_png(tmp_path / "good" / f"{i}.png", mnist_test[0][i])
    r = run_cli("calibrate", tmp_path / "good", "--model", tiny_model_dir, "--anomalies", tmp_path / "good")
    assert r.returncode == 2 and "as normal and as anomalous" in r.stderr and r.stderr.count("error:") == 1, r.stderr


def test_a_pointer_that_is_a_folder_is_a_damaged_model_folder(tmp_path, tiny_model_dir, mnist_test):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "MODEL.json").unlink()
    (model / "MODEL.json").mkdir()
    r = run_cli("score", write_png(tmp_path / "a.png", mnist_test[0][0]), "--model", model)
    assert r.returncode == 2 and "is damaged" in r.stderr and "permissions" not in r.stderr, r.stderr
