"""Process-wide settings `aae-train` makes for itself: how OpenMP's idle threads wait, when the
C allocator hands large buffers back to the system, and (a rank of several) that it stops with
its launcher.

The first two are about sharing a machine: spinning threads take cores other processes need, and memory
the allocator keeps after a buffer is freed is memory nobody else can use.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys

# How long OpenMP's idle threads spin before they sleep (libgomp; set before torch loads). Its
# default, 300,000 spins, is a little faster alone and collapses beside other work: on the 2-core
# box an epoch with 2 threads took 6.2 s alone and 79.0 s beside one busy process; with 1,000
# spins 8.3 s and 14.8 s (benchmarks/results/train_speed.md, one run). A user's setting is kept.
OMP_SPIN_COUNT = "1000"

# While a pass over the validation split runs, buffers above this size get their own mapping,
# returned to the system when freed; outside it, up to `HEAP_THRESHOLD`. glibc's own threshold
# grows with the largest buffer freed (up to 32 MiB, its maximum), after which the chunks and
# activations of large images are carved from the heap, which kept 1.4 GiB more after two
# validation passes of 4,000 streamed 128 x 128 RGB images. Training steps repeat the same
# buffer sizes and reuse the heap without growing it, and mapping each buffer anew there cost
# 40 % of an epoch (page faults), so the small threshold holds during validation passes only.
PASS_THRESHOLD = 4 << 20
HEAP_THRESHOLD = 32 << 20
_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)


def set_openmp_waiting() -> None:
    """OpenMP's idle threads spin `OMP_SPIN_COUNT` times, unless the user set how they wait."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", OMP_SPIN_COUNT)


def _libc():
    name = ctypes.util.find_library("c")
    if name is None or os.environ.get("MALLOC_MMAP_THRESHOLD_"):  # not glibc-like, or the user chose
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


@contextlib.contextmanager
def returning_large_buffers():
    """Within: buffers above `PASS_THRESHOLD` go back to the system when freed; after: the heap
    is trimmed and large buffers are reused again (no-op without glibc's mallopt)."""
    if _LIBC is None:
        yield
        return
    _LIBC.mallopt(_M_MMAP_THRESHOLD, PASS_THRESHOLD)
    try:
        yield
    finally:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, HEAP_THRESHOLD)
        _LIBC.malloc_trim(0)


def stop_with_parent() -> None:
    """SIGTERM to this process when its parent dies, even by SIGKILL (Linux: prctl
    PR_SET_PDEATHSIG): a rank left without its launcher would train on, holding the run folder.
    Elsewhere, nothing."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)
