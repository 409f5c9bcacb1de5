"""The report of a benchmark run: its header (what ran where: machine, model, method, setups)
and the writers: JSON, markdown tables and a Pillow plot of per-item latency against batch size.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path

import numpy as np

from aae_runtime import __version__
from aae_runtime.bench.setups import gpu_name, variant
from aae_runtime.bench.timing import OPS, Setup, Timing
from aae_runtime.contract.fileio import atomic_write_text
from aae_runtime.model import AAEModel
from aae_runtime.session import available_providers

SCHEMA = "aae-bench/1"


def header(model: AAEModel, model_dir: Path, timing: Timing, setups: list[Setup]) -> dict:
    """The parts of a report that say what ran where."""
    return {
        "schema": SCHEMA,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "model": {
            "dir": str(model_dir), "export_id": model.metadata.export_id, "precision": variant(model),
            "input_shape": list(model.input_shape), "latent_dim": model.metadata.latent_dim,
            "score": model.score_name,
        },
        "method": {"rounds": timing.rounds, "slice_s": timing.slice_s, "warmup_s": timing.warmup_s,
                   "order": "round-robin, reversed every round; each call timed alone"},
        "setups": [{"name": s.name, "description": s.description, **s.info} for s in setups],
    }


def machine_info() -> dict:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "logical_cores": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "numpy": np.__version__, "onnxruntime": ort.__version__,
        "aae": __version__, "providers_available": available_providers(), "gpu": gpu_name(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# -- writing ----------------------------------------------------------------------------------------

def write_report(report: dict, out_dir: str | Path, name: str = "latency") -> dict[str, Path]:
    """Write ``name``.json, ``name``.md and ``name``.png into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(exist_ok=True)  # its parent must exist (checked by the command)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md", "png": out_dir / f"{name}.png"}
    atomic_write_text(paths["json"], json.dumps(report, indent=1) + "\n")
    atomic_write_text(paths["md"], markdown(report))
    plot(report, paths["png"])
    return paths


def markdown(report: dict) -> str:
    """The report as markdown tables (latency, sweep, folder, cold start), machine first."""
    m = report["machine"]
    lines = [f"# Latency: {report['model']['dir']} ({report['model']['precision']})", "",
             f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, GPU: {m['gpu'] or 'none'}; "
             f"onnxruntime {m['onnxruntime']}, numpy {m['numpy']}, Python {m['python']}; "
             f"load average at start {', '.join(f'{x:.2f}' for x in m['load_average'] or [])}. "
             f"Created {report['created']}.", ""]
    lines += [f"- `{s['name']}`: {s['description']}" for s in report["setups"]]
    has_best = any("best_ms" in r for r in report["results"])
    lines += ["", "| setup | op | batch | median ms | p90 ms | p99 ms | items/s | µs/item | calls |" + (" best ms |" if has_best else ""),
              "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if has_best else "")]
    for r in report["results"]:
        best = f" {r['best_ms']:.3f} |" if "best_ms" in r else ""
        lines.append(f"| {r['setup']} | {r['op']} | {r['batch']} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | "
                     f"{r['p99_ms']:.3f} | {r['items_per_s']:,.0f} | {1e3 * r['median_ms'] / r['batch']:.1f} | {r['calls']} |{best}")
    for note in report.get("notes") or []:
        lines += ["", f"Note: {note}"]
    if report.get("sweep"):
        lines += ["", "## Session options (scoring)", "", "| threads | spin (us) | optimisation | batch | median ms | p90 ms | p99 ms |",
                  "|---:|---:|---|---:|---:|---:|---:|"]
        for r in report["sweep"]:
            lines.append(f"| {r['threads']} | {r['spin_us']} | {r['optimization']} | {r['batch']} | "
                         f"{r['median_ms']:.3f} | {r['p90_ms']:.3f} | {r['p99_ms']:.3f} |")
    if report.get("paced"):
        r0 = report["paced"][0]
        lines += ["", f"## One image every {r0['interval_ms']:.0f} ms (CPU)", "",
                  "Latency when calls are paced (weights go cold in the caches between calls) and the cores the process "
                  "keeps busy on average, which is what spinning costs between calls.", "",
                  "| setting | median ms | p90 ms | cores busy |", "|---|---:|---:|---:|"]
        lines += [f"| {r['setting']} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | {r['cores_busy']:.2f} |" for r in report["paced"]]
    if report.get("folder"):
        f = report["folder"]
        lines += ["", f"## Scoring a folder of {f['images']} PNG files (batch {f['batch_size']}, best of {f['repeats']})", "",
                  "Speed-up of `score_paths` over decoding, then scoring, one after the other; *ideal* is what hiding "
                  "one-threaded decoding fully behind inference (or the reverse) would give (decoding on several threads "
                  "can beat it).", "",
                  "| list + decode only | score arrays only | score_paths (overlapped) | overlap speed-up | ideal |", "|---:|---:|---:|---:|---:|",
                  f"| {f['decode_only_images_per_s']:,.0f}/s | {f['score_arrays_only_images_per_s']:,.0f}/s | "
                  f"{f['score_paths_images_per_s']:,.0f}/s | {f['overlap_speedup']:.2f}x | {f['ideal_overlap_speedup']:.2f}x |"]
    if report.get("cold_start"):
        c = report["cold_start"]
        lines += ["", f"## Cold start (median of {c['runs']} fresh processes, interleaved)", "",
                  "| | `aae-run score one.png --model DIR` | floor: numpy + ONNX Runtime, one session, one run | "
                  "Python start-up alone | `import aae_runtime.cli` alone |",
                  "|---|---:|---:|---:|---:|",
                  f"| wall time | {c['score_one_image_s']:.3f} s | {c.get('floor_s', float('nan')):.3f} s | "
                  f"{c['python_startup_s']:.3f} s | {c['import_cli_s']:.3f} s |",
                  f"| CPU time (user + sys) | {c.get('score_one_image_cpu_s', 0):.3f} s | {c.get('floor_cpu_s', 0):.3f} s | "
                  f"{c.get('python_startup_cpu_s', 0):.3f} s | {c.get('import_cli_cpu_s', 0):.3f} s |", "",
                  f"Above the floor: {c.get('above_floor_s', float('nan')):.3f} s (median of the run-by-run differences). "
                  f"Targets: <= {c['target_s']} s in all and <= {c.get('floor_margin_s', float('nan'))} s above the floor: "
                  f"{'met' if c['met'] else 'not met'} in this run. On a machine shared with other jobs the wall time "
                  "includes waiting for a core; the CPU time is what it would be on an idle one."]
        if c.get("import_cpu_s"):
            lines += ["", "CPU time each import adds (median, fresh interpreter): " + ", ".join(
                f"`{k}` {1e3 * v:.0f} ms" for k, v in c["import_cpu_s"].items()) + "."]
    for title, body in (report.get("extra_sections") or {}).items():
        lines += ["", f"## {title}", "", body]
    return "\n".join(lines) + "\n"


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (0, 110, 110),
           (170, 110, 0), (90, 90, 200)]


def plot(report: dict, path: str | Path) -> Path:
    """Per-item latency (µs, log scale) against batch size, one panel per operation (Pillow)."""
    from PIL import Image, ImageDraw

    rows = report["results"]
    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    per_col = 6
    pw, ph, left, top, bottom, legend_h = 460, 300, 60, 30, 40, 16 * min(per_col, len(setups)) + 10
    img = Image.new("RGB", (pw * max(1, len(ops)) + 10, ph + top + bottom + legend_h), "white")
    d = ImageDraw.Draw(img)
    values = [1e3 * r["median_ms"] / r["batch"] for r in rows] or [1.0]
    lo, hi = np.log10(min(values)) - 0.1, np.log10(max(values)) + 0.1
    batches = sorted({r["batch"] for r in rows}) or [1]
    bl, bh = np.log2(batches[0]), max(np.log2(batches[-1]), np.log2(batches[0]) + 1)
    for k, op in enumerate(ops):
        x0, y0, w, h = k * pw + left, top, pw - left - 20, ph - 20
        d.rectangle([x0, y0, x0 + w, y0 + h], outline="black")
        d.text((x0 + 4, 8), f"{op}: microseconds per item (median, log) vs batch size", fill="black")

        def xy(b, v):
            return (x0 + (np.log2(b) - bl) / (bh - bl) * w, y0 + h - (np.log10(v) - lo) / (hi - lo) * h)

        for b in batches:
            x, _ = xy(b, 10 ** lo)
            d.line([x, y0 + h, x, y0 + h + 4], fill="black")
            d.text((x - 8, y0 + h + 6), str(b), fill="black")
        for e in range(int(np.floor(lo)), int(np.ceil(hi)) + 1):
            if lo <= e <= hi:
                _, y = xy(batches[0], 10.0**e)
                d.line([x0 - 4, y, x0 + w, y], fill=(225, 225, 225))
                d.text((x0 - 52, y - 6), f"{10.0**e:g}", fill="black")
        for j, s in enumerate(setups):
            pts = [xy(r["batch"], 1e3 * r["median_ms"] / r["batch"]) for r in rows if r["setup"] == s and r["op"] == op]
            col = _COLORS[j % len(_COLORS)]
            if len(pts) > 1:
                d.line(pts, fill=col, width=2)
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
    for j, s in enumerate(setups):
        x, y = left + 230 * (j // per_col), ph + top + bottom - 10 + 16 * (j % per_col)
        d.rectangle([x, y + 3, x + 12, y + 11], fill=_COLORS[j % len(_COLORS)])
        d.text((x + 18, y), s, fill="black")
    from aae_runtime.images import save_png

    return save_png(img, Path(path))
