"""`aae-run serve`: the real server on a free loopback port, driven over real HTTP (http.client)."""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from aae_runtime import AAEModel
from tests.conftest import write_png

pytest.importorskip("fastapi")  # the [serve] extra (installed by make setup)

TOKEN = "a-test-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, *extra: str, env: dict | None = None):
        self.port = free_port()
        self.proc = subprocess.Popen(["aae-run", "serve", "--model", str(model), "--port", str(self.port), "--device", "cpu",
                                      *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        end = time.monotonic() + 60
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.proc.stderr.read()}")
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("server did not start")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.read(), dict(r.getheaders())
        finally:
            conn.close()

    def score(self, body: bytes, headers: dict | None = None, path: str = "/score"):
        status, data, head = self.request("POST", path, body, headers)
        return status, json.loads(data), head

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        return self.proc.returncode


def multipart(files: dict[str, bytes]) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, data in files.items():
        out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\n"
                  "Content-Type: image/png\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture(scope="module")
def pngs(tmp_path_factory, mnist_test) -> list[Path]:
    folder = tmp_path_factory.mktemp("pngs")
    return [write_png(folder / f"{i:02d}.png", mnist_test[0][i]) for i in range(16)]


def model_and_normal_images(tiny_model_dir: Path, tmp_path: Path, mnist_test) -> tuple[Path, Path]:
    """A copy of the model folder (for `aae-run calibrate` to write to) and 20 normal images to calibrate on."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for i in range(20):
        write_png(tmp_path / "normal" / f"{i}.png", mnist_test[0][20 + i])
    return model, tmp_path / "normal"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    s = Server(tiny_model_dir, "--max-wait-ms", "20", "--read-timeout", "1.5", "--max-body-mb", "4", "--noop-endpoint")
    yield s
    assert s.stop() == 0


def test_scores_over_http_are_those_of_the_runtime(server, tiny_model_dir, pngs):
    expected = {r.path: r for r in AAEModel.load(tiny_model_dir, device="cpu").score_paths(pngs[:3])}
    status, raw, _ = server.score(pngs[0].read_bytes(), {"Content-Type": "image/png"})
    assert status == 200 and raw["results"][0]["score"] == pytest.approx(expected[str(pngs[0])].score, abs=1e-5)
    body, head = multipart({p.name: p.read_bytes() for p in pngs[:3]})
    status, many, _ = server.score(body, head)
    assert status == 200 and [r["name"] for r in many["results"]] == [p.name for p in pngs[:3]]
    for r, p in zip(many["results"], pngs[:3]):
        e = expected[str(p)]
        assert r["score"] == pytest.approx(e.score, abs=1e-5) and r["anomaly"] == e.anomaly
        assert r["normalized_score"] == pytest.approx(e.normalized_score, abs=1e-5) and r["error"] is None
    status, mapped, _ = server.score(pngs[0].read_bytes(), path="/score?maps=1")
    assert status == 200 and mapped["results"][0]["map_png"].startswith("iVBOR")  # base64 of a PNG
    body, head = multipart({"a.png": pngs[0].read_bytes(), "bad.png": b"not an image"})
    status, mapped, _ = server.score(body, head, path="/score?maps=1")
    assert status == 200 and set(mapped["results"][1]) == set(mapped["results"][0]) and mapped["results"][1]["map_png"] is None


def test_model_health_ready_and_metrics(server):
    status, data, _ = server.request("GET", "/model")
    assert status == 200 and json.loads(data)["schema_version"] >= 2
    assert server.request("GET", "/healthz")[0] == 200 and json.loads(server.request("GET", "/readyz")[1])["status"] == "ready"
    status, text, head = server.request("GET", "/metrics")
    text = text.decode()
    assert status == 200 and "text/plain" in head["content-type"]
    for name in ("aae_requests_total", "aae_request_seconds_bucket", "aae_batch_images_bucket", "aae_images_total",
                 "aae_anomalies_total", "aae_image_errors_total"):
        assert name in text, name


def test_concurrent_requests_share_inference_calls(server, pngs):
    before = _metric(server, "aae_batch_images_count")
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda p: server.score(p.read_bytes())[0], pngs * 2))
    assert codes == [200] * 32
    batches = _metric(server, "aae_batch_images_count") - before
    assert 1 <= batches < 32  # 32 requests in fewer calls


def _metric(server, name: str) -> float:
    for line in server.request("GET", "/metrics")[1].decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(name)


def bomb_png(side: int = 60_000) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def test_bad_requests_get_their_status_and_the_server_stays_up(server, pngs):
    assert server.score(b"")[0] == 400
    status, answer, _ = server.score(b"--x\r\nbroken", {"Content-Type": "multipart/form-data; boundary=x"})
    assert status == 400 and "cut off" in answer["error"]
    status, bomb, _ = server.score(bomb_png())
    assert status == 422 and "too large" in bomb["results"][0]["error"]
    assert server.score(b"not an image at all")[0] == 422
    assert server.request("POST", "/score", b"x" * (5 << 20))[0] == 413  # over --max-body-mb 4
    sock = socket.create_connection(("127.0.0.1", server.port))  # a 100 MB body announced: refused before it comes
    sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n\r\n" + b"x" * 1000)
    assert b" 413 " in sock.recv(4096).split(b"\r\n")[0]
    sock.close()
    assert server.score(pngs[0].read_bytes())[0] == 200
    # media types are case-insensitive; an empty part says so; more parts than --max-images is too large, not malformed
    body, head = multipart({"a.png": pngs[0].read_bytes(), "empty.png": b""})
    status, answer, _ = server.score(body, {"Content-Type": head["Content-Type"].replace("multipart/form-data", "Multipart/Form-Data")})
    assert status == 200 and answer["results"][0]["error"] is None and "empty file (0 bytes)" in answer["results"][1]["error"]
    assert answer["results"][1] == {"name": "empty.png", "score": None, "normalized_score": None, "anomaly": None,
                                    "error": answer["results"][1]["error"]}  # a failed row has a scored row's keys
    status, answer, _ = server.score(*multipart({f"{i}.png": b"x" for i in range(300)}))
    assert status == 413 and "more than 256 parts" in answer["error"], answer


def test_a_client_that_never_finishes_its_headers_is_disconnected(server, pngs):
    sock = socket.create_connection(("127.0.0.1", server.port))  # --read-timeout 1.5
    sock.settimeout(10)
    start = time.monotonic()
    sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n")
    for _ in range(8):  # a header line a little at a time, never the blank line that ends them
        try:
            sock.sendall(b"X-Slow: y\r\n")
        except OSError:
            break
        time.sleep(0.5)
    try:
        closed = sock.recv(4096) == b""
    except ConnectionResetError:
        closed = True
    sock.close()
    assert closed and time.monotonic() - start < 6
    assert server.score(pngs[0].read_bytes())[0] == 200  # others are served as before


def test_a_client_sending_a_byte_a_second_gets_408(server, pngs):
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    for _ in range(3):
        sock.sendall(b"x")
        time.sleep(1)
    answer = sock.recv(4096).decode(errors="replace")
    assert " 408 " in answer.splitlines()[0] and "connection: close" in answer.lower()
    sock.settimeout(10)
    try:  # and the connection goes: the client cannot hold it by sending the rest a byte at a time
        for _ in range(8):
            sock.sendall(b"x")
            time.sleep(0.25)
        ended = sock.recv(4096) == b""
    except OSError:
        ended = True
    sock.close()
    assert ended
    assert server.score(pngs[0].read_bytes())[0] == 200


def test_a_client_that_goes_on_sending_a_body_refused_as_too_large_is_disconnected(server, pngs):
    sock = socket.create_connection(("127.0.0.1", server.port))  # --max-body-mb 4, --read-timeout 1.5
    sock.settimeout(10)
    sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
    answer = sock.recv(4096).decode(errors="replace")
    assert " 413 " in answer.splitlines()[0], answer  # answered at once, the connection kept for the body
    start = time.monotonic()
    try:  # the rest of the body, a little at a time: it may not hold the connection for ever
        for _ in range(40):
            sock.sendall(b"x" * 100)
            time.sleep(0.2)
        ended = sock.recv(4096) == b""
    except OSError:
        ended = True
    sock.close()
    assert ended and time.monotonic() - start < 6
    assert server.score(pngs[0].read_bytes())[0] == 200


def test_a_kept_alive_connection_gets_its_next_request_answered_whenever_the_first_came(server, pngs):
    """The headers' deadline counts from the last answer, not from the connection's opening."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)  # --read-timeout 1.5
    try:
        for pause in (1.0, 1.0, 1.0):  # past 1.5 s since the connection opened, within it since each answer
            conn.request("POST", "/score", body=pngs[0].read_bytes())
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read())["results"][0]["error"] is None
            time.sleep(pause)
    finally:
        conn.close()


def test_a_client_that_disconnects_mid_upload_does_no_harm(server, pngs):
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 5000)
        sock.close()
    assert server.score(pngs[0].read_bytes())[0] == 200


def test_an_overloaded_server_answers_503_with_retry_after_never_500(tiny_model_dir, pngs):
    s = Server(tiny_model_dir, "--max-queue", "4", "--max-wait-ms", "50")
    try:
        body, head = multipart({f"{i}.png": pngs[i].read_bytes() for i in range(3)})
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda _: s.score(body, head), range(24)))
        codes = {status for status, _, _ in answers}
        assert codes <= {200, 503} and 503 in codes and 200 in codes
        assert all(h.get("retry-after") == "1" for status, _, h in answers if status == 503)
    finally:
        assert s.stop() == 0


def test_a_token_is_required_off_loopback_and_checked_on_every_route(tiny_model_dir, pngs, tmp_path):
    r = subprocess.run(["aae-run", "serve", "--model", str(tiny_model_dir), "--host", "0.0.0.0", "--port", str(free_port())],
                       capture_output=True, text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "AAE_TOKEN"})
    assert r.returncode == 2 and "token" in r.stderr and r.stderr.count("\n") == 1
    s = Server(tiny_model_dir, env={"AAE_TOKEN": TOKEN})
    try:
        assert s.request("GET", "/healthz")[0] == 200
        with ThreadPoolExecutor(8) as pool:
            wrong = list(pool.map(lambda i: s.request("POST", "/score", b"x", {"Authorization": f"Bearer wrong{i}"})[0],
                                  range(1000)))
        assert set(wrong) == {401}
        assert s.request("GET", "/metrics")[0] == 401
        assert s.score(pngs[0].read_bytes(), {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    finally:
        assert s.stop() == 0


def test_sigterm_lets_requests_in_flight_finish(tiny_model_dir, pngs):
    s = Server(tiny_model_dir, "--max-wait-ms", "400", "--max-batch", "64")
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(s.score, p.read_bytes()) for p in pngs[:8]]
        time.sleep(0.15)  # they are waiting for their batch
        s.proc.send_signal(signal.SIGTERM)
        codes = [f.result()[0] for f in futures]
    assert codes == [200] * 8
    assert s.proc.wait(timeout=60) == 0


def test_a_recalibration_is_picked_up_without_dropping_a_request(tiny_model_dir, pngs, tmp_path, mnist_test):
    model, normal = model_and_normal_images(tiny_model_dir, tmp_path, mnist_test)
    s = Server(model)
    before = s.score(pngs[0].read_bytes())[1]["threshold"]
    errors, thresholds, stop = [], set(), threading.Event()

    def client():
        while not stop.is_set():
            status, answer, _ = s.score(pngs[1].read_bytes())
            (thresholds.add(answer["threshold"]) if status == 200 else errors.append(status))

    t = threading.Thread(target=client)
    t.start()
    try:
        r = subprocess.run(["aae-run", "calibrate", str(normal), "--model", str(model), "--percentile", "50"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        end = time.monotonic() + 20
        while time.monotonic() < end and len(thresholds) < 2:
            time.sleep(0.1)
    finally:
        stop.set()
        t.join(timeout=30)
        assert s.stop() == 0
    assert not errors and before in thresholds and len(thresholds) == 2


def test_a_port_in_use_is_one_line_and_a_request_larger_than_the_queue_is_413_not_503(tiny_model_dir, pngs):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = subprocess.run(["aae-run", "serve", "--model", str(tiny_model_dir), "--port", str(taken.getsockname()[1])],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "choose another --port" in r.stderr, r.stderr
    assert "serving" not in r.stderr + r.stdout
    s = Server(tiny_model_dir, "--max-queue", "4")
    try:
        status, answer, head = s.score(*multipart({f"{i}.png": pngs[i].read_bytes() for i in range(5)}))
        assert status == 413 and "--max-queue 4" in answer["error"] and "retry-after" not in head
        status, answer, _ = s.score(pngs[0].read_bytes(), path="/score?maps=2")
        assert status == 400 and "maps=1" in answer["error"]
    finally:
        assert s.stop() == 0


def test_a_damaged_pointer_is_reported_by_readyz_and_the_next_good_version_is_still_picked_up(tiny_model_dir, pngs, tmp_path,
                                                                                             mnist_test):
    model, normal = model_and_normal_images(tiny_model_dir, tmp_path, mnist_test)
    s = Server(model)
    try:
        before = s.score(pngs[0].read_bytes())[1]["threshold"]
        pointer = model / "MODEL.json"
        good = pointer.read_text()

        def replace_pointer(text: str) -> None:  # atomically, as writers do: a poll never reads half a file
            (model / "pointer.tmp").write_text(text)
            os.replace(model / "pointer.tmp", pointer)

        replace_pointer(good.replace('"layout_version": 1', '"layout_version": 1e999'))

        def ready() -> dict:
            return json.loads(s.request("GET", "/readyz")[1])

        end = time.monotonic() + 20
        while "reload_error" not in ready() and time.monotonic() < end:
            time.sleep(0.1)
        assert "is damaged" in ready()["reload_error"]
        replace_pointer(good)
        r = subprocess.run(["aae-run", "calibrate", str(normal), "--model", str(model), "--percentile", "50"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        end = time.monotonic() + 20
        while s.score(pngs[0].read_bytes())[1]["threshold"] == before and time.monotonic() < end:
            time.sleep(0.1)
        assert s.score(pngs[0].read_bytes())[1]["threshold"] != before and "reload_error" not in ready()
    finally:
        assert s.stop() == 0
    log = s.proc.stderr.read()  # the operator's journal says both, the refusal once however often it was retried
    assert log.count(f"reload of {model} refused, still serving export") == 1 and "is damaged" in log, log
    assert f"reloaded {model}: export" in log, log


def test_a_batch_scores_each_image_with_the_model_of_its_request(tiny_model_dir, pngs):
    """Around a reload one batch may hold images of requests made before and after it: each is
    scored by the model its request reports the threshold of, never by the other."""
    import asyncio

    from aae_runtime.images import load_image
    from aae_runtime.serve import Batcher, ServeConfig, _metrics

    every = AAEModel.load(tiny_model_dir, device="cpu", threshold=-1e30)  # flags every image
    none = AAEModel.load(tiny_model_dir, device="cpu", threshold=1e30)  # flags none
    x = load_image(pngs[0], every.metadata.preprocessing)
    _, metrics = _metrics()

    async def requests():
        batcher = Batcher(holder=None, cfg=ServeConfig(max_wait_ms=200), metrics=metrics)
        loop = asyncio.create_task(batcher.run())
        try:
            return await asyncio.gather(batcher.score([x, x], False, every), batcher.score([x, x, x], False, none))
        finally:
            loop.cancel()

    flagged, passed = asyncio.run(requests())
    assert [r["anomaly"] for r in flagged] == [True, True] and [r["anomaly"] for r in passed] == [False] * 3


def test_a_tiled_model_bounds_the_pixels_of_one_request(tmp_path):
    """A tiled model's work grows with the pixels: a few small uploads claiming large photos are a 413."""
    from typer.testing import CliRunner

    from aae_train.cli import app as train_app
    from export.onnx_export import export_checkpoint

    rng = np.random.default_rng(0)
    write_png(tmp_path / "train" / "noise.png", rng.integers(0, 256, (96, 96), dtype=np.uint8))
    r = CliRunner().invoke(train_app, ["folder", str(tmp_path / "train"), "--crop", "16", "--crops-per-image", "64",
                                       "--epochs", "1", "--batch-size", "32", "--val-fraction", "0.3", "--hidden", "16",
                                       "--threads", "1", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    export_checkpoint(tmp_path / "run" / "checkpoint.pt", tmp_path / "model", log=lambda s: None)
    photo = write_png(tmp_path / "photo.png", rng.integers(0, 256, (200, 200), dtype=np.uint8)).read_bytes()
    s = Server(tmp_path / "model", "--max-request-megapixels", "0.05", "--threads", "1")
    try:
        status, answer, _ = s.score(photo)  # 0.04 million pixels
        assert status == 200 and answer["results"][0]["error"] is None, answer
        status, answer, _ = s.score(*multipart({"a.png": photo, "b.png": photo}))
        assert status == 413 and "0.1 million pixels in one request; at most 0.05" in answer["error"], answer
    finally:
        assert s.stop() == 0
