"""Latency and throughput of an exported model: the library behind `aae-run bench`.

What is timed is what a device calls: `AAEModel.score` (a batch of preprocessed images ->
scores, through whichever graph the model scores with) and `AAEModel.sample` (prior draws ->
images), at several batch sizes, on several execution setups (ONNX Runtime on the CPU with one
thread and with every core; CUDA where a GPU is present). Also timed: scoring a folder of PNG
files (decoding overlapped with inference) and the cold start of `aae-run score one.png`.
benchmarks/latency.py adds the PyTorch eager baseline, the matmul floor and the int8/fp16
variants to the same run; it reuses `Setup`, `measure` and the writers in `report`.

Method (chosen for a shared, noisy machine): every case is warmed up first, then all cases are
timed in round-robin time slices, the order reversed every round, so that a burst of load from
another process lands on every case alike and side-by-side ratios stay fair. Each call is timed
on its own; medians, p90 and p99 come from all calls of all rounds.

numpy + onnxruntime + pillow only, like the rest of the runtime.

Modules:

- `timing`: `Setup`, `Case`, `Timing`, `make_cases`, `measure`, `summarize` (the method above).
- `setups`: the setups made from an exported model (ONNX Runtime on the CPU, CUDA with and
  without I/O binding, the session-option sweep), `variant`, `gpu_name`.
- `scenarios`: folder throughput, cold start, paced single images, and `run_bench` (all of it).
- `report`: the report's header and the writers (JSON, markdown, plot).
"""

from __future__ import annotations

from aae_runtime.bench.timing import BATCH_SIZES, OPS, Case, Setup, Timing, make_cases, measure, summarize
from aae_runtime.bench.setups import (
    BoundSample,
    BoundScore,
    cuda_setups,
    gpu_name,
    ort_cpu_setups,
    sweep_setups,
    variant,
)
from aae_runtime.bench.report import SCHEMA, header, machine_info, markdown, plot, write_report
from aae_runtime.bench.scenarios import (
    COLD_START_TARGET_S,
    aae_run_command,
    cold_start,
    folder_throughput,
    import_costs,
    paced_cost,
    run_bench,
)

__all__ = [
    "BATCH_SIZES", "OPS", "SCHEMA", "COLD_START_TARGET_S",
    "Setup", "Case", "Timing", "make_cases", "measure", "summarize",
    "ort_cpu_setups", "cuda_setups", "BoundScore", "BoundSample", "variant", "sweep_setups", "gpu_name",
    "folder_throughput", "aae_run_command", "cold_start", "import_costs", "paced_cost", "run_bench",
    "header", "machine_info", "write_report", "markdown", "plot",
]
