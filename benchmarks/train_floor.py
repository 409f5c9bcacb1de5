"""How near the machine's limit one epoch of the paper's MLP AAE on MNIST runs (batch 100).

The floor of an epoch is what it cannot go below on this CPU:

- its matrix multiplications: every mm/addmm/bmm the real training steps and the epoch's
  validation pass dispatch (forward and backward of all phases, recorded with a dispatch mode
  on the real loop, with their shapes and memory layouts), each timed alone on this CPU at the
  same thread count, times how often an epoch runs it;
- its optimiser updates: the bytes Adam must move (read weight, gradient and both moments,
  write weight and moments: 28 bytes a parameter) at the memory bandwidth measured here with
  the same pattern (an in-place update of arrays far larger than the caches).

Epochs are trained by `aae_train.train.train` on the full training split (54,000 images) in
this process. This machine's speed drifts by tens of percent from minute to minute (a shared
virtual machine), so the floor's rates are measured again after every epoch and each epoch is
compared with the floor measured on either side of it; the report gives every epoch after the
first and the median ratio. Target: epoch <= 1.25 x floor.
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--limit", type=int, default=None, help="MNIST images (90 %% train); default all 60,000")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=RESULTS / "train_floor")
    args = p.parse_args(argv)
    from aae_train.process import set_openmp_waiting

    set_openmp_waiting()  # as aae-train runs, before torch loads
    import torch

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    epochs, floors, cfg, trainer, (step_ops, eval_ops) = measure_epochs(args)
    steps = len(trainer.train_x) // cfg.train.batch_size
    params = sum(p.numel() for opt, _ in trainer.optimizers.values() for g in opt.param_groups for p in g["params"])
    flop = sum(n * op_flop(k) for k, n in step_ops.items()) * steps + sum(n * op_flop(k) for k, n in eval_ops.items())
    adam_bytes = 28 * params * steps
    rows = []
    for i in range(1, len(epochs)):  # the first epoch warms up; each later one between two floor measurements
        before, after = floors[i - 1], floors[i]
        matmul_s = (before["matmul_s"] + after["matmul_s"]) / 2
        bandwidth = (before["bandwidth"] + after["bandwidth"]) / 2
        floor = matmul_s + adam_bytes / bandwidth
        rows.append({"epoch": i + 1, "epoch_s": round(epochs[i], 2), "matmul_floor_s": round(matmul_s, 2),
                     "matmul_rate_gflops": round(flop / matmul_s / 1e9, 1), "bandwidth_gbps": round(bandwidth / 1e9, 1),
                     "optimizer_floor_s": round(adam_bytes / bandwidth, 2), "floor_s": round(floor, 2),
                     "ratio": round(epochs[i] / floor, 3)})
    median = sorted(rows, key=lambda r: r["ratio"])[(len(rows) - 1) // 2]  # a real epoch: the lower median
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "cpu": cpu_name(), "threads": args.threads, "GOMP_SPINCOUNT": os.environ["GOMP_SPINCOUNT"],
        "load_start": round(load_start, 2), "load_end": round(os.getloadavg()[0], 2), "train_images": len(trainer.train_x),
        "steps": steps, "epoch_seconds": epochs, "matmul_tflop": round(flop / 1e12, 3),
        "optimizer_params_per_step": params, "optimizer_gbytes": round(adam_bytes / 1e9, 1),
        "epochs": rows, "median": median, "ratio": median["ratio"],
        "matmul_shapes": {str(k): {"per_step": step_ops.get(k, 0), "per_validation": eval_ops.get(k, 0)}
                          for k in set(step_ops) | set(eval_ops)},
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def measure_epochs(args):
    """Train on MNIST with `train`; after each epoch (outside its timed span) measure the floor's
    rates. Returns the epochs' seconds, the floor measured after each, the config, the trainer and
    the recorded multiplications (of one step and of one validation pass)."""
    from aae_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from aae_train import train as loop

    # aae-train mnist's defaults: 784-1000-1000-8 encoder, its mirror, a 8-1000-1000-1 discriminator
    cfg = RunConfig(model=ModelConfig(), data=DataConfig(source="mnist", path=str(args.data_dir), limit=args.limit),
                    train=TrainConfig(epochs=args.epochs, batch_size=100, device="cpu", seed=0))
    captured, floors = {}, []
    original = loop.Trainer.__init__

    def keep(self, *a, **kw):
        original(self, *a, **kw)
        captured["trainer"] = self

    def after_epoch(metrics):
        trainer = captured["trainer"]
        if "ops" not in captured:  # once: an extra step on a copy, so the run itself is untouched
            captured["ops"] = record_ops(trainer)
        step_ops, eval_ops = captured["ops"]
        steps = len(trainer.train_x) // cfg.train.batch_size
        timed = {key: time_op(key) for key in set(step_ops) | set(eval_ops)}
        floors.append({"matmul_s": sum(n * timed[k] for k, n in step_ops.items()) * steps
                       + sum(n * timed[k] for k, n in eval_ops.items()), "bandwidth": memory_bandwidth()})
        print(f"epoch {metrics['epoch']}: {metrics['seconds']:.2f} s; matmul floor {floors[-1]['matmul_s']:.2f} s, "
              f"{floors[-1]['bandwidth'] / 1e9:.1f} GB/s", flush=True)

    loop.Trainer.__init__ = keep
    try:
        with tempfile.TemporaryDirectory(prefix="aae-floor-") as tmp:
            result = loop.train(cfg, Path(tmp) / "run", data_dir=str(args.data_dir), on_epoch=after_epoch)
    finally:
        loop.Trainer.__init__ = original
    return [m["seconds"] for m in result.metrics], floors, cfg, captured["trainer"], captured["ops"]


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
        family.step(Batch(x, None))
    with Record() as validation:
        trainer.evaluate()
    return step.calls, validation.calls


def op_flop(key) -> int:
    """FLOP of one call of a recorded matrix multiplication."""
    kind, tensors = key
    (*_, (a, _sa), (b, _sb)) = tensors
    return 2 * a[-2] * a[-1] * b[-1] * (a[0] if kind == "bmm" else 1)


def time_op(key) -> float:
    """Median seconds of one call of the recorded matrix multiplication, same shapes and layouts,
    timed alone (its operands stay in cache: the best this CPU does for that shape)."""
    import torch

    kind, tensors = key
    args = [torch.empty_strided(shape, stride).normal_() for shape, stride in tensors]
    op = {"mm": torch.mm, "addmm": torch.addmm, "bmm": torch.bmm}[kind]
    for _ in range(5):
        op(*args)
    reps = max(5, min(1000, int(0.05 / max(1e-6, _once(op, args)))))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            op(*args)
        times.append((time.perf_counter() - start) / reps)
    return statistics.median(times)


def _once(op, args) -> float:
    start = time.perf_counter()
    op(*args)
    return time.perf_counter() - start


def memory_bandwidth() -> float:
    """Bytes a second of an in-place update over 256 MiB arrays, as Adam moves them (a += b * c:
    three arrays read, the first written back in place), median of 9."""
    import torch

    a, b, c = torch.ones(64 << 20), torch.ones(64 << 20), torch.ones(64 << 20)
    a.addcmul_(b, c)
    times = []
    for _ in range(9):
        start = time.perf_counter()
        a.addcmul_(b, c, value=1e-7)
        times.append(time.perf_counter() - start)
    return 4 * a.numel() * 4 / statistics.median(times)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def markdown(r: dict) -> str:
    m = r["median"]
    rows = "\n".join(f"| {e['epoch']} | {e['epoch_s']} | {e['matmul_floor_s']} ({e['matmul_rate_gflops']} GFLOP/s) | "
                     f"{e['optimizer_floor_s']} ({e['bandwidth_gbps']} GB/s) | {e['floor_s']} | {e['ratio']} |" for e in r["epochs"])
    return f"""# Training speed against the machine's floor: the paper's MLP AAE on MNIST, batch 100

Machine: {r['machine']} ({r['cpu']}), {r['threads']} threads, GOMP_SPINCOUNT={r['GOMP_SPINCOUNT']}; load average
{r['load_start']} at the start, {r['load_end']} at the end; {r['date']}. {r['train_images']:,} training images,
{r['steps']} steps an epoch. An epoch's work: {r['matmul_tflop']} TFLOP of matrix multiplications (all phases,
forward and backward, and the validation pass) and {r['optimizer_gbytes']} GB of Adam updates
({r['optimizer_params_per_step']:,} parameters a step, 28 bytes each). The floor's rates were measured
after every epoch; each epoch is compared with the mean of the measurements on either side of it
(the first epoch warms up: {r['epoch_seconds'][0]:.2f} s).

| epoch | seconds | matmul floor s | Adam floor s | floor s | epoch / floor |
|---:|---:|---:|---:|---:|---:|
{rows}

**Median epoch: {m['epoch_s']} s against a floor of {m['floor_s']} s: {m['ratio']} x** (target <= 1.25).

Each distinct multiplication (shape and memory layout, as the loop dispatched it; {len(r['matmul_shapes'])}
of them) was timed alone at the same thread count, its operands in cache. Produced by
`python benchmarks/train_floor.py --data-dir ../shared/data/mnist`.
"""


if __name__ == "__main__":
    main()
