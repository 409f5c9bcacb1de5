"""Time and peak memory of scoring one whole photo with a tiled model, by photo size.

Each size runs in a fresh process (`aae-run score PHOTO --model DIR --maps OUT --maps-raw`, the
command a device runs) under ``/usr/bin/time``-like accounting (``resource.getrusage`` of the
child), so the peak resident memory includes the interpreter, ONNX Runtime and the maps. The
photos are scikit-image's grass photograph mirrored out to the size (a real texture, any size).

    python benchmarks/photo_scoring.py --model runs/textures/grass/aae/model --sizes 512,1024,2048

Writes benchmarks/results/photo_scoring.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def make_photo(side: int, path: Path) -> Path:
    from PIL import Image
    from skimage.data import grass

    g = grass()
    reps = -(-side // g.shape[0])
    tiled = np.block([[g if (i + j) % 2 == 0 else g[:, ::-1] for j in range(reps)] for i in range(reps)])[:side, :side]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(tiled).save(path)
    return path


def measure(model: Path, photo: Path, out: Path, batch: int, threads: int) -> dict:
    """One fresh `aae-run score` process: wall seconds and the child's peak RSS (MiB)."""
    cmd = [str(Path(sys.executable).parent / "aae-run"), "score", str(photo), "--model", str(model), "--maps", str(out),
           "--maps-raw", "--batch-size", str(batch), "--threads", str(threads), "--device", "cpu"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": round(wall, 2), "peak_rss_mib": round(max(peak, before) / 1024, 1)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--sizes", default="512,1024,2048")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "photo_scoring")
    args = p.parse_args(argv)
    rows = []
    for side in (int(s) for s in args.sizes.split(",")):  # ascending: ru_maxrss of children only grows
        photo = make_photo(side, args.work_dir / f"photo_{side}.png")
        rows.append({"side": side, **measure(args.model, photo, args.work_dir / f"maps_{side}", args.batch_size, args.threads)})
        print(rows[-1], flush=True)
    report = {"model": str(args.model), "batch_size": args.batch_size, "threads": args.threads, "rows": rows,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "photo_scoring.json").write_text(json.dumps(report, indent=2))
    lines = ["# Scoring one whole photo (tiled model): time and peak memory", "",
             f"Machine: {report['machine']}; one fresh `aae-run score --maps --maps-raw` process per photo, "
             f"{args.threads} thread(s), {args.batch_size} tiles per call.", "",
             "| photo | seconds | peak RSS (MiB) |", "|---|---|---|"]
    lines += [f"| {r['side']} x {r['side']} | {r['seconds']} | {r['peak_rss_mib']} |" for r in rows]
    (RESULTS / "photo_scoring.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
