"""ONNX Runtime sessions on the requested device, and the truth about which provider runs.

ONNX Runtime falls back to the CPU silently when CUDA cannot start, so the provider actually
running is always read back from ``session.get_providers()``.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from aae_runtime.errors import DeviceError, ModelError

DEVICES = ("auto", "cpu", "cuda")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

# ORT's own log lines (e.g. a failed CUDA load) would bypass our one-line errors: errors only
# from the session we report ourselves.
ort.set_default_logger_severity(4)


# Graph optimisation levels by name. "all" (layout and fusion passes included) measured best or
# equal on the paper-size MLP; "disable" exists to measure what the passes buy.
OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class SessionConfig:
    """Execution settings, chosen by measurement (`aae-run bench --sweep`, benchmarks/latency.py).

    Defaults suit small, shared edge boxes (paper-size MLP on a 2-core box with other jobs
    running; the sweep table in benchmarks/results/latency.md):
    - optimisation "all": never measurably slower. For this MLP the levels are within noise
      of each other (batch-64 scoring 2.27-2.30 ms on one thread in the quietest run): the
      exported graph is already Gemm + Relu with nothing left to fuse; "all" is kept for
      graphs that have (convolutions, normalisation). Batch 1 is ~0.19 ms at every level,
      bound by reading 14 MB of float32 weights.
    - no spinning: spinning threads busy-wait between ops and fight every other process for
      the cores; batch-64 scoring went from 2.3 ms to 6.2-6.6 ms with it (7-15 ms on a busier
      machine) and batch 1 gained nothing. They also burn a core between calls, starving
      camera and decoding threads.
    - threads 0 (one per physical core): batch 1 is the same with one thread or two (0.19
      against 0.21 ms); batch 64 gains from the second core only while it is idle (best calls
      1.8 against 2.6 ms; medians equal when other jobs hold it). ``threads=1`` leaves a core
      free for decoding and for other processes: the right choice when the box does more
      than score.
    """

    device: str = "auto"  # "auto" tries CUDA and falls back to the CPU with a notice
    threads: int = 0  # intra-op threads; 0 lets ORT use one per physical core
    spinning: bool = False  # busy-wait between ops: lower latency, burns a core while idle
    optimization: str = "all"  # a key of OPTIMIZATION_LEVELS


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def _session_options(cfg: SessionConfig) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = OPTIMIZATION_LEVELS[cfg.optimization]
    so.intra_op_num_threads = cfg.threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if cfg.spinning else "0")
    return so


def create_session(model: bytes | str | Path, cfg: SessionConfig) -> tuple[ort.InferenceSession, str | None]:
    """Open ``model`` on ``cfg.device``. Returns the session and a notice when it fell back.

    Raises DeviceError when ``cuda`` was asked for and cannot run; ModelError when the file is
    not a loadable ONNX model.
    """
    if cfg.device not in DEVICES:
        raise DeviceError(f"unknown device {cfg.device!r}: use one of {', '.join(DEVICES)}")
    if cfg.optimization not in OPTIMIZATION_LEVELS:
        raise DeviceError(f"unknown optimisation level {cfg.optimization!r}: use one of {', '.join(OPTIMIZATION_LEVELS)}")
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and _gpu_present())
    want_cuda = want_cuda and CUDA in available_providers()
    if cfg.device == "cuda" and not want_cuda:
        raise DeviceError(
            "--device cuda: this onnxruntime has no CUDA provider; install onnxruntime-gpu or use --device cpu"
        )
    if want_cuda:
        _preload_cuda_libraries()
    providers = [CUDA, CPU] if want_cuda else [CPU]
    source = model if isinstance(model, bytes) else str(model)
    try:
        session = ort.InferenceSession(source, _session_options(cfg), providers=providers)
    except Exception as exc:  # ORT raises its own exception types for invalid files
        name = "model" if isinstance(model, bytes) else Path(model).name
        raise ModelError(f"cannot load {name} as an ONNX model ({_first_line(exc)}): re-export it") from None
    running = session.get_providers()
    notice = None
    if want_cuda and CUDA not in running:
        if cfg.device == "cuda":
            raise DeviceError("--device cuda: CUDA could not start here (no GPU, driver or CUDA 13 libraries); use --device cpu")
        notice = "CUDA is not usable here; running on the CPU"
    return session, notice


def _gpu_present() -> bool:
    """Cheap check for an NVIDIA driver, so that `auto` on a CPU-only Linux box skips a slow,
    noisy CUDA attempt. Elsewhere (Windows) we just try."""
    if sys.platform.startswith("linux"):
        return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")
    return True


def _preload_cuda_libraries() -> None:
    """Load CUDA/cuDNN from pip's nvidia-* wheels when present (onnxruntime-gpu >= 1.21)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    quiet = io.StringIO()  # it prints each library it cannot find; a fallback is reported by us
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            preload()
    except Exception:
        pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
