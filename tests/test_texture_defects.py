"""benchmarks/texture_defects.py: regions, defect kinds on real texture windows, test sets on disk."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("texture_defects", REPO / "benchmarks" / "texture_defects.py")
td = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = td  # dataclasses look their module up by name
_spec.loader.exec_module(td)

SIZE = 96  # the window size the defect sizes were designed for
SEEDS = range(6)
# Longer side (px) of each kind's mask bounding box: the sizes the module promises, with slack
# for the soft edge and a rotated rectangle's diagonal.
EXTENT = {"scratch": (10, 42), "hole": (5, 16), "foreign": (7, 24), "blur": (11, 26), "stain": (11, 30)}


@pytest.fixture(scope="module")
def test_bands() -> dict[str, np.ndarray]:
    return {name: td.split_regions(td.load_texture(name))["test"] for name in td.TEXTURES}


def _window(band: np.ndarray, seed: int) -> np.ndarray:
    """A float32 [0, 1] SIZE x SIZE window of ``band`` at a seeded position."""
    rng = np.random.default_rng([seed, 99])
    y, x = (int(rng.integers(0, s - SIZE + 1)) for s in band.shape)
    return band[y : y + SIZE, x : x + SIZE].astype(np.float32) / 255


# ---------------------------------------------------------------- photographs and regions


def test_textures_are_512_square_grayscale():
    for name in td.TEXTURES:
        photo = td.load_texture(name)
        assert photo.shape == (512, 512) and photo.dtype == np.uint8
    with pytest.raises(ValueError, match="unknown texture"):
        td.load_texture("camera")


def test_fit_rows_of_a_512_row_photo():
    assert td.fit_rows(512) == (288, 96, 128)
    with pytest.raises(ValueError, match="sum to less than 1"):
        td.fit_rows(512, train=0.9, val=0.2)
    with pytest.raises(ValueError, match="too short"):
        td.fit_rows(3, train=0.1, val=0.1)


def test_split_regions_disjoint_bands_cover_the_photo_top_to_bottom():
    photo = np.repeat(np.arange(512, dtype=np.int32)[:, None], 7, axis=1)  # each pixel = its row
    regions = td.split_regions(photo)
    rows = {name: np.unique(band[:, 0]) for name, band in regions.items()}
    assert rows["train"].tolist() == list(range(288))
    assert rows["val"].tolist() == list(range(288, 384))
    assert rows["test"].tolist() == list(range(384, 512))
    assert rows["trainval"].tolist() == list(range(384))
    assert all(band.shape[1] == 7 for band in regions.values())


def test_split_regions_of_a_real_photo_reassemble_it():
    photo = td.load_texture("brick")
    regions = td.split_regions(photo)
    np.testing.assert_array_equal(np.concatenate([regions["train"], regions["val"], regions["test"]]), photo)
    np.testing.assert_array_equal(regions["trainval"], photo[:384])


# ---------------------------------------------------------------- defect kinds


@pytest.mark.parametrize("texture", ["grass", "gravel", "brick"])
@pytest.mark.parametrize("kind", ["scratch", "hole", "foreign", "blur", "stain"])
def test_defect_changes_its_footprint_and_nothing_else(test_bands, kind, texture):
    for seed in SEEDS:
        window = _window(test_bands[texture], seed)
        out, mask = td.DEFECTS[kind](window, np.random.default_rng(seed))
        assert out.dtype == np.float32 and out.shape == window.shape and mask.dtype == bool
        assert 0.0 <= out.min() and out.max() <= 1.0
        assert 40 <= mask.sum() <= 600, (seed, int(mask.sum()))
        change = np.abs(out - window)
        # Soft edges leave a faint rim outside the mask, never more than MASK_ALPHA of the contrast;
        # beyond 2 px of the mask nothing moved at all.
        assert change[~mask].max() <= td.MASK_ALPHA + 1e-6
        assert change[~ndimage.binary_dilation(mask, iterations=2)].max() == 0.0
        assert change[mask].mean() > 10 * change[~mask].mean() and change[mask].mean() > 0.02


@pytest.mark.parametrize("kind", ["scratch", "hole", "foreign", "blur", "stain"])
def test_defect_lies_inside_the_margin_at_its_promised_size(test_bands, kind):
    lo, hi = EXTENT[kind]
    for texture in td.TEXTURES:
        for seed in SEEDS:
            window = _window(test_bands[texture], seed)
            out, mask = td.DEFECTS[kind](window, np.random.default_rng(seed))
            ys, xs = np.nonzero(out != window)
            assert min(ys.min(), xs.min(), SIZE - 1 - ys.max(), SIZE - 1 - xs.max()) >= td.MARGIN
            ys, xs = np.nonzero(mask)
            assert lo <= max(np.ptp(ys), np.ptp(xs)) + 1 <= hi, (texture, seed)


def test_scratch_is_thin_and_contrasting(test_bands):
    for texture in td.TEXTURES:
        for seed in SEEDS:
            window = _window(test_bands[texture], seed)
            out, mask = td.scratch(window, np.random.default_rng(seed))
            # No mask pixel lies deeper than 2.5 px inside the mask: the line is under ~5 px wide.
            assert ndimage.distance_transform_edt(mask).max() <= 2.5
            assert abs(out[mask].mean() - window[mask].mean()) > 0.15


def test_hole_is_dark_and_stain_shifts_brightness_moderately(test_bands):
    for texture in td.TEXTURES:
        for seed in SEEDS:
            window = _window(test_bands[texture], seed)
            out, mask = td.hole(window, np.random.default_rng(seed))
            assert np.median(out[mask]) < 0.25 and out[mask].mean() < 0.7 * window[mask].mean()
            out, mask = td.stain(window, np.random.default_rng(seed))
            assert 0.08 < abs(out[mask].mean() / window[mask].mean() - 1) < 0.5


def test_blur_smooths_and_foreign_differs_from_the_texture(test_bands):
    for texture in td.TEXTURES:
        for seed in SEEDS:
            window = _window(test_bands[texture], seed)
            out, mask = td.blur(window, np.random.default_rng(seed))
            assert np.abs(ndimage.laplace(out))[mask].mean() < np.abs(ndimage.laplace(window))[mask].mean()
            out, mask = td.foreign(window, np.random.default_rng(seed))
            assert np.abs(out - window)[mask].mean() > 0.05


@pytest.mark.parametrize("kind", ["scratch", "hole", "foreign", "blur", "stain"])
def test_defect_is_deterministic_given_the_generator(test_bands, kind):
    window = _window(test_bands["gravel"], 0)
    out_a, mask_a = td.DEFECTS[kind](window, np.random.default_rng(5))
    out_b, mask_b = td.DEFECTS[kind](window, np.random.default_rng(5))
    out_c, _ = td.DEFECTS[kind](window, np.random.default_rng(6))
    np.testing.assert_array_equal(out_a, out_b)
    np.testing.assert_array_equal(mask_a, mask_b)
    assert not np.array_equal(out_a, out_c)


def test_defect_in_a_too_small_window_is_refused():
    with pytest.raises(ValueError, match="too small"):
        td.stain(np.full((24, 24), 0.5, np.float32), np.random.default_rng(0))


# ---------------------------------------------------------------- test sets


def _find(region: np.ndarray, image: np.ndarray, mask: np.ndarray) -> list[tuple[int, int]]:
    """Positions in ``region`` where ``image`` equals the region outside a 2 px dilation of ``mask``."""
    keep = ~ndimage.binary_dilation(mask, iterations=2)
    windows = np.lib.stride_tricks.sliding_window_view(region, image.shape)  # (Y, X, H, W)
    # The top MARGIN rows are never touched by a defect: match them first, then check the rest.
    top = (windows[:, :, : td.MARGIN, :] == image[: td.MARGIN]).all(axis=(-2, -1))
    return [(y, x) for y, x in zip(*np.nonzero(top)) if (windows[y, x][keep] == image[keep]).all()]


def test_make_test_set_half_normal_kinds_balanced_windows_inside_the_region(test_bands):
    region = test_bands["grass"]
    images = td.make_test_set(region, n=20, size=SIZE, seed=3)
    assert len(images) == 20 and len({im.name for im in images}) == 20
    normal, anomalous = images[:10], images[10:]
    assert all(im.kind is None and not im.mask.any() and im.name.startswith("normal_") for im in normal)
    assert [im.kind for im in anomalous] == list(td.KINDS) * 2
    assert [im.name for im in anomalous[:2]] == ["scratch_0010", "hole_0011"]
    for im in images:
        assert im.image.shape == im.mask.shape == (SIZE, SIZE) and im.image.dtype == np.uint8
        assert (im.kind is None) == (not im.mask.any())
        assert _find(region, im.image, im.mask), im.name


def test_make_test_set_odd_count_and_determinism(test_bands):
    region = test_bands["brick"]
    a = td.make_test_set(region, n=7, size=SIZE, seed=1)
    b = td.make_test_set(region, n=7, size=SIZE, seed=1)
    c = td.make_test_set(region, n=7, size=SIZE, seed=2)
    assert [im.kind for im in a] == [None] * 3 + list(td.KINDS[:4])
    assert all(np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask) for x, y in zip(a, b))
    assert not all(np.array_equal(x.image, y.image) for x, y in zip(a, c))


def test_make_test_set_refuses_windows_larger_than_the_region(test_bands):
    with pytest.raises(ValueError, match="do not fit"):
        td.make_test_set(test_bands["brick"], n=2, size=200, seed=0)


def test_write_test_set_round_trips(test_bands, tmp_path):
    images = td.make_test_set(test_bands["gravel"], n=10, size=SIZE, seed=4)
    index = td.write_test_set(images, tmp_path)
    with open(index, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [im.name for im in images]
    for row, im in zip(rows, images):
        folder = "normal" if im.kind is None else "anomalous"
        assert row["path"] == f"{folder}/{im.name}.png" and row["kind"] == (im.kind or "")
        with Image.open(tmp_path / row["path"]) as png:
            assert png.mode == "L"
            np.testing.assert_array_equal(np.asarray(png), im.image)
        if im.kind is not None:
            assert row["mask"] == f"masks/{im.name}.png"
            mask = np.asarray(Image.open(tmp_path / row["mask"]))
            assert set(np.unique(mask)) <= {0, 255}
            np.testing.assert_array_equal(mask == 255, im.mask)
    back = td.read_test_set(tmp_path)
    assert [(b.name, b.kind) for b in back] == [(im.name, im.kind) for im in images]
    assert all(np.array_equal(b.image, im.image) and np.array_equal(b.mask, im.mask) for b, im in zip(back, images))


def test_preview_grid_has_a_row_per_texture_and_two_panels_per_kind():
    grid = td.preview(seed=0, size=SIZE)
    assert grid.dtype == np.uint8
    assert grid.shape == (3 * SIZE, len(td.KINDS) * (2 * SIZE + 5))


def test_a_photograph_of_ones_own_is_a_texture_named_by_its_file(tmp_path):
    photo = np.random.default_rng(0).integers(0, 256, (300, 90, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "my wall.png")
    got = td.load_texture(str(tmp_path / "my wall.png"))
    assert got.shape == (300, 90) and got.dtype == np.uint8  # grayscale, the runtime's conversion
    assert np.array_equal(got, np.asarray(Image.fromarray(photo).convert("L")))
    assert td.texture_name(str(tmp_path / "my wall.png")) == "my wall" and td.texture_name("grass") == "grass"
    with pytest.raises(ValueError, match="or give the path of a photograph"):
        td.load_texture(str(tmp_path / "missing.png"))


def test_the_benchmark_refuses_a_photograph_too_small_for_its_test_windows(tmp_path):
    Image.fromarray(np.zeros((200, 512), np.uint8)).save(tmp_path / "short.png")
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "textures.py"), "--textures", str(tmp_path / "short.png"),
                        "--work-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().endswith("a 200 x 512 photograph is too small: its bottom quarter must hold 72 x 72 test windows "
                                     "(at least 288 rows and 72 columns)")
    assert not (tmp_path / "runs" / "short" / "data" / "train").exists()
