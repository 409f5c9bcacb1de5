"""`aae-run serve`: the model as an HTTP service on the device (FastAPI + uvicorn, extra `[serve]`).

Routes: ``POST /score`` (one image as the raw body, or multipart/form-data with one part per
image; ``?maps=1`` adds each image's anomaly map as a PNG in base64), ``GET /model`` (the
metadata), ``GET /healthz`` (the process answers), ``GET /readyz`` (a model is loaded),
``GET /metrics`` (Prometheus text: requests, errors, latency, batch sizes, images, anomalies).

- **Batching across requests**: images of concurrent requests wait in one queue; a batch runs
  when it holds ``max_batch`` images or ``max_wait_ms`` after its first arrived, one ONNX Runtime
  call on one inference thread. Decoding runs on other threads.
- **Bounded**: body size, images per request, time to receive the body (a client sending a byte
  a second gets 408), and the queue: when it is full a request gets 503 with Retry-After instead
  of waiting without end. Image pixel counts are bounded by the decoder (`aae_runtime.images`).
- **Access**: it listens on 127.0.0.1 unless told otherwise; any other address requires a bearer
  token (``--token-file`` or ``$AAE_TOKEN``), compared in constant time; with a token every route
  but ``/healthz`` requires it.
- **Model updates**: the model folder's pointer (``MODEL.json``) is watched; after `aae-run
  calibrate` (or a new export with ``--overwrite``) the new version is loaded beside the old one
  and swapped in between two batches, so no request is dropped or scored by a mix. SIGHUP
  reloads at once. SIGTERM stops accepting, finishes what is in flight, then exits.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (Request),
# which are imported inside `create_app` so that importing this module needs no FastAPI.
import asyncio
import base64
import errno
import hmac
import io
import ipaddress
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import numpy as np

from aae_runtime.contract.errors import AAEError, InputError
from aae_runtime.contract.modelfolder import POINTER
from aae_runtime.images import decode_image, header_pixels
from aae_runtime.model import AAEModel
from aae_runtime.session import SessionConfig

TOKEN_ENV = "AAE_TOKEN"
# A single image this small is decoded on the event loop (~0.1 ms for an MNIST-size PNG): a hop
# to a decoding thread and back costs more than that. Larger ones decode on threads.
INLINE_DECODE_BYTES = 16 << 10
DECODE_CALLS = 2  # a request's images are decoded in this many thread calls (Pillow releases the GIL in zlib)


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_batch: int = 64  # images in one inference call
    max_wait_ms: float = 2.0  # how long the first image of a batch waits for others
    max_queue: int = 1024  # images waiting for inference; beyond it: 503 + Retry-After
    max_body_bytes: int = 32 << 20  # one request's body
    max_images: int = 256  # images in one request
    max_pixels: int = 16_800_000  # one image's pixels (about a 4096 x 4096 photo): what a small upload may make us decode and tile
    max_request_pixels: int = 33_600_000  # all images of one request, for a tiled model (two such photos): a request's work
    read_timeout_s: float = 10.0  # to receive a whole body
    max_connections: int = 1024  # open connections and requests in flight; beyond: 503 (a client holding sockets open)
    reload_poll_s: float = 1.0  # how often the model folder's pointer is looked at
    token: str | None = None
    noop_endpoint: bool = False  # POST /noop: reads the body, returns fixed JSON (the HTTP floor, for benchmarks)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Overloaded(Exception):
    """The queue is full."""


class ModelHolder:
    """The model in use, swapped for a new version when the folder's pointer changes."""

    def __init__(self, model_dir: Path, session_config: SessionConfig):
        self.model_dir, self.session_config = model_dir, session_config
        self.model = AAEModel.load(model_dir, session_config=session_config)
        self.stamp = self._stamp()
        self.reloads = 0

    def _stamp(self):
        try:
            st = (self.model_dir / POINTER).stat()
            return st.st_mtime_ns, st.st_size, st.st_ino
        except OSError:
            return None

    def changed(self) -> bool:
        return self._stamp() != self.stamp

    def reload(self) -> AAEModel:
        stamp = self._stamp()
        model = AAEModel.load(self.model_dir, session_config=self.session_config)
        self.model, self.stamp = model, stamp  # one assignment: a batch uses the old model or the new
        self.reloads += 1
        return model


class Batcher:
    """Images of concurrent requests, scored in batches on one inference thread."""

    def __init__(self, holder: ModelHolder, cfg: ServeConfig, metrics):
        self.holder, self.cfg, self.metrics = holder, cfg, metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.waiting = 0
        self.arriving = 0  # images of requests received and still decoding: a batch waits for them
        self.inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aae-inference")

    async def score(self, arrays: list[np.ndarray], maps: bool, model: AAEModel) -> list[dict]:
        """The rows of ``arrays``, scored by ``model`` (the one the request decoded them for and
        reports the threshold of: a reload meanwhile never mixes two models in one answer)."""
        if self.waiting + len(arrays) > self.cfg.max_queue:
            raise Overloaded()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in arrays]
        self.waiting += len(arrays)
        self.metrics["queue"].set(self.waiting)
        for x, f in zip(arrays, futures):
            self.queue.put_nowait((x, maps, f, model))
        return list(await asyncio.gather(*futures))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.cfg.max_wait_ms / 1000
            while len(batch) < self.cfg.max_batch:
                timeout = deadline - loop.time()
                if self.queue.empty() and self.arriving == 0:
                    break  # nobody else is on the way: waiting would only add latency
                if timeout <= 0:
                    try:
                        batch.append(self.queue.get_nowait())
                        continue
                    except asyncio.QueueEmpty:
                        break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            self.waiting -= len(batch)
            self.metrics["queue"].set(self.waiting)
            # each image is scored by its request's model: around a reload, a batch runs once per model
            for model in dict.fromkeys(item[3] for item in batch):
                group = [item for item in batch if item[3] is model]
                try:
                    results = await loop.run_in_executor(self.inference, _score_batch, model, group)
                except Exception as exc:  # an inference failure fails this batch's images, not the server
                    why = str(exc) if isinstance(exc, AAEError) else f"inference failed ({type(exc).__name__})"
                    results = [_failed(why, maps) for _, maps, _, _ in group]
                self.metrics["batch"].observe(len(group))
                for (_, _, future, _), result in zip(group, results):
                    if not future.done():  # the client may be gone
                        future.set_result(result)


def _failed(error: str, maps: bool = False) -> dict:
    """The row of an image that could not be scored: the same keys as a scored one's, empty."""
    return {"score": None, "normalized_score": None, "anomaly": None, "error": error, **({"map_png": None} if maps else {})}


def _score_batch(model: AAEModel, batch: list) -> list[dict]:
    """One batch on the inference thread: same shapes stacked (an untiled model: always)."""
    if model.tiling is not None:
        return [_score_photo(model, x, maps) for x, maps, _, _ in batch]
    x = np.stack([item[0] for item in batch])
    parts = model.score_parts(x)
    scores = model.score_from_parts(parts)
    normalized = model.normalise(scores)
    out = []
    for k, (image, maps, _, _) in enumerate(batch):
        s = float(scores[k])
        row = {"score": s, "normalized_score": float(normalized[k]), "anomaly": bool(s > model.threshold), "error": None}
        if maps:
            row["map_png"] = _map_png(model, image, parts.pixel_error[k])
        out.append(row)
    return out


def _score_photo(model: AAEModel, photo: np.ndarray, maps: bool) -> dict:
    try:
        s, error_map = model.score_photo(photo)
    except AAEError as exc:
        return _failed(str(exc), maps)
    s = float(s)
    row = {"score": s, "normalized_score": float(model.normalise(np.array([s]))[0]), "anomaly": bool(s > model.threshold),
           "error": None}
    if maps:
        row["map_png"] = _map_png(model, photo, error_map)
    return row


def _map_png(model: AAEModel, image: np.ndarray, error: np.ndarray) -> str:
    from aae_runtime.maps import render_map

    lo, hi = model.metadata.raw.get("input", {}).get("value_range", [0.0, 1.0])
    shown = (image - lo) / (hi - lo) if hi != lo else image
    scale = float(model.metadata.score.get("pixel_error_scale", 0.0)) or 1.0
    buf = io.BytesIO()
    render_map(shown, error, scale).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _metrics():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    registry = CollectorRegistry()
    return registry, {
        "requests": Counter("aae_requests", "HTTP requests by route and status code", ["route", "code"], registry=registry),
        "latency": Histogram("aae_request_seconds", "Time to answer a request", ["route"], registry=registry,
                             buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)),
        "batch": Histogram("aae_batch_images", "Images per inference call", registry=registry,
                           buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)),
        "images": Counter("aae_images", "Images received", registry=registry),
        "image_errors": Counter("aae_image_errors", "Images that could not be scored", registry=registry),
        "anomalies": Counter("aae_anomalies", "Images flagged anomalous", registry=registry),
        "queue": Gauge("aae_queue_images", "Images waiting for inference", registry=registry),
        "reloads": Counter("aae_model_reloads", "Model versions loaded after the first", registry=registry),
    }


def create_app(model_dir: str | Path, session_config: SessionConfig | None = None, cfg: ServeConfig = ServeConfig(),
               log: Callable[[str], None] | None = None):
    """The FastAPI application serving the model in ``model_dir``; ``log`` hears of each reload
    and each reload refused (once per reason), for the operator's journal."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.requests import Request as StarletteRequest

    holder = ModelHolder(Path(model_dir), session_config or SessionConfig(device="auto"))
    registry, metrics = _metrics()
    state: dict = {}

    async def watch_model() -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(cfg.reload_poll_s)
            if holder.changed() or state.pop("hup", False):
                try:
                    model = await loop.run_in_executor(None, holder.reload)
                    metrics["reloads"].inc()
                    state.pop("reload_error", None)
                    if log is not None:
                        log(f"reloaded {model_dir}: export {model.metadata.export_id}, threshold {model.threshold:.6g}")
                except AAEError as exc:  # a broken new version: keep serving the one loaded
                    refused(str(exc))
                except Exception as exc:  # a bug: keep serving and keep watching, and say so
                    refused(f"internal error ({type(exc).__name__}: {exc}); this is a bug")

    def refused(reason: str) -> None:
        if log is not None and state.get("reload_error") != reason:  # retried every poll: said once
            log(f"reload of {model_dir} refused, still serving export {holder.model.metadata.export_id}: {reason}")
        state["reload_error"] = reason

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        batcher = Batcher(holder, cfg, metrics)
        state["batcher"] = batcher
        tasks = [asyncio.create_task(batcher.run()), asyncio.create_task(watch_model())]
        try:
            import signal

            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: state.__setitem__("hup", True))
        except (ValueError, NotImplementedError, RuntimeError, AttributeError):  # not the main thread, or Windows
            pass
        yield
        for t in tasks:
            t.cancel()
        batcher.inference.shutdown(wait=True)

    app = FastAPI(title="aae-run serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        route = request.url.path if request.url.path in ("/score", "/model", "/healthz", "/readyz", "/metrics", "/noop") else "other"
        start = time.perf_counter()
        if cfg.token and route != "/healthz" and not _authorized(request, cfg.token):
            response = JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        else:
            response = await call_next(request)
        metrics["requests"].labels(route, str(response.status_code)).inc()
        metrics["latency"].labels(route).observe(time.perf_counter() - start)
        return response

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise _HTTPError(413, f"body of {int(declared)} bytes is over the limit of {cfg.max_body_bytes}")
        chunks, size = [], 0

        async def receive_all():
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > cfg.max_body_bytes:
                    raise _HTTPError(413, f"body over the limit of {cfg.max_body_bytes} bytes")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(receive_all(), cfg.read_timeout_s)
        except asyncio.TimeoutError:
            raise _HTTPError(408, f"the body did not arrive within {cfg.read_timeout_s:g} s") from None
        return b"".join(chunks)

    async def images_of(request: Request, body: bytes) -> list[tuple[str, bytes]]:
        ctype = request.headers.get("content-type", "")
        if ctype.lower().startswith("multipart/form-data"):  # media types are case-insensitive
            async def replay():
                return {"type": "http.request", "body": body, "more_body": False}

            try:
                form = await StarletteRequest(request.scope, replay).form(max_files=cfg.max_images, max_fields=cfg.max_images)
            except Exception as exc:  # malformed multipart: Starlette's parser errors
                if "maximum number of" in str(exc).lower():  # more parts than --max-images allows: too large, not malformed
                    raise _HTTPError(413, f"more than {cfg.max_images} parts in one request; at most {cfg.max_images}") from None
                raise _HTTPError(400, f"malformed multipart body ({str(exc)[:120] or type(exc).__name__})") from None
            parts = []
            for key, value in form.multi_items():
                if hasattr(value, "read"):
                    parts.append((value.filename or key, await value.read()))
            if not parts:
                boundary = ctype.partition("boundary=")[2].split(";")[0].strip().strip('"')
                if boundary and f"--{boundary}--".encode() not in body:
                    raise _HTTPError(400, "the multipart body ends before its closing boundary: it was cut off; send it whole")
                raise _HTTPError(400, "the multipart body holds no file parts: send one part per image")
            return parts
        if not body:
            raise _HTTPError(400, "empty body: send an image (raw bytes) or multipart/form-data with one part per image")
        return [("image", body)]

    @app.post("/score")
    async def score(request: Request):
        try:
            maps = _flag(request.query_params.get("maps"), "maps")
            body = await read_body(request)
            images = await images_of(request, body)
            if len(images) > cfg.max_images:
                raise _HTTPError(413, f"{len(images)} images in one request; at most {cfg.max_images}")
            if len(images) > cfg.max_queue:  # would never fit the queue: not a reason to retry
                raise _HTTPError(413, f"{len(images)} images in one request, more than the server's queue holds "
                                      f"(--max-queue {cfg.max_queue}): send at most {cfg.max_queue} a request")
            model = holder.model  # this request's model, from decoding to the threshold it reports
            native = model.tiling is not None
            limit = cfg.max_pixels if native else None  # bounds a tiled model's work; resized images: Pillow's bomb limits
            if native:  # a tiled model's work grows with the pixels: bounded per request, from the headers alone
                pixels = sum(n for _, data in images if (n := header_pixels(data)) <= cfg.max_pixels)  # larger: own 422 row
                if pixels > cfg.max_request_pixels:
                    raise _HTTPError(413, f"{pixels / 1e6:.1f} million pixels in one request; at most "
                                          f"{cfg.max_request_pixels / 1e6:g} (--max-request-megapixels): send fewer or "
                                          "smaller photos a request")
            batcher = state["batcher"]
            batcher.arriving += len(images)
            try:
                if len(images) == 1 and len(images[0][1]) <= INLINE_DECODE_BYTES and not native:
                    decoded = [_decode(images[0][1], model, native, limit)]  # a small image: quicker than a thread hop
                else:  # on decoding threads, a few images per call (a call per image costs more than a small decode)
                    loop = asyncio.get_running_loop()
                    step = max(1, -(-len(images) // DECODE_CALLS))
                    chunks = await asyncio.gather(*(loop.run_in_executor(None, _decode_all, images[i : i + step], model, native,
                                                                         limit)
                                                    for i in range(0, len(images), step)))
                    decoded = [d for chunk in chunks for d in chunk]
            finally:
                batcher.arriving -= len(images)
            metrics["images"].inc(len(images))
            good = [k for k, d in enumerate(decoded) if isinstance(d, np.ndarray)]
            scored = await batcher.score([decoded[k] for k in good], maps, model) if good else []
        except _HTTPError as exc:
            return _error_response(exc)
        except Overloaded:
            return JSONResponse({"error": "busy: the queue is full; retry shortly"}, status_code=503,
                                headers={"Retry-After": "1"})
        rows = dict(zip(good, scored))
        results = [{"name": name, **(rows[k] if k in rows else _failed(str(decoded[k]), maps))} for k, (name, _) in enumerate(images)]
        errors = sum(r.get("error") is not None for r in results)
        metrics["image_errors"].inc(errors)
        metrics["anomalies"].inc(sum(bool(r.get("anomaly")) for r in results))
        code = 422 if errors == len(results) else 200
        return JSONResponse({"threshold": model.threshold, "export_id": model.metadata.export_id, "results": results},
                            status_code=code)

    @app.get("/model")
    async def model_info():
        return JSONResponse(holder.model.metadata.raw)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if "batcher" not in state:
            return JSONResponse({"status": "starting"}, status_code=503)
        return {"status": "ready", "export_id": holder.model.metadata.export_id, "reloads": holder.reloads,
                **({"reload_error": state["reload_error"]} if "reload_error" in state else {})}

    @app.get("/metrics")
    async def metrics_text():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    if cfg.noop_endpoint:
        @app.post("/noop")
        async def noop(request: Request):
            try:
                await read_body(request)
            except _HTTPError as exc:
                return _error_response(exc)
            return {"results": [{"score": 0.0, "normalized_score": 0.0, "anomaly": False, "error": None}]}

    app.state.holder = holder
    return app


class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _flag(value: str | None, name: str) -> bool:
    """A yes/no query parameter; anything else is the client's error, not a silent no."""
    if value is None or value.lower() in ("0", "false", "no"):
        return False
    if value.lower() in ("1", "true", "yes"):
        return True
    raise _HTTPError(400, f"?{name}={value[:40]}: use {name}=1 or {name}=0")


def _authorized(request, token: str) -> bool:
    given = request.headers.get("authorization", "")
    scheme, _, value = given.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def _decode_all(images: list[tuple[str, bytes]], model: AAEModel, native: bool, max_pixels: int | None) -> list:
    return [_decode(data, model, native, max_pixels) for _, data in images]


def _decode(data: bytes, model: AAEModel, native: bool, max_pixels: int | None):
    try:
        x = decode_image(data, model.metadata.preprocessing, native=native, max_pixels=max_pixels)
        if native:
            model.tiling.check(x.shape[1], x.shape[2])
        return x
    except InputError as exc:
        return exc


def read_token(token_file: Path | None) -> str | None:
    """The bearer token: the file's first line, else $AAE_TOKEN, else None."""
    if token_file is not None:
        try:
            lines = token_file.read_text().strip().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"--token-file {token_file}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
        token = lines[0].strip() if lines else ""
        if len(token) < 16:
            raise InputError(f"--token-file {token_file}: the token must be at least 16 characters")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip() or None
    if token is not None and len(token) < 16:
        raise InputError(f"${TOKEN_ENV}: the token must be at least 16 characters")
    return token


def _error_response(exc: "_HTTPError"):
    """The JSON answer to a refused request; a body that came too slowly (408) also closes the
    connection, or the client could go on sending it a byte at a time for ever. (A 413 does not:
    a client sending a large body whole would see the connection reset instead of the answer;
    the rest of its body gets the headers' deadline instead, see `_header_deadline`.)"""
    from fastapi.responses import JSONResponse

    close = {"Connection": "close"} if exc.status == 408 else None
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=close)


def _header_deadline(seconds: float):
    """uvicorn's HTTP protocol with a deadline for a request's headers: a connection that has not
    sent a whole request line and header block ``seconds`` after it opened (or after its last
    answer) is closed. uvicorn times out only idle keep-alive connections, so a client sending
    a header a byte at a time could hold a connection open for ever. The same deadline ends a
    body still arriving ``seconds`` after its request was answered (refused as too large before
    it was read): uvicorn reads and drops such a body to the end, however slowly it comes."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):  # (a class, not "auto": uvicorn then runs h11 even where httptools is installed)
        deadline = None  # the timer of the request awaited now

        def _await_headers(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
            self.deadline = self.loop.call_later(seconds, self._headers_late)

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._await_headers()

        def on_response_complete(self) -> None:  # the next request's headers: counted from this answer
            super().on_response_complete()
            self._await_headers()

        def connection_lost(self, exc) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
            super().connection_lost(exc)

        def _headers_late(self) -> None:
            # still no whole request (h11 leaves IDLE once the headers are in) and none being answered,
            # or the body of a request answered already still coming
            waiting = self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE
            unread = self.conn.their_state is h11.SEND_BODY and self.conn.our_state is h11.DONE
            if (waiting or unread) and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


def serve(model_dir: Path, cfg: ServeConfig, session_config: SessionConfig, log=print) -> None:
    """Run the service until SIGTERM or Ctrl-C (in-flight requests finish first)."""
    import uvicorn

    if not is_loopback(cfg.host) and not cfg.token:
        raise InputError(f"--host {cfg.host} listens beyond this machine: give a bearer token (--token-file FILE or "
                         f"${TOKEN_ENV}), or keep --host 127.0.0.1")
    app = create_app(model_dir, session_config, cfg, log=log)
    m = app.state.holder.model
    socks = _listening_sockets(cfg.host, cfg.port)  # bound here, so a port in use is one line, before "serving"
    log(f"serving {model_dir} ({m.metadata.family}, threshold {m.threshold:.6g}) on http://{cfg.host}:{cfg.port} "
        f"(max batch {cfg.max_batch}, max wait {cfg.max_wait_ms:g} ms{', token required' if cfg.token else ''})")
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=30, lifespan="on", http=_header_deadline(cfg.read_timeout_s),
                            limit_concurrency=cfg.max_connections)  # beyond: 503 (clients that never finish a request)
    server = uvicorn.Server(config)
    # uvicorn drains on SIGTERM/SIGINT, then raises the signal again under the handlers it found:
    # with these, a drained stop ends the process normally (exit 0) instead of by the signal.
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run(sockets=socks)
    except SystemExit:  # uvicorn's own exit on a failure to start
        pass
    finally:
        for sock in socks:
            sock.close()
    if not server.started:
        raise InputError(f"could not listen on {cfg.host}:{cfg.port} (in use, or not an address of this machine)")


def _listening_sockets(host: str, port: int) -> list:
    """TCP sockets bound to every address ``host`` resolves to (``localhost``: 127.0.0.1 and ::1),
    as asyncio binds a server's; InputError in one line when one cannot be bound."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise InputError(f"--host {host}: not an address of this machine ({getattr(exc, 'strerror', None) or exc}): "
                         "give an IP address or name that resolves here, e.g. 127.0.0.1") from None
    socks = []
    for family, kind, proto, address in dict.fromkeys((f, k, p, a) for f, k, p, _, a in infos):  # once each
        sock = socket.socket(family, kind, proto)
        socks.append(sock)
        try:
            if os.name == "posix":  # elsewhere (Windows) it would let a second server share a port in use
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
        except OSError as exc:
            for s in socks:
                s.close()
            fix = "choose another --port" if exc.errno == errno.EADDRINUSE else "give an address of this machine to --host"
            raise InputError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): {fix}") from None
        sock.set_inheritable(True)
    return socks
