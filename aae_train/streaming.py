"""Image folders larger than memory: decoded from disk, batch by batch, in DataLoader workers.

A folder is held in memory as float32 inputs when that fits comfortably (`choose_loader`: a
quarter of the memory this process may use); otherwise its files are *streamed*: every epoch
the loop's own permutation is cut into minibatches, and worker processes decode each batch's
files with `aae_runtime.images.load_image` (the runtime's own preprocessing) while the
networks train on the one before. A streamed run trains on exactly the batches an in-memory
run would, so the two give the same model.

What a streamed run holds in memory does not grow with the folder: the networks and their
optimiser states, ``workers x PREFETCH`` minibatches in flight, one validation chunk of at
most `EVAL_CHUNK_BYTES`, and 8 bytes of label per file.

Files are decoded once before training (`scan`, also in the workers) so that unreadable ones
are skipped, with one warning, before the epochs start: every epoch then has the same images.
"""

from __future__ import annotations

import math
import os
import resource
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset as TorchDataset

from aae_runtime.contract.errors import InputError
from aae_runtime.contract.preprocessing import Preprocessing
from aae_runtime.images import load_image
from aae_train.config import LOADERS
from aae_train.mnist import DataError

MEMORY_SHARE = 0.25  # auto: a folder whose decoded images need more than this share of the usable memory is streamed
EVAL_CHUNK_BYTES = 16 << 20  # validation passes go through chunks of at most this many input bytes
MAX_EVAL_CHUNK = 1000  # ... and at most this many images
PREFETCH = 2  # minibatches each worker decodes ahead


class FolderImages(TorchDataset):
    """Image files as model inputs (C, H, W) float32, decoded on demand; ``images[indices]``
    (an index array) decodes those files into one (N, C, H, W) array in this process."""

    def __init__(self, files: Sequence[str | Path], pre: Preprocessing, root: Path | None = None):
        self.files = [str(f) for f in files]
        self.pre = pre
        self.root = root
        self.shape = (len(self.files), *pre.shape)  # like an array's: (N, C, H, W)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self.load(int(index))
        indices = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index)
        return np.stack([self.load(int(i)) for i in indices]) if len(indices) else np.zeros((0, *self.pre.shape), np.float32)

    def load(self, i: int) -> np.ndarray:
        try:
            return load_image(self.files[i], self.pre)
        except InputError as exc:  # readable when scanned: it changed on disk since
            raise DataError(f"{self.files[i]} can no longer be read ({exc}); it was readable when training started: "
                            "restore it and --resume (or remove it and train again)") from None

    def subset(self, keep: np.ndarray) -> "FolderImages":
        return FolderImages([self.files[i] for i in keep], self.pre, self.root)

    def join(self, other: "FolderImages") -> "FolderImages":
        """These images, then ``other``'s."""
        return FolderImages(self.files + other.files, self.pre, self.root)

    def nbytes(self) -> int:
        """What these images would take decoded in memory."""
        return len(self) * int(np.prod(self.pre.shape)) * 4


class _Probe(TorchDataset):
    """For `scan`: whether each file decodes (None) or why not (the reason)."""

    def __init__(self, images: FolderImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            load_image(self.images.files[i], self.images.pre)
            return i, None
        except InputError as exc:
            return i, str(exc)


def scan(images: FolderImages, workers: int) -> tuple[FolderImages, list[str]]:
    """(the readable images, one "file: reason" line per unreadable one), decoding every file once."""
    problems: dict[int, str] = {}
    loader = DataLoader(_Probe(images), batch_size=64, num_workers=workers, collate_fn=list,
                        prefetch_factor=PREFETCH if workers else None)
    for results in loader:
        problems.update((i, why) for i, why in results if why is not None)
    keep = np.array([i for i in range(len(images)) if i not in problems], dtype=np.int64)
    root = images.root
    lines = [f"{Path(images.files[i]).relative_to(root) if root else images.files[i]}: {why}"
             for i, why in sorted(problems.items())]
    return images.subset(keep), lines


class _Batches:
    """The batch sampler of a persistent loader: the index lists of the coming pass, set before
    each one (the sampler is iterated in the main process, so workers need not be restarted)."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Loading(TorchDataset):
    """For `Stream`: an image, or why it can no longer be read (raised in the training process:
    an exception raised in a worker would come back wrapped in the worker's traceback)."""

    def __init__(self, images: FolderImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            return self.images.load(i)
        except DataError as exc:
            return str(exc)


def _stack(items: list) -> torch.Tensor | str:
    problem = next((item for item in items if isinstance(item, str)), None)
    return problem if problem is not None else torch.from_numpy(np.stack(items))


class Stream:
    """Decodes index lists of ``images`` into minibatch tensors on ``device``, ``workers``
    processes ahead of the training step (0: in this process)."""

    def __init__(self, images: FolderImages, workers: int, device: torch.device):
        self.images, self.device, self.workers = images, device, workers
        self.sampler = _Batches()
        self.loader = DataLoader(_Loading(images), batch_sampler=self.sampler, num_workers=workers, collate_fn=_stack,
                                 pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                 prefetch_factor=PREFETCH if workers else None)

    def batches(self, index_lists: Iterable[Sequence[int]]) -> Iterator[torch.Tensor]:
        self.sampler.batches = [[int(i) for i in b] for b in index_lists]
        for x in self.loader:
            if isinstance(x, str):
                raise DataError(x)
            yield x.to(self.device, non_blocking=True)


def eval_chunk(image_shape: Sequence[int]) -> int:
    """Images per validation chunk: at most `MAX_EVAL_CHUNK` and `EVAL_CHUNK_BYTES` of inputs."""
    return max(1, min(MAX_EVAL_CHUNK, EVAL_CHUNK_BYTES // (4 * int(np.prod(image_shape)))))


def default_workers() -> int:
    """Decoding processes beside the training process: half the cores this process may use, 1 to 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(4, cores // 2))


def usable_memory() -> int:
    """Bytes this process may use: the least of the memory available, its cgroup's limit (v2 or
    v1) less what the cgroup holds, and its address-space limit (ulimit -v) less what it has mapped."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        limits.append(int(info["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        pass
    limits.extend(_cgroup_room())
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/statm") as f:
                mapped = int(f.read().split()[0]) * resource.getpagesize()
        except (OSError, ValueError):
            mapped = 0
        limits.append(soft - mapped)
    return max(0, min(limits)) if limits else 1 << 62


def _cgroup_room() -> list[int]:
    """Limit less usage (less file pages the kernel may drop) of this process's memory cgroup
    and its parents (v2 and v1), where limited."""
    rooms = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return rooms
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: memory.max beside memory.current
            root, limit_name, usage_name, cache = Path("/sys/fs/cgroup"), "memory.max", "memory.current", "inactive_file"
        elif "memory" in controllers.split(","):
            root, limit_name, usage_name, cache = (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes",
                                                   "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        group = root / path.lstrip("/")
        for folder in (group, *group.parents):
            if folder == root.parent:
                break
            try:
                limit = (folder / limit_name).read_text().strip()
                if limit != "max" and int(limit) < 1 << 60:
                    used = int((folder / usage_name).read_text().strip())
                    stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
                    rooms.append(int(limit) - used + int(stat.get(cache, 0)))  # cached file pages give way
            except (OSError, ValueError):
                pass
    return rooms


def choose_loader(loader: str, decoded_bytes: int) -> str:
    """"memory" or "stream" for a folder whose images take ``decoded_bytes`` decoded (``loader``
    "auto": stream when that is more than `MEMORY_SHARE` of `usable_memory`)."""
    if loader not in LOADERS:
        raise DataError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)}")
    if loader != "auto":
        return loader
    return "stream" if decoded_bytes > MEMORY_SHARE * usable_memory() else "memory"


def gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 28 else f"{math.ceil(n / (1 << 20))} MiB"
