"""aae_runtime/regions.py: connected-component labels against scipy, regions and AUROC against brute force."""

from __future__ import annotations

import subprocess
import sys
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from aae_runtime.regions import PixelAUROC, Region, auroc, find_regions, label_regions

EIGHT = np.ones((3, 3), dtype=int)  # scipy's structure for 8-connectivity


def assert_same_partition(mask: np.ndarray) -> None:
    """label_regions equals scipy's labelling up to a renaming, and numbers in raster order."""
    labels, n = label_regions(mask)
    ref, ref_n = ndimage.label(mask, structure=EIGHT)
    assert labels.dtype == np.int32 and labels.shape == mask.shape
    assert n == ref_n
    np.testing.assert_array_equal(labels == 0, ~mask)
    # a bijection: every (ours, scipy's) pair that occurs is one of exactly n + 1 (background included)
    pairs = {(a, b) for a, b in zip(labels.ravel().tolist(), ref.ravel().tolist())}
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs}) == n + int((~mask).any())
    # consecutive 1..n, first pixels in raster order
    first_seen = [v for v in dict.fromkeys(labels.ravel().tolist()) if v]
    assert first_seen == list(range(1, n + 1))


# ------------------------------------------------------------------------------ label_regions

@pytest.mark.parametrize("shape", [(1, 1), (1, 60), (60, 1), (37, 53), (128, 97)])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.7, 0.95])
def test_label_regions_matches_scipy_on_random_masks(shape, density):
    rng = np.random.default_rng([*shape, int(density * 100)])
    assert_same_partition(rng.random(shape) < density)


@settings(max_examples=200, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 12), st.integers(1, 12))))
def test_label_regions_matches_scipy_on_any_small_mask(mask):
    assert_same_partition(mask)


def checkerboard(h: int, w: int) -> np.ndarray:
    return (np.add.outer(np.arange(h), np.arange(w)) % 2).astype(bool)


@pytest.mark.parametrize("mask", [
    np.zeros((20, 30), bool),
    np.ones((20, 30), bool),
    np.zeros((0, 5), bool),
    np.zeros((5, 0), bool),
    np.ones((1, 40), bool),
    np.ones((40, 1), bool),
    checkerboard(1, 9),  # one row: 8-connectivity cannot join pixels a gap apart
    np.eye(25, dtype=bool),
    np.fliplr(np.eye(25, dtype=bool)),
    np.eye(25, dtype=bool) | np.fliplr(np.eye(25, dtype=bool)),  # an X: one component
    np.eye(10, 30, k=5, dtype=bool) | np.eye(10, 30, k=-3, dtype=bool),  # two parallel diagonals
], ids=["empty", "full", "no-rows", "no-columns", "1xN", "Nx1", "checker-row", "diagonal", "anti-diagonal", "x",
        "two-diagonals"])
def test_label_regions_matches_scipy_on_special_masks(mask):
    assert_same_partition(mask)


def test_checkerboard_is_one_component_under_8_connectivity():
    labels, n = label_regions(checkerboard(31, 17))
    assert n == 1 and set(np.unique(labels)) == {0, 1}


def test_label_regions_numbers_components_in_raster_order_of_their_first_pixel():
    mask = np.array([[0, 0, 0, 1],
                     [1, 0, 0, 1],
                     [1, 0, 1, 0],
                     [0, 0, 0, 0],
                     [1, 1, 0, 1]], bool)
    labels, n = label_regions(mask)
    assert n == 4  # (0, 3) reaches (2, 2) diagonally
    np.testing.assert_array_equal(labels, [[0, 0, 0, 1],
                                           [2, 0, 0, 1],
                                           [2, 0, 1, 0],
                                           [0, 0, 0, 0],
                                           [3, 3, 0, 4]])


def test_label_regions_joins_a_run_to_several_runs_above_and_below():
    mask = np.array([[1, 0, 1, 0, 1, 0, 0],
                     [0, 1, 1, 1, 0, 0, 0],
                     [1, 0, 0, 0, 1, 0, 1],
                     [0, 0, 0, 0, 0, 1, 0]], bool)
    assert_same_partition(mask)
    assert label_regions(mask)[1] == 1


def test_label_regions_rejects_a_mask_that_is_not_2d():
    with pytest.raises(ValueError, match="2-D"):
        label_regions(np.zeros(5, bool))


# ------------------------------------------------------------------------------- find_regions

def brute_regions(values: np.ndarray, threshold: float) -> list[Region]:
    """Flood fill pixel by pixel: the slow, obvious definition."""
    above = values > threshold
    seen = np.zeros_like(above)
    h, w = above.shape
    found = []
    for r0 in range(h):
        for c0 in range(w):
            if not above[r0, c0] or seen[r0, c0]:
                continue
            seen[r0, c0] = True
            queue, pixels = deque([(r0, c0)]), []
            while queue:
                r, c = queue.popleft()
                pixels.append((r, c))
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        rr, cc = r + dr, c + dc
                        if 0 <= rr < h and 0 <= cc < w and above[rr, cc] and not seen[rr, cc]:
                            seen[rr, cc] = True
                            queue.append((rr, cc))
            rs, cs = [p[0] for p in pixels], [p[1] for p in pixels]
            found.append(Region(min(cs), min(rs), max(cs) - min(cs) + 1, max(rs) - min(rs) + 1, len(pixels),
                                float(max(values[p] for p in pixels))))
    return found


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape", [(1, 30), (30, 1), (23, 31)])
def test_find_regions_matches_brute_force(seed, shape):
    rng = np.random.default_rng(seed)
    values = rng.random(shape).astype(np.float32)
    values[rng.random(shape) < 0.1] = np.nan  # NaN is never above the threshold
    values[rng.random(shape) < 0.1] = 0.9  # tied peaks
    got = find_regions(values, 0.55)
    want = brute_regions(values, 0.55)
    assert sorted(got, key=lambda g: (g.y, g.x, g.area)) == sorted(want, key=lambda g: (g.y, g.x, g.area))
    assert [g.peak for g in got] == sorted((g.peak for g in got), reverse=True)
    big = find_regions(values, 0.55, min_area=3)
    assert big == [g for g in got if g.area >= 3]


def test_find_regions_boxes_a_known_blob():
    values = np.zeros((10, 12))
    values[2:5, 3:7] = 0.5
    values[4, 7] = 0.8  # joins the block through (4, 6): one wider region
    values[8, 0] = 2.0
    got = find_regions(values, 0.1)
    assert got == [Region(x=0, y=8, width=1, height=1, area=1, peak=2.0),
                   Region(x=3, y=2, width=5, height=3, area=13, peak=0.8)]


def test_find_regions_of_a_map_below_threshold_or_all_nan_is_empty():
    assert find_regions(np.zeros((5, 5)), 0.0) == []
    assert find_regions(np.full((5, 5), np.nan), -1.0) == []
    assert find_regions(np.ones((5, 5)), float("nan")) == []


# -------------------------------------------------------------------------------------- auroc

def brute_auroc(scores, positive) -> float:
    """Every (positive, negative) pair: 1 when the positive scores higher, 1/2 on a tie."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    twice = sum(2 * (a > b) + (a == b) for a in pos for b in neg)
    return twice / (2 * len(pos) * len(neg))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.booleans()), min_size=2, max_size=40)
       .filter(lambda xs: len({p for _, p in xs}) == 2))
def test_auroc_equals_pairwise_count_with_ties(pairs):
    scores = np.array([s for s, _ in pairs], dtype=np.float32) / 2
    positive = np.array([p for _, p in pairs])
    assert auroc(scores, positive) == brute_auroc(scores.tolist(), positive.tolist())


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_pairwise_count_on_continuous_scores(seed):
    rng = np.random.default_rng(seed)
    positive = rng.random(300) < rng.uniform(0.05, 0.95)
    scores = rng.normal(size=300) + positive
    assert auroc(scores, positive) == pytest.approx(brute_auroc(scores.tolist(), positive.tolist()), abs=1e-15)


def test_auroc_of_perfect_reversed_and_constant_scores():
    scores = np.arange(10.0)
    positive = scores >= 6
    assert auroc(scores, positive) == 1.0
    assert auroc(scores, ~positive) == 0.0
    assert auroc(np.ones(10), positive) == 0.5


def test_auroc_accepts_any_shape_and_integer_scores():
    scores = np.array([[1, 2], [3, 4]])
    assert auroc(scores, scores > 2) == 1.0


@pytest.mark.parametrize("positive, message", [(np.zeros(4, bool), "0 positive"), (np.ones(4, bool), "0 negative")])
def test_auroc_without_both_classes_is_a_one_line_error(positive, message):
    with pytest.raises(ValueError, match=message) as caught:
        auroc(np.arange(4.0), positive)
    assert "\n" not in str(caught.value)


def test_auroc_rejects_nan_scores_and_mismatched_labels():
    with pytest.raises(ValueError, match="NaN"):
        auroc(np.array([0.1, np.nan, 0.3]), np.array([True, False, False]))
    with pytest.raises(ValueError, match="one label per score"):
        auroc(np.arange(3.0), np.array([True, False]))


# --------------------------------------------------------------------------------- PixelAUROC

def synthetic_maps(seed: int, count: int, shape=(64, 80)):
    """(map, mask) pairs: a defect square scoring higher than its surroundings on average."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        mask = np.zeros(shape, bool)
        r, c = rng.integers(0, shape[0] - 10), rng.integers(0, shape[1] - 10)
        mask[r:r + 10, c:c + 10] = rng.random() < 0.7  # some maps are all normal
        yield (rng.normal(size=shape) + 1.2 * mask).astype(np.float32), mask


def test_pixel_auroc_under_the_cap_is_exact():
    acc = PixelAUROC()
    maps = list(synthetic_maps(0, 12))
    maps.append((np.linspace(0, 1, 35, dtype=np.float32).reshape(5, 7), np.eye(5, 7, dtype=bool)))  # another shape
    for values, mask in maps:
        acc.add(values, mask)
    want = auroc(np.concatenate([v.ravel() for v, _ in maps]), np.concatenate([m.ravel() for _, m in maps]))
    assert acc.exact and acc.result() == want


def test_pixel_auroc_keeps_its_own_copy_of_each_map():
    acc = PixelAUROC()
    values, mask = np.array([[0.0, 1.0]]), np.array([[False, True]])
    acc.add(values, mask)
    values[:] = [1.0, 0.0]  # a caller reusing its buffer
    assert acc.result() == 1.0


def test_pixel_auroc_over_the_cap_thins_to_a_close_deterministic_estimate():
    maps = list(synthetic_maps(1, 60, shape=(128, 128)))  # ~980,000 pixels
    exact = auroc(np.concatenate([v.ravel() for v, _ in maps]), np.concatenate([m.ravel() for _, m in maps]))
    estimates = []
    for _ in range(2):
        acc = PixelAUROC(cap=20_000, seed=3)
        for values, mask in maps:
            acc.add(values, mask)
            assert acc._count <= acc.cap
        assert not acc.exact and acc.keep < 1.0
        assert acc._count >= acc.cap // 2 - 2_000  # halving keeps about half of a full store
        estimates.append(acc.result())
    assert estimates[0] == estimates[1]  # same seed, same adds: same subsample
    assert abs(estimates[0] - exact) < 0.05


def test_pixel_auroc_rejects_a_mask_of_another_shape():
    with pytest.raises(ValueError, match="differ in shape"):
        PixelAUROC().add(np.zeros((4, 6)), np.zeros((6, 4), bool))


def test_pixel_auroc_with_nothing_added_is_an_error():
    with pytest.raises(ValueError, match="0 positive"):
        PixelAUROC().result()


# ------------------------------------------------------------------------------------ imports

def test_regions_module_imports_only_numpy_and_the_standard_library():
    code = ("import sys, aae_runtime.regions as r, numpy as np; r.find_regions(np.eye(4), 0.5); "
            "print(sorted(m for m in ('scipy', 'torch', 'PIL', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_threshold_just_below_the_peak_finds_its_region_as_the_verdict_does():
    """The verdict compares the score (a float32 map's maximum) with the threshold in float64;
    the regions must too, or a flagged photo could have none (a threshold rounded to float32 ties)."""
    from aae_runtime.regions import find_regions

    values = np.zeros((4, 4), np.float32)
    values[1, 1] = np.float32(0.22764187)
    threshold = float(values.max()) - 1e-9  # above it in float64, equal to it once rounded to float32
    assert np.float32(threshold) == values.max() and float(values.max()) > threshold
    assert len(find_regions(values, threshold)) == 1
    assert find_regions(values, 1e308) == []  # no overflow on the way
