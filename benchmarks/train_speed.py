"""Epoch time of the paper's MLP AAE on MNIST (batch 100; --limit images), one run, side by side:

- 1 process with all cores' threads, alone;
- N processes with 1 thread each (torchrun, data parallel), alone;
- 1 process beside one other CPU-bound process (a Python busy loop: one core's worth), with all
  threads and with 1 thread: what contention costs and which setting survives it;
- aae-train's OpenMP spin setting (GOMP_SPINCOUNT=1000) beside OpenMP's default (300,000);
- aae-train's default thread count, which follows the cores other processes leave idle
  (aae_train.threads), alone and beside the busy process, with both spin settings.

Each case trains 2 epochs in a fresh process and reports the second epoch's time (the first
pays for start-up and warm caches). Results: benchmarks/results/train_speed.{json,md}.

    python benchmarks/train_speed.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BUSY = "import time\nwhile True:\n    sum(i * i for i in range(10000))\n"


def epoch_seconds(cmd: list[str], env: dict) -> float:
    with tempfile.TemporaryDirectory(prefix="aae-speed-") as tmp:
        r = subprocess.run([*cmd, "--out", str(Path(tmp) / "run")], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            sys.exit(f"{' '.join(cmd[:4])}... failed: {r.stderr[-800:]}")
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["seconds"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--limit", type=int, default=20000, help="MNIST images (90 % train); 60000 for full epochs.")
    p.add_argument("--out", type=Path, default=RESULTS / "train_speed")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    base = ["mnist", "--data-dir", str(args.data_dir), "--epochs", "2", "--hidden", "1000", "--latent-dim", "8",
            "--batch-size", "100", "--seed", "0", "--limit", str(args.limit)]
    exe = str(Path(sys.executable).with_name("aae-train"))
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {cores} cores",
              "load_start": round(os.getloadavg()[0], 2), "cases": {}}
    openmp_default = {"GOMP_SPINCOUNT": "300000"}  # libgomp's own default; aae-train sets 1000 unless told
    multi = [exe, *base, "--threads", str(cores)]
    auto = [exe, *base]  # no --threads: aae_train.threads follows the idle cores
    cases = {  # name: (command, beside a busy process, extra environment)
        f"1 process x {cores} threads, alone": (multi, False, {}),
        f"1 process x {cores} threads, alone, OpenMP's default spinning": (multi, False, openmp_default),
        f"{cores} processes x 1 thread (torchrun), alone": (
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cores}", "-m", "aae_train",
             *base, "--threads", "1"], False, {"OMP_NUM_THREADS": "1"}),
        f"1 process x {cores} threads, beside a busy process": (multi, True, {}),
        f"1 process x {cores} threads, beside a busy process, OpenMP's default spinning": (multi, True, openmp_default),
        "1 process x 1 thread, beside a busy process": ([exe, *base, "--threads", "1"], True, {}),
        "1 process, threads following the idle cores (default), alone": (auto, False, {}),
        "1 process, threads following the idle cores (default), beside a busy process": (auto, True, {}),
        "1 process, threads following the idle cores, OpenMP's default spinning, alone": (auto, False, openmp_default),
        "1 process, threads following the idle cores, OpenMP's default spinning, beside a busy process": (auto, True, openmp_default),
    }
    for name, (cmd, busy, extra) in cases.items():
        print(name, flush=True)
        other = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
        try:
            report["cases"][name] = epoch_seconds(cmd, {**env, **extra})
        finally:
            if other is not None:
                other.kill()
                other.wait()
    report["load_end"] = round(os.getloadavg()[0], 2)
    c = report["cases"]
    alone = c[f"1 process x {cores} threads, alone"]
    lines = ["# Training speed: the paper's MLP AAE on MNIST, batch 100", "",
             f"Machine: {report['machine']}; load average {report['load_start']} at the start, {report['load_end']} at the end; "
             f"{report['date']}. Second epoch of 2 ({int(args.limit * 0.9):,} training images), each case a fresh process, "
             "one after another.", "",
             "| case | epoch s | vs 1 process alone |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.1f} | {v / alone:.2f} x |" for k, v in c.items()]
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
