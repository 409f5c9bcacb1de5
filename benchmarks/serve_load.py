"""Load on `aae-run serve` and `aae-run watch`, measured from a separate process over loopback.

One run measures, side by side:

- the HTTP floor: the server's own ``POST /noop`` (reads the same body, returns fixed JSON) at
  64 clients, one PNG per request;
- ``POST /score`` at 1, 8 and 64 clients, one PNG per request: requests/s, p50/p99 latency, and
  the mean batch size the server formed (from its /metrics);
- ``POST /score`` with 64 PNGs per request (multipart) beside the in-process `score_paths`
  throughput on the same 64 PNG files, and the in-process batch-64 throughput on arrays;
- a soak at 8 clients (``--soak-s``): the server's RSS growth and the errors;
- `aae-run watch`: images/s through the folder and the time from a file's arrival (its rename
  into the inbox) to its row in the results file.

The load generator is asyncio with raw keep-alive HTTP/1.1 connections (one process); it shares
the 2 cores with the server, and the report says so.

    python benchmarks/serve_load.py --model runs/demo/model --soak-s 600
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aae_runtime import AAEModel  # noqa: E402
from aae_runtime.images import save_image  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Load:
    """``clients`` keep-alive connections sending ``body`` to ``path`` for ``seconds``."""

    def __init__(self, port: int, path: str, body: bytes, content_type: str):
        self.port = port
        self.request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def _client(self, end: float, latencies: list, errors: list) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                writer.write(self.request)
                await writer.drain()
                status = int((await reader.readline()).split()[1])
                length = 0
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    errors.append(status)
        finally:
            writer.close()

    def run(self, clients: int, seconds: float) -> dict:
        latencies, errors = [], []

        async def main():
            end = time.perf_counter() + seconds
            await asyncio.gather(*(self._client(end, latencies, errors) for _ in range(clients)))

        start = time.perf_counter()
        asyncio.run(main())
        elapsed = time.perf_counter() - start
        ms = sorted(1000 * x for x in latencies)
        return {"clients": clients, "requests": len(ms), "errors": len(errors), "requests_per_s": len(ms) / elapsed,
                "p50_ms": ms[len(ms) // 2] if ms else None, "p99_ms": ms[int(len(ms) * 0.99)] if ms else None}


def multipart(files: list[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for i, data in enumerate(files):
        out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"f{i}\"; filename=\"{i}.png\"\r\n"
                  "Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def metric(port: int, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def start_server(model: Path, port: int, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([str(Path(sys.executable).with_name("aae-run")), "serve", "--model", str(model), "--port", str(port),
                             "--device", "cpu", "--noop-endpoint", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import urllib.request

    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return proc
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"server did not start: {proc.stderr.read().decode()[-500:]}")


def serve_scenarios(model: Path, pngs: list[Path], seconds: float, soak_s: float, log) -> dict:
    port = free_port()
    server = start_server(model, port)
    one = pngs[0].read_bytes()
    out: dict = {"server_args": "--device cpu --noop-endpoint (defaults: --max-batch 64, --max-wait-ms 2, threads: ORT default)"}
    try:
        Load(port, "/score", one, "image/png").run(8, 2.0)  # warm-up
        log("noop floor, 64 clients")
        out["noop_64"] = Load(port, "/noop", one, "image/png").run(64, seconds)
        for clients in (1, 8, 64):
            log(f"score, {clients} clients")
            b0, c0 = metric(port, "aae_batch_images_sum"), metric(port, "aae_batch_images_count")
            r = Load(port, "/score", one, "image/png").run(clients, seconds)
            b1, c1 = metric(port, "aae_batch_images_sum"), metric(port, "aae_batch_images_count")
            r["mean_batch"] = (b1 - b0) / max(1.0, c1 - c0)
            out[f"score_{clients}"] = r
        body, ctype = multipart([p.read_bytes() for p in pngs[:64]])
        log("score, 64 PNGs per request, 4 clients")
        r = Load(port, "/score", body, ctype).run(4, seconds)
        r["images_per_s"] = 64 * r["requests_per_s"]
        out["score_64_per_request"] = r
        if soak_s > 0:
            log(f"soak, 8 clients, {soak_s:g} s")
            rss0 = rss_kb(server.pid)
            r = Load(port, "/score", one, "image/png").run(8, soak_s)
            r["rss_start_mb"], r["rss_end_mb"] = rss0 / 1024, rss_kb(server.pid) / 1024
            r["rss_growth_mb"] = r["rss_end_mb"] - r["rss_start_mb"]
            out["soak_8"] = r
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    return out


def in_process(model: Path, pngs: list[Path]) -> dict:
    m = AAEModel.load(model, device="cpu")
    x = np.stack(m.load_images(pngs[:64]))
    m.score(x)
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < 3:
        m.score(x)
        n += 1
    arrays = 64 * n / (time.perf_counter() - t)
    m.score_paths(pngs[:64])
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < 3:
        m.score_paths(pngs[:64])
        n += 1
    return {"batch64_arrays_images_per_s": arrays, "score_paths_64_pngs_images_per_s": 64 * n / (time.perf_counter() - t)}


def watch_scenario(model: Path, pngs: list[Path], n: int, log) -> dict:
    log(f"watch, {n} files")
    with tempfile.TemporaryDirectory(prefix="aae-watch-bench-") as tmp:
        inbox, out = Path(tmp) / "inbox", Path(tmp) / "rows.jsonl"
        inbox.mkdir()
        proc = subprocess.Popen([str(Path(sys.executable).with_name("aae-run")), "watch", str(inbox), "--model", str(model),
                                 "--output", str(out), "--done", str(Path(tmp) / "done"), "--device", "cpu", "--settle", "0.1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for line in proc.stderr:
            if line.startswith("watching"):
                break
        arrived = {}
        start = time.perf_counter()
        for i in range(n):  # a camera: write under a temporary name, then rename into the inbox
            tmpname = inbox / f".{i:05d}.tmp"
            shutil.copyfile(pngs[i % len(pngs)], tmpname)
            os.replace(tmpname, inbox / f"{i:05d}.png")
            arrived[str(inbox / f"{i:05d}.png")] = time.perf_counter()
        latencies, seen = [], set()
        while len(seen) < n and time.perf_counter() - start < 300:
            if out.exists():
                now = time.perf_counter()
                for line in out.read_text().splitlines():
                    path = json.loads(line)["path"]
                    if path not in seen:
                        seen.add(path)
                        latencies.append(now - arrived[path])
            time.sleep(0.005)
        elapsed = time.perf_counter() - start
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    ms = sorted(1000 * x for x in latencies)
    return {"files": n, "rows": len(seen), "images_per_s": len(seen) / elapsed, "latency_p50_ms": ms[len(ms) // 2],
            "latency_p99_ms": ms[int(len(ms) * 0.99)], "settle_s": 0.1,
            "note": "latency = file renamed into the inbox -> its row in the results file (includes --settle 0.1 s)"}


def markdown(r: dict) -> str:
    s = r["serve"]
    floor = s["noop_64"]["requests_per_s"]
    lines = ["# `aae-run serve` and `aae-run watch` under load", "",
             f"Machine: {r['machine']}; load average {r['load_start']} at the start, {r['load_end']} at the end; {r['date']}. "
             "The load generator (asyncio, keep-alive HTTP/1.1, one process) shares the cores with the server.", "",
             f"Model: {r['model']}. Command: `{r['command']}`.", "",
             "| case | clients | requests/s | images/s | p50 ms | p99 ms | mean batch | errors |", "|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| POST /noop (HTTP floor), 1 PNG | 64 | {floor:,.0f} | | {s['noop_64']['p50_ms']:.2f} | {s['noop_64']['p99_ms']:.2f} | | {s['noop_64']['errors']} |"]
    for c in (1, 8, 64):
        x = s[f"score_{c}"]
        lines.append(f"| POST /score, 1 PNG | {c} | {x['requests_per_s']:,.0f} | {x['requests_per_s']:,.0f} | {x['p50_ms']:.2f} | "
                     f"{x['p99_ms']:.2f} | {x['mean_batch']:.1f} | {x['errors']} |")
    x = s["score_64_per_request"]
    lines.append(f"| POST /score, 64 PNGs (multipart) | 4 | {x['requests_per_s']:,.1f} | {x['images_per_s']:,.0f} | "
                 f"{x['p50_ms']:.1f} | {x['p99_ms']:.1f} | | {x['errors']} |")
    ip = r["in_process"]
    lines += ["", f"In process, same run: batch-64 arrays {ip['batch64_arrays_images_per_s']:,.0f} images/s; `score_paths` on the "
              f"same 64 PNG files {ip['score_paths_64_pngs_images_per_s']:,.0f} images/s.", "",
              "| target | measured | met |", "|---|---|---|"]
    t1 = s["score_64"]["requests_per_s"] / floor
    t2 = x["images_per_s"] / ip["score_paths_64_pngs_images_per_s"]
    p99 = s["score_8"]["p99_ms"]
    lines += [f"| 64 clients, 1 PNG each: throughput >= 0.7 x the no-op floor | {t1:.2f} x (mean batch {s['score_64']['mean_batch']:.1f}) | {'yes' if t1 >= 0.7 else 'no'} |",
              f"| 64 PNGs per request: >= 0.5 x in-process score_paths | {t2:.2f} x | {'yes' if t2 >= 0.5 else 'no'} |",
              f"| 8 clients: p99 <= 10 ms | {p99:.2f} ms | {'yes' if p99 <= 10 else 'no'} |"]
    if "soak_8" in s:
        k = s["soak_8"]
        ok = k["rss_growth_mb"] < 10 and k["errors"] == 0
        lines.append(f"| soak at 8 clients ({r['soak_s']:g} s, {k['requests']:,} requests): RSS growth < 10 MB, 0 errors | "
                     f"{k['rss_growth_mb']:+.1f} MB ({k['rss_start_mb']:.0f} -> {k['rss_end_mb']:.0f} MB), {k['errors']} errors | {'yes' if ok else 'no'} |")
    w = r["watch"]
    lines += ["", f"`aae-run watch`: {w['rows']} of {w['files']} files, {w['images_per_s']:,.0f} images/s through the folder; "
              f"arrival to row p50 {w['latency_p50_ms']:.0f} ms, p99 {w['latency_p99_ms']:.0f} ms ({w['note']})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="A model folder (untiled, MNIST size).")
    p.add_argument("--seconds", type=float, default=8.0, help="Seconds per load case.")
    p.add_argument("--soak-s", type=float, default=600.0, help="Seconds of the 8-client soak (0: skip).")
    p.add_argument("--watch-files", type=int, default=2000, help="Files dropped into the watched folder.")
    p.add_argument("--out", type=Path, default=RESULTS / "serve_load", help="Results path without extension.")
    args = p.parse_args(argv)
    log = lambda s: print(s, flush=True)  # noqa: E731
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "load_start": round(os.getloadavg()[0], 2), "model": str(args.model), "soak_s": args.soak_s,
              "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    with tempfile.TemporaryDirectory(prefix="aae-serve-bench-") as tmp:
        m = AAEModel.load(args.model, device="cpu")
        images = np.clip(m.sample(64, seed=3), 0, 1)
        pngs = [save_image(img, Path(tmp) / f"{i:02d}.png") for i, img in enumerate(images)]
        report["in_process"] = in_process(args.model, pngs)
        report["serve"] = serve_scenarios(args.model, pngs, args.seconds, args.soak_s, log)
        report["watch"] = watch_scenario(args.model, pngs, args.watch_files, log)
    report["load_end"] = round(os.getloadavg()[0], 2)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
