"""Training data in the model's input format, with a held-out validation split.

Pixels become model inputs through `aae_runtime.images.pixels_to_input` (MNIST) and image files
through `aae_runtime.images.load_image` (folders): the functions the runtime uses, so training
and deployment preprocess identically. Everything is rebuilt from a `DataConfig` alone, so
export recovers the same held-out split from a checkpoint.

MNIST is held in memory as float32 arrays; so is a folder that fits, and a larger one is
streamed from disk (`aae_train.streaming`): its splits are then `FolderImages`, which index
like arrays but decode on demand.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, replace
from typing import Sequence
from pathlib import Path

import numpy as np

from aae_runtime.contract.errors import InputError
from aae_runtime.contract.preprocessing import Preprocessing, pixels_to_input
from aae_runtime.images import file_identity, find_images, load_image
from aae_train.config import DataConfig
from aae_train.crops import CropSampler, once, split_photos
from aae_train.mnist import DataError, ensure_mnist, load_mnist
from aae_train.streaming import FolderImages, choose_loader, default_workers, scan

MNIST_PREPROCESSING = Preprocessing(color_mode="L", height=28, width=28, resample="bilinear", scale=1 / 255, offset=0.0)


@dataclass(frozen=True)
class Dataset:
    train: np.ndarray | FolderImages  # (N, C, H, W) float32, or the files of a streamed folder
    val: np.ndarray | FolderImages  # (M, C, H, W) float32 (or files), held out from the training images
    train_labels: np.ndarray | None
    val_labels: np.ndarray | None
    preprocessing: Preprocessing
    path: str  # where the images were read from
    notes: tuple[str, ...] = ()  # one-line messages for the user, e.g. how many files were skipped
    class_names: tuple[str, ...] | None = None  # label i is class_names[i] (folders: the subfolder names)
    crops: CropSampler | None = None  # --crop: draws each epoch's training crops (``train`` is then empty)
    windows: Sequence[np.ndarray] = ()  # --crop: held-out photos (C, h, w) float32 that export scores whole for the threshold
    held_out: str | None = None  # what was held out, said to the user when it is not simply "M images"
    listing: str | None = None  # folders: the file listing the splits were drawn over (`listing_of`)

    @property
    def streamed(self) -> bool:
        return isinstance(self.train, FolderImages)


class DataWarning(UserWarning):
    """Something in the data was skipped; training goes on."""


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation of range(n) cut into (train, validation); at least one of each."""
    if n < 2:
        raise DataError(f"need at least 2 images to hold out a validation split, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, int(round(n * val_fraction))))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def select_mnist(labels: np.ndarray, classes: tuple[int, ...] | None, limit: int | None, seed: int) -> np.ndarray:
    """Indices of the images of ``classes`` (all if None), at most ``limit`` of them, in file order."""
    idx = np.arange(len(labels)) if classes is None else np.flatnonzero(np.isin(labels, classes))
    if classes is not None and len(idx) == 0:
        raise DataError(f"no MNIST images of classes {list(classes)}: classes are digits 0-9")
    if limit is not None and limit < len(idx):
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=limit, replace=False))
    return idx


def load_mnist_dataset(cfg: DataConfig, data_dir: str | None = None, progress=None) -> Dataset:
    """The MNIST training images of ``cfg``, split into train and validation."""
    directory = ensure_mnist(data_dir if data_dir is not None else cfg.path, progress=progress)
    pixels, labels = load_mnist(directory, "train")
    chosen = select_mnist(labels, cfg.classes, cfg.limit, cfg.split_seed)
    tr, va = split_indices(len(chosen), cfg.val_fraction, cfg.split_seed)
    pre = MNIST_PREPROCESSING
    return Dataset(
        train=pixels_to_input(pixels[chosen[tr]], pre),
        val=pixels_to_input(pixels[chosen[va]], pre),
        train_labels=labels[chosen[tr]].astype(np.int64),
        val_labels=labels[chosen[va]].astype(np.int64),
        preprocessing=pre,
        path=str(directory),
    )


def folder_preprocessing(cfg: DataConfig) -> Preprocessing:
    """Preprocessing of a folder run: the configured colour mode and size (a crop's, with --crop), pixels / 255."""
    if cfg.crop is not None and cfg.color_mode is not None:
        return Preprocessing(color_mode=cfg.color_mode, height=cfg.crop, width=cfg.crop, resample=cfg.resample,
                             scale=1 / 255, offset=0.0, orientation=cfg.orientation)
    if cfg.image_size is None or cfg.color_mode is None:
        raise DataError("a folder data set needs image_size and color_mode (aae-train folder --size 64 --color L)")
    height, width = cfg.image_size
    return Preprocessing(color_mode=cfg.color_mode, height=int(height), width=int(width), resample=cfg.resample,
                         scale=1 / 255, offset=0.0, orientation=cfg.orientation)


def load_folder_dataset(cfg: DataConfig, data_dir: str | None = None, loader: str = "memory",
                        workers: int | None = None, splits: tuple[str, ...] = ("train", "val")) -> Dataset:
    """Every image file under a folder (recursively), decoded exactly as `aae-run` decodes files.

    The hold-out split is drawn over the sorted file list before decoding, so a file that later
    becomes unreadable never moves another file between train and validation. Unreadable files
    are skipped and counted in one warning. Labels are the first-level subfolders, if any (the
    classes of the supervised families; the others colour latent plots with them); images at the
    top level or in the folder named ``cfg.unlabelled_dir`` are unlabelled (-1).

    ``loader`` (`aae_train.streaming.LOADERS`) says whether the images are decoded into memory
    or streamed from disk (then checked once, by ``workers`` processes); ``splits`` leaves
    out a split not needed (export needs only "val"), which then holds no image.
    """
    root = Path(data_dir if data_dir is not None else cfg.path or "")
    if not root.is_dir():
        raise DataError(f"image folder {root} not found: pass the folder of images (aae-export: --data-dir DIR, when it "
                        "has moved since training)")
    pre = folder_preprocessing(cfg)
    files = find_images([root], follow_links=False)  # the listing the hold-out split has always been drawn over
    listing = _same_listing(cfg, root, files)
    if cfg.limit is not None and cfg.limit < len(files):
        keep = np.sort(np.random.default_rng(cfg.split_seed).choice(len(files), size=cfg.limit, replace=False))
        files = [files[i] for i in keep]
    if cfg.crop is not None:  # one photo is enough: a band of it is held out
        if not files:
            raise DataError(f"found no image files under {root} (suffixes: png, jpg, bmp, tif, ...)")
        return replace(_load_photo_crops(cfg, root, files, pre), listing=listing)
    if len(files) < 2:
        raise DataError(f"found {len(files)} image file(s) under {root}; need at least 2 (suffixes: png, jpg, bmp, tif, ...)")
    tr, va = split_indices(len(files), cfg.val_fraction, cfg.split_seed)
    # hidden files and folders (.ipynb_checkpoints, .git, editors' copies) are neither data nor classes;
    # dropped after the split, so that a checkpoint's held-out images stay where they were
    hidden = np.array([any(part.startswith(".") for part in f.relative_to(root).parts) for f in files], dtype=bool)
    tr, va = tr[~hidden[tr]], va[~hidden[va]]
    files_seen = [f for f, h in zip(files, hidden) if not h]
    tr, va = (ix if split in splits else ix[:0] for ix, split in ((tr, "train"), (va, "val")))
    # links after the split too: the held-out images stay where they were (export reads no training image),
    # each held out once, and none of them trained on
    keys = {i: file_identity(files[i]) for i in (*tr, *va)}
    held = once(keys, va, [])
    kept = once(keys, tr, va)
    linked = len(va) - len(held) + len(tr) - len(kept)
    tr, va = np.asarray(kept, dtype=tr.dtype), np.asarray(held, dtype=va.dtype)
    subdirs = sorted({f.relative_to(root).parts[0] for f in files_seen if len(f.relative_to(root).parts) > 1} - {cfg.unlabelled_dir})
    label_of = {name: i for i, name in enumerate(subdirs)}
    skipped: list[str] = []

    def label(f: str | Path) -> int:
        parts = Path(f).relative_to(root).parts
        return label_of.get(parts[0], -1) if len(parts) > 1 else -1  # -1: unlabelled

    def read(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.empty((len(indices), *pre.shape), np.float32)  # filled in place: the peak is the data set, once
        labels = []
        for i in indices:
            try:
                x[len(labels)] = load_image(files[i], pre)
            except InputError as exc:
                skipped.append(f"{files[i].relative_to(root)}: {exc}")
                continue
            labels.append(label(files[i]))
        return x[: len(labels)], np.asarray(labels, dtype=np.int64)

    def stream(indices: np.ndarray) -> tuple[FolderImages, np.ndarray]:
        images, problems = scan(FolderImages([files[i] for i in indices], pre, root), workers)
        skipped.extend(problems)
        return images, np.asarray([label(f) for f in images.files], dtype=np.int64)

    decoded = (len(tr) + len(va)) * int(np.prod(pre.shape)) * 4
    workers = default_workers() if workers is None else workers
    streamed = choose_loader(loader, decoded) == "stream"
    train_x, train_y = stream(tr) if streamed else read(tr)
    val_x, val_y = stream(va) if streamed else read(va)
    notes = _linked_note(linked, root)
    if skipped:
        notes.append(f"skipped {len(skipped)} of {len(files)} files under {root} that could not be read "
                     f"(first: {skipped[0]}); fix or remove them to use them")
        warnings.warn(notes[-1], DataWarning, stacklevel=3)
    if (len(train_x) == 0 and "train" in splits) or (len(val_x) == 0 and "val" in splits):
        unread = f"; {len(skipped)} of its {len(files)} files could not be read (first: {skipped[0]})" if skipped else ""
        fix = "add readable images" if len(skipped) * 2 >= len(files) else "add images or change --val-fraction"
        raise DataError(f"too few readable images under {root} ({len(train_x)} train, {len(val_x)} validation{unread}): {fix}")
    has_labels = bool(subdirs)
    return Dataset(
        train=train_x, val=val_x,
        train_labels=train_y if has_labels else None, val_labels=val_y if has_labels else None,
        preprocessing=pre, path=str(root.resolve()), notes=tuple(notes),
        class_names=tuple(subdirs) if has_labels else None, listing=listing,
    )


def listing_of(root: Path, files: Sequence[Path]) -> str:
    """The file listing a folder's splits are drawn over, as "COUNT:DIGEST" (the names relative to
    ``root``, in order): a file added, removed or renamed changes it, a moved folder does not."""
    names = "\n".join(f.relative_to(root).as_posix() for f in files)
    return f"{len(files)}:{hashlib.sha256(names.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}"


def _same_listing(cfg: DataConfig, root: Path, files: Sequence[Path]) -> str:
    """The folder's listing, refused when it is not the one the checkpoint's run was trained on
    (``cfg.listing``; runs from before it was recorded are not checked): the hold-out split
    would be drawn again, and images the run trained on held out as unseen (resume's
    validation and best.pt, export's threshold)."""
    listing = listing_of(root, files)
    if cfg.listing is not None and cfg.listing != listing:
        then = cfg.listing.split(":")[0]
        counts = f"{then} then, {len(files)} now" if then != str(len(files)) else f"{then} then and now, not all of the same names"
        raise DataError(f"the image folder {root} no longer lists the image files this run was trained on ({counts}): "
                        "its held-out images would be drawn again, among them images "
                        "it trained on; restore the folder as it was (move the new files elsewhere), or train a new run on it")
    return listing


def _load_photo_crops(cfg: DataConfig, root: Path, files: list[Path], pre: Preprocessing) -> Dataset:
    """Whole photos at their own size, split as aae_train.crops says; unreadable files skipped (one warning)."""
    photos, names, keys, skipped = [], [], [], []
    for f in files:
        try:
            x = load_image(f, pre, native=True)
        except InputError as exc:
            skipped.append(f"{f.relative_to(root)}: {exc}")
            continue
        photos.append(np.rint((x - pre.offset) / pre.scale).clip(0, 255).astype(np.uint8))  # 1 byte a pixel in memory
        names.append(str(f.relative_to(root)))
        keys.append(file_identity(f))
    notes = []
    if skipped:
        notes.append(f"skipped {len(skipped)} of {len(files)} files under {root} that could not be read "
                     f"(first: {skipped[0]}); fix or remove them to use them")
        warnings.warn(notes[-1], DataWarning, stacklevel=3)
    if not photos:
        raise DataError(f"no readable photos under {root}: add images")
    split = split_photos(photos, names, cfg.crop, cfg.crops_per_image, tuple(cfg.augment), cfg.val_fraction,
                         cfg.split_seed, pre.scale, pre.offset, keys)
    notes += _linked_note(split.linked, root)
    empty = np.zeros((0, *pre.shape), np.float32)  # the loop draws each epoch's crops itself
    return Dataset(train=empty, val=split.val, train_labels=None, val_labels=None, preprocessing=pre,
                   path=str(root.resolve()), notes=tuple(notes), crops=split.sampler, windows=split.windows,
                   held_out=split.note)


def _linked_note(linked: int, root: Path) -> list[str]:
    """The note (and warning) for files left out as a second name of another, if any."""
    if not linked:
        return []
    note = (f"{linked} file(s) under {root} are another listed image under a second name (a link): each image is used "
            "once, and one held out is not trained on")
    warnings.warn(note, DataWarning, stacklevel=4)
    return [note]


def class_labels(data: Dataset) -> tuple[tuple[str, ...] | None, np.ndarray | None, np.ndarray | None]:
    """(class values in label order, train class indices, val class indices; -1: unlabelled).

    MNIST labels are digits, and the classes are the digits present (so --classes 0,3 gives two
    classes, "0" and "3"); folder labels already index their sub-folder names.
    """
    if data.train_labels is None:
        return None, None, None
    if data.class_names is not None:
        return data.class_names, data.train_labels, data.val_labels
    digits = np.unique(np.concatenate([data.train_labels, data.val_labels]))
    return tuple(str(d) for d in digits), np.searchsorted(digits, data.train_labels), np.searchsorted(digits, data.val_labels)


def balanced_subset(labels: np.ndarray, n: int, n_classes: int, seed: int, option: str, where: str,
                    strict: bool = True, names: tuple[str, ...] | None = None) -> np.ndarray:
    """Sorted indices of ``n`` labelled items (labels >= 0), as equal per class as ``n`` allows
    (the first ``n % n_classes`` classes get one more), drawn by ``seed``. Not ``strict``: at
    most ``n``, a class short of its share giving what it has (a validation subset)."""
    if strict and n < n_classes:
        raise DataError(f"{option} {n}: need at least one labelled image per class ({n_classes} classes)")
    rng = np.random.default_rng(seed)
    picked = []
    for c in range(n_classes):
        want = n // n_classes + (c < n % n_classes)
        have = np.flatnonzero(labels == c)
        if not strict:
            want = min(want, len(have))
        if len(have) < want:
            most = n_classes * min(int((labels == k).sum()) for k in range(n_classes))
            fix = f"give at most {most} or all" if most else "put more images of every class in its folder"
            raise DataError(f"{option} {n}: {where} has only {len(have)} images of class "
                            f"{repr(names[c]) if names else c} but a balanced draw needs {want}; {fix}")
        picked.append(rng.choice(have, size=want, replace=False))
    return np.sort(np.concatenate(picked))


def load_dataset(cfg: DataConfig, data_dir: str | None = None, progress=None, loader: str = "memory",
                 workers: int | None = None, splits: tuple[str, ...] = ("train", "val")) -> Dataset:
    """The data set ``cfg`` describes; ``data_dir`` overrides where it is read from. A folder
    is held in memory or streamed as ``loader`` says (see `load_folder_dataset`); MNIST and
    whole photos for --crop are always held in memory."""
    if cfg.source == "mnist":
        return load_mnist_dataset(cfg, data_dir, progress)
    if cfg.source == "folder":
        return load_folder_dataset(cfg, data_dir, loader, workers, splits)
    raise DataError(f"unknown data source {cfg.source!r}: this version reads mnist or folder")
