"""Serve a trained model over HTTP with LitServe: ``python serve.py ckpt_path=... [port=8000]``.

* ``POST /predict``: an image (PNG, JPEG, any size; the raw body, or one file of a
  multipart/form-data upload) -> ``{"top": [[class, probability], ...]}``, the numbers predict.py
  prints for the same file. Requests that wait together share one forward pass (LitServe's
  dynamic batching: ``max_batch_size``, ``batch_timeout``); the ``X-Batch-Size`` and
  ``X-Forward-Pass`` headers say which pass answered and how many images it held.
* ``GET /``: a page to choose or drop an image on (its script and style at ``/page.js``, ``/page.css``);
  ``GET /live``: 200 while the process runs; ``GET /ready``: 200 and the model's identity once the model
  has passed its forward check and warmed up, 503 before and while draining (``/health``: LitServe's "ok");
  ``GET /metrics``: requests by status, latency and batch sizes in Prometheus's text format.
* With a key (``$CIFARKIT_API_KEY`` or ``api_key_file``) every route but the page and the health routes
  needs it in ``X-API-Key`` (or ``Authorization: Bearer``), else a JSON 401.
* Every answer names the model (``X-Model``) and carries a request id, a Content-Security-Policy that allows
  the page's own script and style only, ``nosniff``, ``frame-ancestors 'none'`` and ``no-store``; one log
  line per request (``request_log``: text or JSON lines).
* SIGTERM (or Ctrl+C) drains: ready and new requests answer 503, the requests in flight are finished
  within ``drain_grace`` seconds, then every process stops and the exit code is 0.
* Bad input gets a 4xx ``{"error": "<one line>"}`` and the server goes on; every answer is strict JSON.

Everything a client sends crosses the project's one boundary (cifarkit/core/untrusted/, docs/trust.md):
at most ``max_headers`` header lines of ``max_header_kb`` in all (431), the body read up to
``max_body_mb``, a multipart upload parsed by Starlette's own parser, the image decoded by
``decode_image`` (PNG or JPEG, ``max_megapixels``) in a pool of ``decode_threads`` threads, off the
event loop, with at most ``max_decode_queue`` waiting (503) and none decoded once its client has gone;
a client has ``read_timeout`` seconds to send a whole request, an idle connection is closed after
``keep_alive`` seconds, and at most ``max_requests`` requests are served at once (503), however many
connections are open.

The model is loaded as predict.py loads it (``infer.model.load_model``: checked, then only trusted classes
built): once in this process on the CPU, so that a bad or crafted file is refused in one line
before anything starts, then in LitServe's inference worker for serving. Requests are read and
decoded in LitServe's API process; the worker only ever sees decoded pixels.
"""

# No ``from __future__ import annotations``: LitServe builds the route from decode_request's
# annotation, which must be the object (``Upload``), not a string.

import asyncio
import hmac
import json
import logging
import multiprocessing
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import httptools
import litserve as ls
import numpy as np
import torch
from fastapi import Depends, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from litserve.utils import WorkerSetupStatus
from omegaconf import DictConfig
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from cifarkit.core.devices import resolve_accelerator
from cifarkit.core.errors import UserError
from cifarkit.core.untrusted import ImageTooLarge, decode_image, shown, to_json
from cifarkit.core.untrusted.digest import sha256_of
from cifarkit.core.untrusted.keys import ENV, read_api_key
from cifarkit.core.untrusted.sizes import decoded_megapixels
from cifarkit.infer.model import load_model
from cifarkit.infer.predict import top_classes
from cifarkit.infer.serve_page import PAGE, SCRIPT, STYLE

log = logging.getLogger(__name__)
ROUTES = (
    "/predict",
    "/health",
)  # LitServe's routes that are kept: not /info, /docs, /redoc, /openapi.json (docs/trust.md)
OPEN = ("/", "/page.js", "/page.css", "/live", "/ready", "/health")  # answered without the key
MAX_FIELDS = 16  # text fields of a multipart upload; its parts past this are not parsed


class Gone(Exception):
    """The client of an upload closed its connection before the decode began: nobody reads the answer."""


class DecodePool:
    """Decoding off the event loop, in ``threads`` threads, bounded three ways: the images being decoded at once
    hold at most ``megapixels`` (each weighed from its header; a larger one runs alone), so a burst of costly
    uploads holds the memory of one; at most ``waiting`` wait for a thread (past them a 503 at once); and an
    image whose client has gone by its turn is skipped."""

    def __init__(self, threads: int, waiting: int, megapixels: float) -> None:
        self.threads, self.waiting = threads, waiting
        self.pending, self.held = 0, 0  # held: pixels, a whole number (sums exactly)
        self.limit = int(megapixels * 1e6)
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="decode")  # threads start in the API process
        self.budget = threading.Condition()

    async def decode(self, gone: Any, data: bytes, size: int, max_megapixels: float) -> np.ndarray:
        if self.pending >= self.threads + self.waiting:
            raise HTTPException(
                503, f"the server is busy ({self.waiting} images wait to be decoded); send the image again shortly"
            )
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.executor, self._run, gone, data, size, max_megapixels
            )
        finally:
            self.pending -= 1

    def _run(self, gone: Any, data: bytes, size: int, max_megapixels: float) -> np.ndarray:
        """In a decoding thread: the header read (in the thread: a crafted one may be slow to walk), the
        image's turn within the budget, then the decode, unless its client has gone by then."""
        if gone():
            raise Gone
        weight = min(round(decoded_megapixels(data, size) * 1e6), self.limit)
        with self.budget:
            self.budget.wait_for(lambda: self.held == 0 or self.held + weight <= self.limit)
            self.held += weight
        try:
            if gone():
                raise Gone
            return decode_image(data, size, "the image", "send a PNG or JPEG file", max_megapixels)
        finally:
            with self.budget:
                self.held -= weight
                self.budget.notify_all()


@dataclass(frozen=True)
class Limits:
    """What the API process needs to turn a request into the model's input."""

    image_size: int
    max_body: int  # bytes
    max_megapixels: float
    decoder: DecodePool


async def upload(request: Request) -> np.ndarray:
    """The request's image as uint8 (size, size, 3), prepared as predict.py prepares a file, or
    an HTTPException with one line (415 content type, 413 too large, 400 unreadable, 503 queue full;
    499, which nobody reads, when its client has gone)."""
    limits: Limits = request.app.state.limits
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    if not (kind in ("", "application/octet-stream", "multipart/form-data") or kind.startswith("image/")):
        raise HTTPException(
            415,
            f"Content-Type {shown(kind)[:100]} is not an image; send the image file as the body "
            "(image/png, image/jpeg) or as a multipart/form-data upload",
        )
    try:
        if int(request.headers.get("content-length") or 0) > limits.max_body:
            raise HTTPException(413, too_large(limits))
    except ValueError:
        raise HTTPException(400, "the Content-Length header is not a number") from None
    try:
        data = await (file_part(request, limits) if kind == "multipart/form-data" else body(request, limits))
    except ClientDisconnect:  # nobody will read the answer (499, as nginx counts it), and it is no server error
        raise HTTPException(499, "the client went away before its image was decoded") from None
    if not data:
        raise HTTPException(400, "the request carries no image; send a PNG or JPEG file")
    gone = request.scope.get("cifarkit.gone", lambda: False)
    try:
        return await limits.decoder.decode(gone, data, limits.image_size, limits.max_megapixels)
    except Gone:
        raise HTTPException(499, "the client went away before its image was decoded") from None
    except UserError as e:
        raise HTTPException(413 if isinstance(e, ImageTooLarge) else 400, str(e)) from None


def too_large(limits: Limits) -> str:
    return f"the request body is over max_body_mb ({limits.max_body / 2**20:g} MB); send a smaller image"


async def limited(request: Request, limits: Limits) -> AsyncIterator[bytes]:
    """The request body's chunks, stopped with a 413 once they pass ``max_body``."""
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limits.max_body:
            raise HTTPException(413, too_large(limits))
        yield chunk


async def body(request: Request, limits: Limits) -> bytes:
    return b"".join([chunk async for chunk in limited(request, limits)])


async def file_part(request: Request, limits: Limits) -> bytes:
    """The one file of a multipart/form-data body (RFC 7578), parsed by Starlette's parser
    (python-multipart) as it streams in: a few text fields at most, two files at most (to say how many)."""
    parser = MultiPartParser(
        request.headers, limited(request, limits), max_files=2, max_fields=MAX_FIELDS, max_part_size=limits.max_body
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise HTTPException(
            400,
            f"the multipart/form-data upload cannot be read ({shown(e.message)[:200]}); "
            "send one file, or the image itself as the body",
        ) from None
    try:
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if len(files) != 1:
            raise HTTPException(400, f"a multipart/form-data upload must carry one file, this one has {len(files)}")
        return await files[0].read()
    finally:
        await form.close()


class Pixels(np.ndarray):
    """A decoded image whose text is short: LitServe formats every request into a debug line (an f-string, made
    even when nothing logs it), which for a whole array cost about 5% of the API process's time."""

    def __repr__(self) -> str:
        return f"<pixels {'x'.join(map(str, self.shape))}>"

    __str__ = __repr__


async def pixels(request: Request) -> Pixels:
    return (await upload(request)).view(Pixels)


Upload = Annotated[np.ndarray, Depends(pixels)]


class HeadersTooLarge(httptools.HttpParserError):
    """A request line and headers past ``max_headers`` lines or ``max_header_kb``: refused as they arrive."""


class Guarded(HttpToolsProtocol):
    """uvicorn's HTTP protocol with the bounds it lacks. Deadlines: a request must arrive whole (headers
    and body) within ``read_timeout`` of its first byte, and a connection that sends nothing is closed after
    ``keep_alive``, before its first request as after an answer (uvicorn waits for a slow client forever).
    Headers: at most ``max_headers`` lines and ``max_header_bytes`` with the request line, else 431 and the
    connection closed (uvicorn keeps them all). And it tells the application, through the request's scope
    (``cifarkit.gone``), whether the client has closed its end, from any thread."""

    read_timeout = 10.0  # the four are set per server by ``guarded_protocol``
    keep_alive = 5.0
    max_headers = 100
    max_header_bytes = 65536
    headers_out: list[tuple[bytes, bytes]] = []  # the Gate's security and identity headers
    _deadline: asyncio.TimerHandle | None = None
    _idle = True
    _fd = -1
    _too_large = False
    _header_lines = 0
    _header_bytes = 0

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1
        self._arm(self.keep_alive)

    def data_received(self, data: bytes) -> None:
        if self._idle:  # the first byte of a request starts its clock
            self._idle = False
            self._arm(self.read_timeout)
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_lines, self._header_bytes = 0, 0

    def _count(self, size: int, line: int) -> None:
        self._header_lines += line
        self._header_bytes += size
        if self._header_lines > self.max_headers or self._header_bytes > self.max_header_bytes:
            self._too_large = True
            raise HeadersTooLarge

    def on_url(self, url: bytes) -> None:
        self._count(len(url), 0)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4, 1)
        super().on_header(name, value)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse; for headers past the bounds, a JSON 431."""
        if not self._too_large:
            return super().send_400_response(msg)
        body = to_json(
            {
                "error": f"the request's headers are over {self.max_headers} lines or "
                f"{self.max_header_bytes // 1024} kB; send fewer and shorter headers"
            }
        ).encode()
        headers = b"".join(b"%s: %s\r\n" % pair for pair in self.headers_out)
        self.transport.write(
            STATUS_LINE[431]
            + headers
            + b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
            + body
        )
        self.transport.close()

    def on_headers_complete(self) -> None:
        self.scope["cifarkit.gone"] = self.gone  # type: ignore[typeddict-unknown-key]
        super().on_headers_complete()

    def gone(self) -> bool:
        """Whether the client has closed its end (or the connection is closed): the kernel says so before
        the event loop does."""
        if self.transport.is_closing() or self._fd < 0:
            return True
        poll = select.poll()
        poll.register(self._fd, select.POLLRDHUP)
        return any(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, events in poll.poll(0))

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._idle = True
            self._arm(self.keep_alive)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def guarded_protocol(cfg: DictConfig, headers: list[tuple[bytes, bytes]]) -> type[Guarded]:
    return type(
        "Guarded",
        (Guarded,),
        {
            "headers_out": headers,
            "read_timeout": float(cfg.read_timeout),
            "keep_alive": float(cfg.keep_alive),
            "max_headers": int(cfg.max_headers),
            "max_header_bytes": int(float(cfg.max_header_kb) * 1024),
        },
    )


@dataclass(frozen=True)
class Identity:
    """Which model answers: after a redeploy, logs, metrics and clients can tell two models apart."""

    file: str  # the checkpoint's or ONNX model's file name
    sha256: str  # of the file's bytes: its weights (and, in a .ckpt, what travels with them)
    classes: list[str]
    image_size: int

    @classmethod
    def of(cls, path: str, classes: list[str], image_size: int) -> "Identity":
        return cls(Path(path).name, sha256_of(path), list(classes), image_size)

    @property
    def header(self) -> str:
        """``X-Model``'s value: the file name (percent-encoded: a header is ASCII) and the hash's first 16 digits."""
        return f"{quote(self.file)} sha256:{self.sha256[:16]}"


class Metrics:
    """What operators look for first, at ``GET /metrics`` in Prometheus's text format (prometheus_client):
    requests by route, status and model, their latency, the size of the forward pass that answered each,
    and the model's identity as labels."""

    def __init__(self, identity: Identity) -> None:
        self.registry = CollectorRegistry()
        self.model = identity.sha256[:16]
        Info("cifarkit_model", "The model being served", registry=self.registry).info(
            {
                "file": shown(identity.file)[:200],
                "sha256": identity.sha256,
                "classes": ",".join(identity.classes)[:1000],
                "image_size": str(identity.image_size),
            }
        )
        self.requests = Counter(
            "cifarkit_requests", "HTTP requests answered", ["path", "status", "model"], registry=self.registry
        )
        self.latency = Histogram(
            "cifarkit_request_seconds",
            "Time from a request's arrival to its answer's start",
            ["path"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "cifarkit_predict_in_flight", "/predict requests being read, decoded or answered", registry=self.registry
        )
        self.batch = Histogram(
            "cifarkit_batch_size",
            "Images in the forward pass that answered a /predict request",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )

    def observe(self, path: str, status: int, seconds: float, batch: int | None) -> None:
        self.requests.labels(path, str(status), self.model).inc()
        self.latency.labels(path).observe(seconds)
        if batch is not None:
            self.batch.observe(batch)

    async def page(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


# On every answer: the page may run only its own script and style (no inline code, no other origin), may
# not be framed, and nothing is cached or sniffed.
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
]


@dataclass
class Shared:
    """What the main process and the API process (forked from it) share: the drain, and the requests in flight."""

    draining: Any  # multiprocessing.Event
    in_flight: Any  # multiprocessing.Value("i")


class Gate:
    """A pure ASGI middleware (nothing buffered) in front of every route: the key, the drain, the bound on
    requests served at once, the security and identity headers, the metrics and one log line per request."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        key: str | None,
        identity: Identity,
        shared: Shared,
        max_requests: int,
        request_log: str,
        metrics: Metrics,
        ready: Any,
    ) -> None:
        self.app, self.key = app, None if key is None else key.encode()
        self.identity, self.shared, self.max_requests = identity, shared, max_requests
        self.request_log, self.metrics, self.ready = request_log, metrics, ready
        self.active = 0
        self.headers = [*SECURITY_HEADERS, (b"x-model", identity.header.encode())]

    def authorized(self, scope: Scope) -> bool:
        """The key in ``X-API-Key`` or ``Authorization: Bearer``, compared in constant time."""
        given = b""
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                given = value
            elif name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
        return hmac.compare_digest(given, self.key)  # type: ignore[arg-type]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, request_id = time.perf_counter(), os.urandom(8).hex()
        path = scope["path"] if scope["path"] in (*ROUTES, *OPEN, "/metrics") else "other"
        seen: dict[str, Any] = {"status": 0, "batch": None}
        extra = [*self.headers, (b"x-request-id", request_id.encode())]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                size = dict(headers).get(b"x-batch-size")
                seen["status"], seen["batch"] = message["status"], int(size) if size and size.isdigit() else None
                if seen["status"] == 503:
                    headers.append((b"retry-after", b"1"))
                message = {**message, "headers": headers + extra}
                self.metrics.observe(path, seen["status"], time.perf_counter() - start, seen["batch"])
            await send(message)

        try:
            if path in OPEN:
                await self.app(scope, receive, sending)
            elif self.key is not None and not self.authorized(scope):
                await refuse(sending, 401, f"this server needs its API key in the X-API-Key header (${ENV})")
            elif self.shared.draining.is_set():
                await refuse(sending, 503, "the server is stopping; send the request to another instance")
            elif path != "/metrics" and not self.ready():
                await refuse(sending, 503, "the model is warming up; send the request again shortly")
            elif self.active >= self.max_requests:
                await refuse(sending, 503, f"the server is busy ({self.max_requests} requests in flight); retry soon")
            else:
                gauge = self.metrics.in_flight if path == "/predict" else None
                self.active += 1
                with self.shared.in_flight.get_lock():
                    self.shared.in_flight.value += 1
                if gauge is not None:
                    gauge.inc()
                try:
                    await self.app(scope, receive, sending)
                finally:
                    self.active -= 1
                    with self.shared.in_flight.get_lock():
                        self.shared.in_flight.value -= 1
                    if gauge is not None:
                        gauge.dec()
        finally:
            self.log(request_id, scope["method"], path, seen, time.perf_counter() - start)

    def log(self, request_id: str, method: str, path: str, seen: dict[str, Any], seconds: float) -> None:
        """One line per request: nothing the client sent but the method (escaped) and which route it asked
        for (one of the server's, or "other"); never a body."""
        if self.request_log == "none":
            return
        line = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "id": request_id,
            "method": shown(method)[:16],
            "path": path,
            "status": seen["status"],
            "ms": round(seconds * 1000, 2),
            "batch": seen["batch"],
            "model": self.metrics.model,
        }
        if self.request_log == "json":
            text = json.dumps(line)
        else:
            text = " ".join(f"{k}={v}" for k, v in line.items())
        sys.stderr.write(text + "\n")


async def refuse(send: Send, status: int, error: str) -> None:
    body = to_json({"error": error}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


@dataclass(frozen=True)
class Answer:
    top: list[list] | None  # None: the net's output for this image was not finite
    forward_pass: int  # which of the worker's forward passes answered
    batch_size: int  # how many images that pass held


class Classifier(ls.LitAPI):
    """The model in LitServe's inference worker: decoded images in, each one's top classes out."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(max_batch_size=int(cfg.max_batch_size), batch_timeout=float(cfg.batch_timeout))
        self.cfg = cfg
        self.passes = 0

    def setup(self, device: str) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches every process: the main one stops this one
        if self.cfg.threads:
            torch.set_num_threads(int(self.cfg.threads))
        model = load_model(self.cfg)
        self.score, self.classes = model.score, model.classes
        for size in sorted({1, self.max_batch_size}):  # warm-up: ready says 200 only after these passes
            for _ in range(3):
                self.score(np.zeros((size, model.image_size, model.image_size, 3), np.uint8))

    def decode_request(self, request: Upload) -> np.ndarray:
        return request.view(np.ndarray)  # decoded in the API process by ``upload``

    @torch.inference_mode()
    def predict(self, images: np.ndarray) -> list[Answer] | Answer:
        """One forward pass: a stack of images when batching (LitServe's ``batch``), else one image."""
        batch = images if self.max_batch_size > 1 else images[None]
        self.passes += 1
        answers = [
            Answer(top, self.passes, len(batch))
            for top in top_classes(self.score(batch), self.classes, int(self.cfg.top_k))
        ]
        return answers if self.max_batch_size > 1 else answers[0]

    def encode_response(self, answer: Answer) -> Response:
        headers = {"X-Batch-Size": str(answer.batch_size), "X-Forward-Pass": str(answer.forward_pass)}
        if answer.top is None:  # never NaN in an answer: it is not JSON
            return Response(
                to_json(
                    {
                        "error": "the model's output for this image is not a number (NaN/inf); "
                        "the checkpoint's net overflows on it"
                    }
                ),
                status_code=500,
                media_type="application/json",
                headers=headers,
            )
        return Response(to_json({"top": answer.top}), media_type="application/json", headers=headers)


async def json_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Every HTTP error (ours, FastAPI's 404/405, LitServe's 500) as ``{"error": "<one line>"}``."""
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def page() -> HTMLResponse:
    return HTMLResponse(PAGE)


async def script() -> Response:
    return Response(SCRIPT, media_type="text/javascript")


async def style() -> Response:
    return Response(STYLE, media_type="text/css")


async def live() -> JSONResponse:
    return JSONResponse({"live": True})


def check_port_free(host: str, port: int) -> None:
    """The port can be bound (as uvicorn binds it), or one line now rather than a log line later."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"port={port} cannot be used on {host} ({e.strerror}); pass another port=") from None


class Server(ls.LitServer):
    """LitServer that SIGTERM (a service manager's or container's stop) and Ctrl+C stop cleanly,
    and that stops (rather than hangs) when its inference worker dies.

    LitServe ends its API process, inference worker and queue manager once its shutdown event is
    set; but a plain SIGTERM kills this process alone and leaves them running, and when the worker
    dies its monitor ends everything without setting the event, so ``run()`` waits forever. Here
    either signal sets the event, the monitor's shutdown sets it too, and the event is a plain
    ``multiprocessing.Event`` rather than one held by the manager, which may be gone by then.

    A signal drains first: ``shared.draining`` makes ready and new requests answer 503 (the port stays
    open, so a request meets an answer, not a reset), and the shutdown waits until the requests in flight
    are answered or ``grace`` seconds have passed. The API process starts without waiting for the
    inference worker, so that ``/live`` answers at once and ``/ready`` says 503 until the worker is warm.
    """

    def __init__(self, *args: Any, grace: float = 30.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stopped_by: str | None = None  # the signal that stopped the server
        self._shutdown_once = threading.Lock()
        self._shut_down = False
        self.grace = grace
        self.shared = Shared(multiprocessing.Event(), multiprocessing.Value("i", 0))
        self._warm = False

    def verify_worker_status(self) -> None:
        """LitServe waits here for a worker to be ready before it starts the API process; ``ready`` says it."""

    def ready(self) -> bool:
        """Whether every inference worker has loaded, checked and warmed up its model (asked once it is)."""
        if not self._warm:
            status = dict(self.workers_setup_status)
            self._warm = bool(status) and all(v == WorkerSetupStatus.READY for v in status.values())
        return self._warm

    def _init_manager(self, num_api_servers: int) -> Any:
        manager = super()._init_manager(num_api_servers)
        self._shutdown_event = multiprocessing.Event()
        return manager

    def _perform_graceful_shutdown(self, *args: Any, **kwargs: Any) -> None:
        with self._shutdown_once:  # run()'s, after the event, or the monitor's, first: not both
            if not self._shut_down:
                self._shut_down = True
                super()._perform_graceful_shutdown(*args, **kwargs)
        self._shutdown_event.set()

    def stop_on_signals(self) -> None:
        main_pid = os.getpid()

        def stop(name: str) -> None:
            log.info(
                f"{name}: draining (requests in flight are answered, new ones get 503; drain_grace={self.grace:g} s)"
            )
            self.stopped_by = name
            self.shared.draining.set()
            deadline = time.monotonic() + self.grace
            while self.shared.in_flight.value > 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            if self.shared.in_flight.value > 0:
                log.warning(
                    f"{self.shared.in_flight.value} requests still in flight after drain_grace; stopping anyway"
                )
            log.info(f"{name}: stopping the server")
            self._shutdown_event.set()

        def handler(signum: int, frame: object) -> None:
            if os.getpid() != main_pid or self._shutdown_event is None:  # a forked child, or nothing started yet
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            for s in (signal.SIGTERM, signal.SIGINT):  # once is enough
                signal.signal(s, signal.SIG_IGN)
            # from a thread: the main thread may hold the event's lock right now
            threading.Thread(target=stop, args=(signal.Signals(signum).name,), name="stop", daemon=True).start()

        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, handler)


def check_key(cfg: DictConfig) -> str | None:
    """The API key (``$CIFARKIT_API_KEY`` or ``api_key_file``; never an option, which ``ps`` would show), and
    the refusal to answer other machines without one unless ``allow_anonymous=true``."""
    key = read_api_key(cfg.api_key_file)
    if key is None and cfg.host != "127.0.0.1" and not cfg.allow_anonymous:
        raise UserError(
            f"host={cfg.host} answers other machines, and no API key is set; set ${ENV} or api_key_file=, "
            "or pass allow_anonymous=true to serve anyone who reaches the port"
        )
    return key


def serve(cfg: DictConfig) -> None:
    """Serve ``cfg.ckpt_path`` on ``cfg.host:cfg.port`` until SIGTERM or Ctrl+C (its options checked by
    cifarkit/run/schema.py)."""
    key = check_key(cfg)
    checked = load_model(cfg, device="cpu")  # refused here, in one line, if bad; the worker loads it on its device
    classes, size = checked.classes, checked.image_size
    identity = Identity.of(str(cfg.ckpt_path), classes, size)
    device = "cpu" if str(cfg.ckpt_path).lower().endswith(".onnx") else resolve_accelerator(cfg.device)
    check_port_free(cfg.host, int(cfg.port))

    try:
        server = Server(
            Classifier(cfg),
            accelerator=device,
            devices=1,
            grace=float(cfg.drain_grace),
            fast_queue=bool(cfg.fast_queue),
        )
    except ValueError as e:  # LitServe's own checks (batch_timeout must stay under its request timeout...)
        raise UserError(str(e).splitlines()[0]) from e
    decoder = DecodePool(int(cfg.decode_threads), int(cfg.max_decode_queue), float(cfg.max_megapixels))
    server.app.state.limits = Limits(size, int(float(cfg.max_body_mb) * 2**20), float(cfg.max_megapixels), decoder)
    server.app.add_exception_handler(HTTPException, json_error)
    # LitServe's own pages go: "/" (a "litserve running" line), /info (the server's settings), and
    # FastAPI's /docs, /redoc and /openapi.json (Swagger's page loads its script from a CDN).
    server.app.router.routes = [r for r in server.app.router.routes if getattr(r, "path", None) in ROUTES]
    metrics = Metrics(identity)

    async def ready() -> JSONResponse:
        if server.shared.draining.is_set():
            return JSONResponse({"ready": False, "why": "draining"}, status_code=503)
        if not server.ready():
            return JSONResponse({"ready": False, "why": "warming up"}, status_code=503)
        return JSONResponse({"ready": True, "model": asdict(identity)})

    for path, route in (
        ("/", page),
        ("/page.js", script),
        ("/page.css", style),
        ("/live", live),
        ("/ready", ready),
        ("/metrics", metrics.page),
    ):
        server.app.add_api_route(path, route, methods=["GET"], include_in_schema=False)
    server.app.add_middleware(
        Gate,
        key=key,
        identity=identity,
        shared=server.shared,
        max_requests=int(cfg.max_requests),
        request_log=str(cfg.request_log),
        metrics=metrics,
        ready=server.ready,
    )
    url = f"http://{'[::1]' if cfg.host == '::' else cfg.host}:{cfg.port}/"
    log.info(
        f"serving {cfg.ckpt_path} ({len(classes)} classes, {size}x{size}, sha256 {identity.sha256[:16]}) on {device} "
        f"at {url} (POST /predict, GET /live, /ready, /metrics); batches of up to {cfg.max_batch_size}; "
        + ("an API key is required" if key else "no API key")
    )
    server.stop_on_signals()
    server.run(
        host=cfg.host,
        port=int(cfg.port),
        generate_client_file=False,
        http=guarded_protocol(cfg, [*SECURITY_HEADERS, (b"x-model", identity.header.encode())]),
        limit_concurrency=int(cfg.max_connections),  # connections, idle ones included: a bound on sockets
        timeout_keep_alive=float(cfg.keep_alive),
        access_log=False,  # the Gate writes one line per request
    )
    if server.stopped_by is None:
        codes = [w.exitcode for w in server.inference_workers]
        raise UserError(
            f"the inference worker stopped (exit code {', '.join(map(str, codes))}; its log is above), so the server "
            "did"
        )
    log.info("server stopped")
