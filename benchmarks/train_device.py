"""Epoch time of the paper's MLP AAE on MNIST on a training device (a GPU, or the CPU), by
precision (fp32, bf16 autocast), ``--compile`` mode (torch.compile's, or the whole step as one CUDA
graph) and batch size.

Each case trains `aae_train.train.train` for ``--epochs`` epochs on the full training split
(54,000 images, held on the device as `aae-train mnist` holds them) and reports the median epoch
time after the first (which warms up, and compiles); an epoch includes its validation pass.
First the grid of precisions x compile modes at batch 100 (the paper's); then the fastest of
those at larger batches (``--batch-sizes``), since the issue asks for the figure at the fastest
batch size too (larger batches are a different recipe: fewer steps an epoch). Target on an
H100/H200-class GPU: <= 1 s an epoch at batch 100.

Resumable: finished cases are kept in ``--work-dir``/cases.json and skipped; the report
(benchmarks/results/train_device_<device>.{json,md}) is rewritten after every case.

    python benchmarks/train_device.py --data-dir ../shared/data/mnist --device cuda
    python benchmarks/train_device.py --data-dir ../shared/data/mnist --device cpu --precisions fp32 --limit 20000
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from train_floor import cpu_name  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
TARGET_S = 1.0  # an MNIST epoch at batch 100 on an H100/H200-class GPU


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--epochs", type=int, default=4, help="per case; the first warms up")
    p.add_argument("--limit", type=int, default=None, help="MNIST images (90 %% train); default all 60,000")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--compile", default=None,
                   help="--compile modes (off: eager; cuda-graph: the whole step as one CUDA graph, GPUs only; the rest "
                        "torch.compile's); default off,cuda-graph,reduce-overhead on cuda, off,default,reduce-overhead on cpu")
    p.add_argument("--batch-sizes", default="250,500,1000,2000", help="tried with the fastest case at batch 100")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "train_device")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    from aae_train.process import set_openmp_waiting

    set_openmp_waiting()  # as aae-train runs, before torch loads
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: PyTorch sees no CUDA GPU here; use --device cpu", file=sys.stderr)
        return 2
    args.work_dir.mkdir(parents=True, exist_ok=True)
    cache = args.work_dir / f"cases-{args.device}.json"
    done = json.loads(cache.read_text()) if cache.exists() else {}
    modes = args.compile or ("off,cuda-graph,reduce-overhead" if args.device == "cuda" else "off,default,reduce-overhead")
    grid = [(prec, mode, 100) for prec in args.precisions.split(",") for mode in modes.split(",")]
    failed: dict[str, str] = {}  # cases that raised: reported, not cached (a rerun tries them again)
    for case in grid:
        run_case(args, case, done, cache, failed)
    finished = [done[key(c)] for c in grid if key(c) in done]
    if finished:
        best = min(finished, key=lambda r: r["epoch_s"])
        for bs in (int(b) for b in args.batch_sizes.split(",") if b):
            run_case(args, (best["precision"], best["compile"], bs), done, cache, failed)
    report = summary(args, done, device_name(args.device, torch))
    report["failed"] = failed
    report["command"] = shlex.join(["python", "benchmarks/train_device.py", *(sys.argv[1:] if argv is None else argv)])
    stem = args.results / f"train_device_{args.device}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 1 if failed else 0


def key(case) -> str:
    precision, mode, batch = case
    return f"{precision}-{mode}-{batch}"


def run_case(args, case, done: dict, cache: Path, failed: dict) -> None:
    """Train one case (unless finished) and record its epoch times; a case that raises is
    recorded in ``failed`` (its last line) and the grid goes on."""
    from aae_runtime.contract.errors import AAEError
    from aae_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from aae_train.train import train

    if key(case) in done:
        return
    precision, mode, batch = case
    # aae-train mnist's defaults: 784-1000-1000-8 encoder, its mirror, a 8-1000-1000-1 discriminator
    cfg = RunConfig(model=ModelConfig(), data=DataConfig(source="mnist", path=str(args.data_dir), limit=args.limit),
                    train=TrainConfig(epochs=args.epochs, batch_size=batch, device=args.device, seed=0, precision=precision))
    start = time.perf_counter()
    try:
        result = train(cfg, args.work_dir / key(case), data_dir=str(args.data_dir), overwrite=True, compile_mode=mode)
    except Exception as exc:  # noqa: BLE001 - a benchmark reports every case, failed ones too
        if not isinstance(exc, AAEError):  # a bug's traceback; a refusal (AAEError) is its own message
            traceback.print_exc()
        failed[key(case)] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}"
        print(f"{key(case)}: failed ({failed[key(case)]})", flush=True)
        return
    seconds = [m["seconds"] for m in result.metrics]
    done[key(case)] = {"precision": precision, "compile": mode, "batch_size": batch, "epoch_seconds": seconds,
                       "epoch_s": round(statistics.median(seconds[1:] or seconds), 3),
                       "val_recon_loss": result.metrics[-1]["val_recon_loss"],
                       "wall_s": round(time.perf_counter() - start, 1)}
    cache.write_text(json.dumps(done, indent=1) + "\n")
    print(f"{key(case)}: {done[key(case)]['epoch_s']} s an epoch", flush=True)


def device_name(device: str, torch) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def summary(args, done: dict, name: str) -> dict:
    import torch

    rows = sorted(done.values(), key=lambda r: (r["batch_size"], r["epoch_s"]))
    at_100 = [r for r in rows if r["batch_size"] == 100]
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "device": name, "torch": torch.__version__,
            "limit": args.limit, "epochs": args.epochs, "load_average": round(os.getloadavg()[0], 2), "cases": rows,
            "fastest_at_100": min(at_100, key=lambda r: r["epoch_s"]) if at_100 else None,
            "fastest": min(rows, key=lambda r: r["epoch_s"]) if rows else None}


def markdown(r: dict) -> str:
    images = "all 54,000" if r["limit"] is None else f"{int(r['limit'] * 0.9):,}"
    lines = [f"# Training epoch time on {r['device']}: the paper's MLP AAE on MNIST", "",
             f"torch {r['torch']}; {images} training images held on the device; {r['epochs']} epochs a case, the median "
             f"of epochs 2-{r['epochs']} (the first warms up and compiles); an epoch includes its validation pass; "
             f"load average {r['load_average']}; {r['date']}.", "",
             "| precision | torch.compile | batch | epoch s | epochs s | val recon loss |", "|---|---|---:|---:|---|---:|"]
    for c in r["cases"]:
        lines.append(f"| {c['precision']} | {c['compile']} | {c['batch_size']} | {c['epoch_s']} | "
                     f"{', '.join(str(s) for s in c['epoch_seconds'])} | {c['val_recon_loss']:.4f} |")
    if r["fastest_at_100"]:
        f = r["fastest_at_100"]
        lines += ["", f"**Fastest at batch 100: {f['epoch_s']} s an epoch ({f['precision']}, compile {f['compile']})** "
                      f"(target on an H100/H200-class GPU: <= {TARGET_S:g} s)."]
    for name, why in r.get("failed", {}).items():
        lines += ["", f"Case {name} failed: {why}"]
    lines += ["", f"Produced by `{r['command']}`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
