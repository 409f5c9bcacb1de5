"""Latency and throughput of an exported model: the library behind `aae-run bench`.

What is timed is what a device calls: `AAEModel.score` (a batch of preprocessed images ->
scores, through whichever graph the model scores with) and `AAEModel.sample` (prior draws ->
images), at several batch sizes, on several execution setups (ONNX Runtime on the CPU with one
thread and with every core; CUDA where a GPU is present). Also timed: scoring a folder of PNG
files (decoding overlapped with inference) and the cold start of `aae-run score one.png`.
benchmarks/latency.py adds the PyTorch eager baseline, the matmul floor and the int8/fp16
variants to the same run; it reuses `Setup`, `measure` and the writers below.

Method (chosen for a shared, noisy machine): every case is warmed up first, then all cases are
timed in round-robin time slices, the order reversed every round, so that a burst of load from
another process lands on every case alike and side-by-side ratios stay fair. Each call is timed
on its own; medians, p90 and p99 come from all calls of all rounds.

numpy + onnxruntime + pillow only, like the rest of the runtime.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from aae_runtime import __version__
from aae_runtime.contract.errors import AAEError, InputError
from aae_runtime.contract.fileio import atomic_write_text
from aae_runtime.contract.metadata import IMAGE_INPUT, LATENT_INPUT, LATENT_OUTPUT, RECONSTRUCTION_OUTPUT
from aae_runtime.model import AAEModel
from aae_runtime.session import CUDA, LOW_LATENCY_SPIN_US, OPTIMIZATION_LEVELS, SessionConfig, _gpu_present, available_providers

BATCH_SIZES = (1, 8, 64, 256)
OPS = ("score", "sample")
SCHEMA = "aae-bench/1"


@dataclass
class Setup:
    """One way of running the model: how to score a batch and how to draw a batch of samples."""

    name: str  # short key, e.g. "ort-cpu-1t"
    description: str
    score: Callable[[np.ndarray], Any]  # preprocessed images (N, C, H, W) -> anything
    sample: Callable[[int], Any] | None  # n -> anything; None: this setup does not sample
    before: Callable[[], None] | None = None  # runs before each time slice (e.g. torch.set_num_threads)
    info: dict = field(default_factory=dict)  # threads, provider, precision... for the JSON


@dataclass
class Case:
    setup: Setup
    op: str
    batch: int
    call: Callable[[], Any]
    times: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Timing:
    """How long `measure` spends: defaults give >= 1 s per case; `quick()` is for tests."""

    # many short slices interleave the cases finely, so bursts of load from other processes
    # spread over all of them (15 x 0.07 s: ~1 s per case, as 5 x 0.2 s but fairer)
    rounds: int = 15
    slice_s: float = 0.07  # time per case per round
    warmup_s: float = 0.1  # per case, after at least `warmup_calls` calls
    warmup_calls: int = 3
    min_calls: int = 2  # per case per round

    @classmethod
    def quick(cls) -> "Timing":
        return cls(rounds=1, slice_s=0.0, warmup_s=0.0, warmup_calls=1, min_calls=1)


def make_cases(setups: Iterable[Setup], images: np.ndarray, batch_sizes: Iterable[int] = BATCH_SIZES,
               ops: Iterable[str] = OPS) -> list[Case]:
    """One case per (setup, op, batch). ``images`` (>= max batch, C, H, W) feed the scoring cases."""
    batch_sizes, ops = list(batch_sizes), list(ops)
    if not batch_sizes or min(batch_sizes) < 1:
        raise InputError(f"batch sizes must be positive integers, got {batch_sizes}")
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise InputError(f"unknown operation {unknown[0]!r}: use {', '.join(OPS)}")
    if len(images) < max(batch_sizes):
        images = np.resize(images, (max(batch_sizes), *images.shape[1:]))
    cases = []
    for s in setups:
        for op in ops:
            fn = s.score if op == "score" else s.sample
            if fn is None:
                continue
            for b in batch_sizes:
                # bind the batch now: no slicing or allocation inside the timed call
                arg = np.ascontiguousarray(images[:b]) if op == "score" else b
                cases.append(Case(s, op, b, (lambda f=fn, a=arg: f(a))))
    return cases


def measure(cases: list[Case], timing: Timing = Timing(), progress: Callable[[str], None] | None = None) -> list[Case]:
    """Warm every case up, then time them in round-robin slices (see the module docstring)."""
    clock = time.perf_counter
    for c in cases:
        if c.setup.before:
            c.setup.before()
        start, n = clock(), 0
        while n < timing.warmup_calls or clock() - start < timing.warmup_s:
            c.call()
            n += 1
    for r in range(timing.rounds):
        if progress:
            progress(f"round {r + 1}/{timing.rounds}")
        for c in (cases if r % 2 == 0 else reversed(cases)):
            if c.setup.before:
                c.setup.before()
            start, n = clock(), 0
            while n < timing.min_calls or clock() - start < timing.slice_s:
                t0 = clock()
                c.call()
                c.times.append(clock() - t0)
                n += 1
    return cases


def summarize(c: Case) -> dict:
    """Median, p90, p99 (ms) and throughput (items/s at the median) of one case."""
    t = np.asarray(c.times) * 1e3
    p50, p90, p99 = np.percentile(t, [50, 90, 99])
    return {
        "setup": c.setup.name, "op": c.op, "batch": c.batch,
        "median_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(t.mean()),
        "calls": int(t.size), "items_per_s": float(c.batch / (p50 / 1e3)),
    }


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


# -- folders of files: decoding overlapped with inference ---------------------------------------------

def folder_throughput(model: AAEModel, n_images: int = 512, batch_size: int = 64, repeats: int = 3) -> dict:
    """Images/s for listing and decoding alone, scoring decoded arrays alone, and `score_paths`
    on a folder of PNG files (both, overlapped). Overlap works when ``score_paths`` approaches
    the slower of the two; it needs an idle core (decoding and inference each keep one busy)."""
    from aae_runtime.images import find_images, save_image

    with tempfile.TemporaryDirectory(prefix="aae-bench-") as tmp:
        images = np.clip(model.sample(n_images, seed=1), 0, 1)
        for i, img in enumerate(images):
            save_image(img, Path(tmp) / f"{i:05d}.png")
        def decode():  # listing the folder included, as score_paths does it
            return model.load_images(find_images([tmp]))

        arrays = np.stack(decode())

        def infer():
            for i in range(0, len(arrays), batch_size):
                model.score(arrays[i : i + batch_size])

        def paths():
            rows = model.score_paths([tmp], batch_size=batch_size)
            assert len(rows) == n_images

        best = {}
        for name, fn in (("decode_only", decode), ("score_arrays_only", infer), ("score_paths", paths)):
            fn()  # warm-up (page cache, sessions)
            best[name] = min(_timed(fn) for _ in range(repeats))
    serial = best["decode_only"] + best["score_arrays_only"]
    return {
        "images": n_images, "batch_size": batch_size, "repeats": repeats,
        **{f"{k}_images_per_s": n_images / v for k, v in best.items()},
        # 1.0: no overlap (decode then infer); higher: the two ran at the same time
        "overlap_speedup": serial / best["score_paths"],
        "ideal_overlap_speedup": serial / max(best["decode_only"], best["score_arrays_only"]),
    }


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -- cold start -----------------------------------------------------------------------------------

def aae_run_command() -> list[str]:
    """How to start `aae-run` in a fresh process: the console script next to this Python if there."""
    exe = Path(sys.executable).with_name("aae-run")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("aae-run")
    return [found] if found else [sys.executable, "-m", "aae_runtime"]


def cold_start(model_dir: str | Path, runs: int = 7) -> dict:
    """Wall time of ``aae-run score one.png --model DIR`` from process start to exit, median of
    ``runs`` (after one untimed run that fills the page cache), with the share of Python start-up
    and of imports, each measured the same way."""
    model_dir = Path(model_dir)
    with tempfile.TemporaryDirectory(prefix="aae-cold-") as tmp:
        from aae_runtime.images import save_image

        m = AAEModel.load(model_dir, device="cpu")
        png = save_image(np.clip(m.sample(1, seed=0)[0], 0, 1), Path(tmp) / "one.png")
        cmd = [*aae_run_command(), "score", str(png), "--model", str(model_dir)]
        # as installed: bytecode caches written once, then read (a set PYTHONDONTWRITEBYTECODE would
        # make every run compile every module again)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        checks = {
            "python_startup_s": [sys.executable, "-c", "pass"],
            "import_cli_s": [sys.executable, "-c", "import aae_runtime.cli"],
            "score_one_image_s": cmd,
        }
        out: dict = {"command": "aae-run score one.png --model DIR", "runs": runs}
        for key, argv in checks.items():
            first = subprocess.run(argv, capture_output=True, text=True, env=env)
            if first.returncode != 0:
                raise InputError(f"cold start: {' '.join(argv[:3])}... failed: {first.stderr.strip()[-300:]}")
            times, cpu = [], []
            for _ in range(runs):
                c0, t0 = _children_cpu(), time.perf_counter()
                subprocess.run(argv, capture_output=True, env=env, check=True)
                times.append(time.perf_counter() - t0)
                cpu.append(_children_cpu() - c0)
            out[key] = statistics.median(times)
            out[key[:-2] + "_all_s"] = times
            out[key[:-2] + "_cpu_s"] = statistics.median(cpu)
    out["import_cpu_s"] = import_costs(env, runs)
    out["target_s"] = COLD_START_TARGET_S
    out["met"] = out["score_one_image_s"] <= COLD_START_TARGET_S
    return out


# What `aae-run` imports, heaviest first, in the order Python meets them; each module's CPU time
# is what it adds on top of the ones before it.
_IMPORT_STEPS = ("numpy", "onnxruntime", "PIL.Image", "rich.console", "typer", "typer._adapters", "aae_runtime.cli")
_IMPORT_PROBE = """
import importlib, json, time
out = {}
for name in %r:
    t = time.process_time()
    try:
        importlib.import_module(name)
    except ImportError:
        continue
    out[name] = time.process_time() - t
print(json.dumps(out))
""" % (_IMPORT_STEPS,)


def import_costs(env: dict, runs: int) -> dict:
    """Median CPU seconds each heavy import adds in a fresh interpreter (typer._adapters: the
    pydantic layer typer >= 0.29 loads while it parses a command line)."""
    samples = []
    for _ in range(max(1, runs)):
        r = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, env=env)
        if r.returncode == 0:
            samples.append(json.loads(r.stdout))
    return {k: statistics.median(s[k] for s in samples if k in s) for k in _IMPORT_STEPS if any(k in s for s in samples)}


COLD_START_TARGET_S = 0.5


def _children_cpu() -> float:
    """User + system CPU seconds of finished child processes: on a machine shared with other
    jobs, the cold start's CPU time is what its wall time would be on an idle one."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# -- single images at a steady pace: the latency / idle-CPU trade-off of spinning ---------------------

def paced_cost(model_dir: str | Path, interval_s: float = 0.01, duration_s: float = 1.5, label: str = "") -> list[dict]:
    """One image every ``interval_s`` (a camera, a conveyor) under each CPU setting: median and p90
    latency, and the cores the process keeps busy on average (CPU time / wall time), which is
    what spinning costs between calls. Back-to-back timings hide both effects: the weights go
    cold in the caches between paced calls, and spinning threads burn CPU while waiting."""
    cores = os.cpu_count() or 1
    configs = [("1 thread", SessionConfig(device="cpu", threads=1)),
               (f"{cores} threads (default)", SessionConfig(device="cpu", threads=cores))]
    if cores > 1:
        configs.append((f"{cores} threads, --low-latency", SessionConfig.low_latency("cpu", cores)))
    rows = []
    for name, cfg in configs:
        m = AAEModel.load(model_dir, session_config=cfg)
        image = np.clip(m.sample(1, seed=0), 0, 1)
        for _ in range(10):
            m.score(image)
        times = []
        cpu0, wall0 = time.process_time(), time.perf_counter()
        while time.perf_counter() - wall0 < duration_s:
            t = time.perf_counter()
            m.score(image)
            times.append(time.perf_counter() - t)
            time.sleep(interval_s)
        busy = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
        del m  # its threads stop before the next setting is measured
        rows.append({"setting": f"{label}{name}", "threads": cfg.threads, "spin_us": cfg.spin_us, "interval_ms": 1e3 * interval_s,
                     "calls": len(times), "median_ms": 1e3 * float(np.median(times)),
                     "p90_ms": 1e3 * float(np.percentile(times, 90)), "cores_busy": float(busy)})
    return rows


# -- the whole `aae-run bench` ----------------------------------------------------------------------

def run_bench(model_dir: str | Path, batch_sizes: Iterable[int] = BATCH_SIZES, ops: Iterable[str] = OPS,
              device: str = "auto", timing: Timing = Timing(), cold_start_runs: int = 7, folder_images: int = 512,
              sweep: bool = False, progress: Callable[[str], None] | None = None) -> dict:
    """Everything `aae-run bench` measures, as one JSON-able dict (see `write_report`)."""
    log = progress or (lambda s: None)
    model_dir = Path(model_dir)
    setups: list[Setup] = []
    notes: list[str] = []
    if device in ("auto", "cpu"):
        setups += ort_cpu_setups(model_dir)
    if device in ("auto", "cuda"):
        cuda, why = cuda_setups(model_dir)
        setups += cuda
        if why:
            notes.append(why)
            if device == "cuda":
                raise InputError(f"--device cuda: {why[len('CUDA not measured: '):]}; use --device cpu")
    ref = AAEModel.load(model_dir, device="cpu")
    images = np.clip(ref.sample(max(batch_sizes), seed=0), 0, 1)  # realistic inputs, no data set needed
    log(f"timing {len(setups)} setups x {len(list(ops))} operations x {len(list(batch_sizes))} batch sizes")
    results = [summarize(c) for c in measure(make_cases(setups, images, batch_sizes, ops), timing, log)]
    report = header(ref, model_dir, timing, setups)
    report.update(results=results, notes=notes)
    if device in ("auto", "cpu"):
        log("single images at a steady pace")
        report["paced"] = paced_cost(model_dir, duration_s=min(1.5, max(0.2, timing.rounds * timing.slice_s)))
    if sweep:
        log("session-option sweep")
        cases = measure(make_cases(sweep_setups(model_dir), images, (1, 64), ("score",)), timing, log)
        report["sweep"] = [{**summarize(c), **c.setup.info} for c in cases]
    if folder_images:
        log(f"folder of {folder_images} PNG files")
        report["folder"] = folder_throughput(ref, folder_images)
    if cold_start_runs:
        log(f"cold start, {cold_start_runs} runs")
        report["cold_start"] = cold_start(model_dir, cold_start_runs)
    return report


def header(model: AAEModel, model_dir: Path, timing: Timing, setups: list[Setup]) -> dict:
    """The parts of a report that say what ran where."""
    return {
        "schema": SCHEMA,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "model": {
            "dir": str(model_dir), "export_id": model.metadata.export_id, "precision": variant(model),
            "input_shape": list(model.input_shape), "latent_dim": model.metadata.latent_dim,
            "score": model.score_name,
        },
        "method": {"rounds": timing.rounds, "slice_s": timing.slice_s, "warmup_s": timing.warmup_s,
                   "order": "round-robin, reversed every round; each call timed alone"},
        "setups": [{"name": s.name, "description": s.description, **s.info} for s in setups],
    }


def machine_info() -> dict:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "logical_cores": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "numpy": np.__version__, "onnxruntime": ort.__version__,
        "aae": __version__, "providers_available": available_providers(), "gpu": gpu_name(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def gpu_name() -> str | None:
    if not _gpu_present() or not shutil.which("nvidia-smi"):
        return None
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


# -- writing ----------------------------------------------------------------------------------------

def write_report(report: dict, out_dir: str | Path, name: str = "latency") -> dict[str, Path]:
    """Write ``name``.json, ``name``.md and ``name``.png into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md", "png": out_dir / f"{name}.png"}
    atomic_write_text(paths["json"], json.dumps(report, indent=1) + "\n")
    atomic_write_text(paths["md"], markdown(report))
    plot(report, paths["png"])
    return paths


def markdown(report: dict) -> str:
    """The report as markdown tables (latency, sweep, folder, cold start), machine first."""
    m = report["machine"]
    lines = [f"# Latency: {report['model']['dir']} ({report['model']['precision']})", "",
             f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, GPU: {m['gpu'] or 'none'}; "
             f"onnxruntime {m['onnxruntime']}, numpy {m['numpy']}, Python {m['python']}; "
             f"load average at start {', '.join(f'{x:.2f}' for x in m['load_average'] or [])}. "
             f"Created {report['created']}.", ""]
    lines += [f"- `{s['name']}`: {s['description']}" for s in report["setups"]]
    has_best = any("best_ms" in r for r in report["results"])
    lines += ["", "| setup | op | batch | median ms | p90 ms | p99 ms | items/s | µs/item | calls |" + (" best ms |" if has_best else ""),
              "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if has_best else "")]
    for r in report["results"]:
        best = f" {r['best_ms']:.3f} |" if "best_ms" in r else ""
        lines.append(f"| {r['setup']} | {r['op']} | {r['batch']} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | "
                     f"{r['p99_ms']:.3f} | {r['items_per_s']:,.0f} | {1e3 * r['median_ms'] / r['batch']:.1f} | {r['calls']} |{best}")
    for note in report.get("notes") or []:
        lines += ["", f"Note: {note}"]
    if report.get("sweep"):
        lines += ["", "## Session options (scoring)", "", "| threads | spin (us) | optimisation | batch | median ms | p90 ms | p99 ms |",
                  "|---:|---:|---|---:|---:|---:|---:|"]
        for r in report["sweep"]:
            lines.append(f"| {r['threads']} | {r['spin_us']} | {r['optimization']} | {r['batch']} | "
                         f"{r['median_ms']:.3f} | {r['p90_ms']:.3f} | {r['p99_ms']:.3f} |")
    if report.get("paced"):
        r0 = report["paced"][0]
        lines += ["", f"## One image every {r0['interval_ms']:.0f} ms (CPU)", "",
                  "Latency when calls are paced (weights go cold in the caches between calls) and the cores the process "
                  "keeps busy on average, which is what spinning costs between calls.", "",
                  "| setting | median ms | p90 ms | cores busy |", "|---|---:|---:|---:|"]
        lines += [f"| {r['setting']} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | {r['cores_busy']:.2f} |" for r in report["paced"]]
    if report.get("folder"):
        f = report["folder"]
        lines += ["", f"## Scoring a folder of {f['images']} PNG files (batch {f['batch_size']}, best of {f['repeats']})", "",
                  "Speed-up of `score_paths` over decoding, then scoring, one after the other; *ideal* is what hiding "
                  "one-threaded decoding fully behind inference (or the reverse) would give (decoding on several threads "
                  "can beat it).", "",
                  "| list + decode only | score arrays only | score_paths (overlapped) | overlap speed-up | ideal |", "|---:|---:|---:|---:|---:|",
                  f"| {f['decode_only_images_per_s']:,.0f}/s | {f['score_arrays_only_images_per_s']:,.0f}/s | "
                  f"{f['score_paths_images_per_s']:,.0f}/s | {f['overlap_speedup']:.2f}x | {f['ideal_overlap_speedup']:.2f}x |"]
    if report.get("cold_start"):
        c = report["cold_start"]
        lines += ["", f"## Cold start (median of {c['runs']} fresh processes)", "",
                  "| | `aae-run score one.png --model DIR` | Python start-up alone | `import aae_runtime.cli` alone |",
                  "|---|---:|---:|---:|",
                  f"| wall time | {c['score_one_image_s']:.3f} s | {c['python_startup_s']:.3f} s | {c['import_cli_s']:.3f} s |",
                  f"| CPU time (user + sys) | {c.get('score_one_image_cpu_s', 0):.3f} s | {c.get('python_startup_cpu_s', 0):.3f} s | "
                  f"{c.get('import_cli_cpu_s', 0):.3f} s |", "",
                  f"Target: wall time <= {c['target_s']} s: {'met' if c['met'] else 'not met'} in this run. On a machine shared "
                  "with other jobs the wall time includes waiting for a core; the CPU time is what it would be on an idle one."]
        if c.get("import_cpu_s"):
            lines += ["", "CPU time each import adds (median, fresh interpreter): " + ", ".join(
                f"`{k}` {1e3 * v:.0f} ms" for k, v in c["import_cpu_s"].items()) + "."]
    for title, body in (report.get("extra_sections") or {}).items():
        lines += ["", f"## {title}", "", body]
    return "\n".join(lines) + "\n"


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (0, 110, 110),
           (170, 110, 0), (90, 90, 200)]


def plot(report: dict, path: str | Path) -> Path:
    """Per-item latency (µs, log scale) against batch size, one panel per operation (Pillow)."""
    from PIL import Image, ImageDraw

    rows = report["results"]
    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    per_col = 6
    pw, ph, left, top, bottom, legend_h = 460, 300, 60, 30, 40, 16 * min(per_col, len(setups)) + 10
    img = Image.new("RGB", (pw * max(1, len(ops)) + 10, ph + top + bottom + legend_h), "white")
    d = ImageDraw.Draw(img)
    values = [1e3 * r["median_ms"] / r["batch"] for r in rows] or [1.0]
    lo, hi = np.log10(min(values)) - 0.1, np.log10(max(values)) + 0.1
    batches = sorted({r["batch"] for r in rows}) or [1]
    bl, bh = np.log2(batches[0]), max(np.log2(batches[-1]), np.log2(batches[0]) + 1)
    for k, op in enumerate(ops):
        x0, y0, w, h = k * pw + left, top, pw - left - 20, ph - 20
        d.rectangle([x0, y0, x0 + w, y0 + h], outline="black")
        d.text((x0 + 4, 8), f"{op}: microseconds per item (median, log) vs batch size", fill="black")

        def xy(b, v):
            return (x0 + (np.log2(b) - bl) / (bh - bl) * w, y0 + h - (np.log10(v) - lo) / (hi - lo) * h)

        for b in batches:
            x, _ = xy(b, 10 ** lo)
            d.line([x, y0 + h, x, y0 + h + 4], fill="black")
            d.text((x - 8, y0 + h + 6), str(b), fill="black")
        for e in range(int(np.floor(lo)), int(np.ceil(hi)) + 1):
            if lo <= e <= hi:
                _, y = xy(batches[0], 10.0**e)
                d.line([x0 - 4, y, x0 + w, y], fill=(225, 225, 225))
                d.text((x0 - 52, y - 6), f"{10.0**e:g}", fill="black")
        for j, s in enumerate(setups):
            pts = [xy(r["batch"], 1e3 * r["median_ms"] / r["batch"]) for r in rows if r["setup"] == s and r["op"] == op]
            col = _COLORS[j % len(_COLORS)]
            if len(pts) > 1:
                d.line(pts, fill=col, width=2)
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
    for j, s in enumerate(setups):
        x, y = left + 230 * (j // per_col), ph + top + bottom - 10 + 16 * (j % per_col)
        d.rectangle([x, y + 3, x + 12, y + 11], fill=_COLORS[j % len(_COLORS)])
        d.text((x + 18, y), s, fill="black")
    path = Path(path)
    img.save(path)
    return path
