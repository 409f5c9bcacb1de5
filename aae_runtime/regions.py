"""Connected regions of an anomaly map, and the AUROC figures that measure maps and scores (numpy only).

`label_regions` labels the 8-connected components of a boolean mask; `find_regions` lists where
a map exceeds a threshold, one `Region` per component (what `aae-run score --regions` writes).
Labelling works on runs: each row's runs of True pixels are found with whole-array numpy
operations, the pairs of runs that touch are found the same way, and only those pairs (not the
pixels) go through a union-find in Python. A 2048 x 2048 mask at density 0.3 (about 880,000
runs, 200,000 components) labels in under half a second.

`auroc` is the exact area under the ROC curve (the Mann-Whitney U, ties counted half);
`PixelAUROC` accumulates map pixels and their ground truth photo by photo, thinning to a uniform
random subsample only when more than ``cap`` pixels arrive (then ``exact`` is False).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_SEARCH_CHUNK = 1 << 20  # scores looked up per searchsorted call in `auroc`: bounds its int64 temporaries


@dataclass(frozen=True)
class Region:
    x: int  # column of the bounding box's left edge
    y: int  # row of its top edge
    width: int  # bounding box columns
    height: int  # bounding box rows
    area: int  # pixels in the region
    peak: float  # largest map value in it


# ---------------------------------------------------------------------------------- labelling

def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, start, end) of every horizontal run of True pixels (end exclusive), in raster order."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)  # (H, W + 1): +1 where a run starts, -1 one past its end
    rows, starts = np.nonzero(edges == 1)
    ends = np.nonzero(edges == -1)[1]  # same rows and order: every run has one start and one end
    return rows, starts, ends


def _touching_pairs(rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(run, run above) index pairs: runs in adjacent rows that touch under 8-connectivity.

    Run k of row r - 1 touches run i of row r when start_k <= end_i and end_k >= start_i (ends
    exclusive, so diagonal neighbours count). Keys row * (width + 1) + column put every run's
    start and end on one increasing axis, so one searchsorted per bound finds each run's
    touching runs above as a contiguous index range [lo, hi)."""
    stride = width + 1  # > any column (ends reach width), so keys of different rows never interleave
    above = (rows - 1) * stride
    lo = np.searchsorted(rows * stride + ends, above + starts, side="left")
    hi = np.searchsorted(rows * stride + starts, above + ends, side="right")
    counts = np.maximum(hi - lo, 0)
    first = np.cumsum(counts) - counts  # where each run's pairs begin in the output
    below = np.repeat(np.arange(len(rows)), counts)
    return below, np.repeat(lo - first, counts) + np.arange(int(counts.sum()))


def _components(n_runs: int, below: np.ndarray, above: np.ndarray) -> np.ndarray:
    """Root run of every run's component: the component's first run in raster order."""
    parent = list(range(n_runs))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving keeps later finds short
            i = parent[i]
        return i

    for i, k in zip(below.tolist(), above.tolist()):
        a, b = find(i), find(k)
        if a != b:  # the smaller index stays root, so a root is always its component's first run
            parent[max(a, b)] = min(a, b)
    roots = np.array(parent, dtype=np.int64)
    while True:  # pointer jumping flattens the forest in O(log depth) whole-array steps
        jumped = roots[roots]
        if np.array_equal(jumped, roots):
            return roots
        roots = jumped


def _label_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Runs of ``mask`` with the label (1..n, raster order of first pixel) of each: (rows, starts, ends, labels, n)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    rows, starts, ends = _runs(mask)
    roots = _components(len(rows), *_touching_pairs(rows, starts, ends, mask.shape[1]))
    is_root = roots == np.arange(len(roots))
    # roots ascend in raster order, so numbering them in index order numbers components in raster order
    number = np.cumsum(is_root, dtype=np.int64)
    return rows, starts, ends, number[roots], int(is_root.sum())


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a 2-D boolean mask: (int32 labels, 0 = background and 1..n in
    raster order of each component's first pixel; n)."""
    mask = np.asarray(mask, dtype=bool)
    rows, starts, ends, run_label, n = _label_runs(mask)
    # paint by differences: +label at a run's start, -label one past its end, then a running sum
    # along the row; runs of one row never share a start or end column (a gap separates them)
    marks = np.zeros((mask.shape[0], mask.shape[1] + 1), dtype=np.int32)
    marks[rows, starts] = run_label
    marks[rows, ends] = -run_label
    return np.cumsum(marks, axis=1, dtype=np.int32)[:, :-1], n


def find_regions(values: np.ndarray, threshold: float, min_area: int = 1) -> list[Region]:
    """Regions of ``values > threshold`` (a 2-D map; NaN is never above), largest peak first
    (ties in raster order); regions of fewer than ``min_area`` pixels are dropped."""
    values = np.asarray(values)
    # in float64, as the image's verdict compares its score: a float32 map against a threshold
    # rounded to float32 could leave a flagged photo without a region (NaN compares False)
    mask = values > np.float64(threshold)
    rows, starts, ends, run_label, n = _label_runs(mask)
    if n == 0:
        return []
    lab, lengths = run_label - 1, ends - starts
    # values[mask] lists the pixels in raster order, which is the runs' order, one run after another
    run_peak = np.maximum.reduceat(values[mask].astype(np.float64), np.cumsum(lengths) - lengths)
    area = np.bincount(lab, weights=lengths, minlength=n).astype(np.int64)
    peak = _reduce_at(np.maximum, -np.inf, lab, run_peak, n)
    x0, x1 = _reduce_at(np.minimum, mask.shape[1], lab, starts, n), _reduce_at(np.maximum, 0, lab, ends, n)
    y0, y1 = _reduce_at(np.minimum, mask.shape[0], lab, rows, n), _reduce_at(np.maximum, 0, lab, rows, n)
    order = np.argsort(-peak, kind="stable")
    return [Region(int(x0[i]), int(y0[i]), int(x1[i] - x0[i]), int(y1[i] - y0[i] + 1), int(area[i]), float(peak[i]))
            for i in order if area[i] >= min_area]


def _reduce_at(ufunc: np.ufunc, initial, index: np.ndarray, data: np.ndarray, n: int) -> np.ndarray:
    """Per-label reduction: out[j] = ufunc over data[index == j], starting from ``initial``."""
    out = np.full(n, initial, dtype=np.result_type(data.dtype, np.asarray(initial).dtype))
    ufunc.at(out, index, data)
    return out


# ------------------------------------------------------------------------------------- AUROC

def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Exact area under the ROC curve of ``scores`` for ``positive`` (bool): the probability that
    a positive scores above a negative, ties counted half (Mann-Whitney U / (n_pos * n_neg)).

    Equal to the average-rank formula, but computed by sorting each class on its own and looking
    the smaller one up in the larger (searchsorted left + right: the count below plus half the
    ties), so 50 million float32 scores need no N-long int64 argsort or float64 ranks (about
    1.2 GB saved, and 6 s of argsort): extra memory is one copy of the scores plus chunk-sized
    temporaries. Integer counts keep it exact; scores keep their dtype."""
    s = np.asarray(scores).ravel()
    y = np.asarray(positive, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"AUROC needs one label per score, got {s.size} scores and {y.size} labels")
    if s.dtype.kind == "f" and np.isnan(s).any():
        raise ValueError(f"AUROC is undefined with NaN scores, got {int(np.isnan(s).sum())}: drop or fix them first")
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"AUROC needs at least one positive and one negative, "
                         f"got {len(pos)} positive and {len(neg)} negative")
    flip = len(pos) > len(neg)  # look up the smaller class; P(pos > neg) = 1 - P(neg > pos), ties included
    few, many = (neg, pos) if flip else (pos, neg)
    # both are copies already (boolean indexing), so sorting in place costs no memory; sorted
    # lookups walk the sorted array in order, about 10x faster than random ones at 50 million
    many.sort()
    few.sort()
    twice_u = 0  # 2 * U: #many below each of few, twice, plus #ties once; Python int, exact
    for i in range(0, len(few), _SEARCH_CHUNK):
        part = few[i:i + _SEARCH_CHUNK]
        for side in ("left", "right"):
            twice_u += int(np.searchsorted(many, part, side=side).sum())
    pairs = len(few) * len(many)
    return (2 * pairs - twice_u if flip else twice_u) / (2 * pairs)


class PixelAUROC:
    """Pixel AUROC over many maps: `add` each map with its boolean ground truth, then `result`.

    Exact (``exact`` True) while at most ``cap`` pixels have been added. Past that it thins: every
    pixel stored so far is kept with probability 1/2, and so is every later pixel, halving again
    whenever the store passes ``cap`` once more. Every pixel ever added thus survives
    independently with the same probability ``keep`` = 2**-k, so what remains is a uniform random
    subsample of 0.5 to 1 times ``cap`` pixels, the same for the same seed and adds."""

    def __init__(self, cap: int = 20_000_000, seed: int = 0):
        self.cap = cap
        self.keep = 1.0  # probability that an added pixel is still stored
        self.exact = True  # False once any thinning happened
        self._rng = np.random.default_rng(seed)
        self._values: list[np.ndarray] = []
        self._truth: list[np.ndarray] = []
        self._count = 0  # pixels stored now
        self.has_positives = False  # any defect pixel added (before thinning)

    def add(self, values: np.ndarray, mask: np.ndarray) -> None:
        values, mask = np.asarray(values), np.asarray(mask, dtype=bool)
        if values.shape != mask.shape:
            raise ValueError(f"map and mask differ in shape: {values.shape} vs {mask.shape}; resize the mask to the map")
        v, m = values.ravel().copy(), mask.ravel().copy()  # copies: callers may reuse their buffers
        self.has_positives = self.has_positives or bool(m.any())
        if self.keep < 1.0:
            v, m = self._thin(v, m, self.keep)
        self._values.append(v)
        self._truth.append(m)
        self._count += len(v)
        while self._count > self.cap:
            self._halve()

    def _halve(self) -> None:
        """Keep each stored pixel with probability 1/2, and halve the share kept of later adds."""
        v, m = self._thin(np.concatenate(self._values), np.concatenate(self._truth), 0.5)
        self._values, self._truth, self._count = [v], [m], len(v)
        self.keep /= 2
        self.exact = False

    def _thin(self, v: np.ndarray, m: np.ndarray, share: float) -> tuple[np.ndarray, np.ndarray]:
        kept = self._rng.random(len(v)) < share
        return v[kept], m[kept]

    def result(self) -> float:
        """AUROC of the stored pixels (all of them while ``exact``); ValueError without both classes."""
        if not self._values:
            return auroc(np.empty(0), np.empty(0, bool))
        return auroc(np.concatenate(self._values), np.concatenate(self._truth))
