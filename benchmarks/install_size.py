"""Installed size and cold start of the runtime-only installs, `[cpu]` and `[gpu]`.

For each virtual environment given (made with `python -m venv V && V/bin/pip install ".[cpu]"`,
or `".[gpu]"`), this measures the size of what the install put in site-packages (pip and
setuptools, which every venv has, left out; bytecode caches in), lists the largest packages,
and runs the cold-start benchmark (`aae_runtime.bench.cold_start`: `aae-run score one.png`
beside its floor, interleaved) with that environment's own Python and `aae-run`.

    python -m venv /tmp/venv-cpu && /tmp/venv-cpu/bin/pip install ".[cpu]"
    python -m venv /tmp/venv-gpu && /tmp/venv-gpu/bin/pip install ".[gpu]"
    python benchmarks/install_size.py --venv /tmp/venv-cpu --venv /tmp/venv-gpu --model runs/demo/model

A venv made with ``pip install --no-compile`` leaves the bytecode out; Python then writes it for
the modules a command imports, on their first import, so the size is measured again after the
cold-start runs ("after running").

Results: benchmarks/results/install_size.{json,md}.
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

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# In every venv whatever was installed into it: not part of what this project's install adds.
VENV_OWN = ("pip", "setuptools", "_distutils_hack", "pkg_resources", "distutils-precedence.pth")
TARGET_CPU_MB = 150


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python*/site-packages")) or sorted(venv.glob("Lib/site-packages"))
    if not found:
        sys.exit(f"{venv}: no site-packages folder; pass a virtual environment")
    return found[0]


def installed_size(venv: Path) -> dict:
    """MB of site-packages, without the venv's own pip and setuptools; the ten largest entries
    (a package's .libs folder counted with it)."""
    sp = site_packages(venv)
    sizes: dict[str, int] = {}
    for entry in sp.iterdir():
        name = entry.name
        if name.startswith(VENV_OWN) or name == "__pycache__":
            continue
        key = name.split("-")[0].removesuffix(".libs").removesuffix(".dist").lower()
        key = key.removesuffix(".py")
        sizes[key] = sizes.get(key, 0) + folder_bytes(entry)
    mb = {k: v / 2**20 for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])}
    return {"site_packages": str(sp), "total_mb": sum(mb.values()), "largest_mb": dict(list(mb.items())[:10])}


def cold_start_in(venv: Path, model: Path, runs: int) -> dict:
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    code = ("import json, sys; from aae_runtime.bench.scenarios import cold_start; "
            f"print(json.dumps(cold_start({str(model)!r}, {runs})))")
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{venv}: cold start failed: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout)


def ort_package(venv: Path) -> str:
    sp = site_packages(venv)
    names = [p.name.split("-")[0] + " " + p.name.split("-")[1].removesuffix(".dist") for p in sp.glob("onnxruntime*.dist-info")]
    return ", ".join(names) or "none"


def markdown(report: dict) -> str:
    lines = ["# Runtime-only installs: size and cold start", "",
             f"Machine: {report['machine']}; load average at start {report['load_start']}, at end {report['load_end']}; "
             f"{report['date']}. Command: `{report['command']}`.", "",
             "| install | ONNX Runtime | installed size | after running | `aae-run score one.png` | floor | above the floor | "
             "met (<= 0.35 s, <= 0.08 s above) |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for name, v in report["venvs"].items():
        c = v["cold_start"]
        lines.append(f"| {name} | {v['onnxruntime']} | {v['size']['total_mb']:.0f} MB | {v['size_after_running']['total_mb']:.0f} MB | "
                     f"{c['score_one_image_s']:.3f} s | "
                     f"{c['floor_s']:.3f} s | {c['above_floor_s']:.3f} s | {'yes' if c['met'] else 'no'} |")
    lines += ["", f"Target for `[cpu]`: <= {TARGET_CPU_MB} MB. Sizes: site-packages without the venv's own pip and setuptools, "
              "bytecode caches included (what `pip install` leaves; with `--no-compile` none until a command imports the module: "
              "\"after running\" is the size after the cold-start runs of `aae-run score`). Cold start: median of the fresh processes, interleaved "
              "run by run with the floor (a Python that imports numpy and onnxruntime, opens the scoring graph and runs it once).", ""]
    for name, v in report["venvs"].items():
        lines.append(f"Largest in {name}: " + ", ".join(f"{k} {mb:.0f} MB" for k, mb in v["size"]["largest_mb"].items()) + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--venv", type=Path, action="append", required=True, help="A virtual environment (repeatable).")
    p.add_argument("--model", type=Path, required=True, help="A model folder written by aae-export.")
    p.add_argument("--runs", type=int, default=21, help="Fresh processes per case.")
    p.add_argument("--out", type=Path, default=RESULTS / "install_size", help="Results path without extension.")
    args = p.parse_args(argv)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, {platform.system()}", "load_start": round(os.getloadavg()[0], 2),
              "command": "python benchmarks/install_size.py " + " ".join(sys.argv[1:] if argv is None else argv), "venvs": {}}
    for venv in args.venv:
        print(f"{venv}: size", flush=True)
        entry = {"onnxruntime": ort_package(venv), "size": installed_size(venv)}
        print(f"{venv}: cold start, {args.runs} runs", flush=True)
        entry["cold_start"] = cold_start_in(venv, args.model.resolve(), args.runs)
        entry["size_after_running"] = installed_size(venv)
        report["venvs"][venv.name] = entry
    report["load_end"] = round(os.getloadavg()[0], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
