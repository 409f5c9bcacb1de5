"""Measuring a model on a user's own parts: normal photos, defective ones and (optionally) defect masks.

`evaluate` scores both sets the way `aae-run score` does and reports what the benchmark reports
(benchmarks/textures.py): image AUROC, pixel AUROC of the maps against the masks, and the false
alarms and detections at the model's threshold, per defect kind where the defective photos sit
in one sub-folder per kind (``defects/scratch/*.png``).

Masks are found by the defective photo's path relative to its folder (``masks/scratch/a.png``)
or, failing that, by its file stem in its kind's sub-folder or at the top of the masks folder
(``a.png``, ``a_mask.png``); a mask is white (> 127) on the defect, or 1 in a mask of 0s and 1s.
A map is compared at its own size: a tiled model's map has the photo's size, an untiled model's
the model input's, so a mask is resized to it (nearest neighbour); a tiled model's map must
match its mask's size exactly. Normal photos count as all-normal pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aae_runtime.console import counted
from aae_runtime.contract.errors import InputError, ModelError
from aae_runtime.images import distinct_files, find_images, first_shared
from aae_runtime.regions import PixelAUROC, auroc

MASK_SUFFIXES = ("", "_mask", ".mask", "_gt")
FEW_PHOTOS = 20  # of each kind: fewer, and one photo moves the image AUROC by more than 0.05
NO_MARK = "a mask is white (> 127, or 1 in a mask of 0s and 1s) on the defect; fix the masks"


@dataclass
class Evaluation:
    threshold: float
    normal: int = 0  # photos scored
    anomalous: int = 0
    false_alarms: int = 0  # normal photos flagged
    detections: int = 0  # defective photos flagged
    image_auroc: float | None = None
    pixel_auroc: float | None = None  # None without masks
    pixel_auroc_exact: bool = True  # False: estimated on a uniform subsample of the pixels (very many of them)
    masked: int = 0  # defective photos that had a mask
    notes: list[str] = field(default_factory=list)  # one-line remarks for the user (e.g. masks not found)
    per_kind: dict[str, dict] = field(default_factory=dict)  # kind -> {"images", "detected"}
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def false_alarm_rate(self) -> float:
        return self.false_alarms / self.normal if self.normal else float("nan")

    @property
    def detection_rate(self) -> float:
        return self.detections / self.anomalous if self.anomalous else float("nan")

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "normal_images": self.normal, "anomalous_images": self.anomalous,
                "image_auroc": self.image_auroc, "pixel_auroc": self.pixel_auroc, "pixel_auroc_exact": self.pixel_auroc_exact,
                "masked_images": self.masked, "false_alarms": self.false_alarms, "false_alarm_rate": self.false_alarm_rate,
                "detections": self.detections, "detection_rate": self.detection_rate, "per_kind": self.per_kind,
                "failed": [{"path": p, "error": e} for p, e in self.failed]}


def evaluate(model, normal: list[str | Path], anomalies: list[str | Path], masks: str | Path | None = None,
             batch_size: int = 64) -> Evaluation:
    """Score ``normal`` and ``anomalies`` (files or folders) with ``model`` (an `AAEModel`) and
    measure it; ``masks``: a folder of defect masks for the pixel AUROC."""
    for option, paths in (("normal photos", normal), ("--anomalies", anomalies)):
        missing = [str(p) for p in paths if not Path(p).exists()]
        if missing:
            raise InputError(f"{option}: {missing[0]} does not exist; pass existing files or folders")
    if masks is not None and not Path(masks).is_dir():
        raise InputError(f"--masks {masks}: not a folder; pass the folder of defect masks")
    files = {False: distinct_files(find_images(list(normal))), True: distinct_files(find_images(list(anomalies)))}  # each file once
    shared = first_shared(files[False], files[True])
    if shared is not None:
        raise InputError(f"{shared} is given as normal and as defective: each photo is one or the other")
    result = Evaluation(threshold=model.threshold)
    pixels = PixelAUROC() if masks is not None else None
    mask_files: dict[str, list[Path]] = {}
    for p in find_images([masks]) if masks is not None else []:
        mask_files.setdefault(p.stem, []).append(p)
    if masks is not None:
        _check_masks(files[True], [Path(p) for p in anomalies], Path(masks), mask_files, model.tiling is not None,
                     model.metadata.preprocessing.orientation == "exif")
    scores: list[float] = []
    labels: list[bool] = []
    unmasked: list[str] = []  # defective photos without a mask
    blank: list[str] = []  # defective photos whose mask marks no pixel
    for positive, paths in ((False, normal), (True, anomalies)):
        roots = [Path(p) for p in paths]
        for row in model.iter_score_paths(files[positive], batch_size=batch_size, maps=pixels is not None):
            if not row.ok:
                result.failed.append((row.path, row.error))
                continue
            scores.append(row.score)
            labels.append(positive)
            _count(result, row, positive, _kind(Path(row.path), roots) if positive else None)
            if pixels is not None:
                truth = (_mask_for(Path(row.path), roots, Path(masks), mask_files, row.pixel_error.shape, model.tiling is not None,
                                   model.metadata.preprocessing.orientation == "exif")
                         if positive else None)
                if positive and truth is None:
                    unmasked.append(row.path)
                    continue  # no mask: the photo counts for the image figures only
                if positive and not truth.any():
                    blank.append(row.path)
                result.masked += positive
                pixels.add(row.pixel_error, truth if truth is not None else np.zeros(row.pixel_error.shape, bool))
    if not result.normal or not result.anomalous:
        why = f" (first failure: {result.failed[0][0]}: {result.failed[0][1]})" if result.failed else ""
        raise InputError(f"need scored normal and defective photos, got {result.normal} normal and {result.anomalous} "
                         f"defective{why}: check both folders")
    if pixels is not None and not result.masked:
        result.notes.append(f"no defective photo has a mask under {masks} (same relative path, or the same file name "
                            f"with {', '.join(repr(s) for s in MASK_SUFFIXES if s)} added): no pixel AUROC")
    pixel_figure = pixels is not None and result.masked and pixels.has_positives
    if pixels is not None and result.masked and not pixels.has_positives:  # every marked mask checked was someone else's
        at = "" if model.tiling is not None else f" at the maps' size ({'x'.join(map(str, model.metadata.preprocessing.shape[1:]))})"
        result.notes.append(f"no mask of a scored defective photo marks a pixel{at} (masks of photos that could not be "
                            "scored are left out): no pixel AUROC")
    if result.masked and unmasked:
        result.notes.append(f"{counted(len(unmasked), 'defective photo')} without a mask under {masks} (first: {unmasked[0]}): "
                            "they count for the image figures only")
    if blank:
        result.notes.append(f"{counted(len(blank), 'defective photo')} with a mask that marks no pixel (first: {blank[0]}): their "
                            f"pixels count as defect-free; {NO_MARK.split(';')[0]}")
    few = min(result.normal, result.anomalous)
    if few < FEW_PHOTOS:
        result.notes.append(f"{counted(result.normal, 'normal photo')} and {result.anomalous} defective: one photo "
                            f"scored otherwise moves the image AUROC by up to {1 / few:.2g}; measure on "
                            f"{FEW_PHOTOS} or more of each for a figure to rely on")
    try:
        result.image_auroc = auroc(np.asarray(scores), np.asarray(labels))
        if pixel_figure:
            result.pixel_auroc, result.pixel_auroc_exact = pixels.result(), pixels.exact
    except ValueError as exc:  # NaN scores or maps: the model, not the photos, is broken
        raise ModelError(f"the model gives unusable scores or maps ({exc}): re-export or recalibrate it") from None
    return result


def _count(result: Evaluation, row, positive: bool, kind: str | None) -> None:
    if not positive:
        result.normal += 1
        result.false_alarms += bool(row.anomaly)
        return
    result.anomalous += 1
    result.detections += bool(row.anomaly)
    entry = result.per_kind.setdefault(kind or "all", {"images": 0, "detected": 0})
    entry["images"] += 1
    entry["detected"] += bool(row.anomaly)


def _relative(path: Path, roots: list[Path]) -> Path:
    for root in roots:
        if root.is_dir():
            try:
                return path.relative_to(root)
            except ValueError:
                continue
    return Path(path.name)


def _kind_folder(path: Path, roots: list[Path]) -> str | None:
    """The folder name that says the photo's defect kind: its first sub-folder under its root,
    or, for a photo directly in a root folder given by itself (``--anomalies defects/scratch``),
    that folder's name; None for a photo given as a file."""
    rel = _relative(path, roots)
    if len(rel.parts) > 1:
        return rel.parts[0]
    folder = next((r for r in roots if r.is_dir() and path.parent == r), None)
    return folder.resolve().name if folder is not None else None


def _kind(path: Path, roots: list[Path]) -> str:
    """The first sub-folder of the photo under its root (the defect kind), or "all"."""
    rel = _relative(path, roots)
    return rel.parts[0] if len(rel.parts) > 1 else "all"


def _mask_path(path: Path, roots: list[Path], masks: Path, by_stem: dict[str, list[Path]]) -> Path | None:
    """The defect mask file of a defective photo, or None when it has none: at the photo's
    relative path under ``masks``, else by file name when exactly one mask has it in the photo's
    own sub-folder (its defect kind) or at the top of ``masks`` (never another kind's ``a.png``)."""
    rel = _relative(path, roots)
    kind = _kind_folder(path, roots)

    def beside(mask: Path) -> bool:  # at the top of masks/, or under its sub-folder of the photo's kind
        parts = mask.parent.relative_to(masks).parts
        return not parts or (kind is not None and parts[0] == kind)

    by_name = [found[0] for s in MASK_SUFFIXES
               if len(found := [m for m in by_stem.get(path.stem + s, []) if beside(m)]) == 1]
    return next((c for c in [masks / rel, masks / rel.with_suffix(".png")] + by_name if c.is_file()), None)


def _read_mask(mask: Path, upright_photos: bool) -> np.ndarray:
    """A mask file as 8-bit grayscale; one line naming it when it cannot be read. A model that
    turns photos upright (``upright_photos``) takes masks as viewers show them too: turned by
    their own EXIF tag, if they have one. Masks are read as the photos are (the same formats and
    size limits)."""
    from aae_runtime.images import load_gray

    try:
        return load_gray(mask, turn_by_tag=upright_photos, mask=True)
    except InputError as exc:
        raise InputError(f"mask {mask}: {exc}; fix or remove it") from None


def _check_masks(files: list[Path], roots: list[Path], masks: Path, by_stem: dict[str, list[Path]], tiled: bool,
                 upright_photos: bool) -> None:
    """Before any photo is scored: every mask found can be read, has its photo's size where the
    map has it (``tiled``), and belongs to one photo only, so a bad mask fails the run at once,
    not after an hour of scoring."""
    from aae_runtime.images import photo_size

    owner: dict[Path, Path] = {}
    marked = False
    for path in files:
        mask = _mask_path(path, roots, masks, by_stem)
        if mask is None:
            continue
        if mask in owner:
            raise InputError(f"mask {mask} matches two defective photos, {owner[mask]} and {path}: give each its own "
                             "(same relative path under the masks folder, or the kind's sub-folder)")
        owner[mask] = path
        m = _read_mask(mask, upright_photos)
        size = photo_size(path, upright_photos) if tiled else None
        if size is not None and m.shape != size:
            raise InputError(f"mask {mask} is {m.shape[1]} x {m.shape[0]} pixels but its photo {path} is "
                             f"{size[1]} x {size[0]}: give masks of the photos' own size")
        marked = marked or bool(_marked(m).any())
    if owner and not marked:
        raise InputError(f"the masks under {masks} mark no defect pixel: {NO_MARK}")


def _mask_for(path: Path, roots: list[Path], masks: Path, by_stem: dict[str, list[Path]], shape: tuple[int, int],
              exact: bool, upright_photos: bool) -> np.ndarray | None:
    """The defect mask (bool, ``shape``) of a defective photo (`_mask_path`), or None when it has none."""
    from PIL import Image

    candidate = _mask_path(path, roots, masks, by_stem)
    if candidate is None:
        return None
    m = _read_mask(candidate, upright_photos)
    if exact and m.shape != shape:
        raise InputError(f"mask {candidate} is {m.shape[1]} x {m.shape[0]} pixels but its photo {path} is "
                         f"{shape[1]} x {shape[0]}: give masks of the photos' own size")
    if m.shape != shape:
        m = np.asarray(Image.fromarray(m).resize((shape[1], shape[0]), Image.Resampling.NEAREST))
    return _marked(m)


def _marked(mask: np.ndarray) -> np.ndarray:
    """The defect pixels of an 8-bit mask: white (> 127), or 1 in a mask of 0s and 1s (a common label format)."""
    return mask > (0 if mask.max(initial=0) == 1 else 127)

