"""What this installation holds, checked at each command's start: the extras a command needs.

The distribution is ``aae-toolkit``. Its base install is the runtime's code with numpy, Pillow and
Typer; ONNX Runtime comes from one extra, ``[cpu]`` (onnxruntime) or ``[gpu]`` (onnxruntime-gpu),
and training and export from ``[train]`` (torch, onnx, onnxscript) beside one of them. The two
ONNX Runtime packages install the same ``onnxruntime`` module, so with both present the one
imported depends on install order (the CPU one hides CUDA): that is refused, not guessed.

The checks look for packages without importing them (``importlib.util.find_spec``, and the
``*.dist-info`` folders on ``sys.path``, read directly: ``importlib.metadata`` alone takes 25 ms
to import), well under a millisecond, so `aae-run` starts fast.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import sys

from aae_runtime.contract.errors import AAEError

DISTRIBUTION = "aae-toolkit"
# An installed distribution's metadata folder: NAME-VERSION.dist-info, the name normalised to
# lower case with underscores (onnxruntime_gpu-1.31.1.dist-info); egg-info for old installs.
_DIST_INFO = re.compile(r"^(onnxruntime|onnxruntime_gpu)-[^-]+\.(dist|egg)-info$", re.IGNORECASE)
TRAINING_MODULES = ("torch", "onnx", "onnxscript")


class InstallError(AAEError):
    """A command needs a package this installation does not have (or has twice)."""


def _installed_onnxruntimes() -> set[str]:
    """The ONNX Runtime distributions installed on ``sys.path`` (normalised names)."""
    found = set()
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:  # a zip, a missing folder
            continue
        found.update(m.group(1).lower().replace("_", "-") for m in map(_DIST_INFO.match, names) if m)
    return found


def _importable(module: str) -> bool:
    """Whether ``module`` is installed: a package or module with code, not a folder of that name
    alone (which imports as an empty namespace package: what `pip uninstall` of one of two
    distributions sharing a module, onnxruntime and onnxruntime-gpu, leaves behind)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules (blocked)
        return False
    return spec is not None and spec.origin not in (None, "namespace")


@functools.cache  # once per process: the answer does not change while it runs
def check_onnxruntime() -> None:
    """ONNX Runtime is installed exactly once (onnxruntime or onnxruntime-gpu, not both)."""
    if len(_installed_onnxruntimes()) > 1:
        raise InstallError(
            "both onnxruntime and onnxruntime-gpu are installed, and they share one module: keep one, e.g. "
            "`pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu` (or onnxruntime for the CPU only)")
    if not _importable("onnxruntime"):
        raise InstallError(
            f"ONNX Runtime is not installed: add the [cpu] extra of {DISTRIBUTION} (from its source folder: "
            "pip install '.[cpu]'; '.[gpu]' for an NVIDIA GPU; an empty onnxruntime folder left by an uninstall "
            "is replaced by pip install --force-reinstall onnxruntime)")


def check_training(command: str, export: bool = False) -> None:
    """The ``[train]`` extra is importable: torch for training; for export (``export=True``) also
    onnx, onnxscript and ONNX Runtime, which verifies the graphs."""
    missing = [m for m in (TRAINING_MODULES if export else ("torch",)) if not _importable(m)]
    if missing:
        raise InstallError(
            f"{command} needs {', '.join(missing)}, which this installation lacks (it is runtime-only): "
            f"add the [train,cpu] extras of {DISTRIBUTION} (from its source folder: pip install '.[train,cpu]'; on a "
            "machine without a GPU, install the CPU build of torch first: pip install torch --index-url "
            "https://download.pytorch.org/whl/cpu)")
    if export:
        check_onnxruntime()
