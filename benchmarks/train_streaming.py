"""Training on a folder larger than the process's memory: `aae-train folder --loader stream`.

Writes a folder of random RGB images (BMP, so that the files on disk are as large as the
8-bit pixels) whose files alone are larger than a memory cap, then trains one epoch in a memory
cgroup with that cap (the whole process tree: the training process and its decoding workers):

- ``--loader auto`` under the cap (auto must choose to stream; the run must finish);
- ``--loader memory`` under the cap (expected to be killed: the decoded folder is 4 x its files);
- ``--loader memory`` and ``--loader stream`` without a cap, side by side: epoch times and peaks.

Memory is the peak of the summed proportional set size (Pss: shared pages split between the
processes sharing them) of the processes in the cgroup, sampled every 0.1 s, and the cgroup's
own peak of charged memory (which also counts the page cache the kernel gives back under the
cap). Needs root (to make a cgroup, v1 or v2). Resumable: the folder and each finished case are
kept under ``runs/train_streaming``.

    python benchmarks/train_streaming.py                # 30,000 images 128 x 128, cap 1.25 GiB
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")


def make_folder(folder: Path, n: int, size: int) -> int:
    """``n`` random size x size RGB BMP files in sub-folders of 1,000 (kept once complete); their bytes."""
    done = folder / "complete.json"
    if done.exists() and json.loads(done.read_text())["images"] == n:
        return json.loads(done.read_text())["bytes"]
    from PIL import Image

    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    total = 0
    for i in range(n):
        sub = folder / "images" / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)  # blocky, like a part at low resolution
        img = np.kron(low, np.ones((8, 8, 1), np.uint8)) ^ rng.integers(0, 32, (size, size, 3), dtype=np.uint8)
        path = sub / f"{i:06d}.bmp"
        Image.fromarray(img).save(path)
        total += path.stat().st_size
    done.write_text(json.dumps({"images": n, "bytes": total}))
    return total


class Cgroup:
    """A memory cgroup (v1 or v2) with a limit, for one command's process tree."""

    def __init__(self, name: str, limit: int | None):
        self.v1 = (CGROUP_V1 / "memory.limit_in_bytes").exists() or CGROUP_V1.is_dir() and (CGROUP_V1 / "cgroup.procs").exists()
        self.path = (CGROUP_V1 if self.v1 else CGROUP_V2) / name
        self.path.mkdir(exist_ok=True)
        if limit is not None:
            (self.path / ("memory.limit_in_bytes" if self.v1 else "memory.max")).write_text(str(limit))
            if not self.v1:
                (self.path / "memory.swap.max").write_text("0")

    def enter(self) -> None:  # in the child, before exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def pids(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def peak(self) -> int:
        name = "memory.max_usage_in_bytes" if self.v1 else "memory.peak"
        try:
            return int((self.path / name).read_text())
        except OSError:
            return 0

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_case(name: str, cmd: list[str], cap: int | None, runs: Path) -> dict:
    result_file = runs / f"{name}.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    group = Cgroup(f"aae-bench-{name}-{os.getpid()}", cap)
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], sum(pss(p) for p in group.pids()))
            except OSError:
                pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, preexec_fn=group.enter, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    sampler.start()
    output = proc.communicate()[0]
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    charged = group.peak()
    group.remove()
    out_dir = Path(cmd[cmd.index("--out") + 1])
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()] if (out_dir / "metrics.jsonl").exists() else []
    lines = [line for line in output.splitlines() if line.strip()]
    result = {"name": name, "rc": proc.returncode, "wall_s": round(wall, 1), "peak_pss": peak[0], "peak_charged": charged,
              "cap": cap, "epoch_s": metrics[-1]["seconds"] if metrics else None,
              "said": [line for line in lines if line.startswith(("training on", "error", "warning"))][:3] or lines[-2:]}
    result_file.write_text(json.dumps(result, indent=1))
    return result


def mib(n: int | None) -> str:
    return "-" if not n else f"{n / (1 << 20):,.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=30_000)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--cap-mib", type=int, default=1280)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "train_streaming")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_streaming.md")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root, to make a memory cgroup for the runs")
    args.runs.mkdir(parents=True, exist_ok=True)
    folder = args.runs / "folder"
    files = make_folder(folder, args.images, args.size)
    decoded = args.images * 3 * args.size * args.size * 4
    cap = args.cap_mib << 20
    load = os.getloadavg()[0]
    train = [str(ROOT / ".venv" / "bin" / "aae-train"), "folder", str(folder / "images"), "--size", str(args.size),
             "--color", "RGB", "--arch", "mlp", "--hidden", "32", "--latent-dim", "8", "--epochs", "1",
             "--threads", "1", "--overwrite"]
    cases = [("stream_capped", ["--loader", "auto"], cap), ("memory_capped", ["--loader", "memory"], cap),
             ("memory", ["--loader", "memory"], None), ("stream", ["--loader", "stream"], None)]
    results = [run_case(name, train + extra + ["--out", str(args.runs / name)], limit, args.runs) for name, extra, limit in cases]
    when = time.strftime("%Y-%m-%d %H:%M")
    rows = []
    for r in results:
        outcome = "finished" if r["rc"] == 0 else ("killed at the cap (out of memory)" if r["rc"] in (-9, 137) else f"exit {r['rc']}")
        rows.append(f"| {r['name']} | {mib(r['cap']) if r['cap'] else 'none'} | {outcome} | "
                    f"{r['epoch_s'] if r['epoch_s'] is not None else '-'} | {r['wall_s']} | {mib(r['peak_pss'])} | {mib(r['peak_charged'])} |")
    text = f"""# Training on a folder larger than memory

Machine: {platform.machine()}, {os.cpu_count()} cores; load average {load:.2f} at the start; {when}.
Folder: {args.images:,} random {args.size} x {args.size} RGB BMP files, {files / (1 << 20):,.0f} MiB on disk,
{decoded / (1 << 30):.1f} GiB decoded as float32 inputs (what `--loader memory` holds). One epoch of
`aae-train folder --size {args.size} --color RGB --arch mlp --hidden 32 --threads 1` (AAE, batch 100), each case a fresh
process tree in its own memory cgroup; the default number of decoding workers.

| case | memory cap | outcome | epoch s | wall s | peak Pss (all processes) | peak charged to the cgroup |
|---|---|---|---:|---:|---:|---:|
{chr(10).join(rows)}

Peak Pss: the training process and its workers, shared pages split between them. "Charged" also
counts the page cache of the files read, which the kernel takes back under a cap.
Produced by `python benchmarks/train_streaming.py` (root: it makes memory cgroups).
"""
    args.out.write_text(text)
    (args.out.with_suffix(".json")).write_text(json.dumps({"results": results, "files_bytes": files, "decoded_bytes": decoded,
                                                           "load": load, "when": when}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
