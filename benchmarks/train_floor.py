"""How near the machine's limit one epoch of the paper's MLP AAE on MNIST runs (batch 100).

The floor of an epoch is what it cannot go below on this CPU:

- its matrix multiplications: every mm/addmm/bmm the real training steps and the epoch's
  validation pass dispatch (forward and backward of all phases, recorded with a dispatch mode
  on the real loop, with their shapes and memory layouts), each run alone on this CPU at the
  same thread count, with its operands in cache, as often as the epoch runs it;
- its optimiser updates: the bytes Adam must move (read weight, gradient and both moments,
  write weight and moments: 28 bytes a parameter) at the memory bandwidth measured here with
  the same pattern (an in-place update of arrays far larger than the caches).

Epochs are trained by `aae_train.train.train` on the full training split (54,000 images) in
this process. This machine's speed drifts by tens of percent from minute to minute (a shared
virtual machine), so the floor is measured side by side with the epoch it is compared with:
every ten training steps the loop's progress callback replays those ten steps' multiplications
alone and measures the bandwidth once, and after the epoch the validation pass's
multiplications are replayed. The time spent in the callback is taken out of the epoch's time.
The first epoch warms up (and records the multiplications); the report gives every later epoch
and the medians. Target: epoch <= 1.25 x floor.

``--threads 1,2`` measures several thread counts in one run: the epochs after the first take them
in turn (the count changes between epochs, outside their timing), each floor measured at its own
epoch's count. The report gives each count's median and the machine's: its fastest epoch against
its lowest floor, whatever counts they came from.
Results: benchmarks/results/train_floor.{json,md}.

    python benchmarks/train_floor.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
ADAM_BYTES = 28  # a parameter's update: weight, gradient and both moments read; weight and moments written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--epochs", type=int, help="default: one to warm up and three for each thread count")
    p.add_argument("--limit", type=int, default=None, help="MNIST images (90 %% train); default all 60,000")
    p.add_argument("--threads", type=thread_counts, default=[os.cpu_count() or 1],
                   help="torch threads, or several counts taken in turn epoch by epoch (e.g. 1,2); default all cores")
    p.add_argument("--out", type=Path, default=RESULTS / "train_floor")
    args = p.parse_args(argv)
    from aae_train.process import set_openmp_waiting

    set_openmp_waiting()  # as aae-train runs, before torch loads
    import torch

    if args.epochs is None:
        args.epochs = 1 + 3 * len(args.threads)
    if args.epochs < 1 + len(args.threads):
        p.error(f"--epochs {args.epochs} measures no epoch at some thread count: give at least {1 + len(args.threads)}")
    torch.set_num_threads(args.threads[0])
    load_start = os.getloadavg()[0]
    epochs, cfg, trainer, (step_ops, eval_ops), params = measure_epochs(args)
    steps = len(trainer.train_x) // cfg.train.batch_size
    flop = sum(n * op_flop(k) for k, n in step_ops.items()) * steps + sum(n * op_flop(k) for k, n in eval_ops.items())
    adam_bytes = ADAM_BYTES * params * steps
    rows = []
    for e in epochs[1:]:  # the first epoch warms up and records the multiplications
        floor = e["matmul_s"] + e["optimizer_s"]
        rows.append({"epoch": e["epoch"], "threads": e["threads"], "epoch_s": round(e["epoch_s"], 2), "matmul_floor_s": round(e["matmul_s"], 2),
                     "matmul_rate_gflops": round(flop / e["matmul_s"] / 1e9, 1), "bandwidth_gbps": round(e["bandwidth"] / 1e9, 1),
                     "optimizer_floor_s": round(e["optimizer_s"], 2), "floor_s": round(floor, 2),
                     "replay_s": round(e["replay_s"], 2), "ratio": round(e["epoch_s"] / floor, 3)})
    by_threads = {t: summary([r for r in rows if r["threads"] == t]) for t in args.threads}
    fastest = min(by_threads.items(), key=lambda kv: kv[1]["epoch_s"])
    lowest = min(by_threads.items(), key=lambda kv: kv[1]["floor_s"])
    best = {"epoch_threads": fastest[0], "epoch_s": fastest[1]["epoch_s"], "floor_threads": lowest[0],
            "floor_s": lowest[1]["floor_s"], "ratio": round(fastest[1]["epoch_s"] / lowest[1]["floor_s"], 3)}
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "cpu": cpu_name(), "threads": args.threads, "GOMP_SPINCOUNT": os.environ["GOMP_SPINCOUNT"],
        "load_start": round(load_start, 2), "load_end": round(os.getloadavg()[0], 2), "train_images": len(trainer.train_x),
        "steps": steps, "epoch_seconds": [round(e["epoch_s"], 3) for e in epochs], "matmul_tflop": round(flop / 1e12, 3),
        "optimizer_params_per_step": params, "optimizer_gbytes": round(adam_bytes / 1e9, 1),
        "epochs": rows, "by_threads": {str(t): v for t, v in by_threads.items()}, "best": best,
        "ratio": best["ratio"],
        "matmul_shapes": {str(k): {"per_step": step_ops.get(k, 0), "per_validation": eval_ops.get(k, 0)}
                          for k in set(step_ops) | set(eval_ops)},
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def measure_epochs(args):
    """Train on MNIST with `train`, the floor measured beside it (module docstring). Returns per
    epoch its seconds (less the time the measurements took) and its floor's parts, the config,
    the trainer, the recorded multiplications (of one step and of one validation pass) and the
    parameters Adam updates in a step."""
    from aae_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from aae_train import train as loop

    # aae-train mnist's defaults: 784-1000-1000-8 encoder, its mirror, a 8-1000-1000-1 discriminator
    cfg = RunConfig(model=ModelConfig(), data=DataConfig(source="mnist", path=str(args.data_dir), limit=args.limit),
                    train=TrainConfig(epochs=args.epochs, batch_size=100, device="cpu", seed=0))
    captured, epochs = {}, []
    current = {"done": 0, "callback_s": 0.0, "matmul_s": 0.0, "optimizer_s": 0.0, "bandwidths": []}
    original = loop.Trainer.__init__

    def keep(self, *a, **kw):
        original(self, *a, **kw)
        captured["trainer"] = self

    def after_steps(done, steps, losses):  # inside the timed epoch: its own time is taken out
        start = time.perf_counter()
        if "replay" in captured:
            k, current["done"] = done - current["done"], done
            current["matmul_s"] += captured["replay"].run(captured["ops"][0], k)
            bandwidth = captured["bandwidth"].measure()
            current["bandwidths"].append(bandwidth)
            current["optimizer_s"] += k * ADAM_BYTES * captured["params"] / bandwidth
        current["callback_s"] += time.perf_counter() - start

    def after_epoch(metrics):  # outside the timed epoch
        import torch

        trainer = captured["trainer"]
        threads = torch.get_num_threads()  # the count this epoch ran at
        if "replay" not in captured:  # once: an extra step on a copy, so the run itself is untouched
            captured["ops"] = record_ops(trainer)
            captured["replay"], captured["bandwidth"] = Replay(captured["ops"], args.threads), Bandwidth()
            captured["params"] = sum(p.numel() for opt, _ in trainer.optimizers.values()
                                     for g in opt.param_groups for p in g["params"])
            row = {"epoch": metrics["epoch"], "threads": threads, "epoch_s": metrics["seconds"] - current["callback_s"]}
        else:
            current["matmul_s"] += captured["replay"].run(captured["ops"][1], 1)  # the validation pass
            row = {"epoch": metrics["epoch"], "threads": threads, "epoch_s": metrics["seconds"] - current["callback_s"],
                   "matmul_s": current["matmul_s"], "optimizer_s": current["optimizer_s"],
                   "bandwidth": statistics.median(current["bandwidths"]), "replay_s": current["callback_s"]}
        epochs.append(row)
        print(f"epoch {row['epoch']} ({threads} threads): {row['epoch_s']:.2f} s" + (f"; floor {row['matmul_s']:.2f} s of multiplications + "
              f"{row['optimizer_s']:.2f} s of Adam ({row['bandwidth'] / 1e9:.1f} GB/s)" if "matmul_s" in row else ""), flush=True)
        current.update(done=0, callback_s=0.0, matmul_s=0.0, optimizer_s=0.0, bandwidths=[])
        torch.set_num_threads(args.threads[(metrics["epoch"] - 1) % len(args.threads)])  # the next epoch's

    loop.Trainer.__init__ = keep
    try:
        with tempfile.TemporaryDirectory(prefix="aae-floor-") as tmp:
            loop.train(cfg, Path(tmp) / "run", data_dir=str(args.data_dir), on_epoch=after_epoch, on_step=after_steps)
    finally:
        loop.Trainer.__init__ = original
    return epochs, cfg, captured["trainer"], captured["ops"], captured["params"]


def record_ops(trainer) -> tuple[Counter, Counter]:
    """The matrix multiplications of one training step and of one validation pass: (op, shapes, strides) -> count."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    kinds = {aten.mm.default: "mm", aten.addmm.default: "addmm", aten.bmm.default: "bmm"}

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in kinds:
                tensors = tuple((tuple(t.shape), tuple(t.stride())) for t in args if isinstance(t, torch.Tensor))
                self.calls[(kinds[func], tensors)] += 1
            return func(*args, **(kwargs or {}))

    from aae_train.families.base import Batch

    x = trainer.train_x[: trainer.cfg.train.batch_size]
    family = copy.deepcopy(trainer.family)  # its networks, optimisers and RNG streams: the run goes on untouched
    with Record() as step:
        family.step(Batch(x, None), [torch.from_numpy(d) for d in family.host_draws(len(x))])
    with Record() as validation:
        trainer.evaluate()
    return step.calls, validation.calls


def op_flop(key) -> int:
    """FLOP of one call of a recorded matrix multiplication."""
    kind, tensors = key
    (*_, (a, _sa), (b, _sb)) = tensors
    return 2 * a[-2] * a[-1] * b[-1] * (a[0] if kind == "bmm" else 1)


class Replay:
    """The recorded multiplications, each with operands of its shapes and layouts made once."""

    def __init__(self, ops: tuple[Counter, Counter], thread_counts: list[int]):
        import torch

        functions = {"mm": torch.mm, "addmm": torch.addmm, "bmm": torch.bmm}
        self.calls = {}
        for kind, tensors in set(ops[0]) | set(ops[1]):
            args = [torch.empty_strided(shape, stride).normal_() for shape, stride in tensors]
            self.calls[(kind, tensors)] = (functions[kind], args)
        threads = torch.get_num_threads()
        for count in thread_counts:  # warm at every count: the first calls allocate and pick kernels
            torch.set_num_threads(count)
            for op, args in self.calls.values():
                for _ in range(3):
                    op(*args)
        torch.set_num_threads(threads)

    def run(self, ops: Counter, times: int) -> float:
        """Seconds to run every multiplication of ``ops`` as often as ``times`` passes call it, alone
        (one after the other, each one's operands in cache: the best this CPU does for that shape)."""
        start = time.perf_counter()
        for key, n in ops.items():
            op, args = self.calls[key]
            for _ in range(n * times):
                op(*args)
        return time.perf_counter() - start


class Bandwidth:
    """Bytes a second of an in-place update of 64 MiB arrays (far larger than the caches), as Adam
    moves them (a += b * c: three arrays read, the first written back in place)."""

    def __init__(self, elements: int = 16 << 20):
        import torch

        self.a, self.b, self.c = torch.ones(elements), torch.ones(elements), torch.ones(elements)
        self.a.addcmul_(self.b, self.c)

    def measure(self) -> float:
        start = time.perf_counter()
        self.a.addcmul_(self.b, self.c, value=1e-7)
        return 4 * self.a.numel() * 4 / (time.perf_counter() - start)


def thread_counts(text: str) -> list[int]:
    """``--threads``: one count or several, comma-separated, each at least 1."""
    try:
        counts = [int(t) for t in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of distinct thread counts like 1,2")
    return counts


def summary(rows: list[dict]) -> dict:
    """One thread count's figures: its median epoch, floor and ratio (each the lower median)."""
    def median(key):
        values = sorted(r[key] for r in rows)
        return values[(len(values) - 1) // 2]

    return {"epochs": len(rows), "epoch_s": median("epoch_s"), "floor_s": median("floor_s"), "ratio": median("ratio"),
            "matmul_rate_gflops": median("matmul_rate_gflops"), "bandwidth_gbps": median("bandwidth_gbps")}


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def markdown(r: dict) -> str:
    rows = "\n".join(f"| {e['epoch']} | {e['threads']} | {e['epoch_s']} | {e['matmul_floor_s']} ({e['matmul_rate_gflops']} GFLOP/s) | "
                     f"{e['optimizer_floor_s']} ({e['bandwidth_gbps']} GB/s) | {e['floor_s']} | {e['ratio']} | {e['replay_s']} |"
                     for e in r["epochs"])
    counts = "\n".join(f"| {t} | {v['epochs']} | {v['epoch_s']} | {v['floor_s']} | {v['matmul_rate_gflops']} | "
                       f"{v['bandwidth_gbps']} | **{v['ratio']} x** |" for t, v in r["by_threads"].items())
    m = r["best"]
    threads = ", ".join(map(str, r["threads"]))
    return f"""# Training speed against the machine's floor: the paper's MLP AAE on MNIST, batch 100

Machine: {r['machine']} ({r['cpu']}), threads {threads} (taken in turn epoch by epoch), GOMP_SPINCOUNT={r['GOMP_SPINCOUNT']};
load average {r['load_start']} at the start, {r['load_end']} at the end; {r['date']}. {r['train_images']:,} training images,
{r['steps']} steps an epoch. An epoch's work: {r['matmul_tflop']} TFLOP of matrix multiplications (all phases,
forward and backward, and the validation pass) and {r['optimizer_gbytes']} GB of Adam updates
({r['optimizer_params_per_step']:,} parameters a step, {ADAM_BYTES} bytes each). The floor was measured beside
each epoch at its thread count: every ten steps the loop's callback ran those steps' multiplications alone
and measured the bandwidth once, and the validation pass's multiplications were run after the epoch; the
epoch's seconds exclude that time ("replay s"). The first epoch warms up: {r['epoch_seconds'][0]:.2f} s.

| epoch | threads | seconds | matmul floor s | Adam floor s | floor s | epoch / floor | replay s |
|---:|---:|---:|---:|---:|---:|---:|---:|
{rows}

Medians per thread count:

| threads | epochs | epoch s | floor s | matmul GFLOP/s | bandwidth GB/s | epoch / floor |
|---:|---:|---:|---:|---:|---:|---:|
{counts}

**The machine: fastest epoch {m['epoch_s']} s ({plural(m['epoch_threads'], 'thread')}) against the lowest floor {m['floor_s']} s
({plural(m['floor_threads'], 'thread')}): {m['ratio']} x** (target <= 1.25).

Each distinct multiplication (shape and memory layout, as the loop dispatched it; {len(r['matmul_shapes'])}
of them) was run alone at the epoch's thread count, its operands in cache. Produced by
`python benchmarks/train_floor.py --data-dir ../shared/data/mnist --threads {",".join(map(str, r["threads"]))}`.
"""


if __name__ == "__main__":
    main()
