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
from typing import TYPE_CHECKING

from aae_runtime.contract.errors import DeviceError, ModelError, first_line

if TYPE_CHECKING:
    import onnxruntime

DEVICES = ("auto", "cpu", "cuda")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


# Graph optimisation levels by name -> ONNX Runtime's GraphOptimizationLevel member. "all" (layout
# and fusion passes included) measured best or equal on the paper-size MLP; "disable" exists to
# measure what the passes buy.
OPTIMIZATION_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def onnxruntime_module():
    """``import onnxruntime``, on first use only (importing it costs ~0.1 s), after checking that
    exactly one ONNX Runtime package is installed (`aae_runtime.install`)."""
    if "onnxruntime" not in sys.modules:
        from aae_runtime.install import check_onnxruntime

        check_onnxruntime()
    import onnxruntime

    return onnxruntime


# How long idle intra-op threads busy-wait for the next piece of work before sleeping, in the
# low-latency setting (`aae-run score --low-latency`). A scoring call is ~10 short operators; between them the
# second core's thread must wake within microseconds, which only spinning gives. Measured on the
# 2-core box, fused scorer, batch 1 back to back: 0.10 ms spinning (1000 us or unbounded alike),
# 0.11-0.17 ms at 100 us, 0.19 ms without. Bounding the spin is what makes it affordable: at one
# call every 10 ms, unbounded spinning (ORT's own default) keeps a whole core busy (1.02 cores),
# 1000 us costs 0.17 cores, none 0.04.
LOW_LATENCY_SPIN_US = 1000


@dataclass(frozen=True)
class SessionConfig:
    """Execution settings, chosen by measurement (`aae-run bench --sweep`, benchmarks/latency.py).

    Two settings matter on a small CPU box, and which is right depends on what else the box does:

    - **Shared box (the default: ``threads=0, spin_us=0``).** One intra-op thread per physical
      core, no spinning: idle threads sleep, so the runtime never burns a core between calls and
      never fights the image decoding threads or other processes for the cores. Batch 1 takes
      ~0.19 ms (the same as one thread), batch 64 gains from the second core while it is free.
      ``threads=1`` leaves a core free for decoding and other work, and is the steadiest choice
      when another process is busy: with one core taken by another job, batch-64 p99 stayed at
      2.7 ms on one thread against 5-9 ms with two.
    - **Dedicated inspection box (``spin_us=LOW_LATENCY_SPIN_US``, all cores).** Threads spin for
      up to 1 ms waiting for the next operator, so both cores work on one image: batch 1 back to
      back drops from ~0.19 to ~0.11 ms. The price: after each call a core stays busy for up to
      1 ms, and when another process holds a core the tail gets long (p99 ~4 ms at batch 1), so
      use it only where scoring owns the CPU. It helps bursts only: with one image every 10 ms
      the threads are asleep again by the next call and every setting takes ~0.5-0.9 ms (cold
      caches), while spinning keeps 3-6x more CPU busy (`paced` in the benchmark reports).

    Graph optimisation "all" was never measurably slower; for the MLP the levels are within noise
    of each other (the exported graph is already Gemm + Relu), and "all" is kept for graphs that
    have more to fuse (convolutions, normalisation).
    """

    device: str = "auto"  # "auto" tries CUDA and falls back to the CPU with a notice
    threads: int = 0  # intra-op threads; 0 lets ORT use one per physical core
    spin_us: int = 0  # idle threads busy-wait this long for work before sleeping (0: never spin)
    optimization: str = "all"  # a key of OPTIMIZATION_LEVELS
    call_time_limit_s: float = 120.0  # one inference call running longer is stopped (a runaway graph), see GuardedSession

    @classmethod
    def low_latency(cls, device: str = "auto", threads: int = 0) -> "SessionConfig":
        """The dedicated-box setting: every core on one call, threads spinning up to 1 ms."""
        return cls(device=device, threads=threads, spin_us=LOW_LATENCY_SPIN_US)


def available_providers() -> list[str]:
    """The execution providers this ONNX Runtime build was compiled with (not whether they can run)."""
    return list(onnxruntime_module().get_available_providers())


def usable_providers() -> list[str]:
    """The providers that can run on this machine: CUDA only where the build has it and an NVIDIA
    driver is present (TensorRT and others are never used by this runtime)."""
    built = available_providers()
    return [p for p in (CUDA, CPU) if p in built and (p != CUDA or _gpu_present())]


def _session_options(cfg: SessionConfig) -> "onnxruntime.SessionOptions":
    ort = onnxruntime_module()
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[cfg.optimization])
    so.intra_op_num_threads = cfg.threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if cfg.spin_us > 0 else "0")
    if cfg.spin_us > 0:
        so.add_session_config_entry("session.intra_op.spin_duration_us", str(cfg.spin_us))
    return so


class _Watchdog:
    """One daemon thread that stops inference calls running past their deadline, by setting
    their RunOptions' ``terminate`` flag (ONNX Runtime then ends the call with an error). It
    looks twice a second, so arming a call costs a lock and a dict entry, no wake-up."""

    PERIOD_S = 0.5

    def __init__(self):
        import threading

        self.lock, self.calls, self.thread = threading.Lock(), {}, None

    def arm(self, run_options, limit_s: float) -> list:
        import threading
        import time

        token = [run_options, time.monotonic() + limit_s, False]  # options, deadline, fired
        with self.lock:
            self.calls[id(token)] = token
            if self.thread is None:
                self.thread = threading.Thread(target=self._watch, name="aae-inference-watchdog", daemon=True)
                self.thread.start()
        return token

    def disarm(self, token: list) -> None:
        with self.lock:
            self.calls.pop(id(token), None)

    def _watch(self) -> None:
        import time

        while True:
            time.sleep(self.PERIOD_S)
            now = time.monotonic()
            with self.lock:
                for token in self.calls.values():
                    if not token[2] and now > token[1]:
                        token[0].terminate, token[2] = True, True


_WATCHDOG = _Watchdog()


class GuardedSession:
    """An ONNX Runtime session whose ``run`` is stopped after ``limit_s`` and whose failures are
    one-line ModelErrors naming the graph; everything else is the session's own."""

    def __init__(self, session, name: str, limit_s: float):
        self._session, self._name, self._limit_s = session, name, limit_s

    def __getattr__(self, attr):
        return getattr(self._session, attr)

    def run(self, output_names, feeds, run_options=None):
        run_options = run_options or onnxruntime_module().RunOptions()
        token = _WATCHDOG.arm(run_options, self._limit_s)
        try:
            return self._session.run(output_names, feeds, run_options)
        except Exception as exc:  # ORT's own exception types: a failed kernel, an allocation, a stop
            if token[2]:
                raise ModelError(f"{self._name}: one inference call ran over {self._limit_s:g} s and was stopped: the "
                                 "graph does not behave like an exported model; export it again") from None
            raise ModelError(f"{self._name}: inference failed ({first_line(exc)}): export the model again, or use a "
                             "smaller --batch-size if memory ran out") from None
        finally:
            _WATCHDOG.disarm(token)


def create_session(model: bytes | str | Path, cfg: SessionConfig) -> tuple["GuardedSession", str | None]:
    """Open ``model`` on ``cfg.device``. Returns the session and a notice when it fell back.

    Raises DeviceError when ``cuda`` was asked for and cannot run; ModelError when the file is
    not a loadable ONNX model.
    """
    if cfg.device not in DEVICES:
        raise DeviceError(f"unknown device {cfg.device!r}: use one of {', '.join(DEVICES)}")
    if cfg.threads < 0 or cfg.spin_us < 0:
        raise DeviceError(f"threads ({cfg.threads}) and spin time ({cfg.spin_us} us) cannot be negative")
    if not cfg.call_time_limit_s > 0:
        raise DeviceError(f"the time limit of an inference call must be positive, got {cfg.call_time_limit_s}")
    if cfg.optimization not in OPTIMIZATION_LEVELS:
        raise DeviceError(f"unknown optimisation level {cfg.optimization!r}: use one of {', '.join(OPTIMIZATION_LEVELS)}")
    ort = onnxruntime_module()
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
    # ORT's own log lines (e.g. a failed CUDA load) would bypass our one-line errors: the
    # sessions' severity is set per session; the default logger's (used while a CUDA provider
    # loads) only here, once a session is made, never at import.
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(source, _session_options(cfg), providers=providers)
    except Exception as exc:  # ORT raises its own exception types for invalid files
        name = "model" if isinstance(model, bytes) else Path(model).name
        raise ModelError(f"cannot load {name} as an ONNX model ({first_line(exc)}): re-export it") from None
    session = GuardedSession(session, "model" if isinstance(model, bytes) else Path(model).name, cfg.call_time_limit_s)
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
    preload = getattr(onnxruntime_module(), "preload_dlls", None)
    if preload is None:
        return
    quiet = io.StringIO()  # it prints each library it cannot find; a fallback is reported by us
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            preload()
    except Exception:
        pass


