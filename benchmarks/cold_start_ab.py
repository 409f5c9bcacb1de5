"""Cold start of `aae-run score one.png` in two installs, side by side: which is faster, by how much.

`benchmarks/install_size.py` measures each install against its floor, one install after the
other; on a virtual machine whose speed drifts from minute to minute, two installs measured a
minute apart differ by more than a change of some tens of milliseconds. This runs the two
installs' `aae-run score` in alternation (the order swapped every round), so that both see the
same machine, and reports the median of each and the median of the paired differences.

    python benchmarks/cold_start_ab.py --venv /tmp/venv-before --venv /tmp/venv-after --model runs/demo/model

Results: benchmarks/results/NAME.{json,md} (``--name``, cold_start_ab by default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"

from aae_runtime import AAEModel  # noqa: E402
from aae_runtime.images import save_image  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--venv", type=Path, action="append", required=True, help="An install (twice: before, after).")
    p.add_argument("--model", type=Path, required=True, help="A model folder written by aae-export.")
    p.add_argument("--runs", type=int, default=41, help="Rounds (each runs both installs once).")
    p.add_argument("--name", default="cold_start_ab", help="results file stem")
    args = p.parse_args(argv)
    if len(args.venv) != 2:
        p.error("give --venv twice: the install before and the install after")
    load_start = os.getloadavg()[0]
    model_dir = args.model.resolve()
    # as aae_runtime.bench.scenarios.cold_start runs it: one of the model's own samples, on the CPU,
    # bytecode caches read as installed, one untimed run each to fill the page cache
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    with tempfile.TemporaryDirectory(prefix="aae-cold-ab-") as tmp:
        model = AAEModel.load(model_dir, device="cpu")
        image = save_image(np.clip(model.sample(1, seed=0)[0], 0, 1), Path(tmp) / "one.png")
        cmds = {str(v): [str(v / "bin" / "aae-run"), "score", str(image), "--model", str(model_dir), "--device", "cpu"]
                for v in args.venv}
        for cmd in cmds.values():
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=env)
        seconds: dict[str, list[float]] = {k: [] for k in cmds}
        for i in range(args.runs):
            for name, cmd in (list(cmds.items()) if i % 2 == 0 else list(cmds.items())[::-1]):
                start = time.perf_counter()
                subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=env)
                seconds[name].append(time.perf_counter() - start)
    first, second = (seconds[str(v)] for v in args.venv)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}; load average at start "
                         f"{load_start:.2f}, at end {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}",
              "runs": args.runs, "median_s": {k: statistics.median(v) for k, v in seconds.items()},
              "paired_difference_median_s": statistics.median(a - b for a, b in zip(first, second)), "seconds": seconds}
    lines = ["# Cold start of `aae-run score one.png`, two installs side by side", "",
             f"Machine: {report['machine']}. {args.runs} rounds, each install once a round, order swapped every round.", "",
             "| install | median |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} s |" for k, v in report["median_s"].items()]
    lines += ["", f"Median of the paired differences (first - second): {1000 * report['paired_difference_median_s']:.1f} ms.", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
