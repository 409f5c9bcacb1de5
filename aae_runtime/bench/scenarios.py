"""The measurements beyond back-to-back calls, and the whole run: scoring a folder of PNG files
(decoding overlapped with inference), the cold start of `aae-run score one.png` with the CPU
time each heavy import adds, single images at a steady pace (what spinning costs), and
`run_bench`, everything `aae-run bench` measures as one JSON-able dict.
"""

from __future__ import annotations

import json
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from aae_runtime.bench.report import header
from aae_runtime.bench.setups import cuda_setups, ort_cpu_setups, sweep_setups
from aae_runtime.bench.timing import BATCH_SIZES, OPS, Setup, Timing, _timed, make_cases, measure, summarize
from aae_runtime.contract.errors import InputError
from aae_runtime.contract.modelfolder import POINTER, VERSIONS, current_version, pointer_text
from aae_runtime.model import AAEModel, file_scoring_threads
from aae_runtime.session import SessionConfig


# -- folders of files: decoding overlapped with inference ---------------------------------------------

def folder_throughput(model: AAEModel, n_images: int = 512, batch_size: int = 64, repeats: int = 3) -> dict:
    """Images/s for listing and decoding alone, scoring decoded arrays alone, and `score_paths`
    on a folder of PNG files (both, overlapped). Overlap works when ``score_paths`` approaches
    the slower of the two; it needs an idle core (decoding and inference each keep one busy):
    load ``model`` with `file_scoring_threads`, as `aae-run score` does."""
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


# -- cold start -----------------------------------------------------------------------------------

def aae_run_command() -> list[str]:
    """How to start `aae-run` in a fresh process: the console script next to this Python if there."""
    exe = Path(sys.executable).with_name("aae-run")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("aae-run")
    return [found] if found else [sys.executable, "-m", "aae_runtime"]


# The floor of a cold start: a fresh Python that imports numpy and ONNX Runtime, opens the graph
# `aae-run score` runs (the fused scorer, else the encoder) and runs it once on one image.
_FLOOR = """
import sys
import numpy as np
import onnxruntime as ort
so = ort.SessionOptions()
so.log_severity_level = 4
session = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
shape = [1 if not isinstance(d, int) else d for d in session.get_inputs()[0].shape]
session.run(None, {session.get_inputs()[0].name: np.zeros(shape, np.float32)})
"""


def cold_start(model_dir: str | Path, runs: int = 7) -> dict:
    """Wall time of ``aae-run score one.png --model DIR`` from process start to exit, median of
    ``runs`` (after one untimed run that fills the page cache), beside its floor (`_FLOOR`: what
    any Python program scoring with ONNX Runtime pays), Python's own start-up and the CLI's
    imports, each in a fresh process; the four are interleaved, run by run, so that a change in
    the machine's load touches all of them alike."""
    with tempfile.TemporaryDirectory(prefix="aae-cold-") as tmp:
        from aae_runtime.images import save_image

        model_dir = _snapshot(Path(model_dir), Path(tmp) / "model")
        m = AAEModel.load(model_dir, device="cpu")
        png = save_image(np.clip(m.sample(1, seed=0)[0], 0, 1), Path(tmp) / "one.png")
        graph = current_version(model_dir) / ("scorer.onnx" if m.scorer is not None else "encoder.onnx")
        cmd = [*aae_run_command(), "score", str(png), "--model", str(model_dir), "--device", "cpu"]
        # as installed: bytecode caches written once, then read (a set PYTHONDONTWRITEBYTECODE would
        # make every run compile every module again)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        checks = {
            "python_startup_s": [sys.executable, "-c", "pass"],
            "import_cli_s": [sys.executable, "-c", "import aae_runtime.cli"],
            "floor_s": [sys.executable, "-c", _FLOOR, str(graph)],
            "score_one_image_s": cmd,
        }
        out: dict = {"command": "aae-run score one.png --model DIR --device cpu", "runs": runs,
                     "floor": "python: import numpy, onnxruntime; one session of the graph scoring runs; run it once"}
        times: dict = {key: [] for key in checks}
        cpu: dict = {key: [] for key in checks}
        for key, argv in checks.items():
            first = subprocess.run(argv, capture_output=True, text=True, env=env)
            if first.returncode != 0:
                raise InputError(f"cold start: {' '.join(argv[:3])}... failed: {first.stderr.strip()[-300:]}")
        for _ in range(runs):
            for key, argv in checks.items():
                c0, t0 = _children_cpu(), time.perf_counter()
                run = subprocess.run(argv, capture_output=True, text=True, env=env)
                times[key].append(time.perf_counter() - t0)
                if run.returncode != 0:
                    raise InputError(f"cold start: {' '.join(argv[:3])}... failed on a timed run after passing the first: "
                                     f"{run.stderr.strip()[-300:]}")
                cpu[key].append(_children_cpu() - c0)
        for key in checks:
            out[key] = statistics.median(times[key])
            out[key[:-2] + "_all_s"] = times[key]
            out[key[:-2] + "_cpu_s"] = statistics.median(cpu[key])
    out["above_floor_s"] = statistics.median(a - b for a, b in zip(times["score_one_image_s"], times["floor_s"]))
    out["import_cpu_s"] = import_costs(env, runs)
    out["target_s"], out["floor_margin_s"] = COLD_START_TARGET_S, COLD_START_FLOOR_MARGIN_S
    out["met"] = out["score_one_image_s"] <= COLD_START_TARGET_S and out["above_floor_s"] <= COLD_START_FLOOR_MARGIN_S
    return out


def _snapshot(model_dir: Path, copy: Path) -> Path:
    """A copy of the model folder's current version, in the same layout, that the cold-start runs
    load: writers updating the folder meanwhile (a calibration) cannot prune what they time."""
    version = current_version(model_dir)
    if version == model_dir:  # a folder of the layout before versions
        shutil.copytree(model_dir, copy, ignore=shutil.ignore_patterns(".*"))
        return copy
    shutil.copytree(version, copy / VERSIONS / version.name)
    (copy / POINTER).write_text(pointer_text(version.name))
    return copy


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


# Targets on a quiet machine: at most this in all, and at most this much above the floor.
COLD_START_TARGET_S, COLD_START_FLOOR_MARGIN_S = 0.35, 0.08


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
        report["folder"] = folder_throughput(AAEModel.load(model_dir, session_config=SessionConfig(
            device="cpu", threads=file_scoring_threads(ref.tiling is not None))), folder_images)
    if cold_start_runs:
        log(f"cold start, {cold_start_runs} runs")
        report["cold_start"] = cold_start(model_dir, cold_start_runs)
    return report
