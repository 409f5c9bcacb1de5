"""Time and peak memory of scoring one whole photo with a tiled model, by photo size.

Each size runs in a fresh process (`aae-run score PHOTO --model DIR --maps OUT --maps-raw`, the
command a device runs) and its peak resident memory (``resource.getrusage`` of that child alone) includes the
interpreter, ONNX Runtime and, in the second column, drawing and saving the maps. The
photos are scikit-image's grass photograph mirrored out to the size (a real texture, any size).

    python benchmarks/photo_scoring.py --model runs/textures/grass/aae/model --sizes 512,1024,2048

Writes benchmarks/results/photo_scoring.{json,md} (``--name``: another stem).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
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


def family_of(model: Path) -> str:
    from aae_runtime.contract.modelfolder import current_version

    meta = current_version(model) / "metadata.json"
    return json.loads(meta.read_text()).get("family", "?") if meta.is_file() else "?"


def measure(model: Path, photo: Path, out: Path | None, batch: int, threads: int) -> dict:
    """One fresh `aae-run score` process (with ``out``: also --maps --maps-raw): wall seconds and
    its peak RSS (MiB), read in a small wrapper process whose only child it is."""
    maps = ["--maps", str(out), "--maps-raw"] if out is not None else []
    cmd = [str(Path(sys.executable).parent / "aae-run"), "score", str(photo), "--model", str(model), *maps,
           "--batch-size", str(batch), "--threads", str(threads), "--device", "cpu"]
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")  # this child's peak alone
    start = time.perf_counter()
    peak = subprocess.run([sys.executable, "-c", wrapper, *cmd], check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - start
    return {"seconds": round(wall, 2), "peak_rss_mib": round(int(peak) / 1024, 1)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--sizes", default="512,1024,2048")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "photo_scoring")
    p.add_argument("--name", default="photo_scoring", help="results file stem (benchmarks/results/NAME.json and .md)")
    args = p.parse_args(argv)
    rows = []
    for side in (int(s) for s in args.sizes.split(",")):  # ascending: ru_maxrss of children only grows
        photo = make_photo(side, args.work_dir / f"photo_{side}.png")
        plain = measure(args.model, photo, None, args.batch_size, args.threads)
        drawn = measure(args.model, photo, args.work_dir / f"maps_{side}", args.batch_size, args.threads)
        rows.append({"side": side, "seconds": plain["seconds"], "peak_rss_mib": plain["peak_rss_mib"],
                     "seconds_with_maps": drawn["seconds"], "peak_rss_mib_with_maps": drawn["peak_rss_mib"]})
        print(rows[-1], flush=True)
    report = {"model": str(args.model), "batch_size": args.batch_size, "threads": args.threads, "rows": rows,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    lines = [f"# Scoring one whole photo (tiled model, family {family_of(args.model)}): time and peak memory", "",
             f"Machine: {report['machine']}; one fresh `aae-run score` process per photo and column (start-up "
             f"included), {args.threads} thread(s), {args.batch_size} tiles per call; tile "
             "stride half a tile.", "",
             "| photo | score: seconds | score: peak RSS (MiB) | with --maps --maps-raw: seconds | peak RSS (MiB) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['side']} x {r['side']} | {r['seconds']} | {r['peak_rss_mib']} | {r['seconds_with_maps']} | "
              f"{r['peak_rss_mib_with_maps']} |" for r in rows]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
