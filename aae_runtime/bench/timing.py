"""The timing core of the benchmark: `Setup` (one way of running the model), `Case` (a setup,
an operation and a batch size), `Timing` (how long to measure), `make_cases`, `measure` (warm-up,
then round-robin slices, as the package docstring describes) and `summarize` (median, p90, p99
and throughput of one case), with the batch sizes and operations timed by default.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from aae_runtime.contract.errors import InputError

BATCH_SIZES = (1, 8, 64, 256)
OPS = ("score", "sample")


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
    """Warm every case up, then time them in round-robin slices (see the package docstring)."""
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


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
