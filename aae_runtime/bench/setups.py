"""The setups timed from an exported model: ONNX Runtime on the CPU (one thread, every core,
every core spinning), CUDA with I/O binding (`BoundScore`, `BoundSample`) and with numpy in and
out, and the session-option sweep; with the helpers that name a model's precision and the GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterable

import numpy as np

from aae_runtime.bench.timing import Setup
from aae_runtime.contract.errors import AAEError
from aae_runtime.contract.metadata import IMAGE_INPUT, LATENT_INPUT, LATENT_OUTPUT, RECONSTRUCTION_OUTPUT
from aae_runtime.model import AAEModel
from aae_runtime.session import CUDA, LOW_LATENCY_SPIN_US, OPTIMIZATION_LEVELS, SessionConfig, _gpu_present, available_providers


# -- setups from an exported model -----------------------------------------------------------------

def ort_cpu_setups(model_dir: str | Path, label: str = "", threads: Iterable[int] | None = None,
                   low_latency: bool = True) -> list[Setup]:
    """ONNX Runtime on the CPU with one thread and with every core (default, shared-box session
    options), and with every core in the low-latency setting (threads spinning up to 1 ms)."""
    cores = os.cpu_count() or 1
    configs = [(f"{'1t' if n == 1 else f'{n}t'}", SessionConfig(device="cpu", threads=n), "")
               for n in (threads or (1, cores))]
    if low_latency and cores > 1:
        configs.append((f"{cores}t-spin", SessionConfig.low_latency("cpu", cores),
                        f", spinning up to {LOW_LATENCY_SPIN_US} us (--low-latency)"))
    setups = []
    for suffix, cfg, extra in configs:
        m = AAEModel.load(model_dir, session_config=cfg)
        n = cfg.threads
        setups.append(Setup(f"ort{label}-cpu-{suffix}",
                            f"ONNX Runtime{_variant_text(m)}, CPU, {n} thread{'s' if n > 1 else ''}{extra}",
                            m.score, lambda k, m=m: m.sample(k, seed=0),
                            info={"provider": "CPUExecutionProvider", "threads": n, "spin_us": cfg.spin_us,
                                  "precision": variant(m)}))
    return setups


def cuda_setups(model_dir: str | Path, label: str = "") -> tuple[list[Setup], str | None]:
    """CUDA setups, or none and the reason. Two per model:

    - ``ort-cuda-bound``: inputs and outputs bound on the GPU with I/O binding, buffers allocated
      once; the loop runs the graphs only (for scoring: the fused scorer graph where the model has
      one, else encoder + decoder with the host-side reduction to one score left out; for
      sampling: the decoder on codes already on the GPU).
    - ``ort-cuda-copy``: `AAEModel.score` / `.sample` with numpy in and out, so every host<->device
      copy and the host-side score are included.
    """
    if CUDA not in available_providers():
        return [], "CUDA not measured: this onnxruntime has no CUDA provider"
    if not _gpu_present():
        return [], "CUDA not measured: no NVIDIA GPU on this machine"
    try:
        m = AAEModel.load(model_dir, session_config=SessionConfig(device="cuda"))
    except AAEError as exc:  # a GPU without a working driver or CUDA libraries
        return [], f"CUDA not measured: {exc}"
    if m.providers[0] != CUDA:
        return [], "CUDA not measured: the CUDA provider did not start"
    info = {"provider": CUDA, "gpu": gpu_name(), "precision": variant(m)}
    bound = Setup(f"ort{label}-cuda-bound", f"ONNX Runtime{_variant_text(m)}, CUDA, I/O bound on the GPU (graphs only)",
                  BoundScore(m), BoundSample(m), info={**info, "copies": "none in the loop"})
    copy = Setup(f"ort{label}-cuda-copy", f"ONNX Runtime{_variant_text(m)}, CUDA, numpy in and out (copies included)",
                 m.score, lambda k: m.sample(k, seed=0), info={**info, "copies": "host->device and back, every call"})
    return [bound, copy], None


class BoundScore:
    """Scoring with I/O binding: inputs and outputs stay on ``device`` ("cuda" in the benchmark;
    "cpu" works too, which is how the tests exercise this path without a GPU). Bindings are made
    once per batch size, so the timed call is one `run_with_iobinding` per graph and nothing else:
    the fused scorer where the model has one, else encoder then decoder."""

    def __init__(self, model: AAEModel, device: str = "cuda"):
        self.m = model
        self.device = device
        self.bound: dict[int, tuple] = {}

    def __call__(self, images: np.ndarray) -> None:
        key = len(images)
        if key not in self.bound:
            self.bound[key] = self._bind(images)
        runs = self.bound[key][0]
        for session, binding in runs:
            session.run_with_iobinding(binding)
        runs[-1][1].synchronize_outputs()

    def _bind(self, images: np.ndarray):
        import onnxruntime as ort

        scorer = getattr(self.m, "scorer", None)
        if scorer is not None:  # the fused graph: one call, every output left on the GPU
            x = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(images, dtype=np.float32), self.device, 0)
            b = scorer.io_binding()
            b.bind_ortvalue_input(IMAGE_INPUT, x)
            for o in scorer.get_outputs():
                b.bind_output(o.name, self.device, 0)
            return [(scorer, b)], x
        n, lat = len(images), self.m.metadata.latent_dim
        x = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(images, dtype=np.float32), self.device, 0)
        z = ort.OrtValue.ortvalue_from_shape_and_type((n, lat), np.float32, self.device, 0)
        r = ort.OrtValue.ortvalue_from_shape_and_type((n, *self.m.input_shape), np.float32, self.device, 0)
        enc_b = self.m.encoder.io_binding()
        enc_b.bind_ortvalue_input(IMAGE_INPUT, x)
        enc_b.bind_ortvalue_output(LATENT_OUTPUT, z)
        dec_b = self.m.decoder.io_binding()
        dec_b.bind_ortvalue_input(LATENT_INPUT, z)
        dec_b.bind_ortvalue_output(RECONSTRUCTION_OUTPUT, r)
        return [(self.m.encoder, enc_b), (self.m.decoder, dec_b)], x, z, r  # OrtValues kept alive with their bindings


class BoundSample(BoundScore):
    """The decoder on prior draws already on the GPU (drawn once per batch size)."""

    def __call__(self, n: int) -> None:
        if n not in self.bound:
            self.bound[n] = self._bind_decoder(n)
        self.m.decoder.run_with_iobinding(self.bound[n][0])
        self.bound[n][0].synchronize_outputs()

    def _bind_decoder(self, n: int):
        import onnxruntime as ort

        from aae_runtime.contract.priors import sample_prior

        z_host = sample_prior(self.m.metadata.prior, n, np.random.default_rng(0)).astype(np.float32)
        z = ort.OrtValue.ortvalue_from_numpy(z_host, self.device, 0)
        r = ort.OrtValue.ortvalue_from_shape_and_type((n, *self.m.input_shape), np.float32, self.device, 0)
        b = self.m.decoder.io_binding()
        b.bind_ortvalue_input(LATENT_INPUT, z)
        b.bind_ortvalue_output(RECONSTRUCTION_OUTPUT, r)
        return b, z, r


def variant(model: AAEModel) -> str:
    """The precision the model was exported at ("fp32" for models exported before variants existed)."""
    return str((model.metadata.raw.get("variant") or {}).get("precision", "fp32"))


def _variant_text(model: AAEModel) -> str:
    v = variant(model)
    return "" if v == "fp32" else f" {v}"


def gpu_name() -> str | None:
    if not _gpu_present() or not shutil.which("nvidia-smi"):
        return None
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


# -- session-option sweep ---------------------------------------------------------------------------

def sweep_setups(model_dir: str | Path) -> list[Setup]:
    """Scoring under every combination of threads (1, all), spinning (none, the low-latency 1 ms)
    and optimisation level."""
    cores = os.cpu_count() or 1
    setups = []
    for threads in sorted({1, cores}):
        for spin_us in (0, LOW_LATENCY_SPIN_US):
            if threads == 1 and spin_us:
                continue  # one thread never waits for another: spinning changes nothing
            for opt in OPTIMIZATION_LEVELS:
                cfg = SessionConfig(device="cpu", threads=threads, spin_us=spin_us, optimization=opt)
                m = AAEModel.load(model_dir, session_config=cfg)
                name = f"{threads}t-{'spin' if spin_us else 'nospin'}-{opt}"
                setups.append(Setup(name, name, m.score, None,
                                    info={"threads": threads, "spin_us": spin_us, "optimization": opt}))
    return setups
