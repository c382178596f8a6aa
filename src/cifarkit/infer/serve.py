"""Serve a trained model over HTTP with LitServe: ``python serve.py ckpt_path=... [port=8000]``.

* ``POST /predict``: an image (PNG, JPEG, any size; the raw body, or one file of a
  multipart/form-data upload) -> ``{"top": [[class, probability], ...]}``, the numbers predict.py
  prints for the same file. Requests that wait together share one forward pass (LitServe's
  dynamic batching: ``max_batch_size``, ``batch_timeout``); the ``X-Batch-Size`` and
  ``X-Forward-Pass`` headers say which pass answered and how many images it held.
* ``GET /``: a page to choose or drop an image on; ``GET /health``: "ok" once the model is loaded;
  ``GET /metrics``: requests by status, latency and batch sizes in Prometheus's text format.
* Bad input gets a 4xx ``{"error": "<one line>"}`` and the server goes on; every answer is strict JSON.

Everything a client sends crosses the project's one boundary (cifarkit/core/untrusted/, docs/trust.md):
the body is read up to ``max_body_mb``, a multipart upload parsed by Starlette's own parser,
the image decoded by ``decode_image`` (PNG or JPEG, ``max_megapixels``) in a pool of
``decode_threads`` threads, off the event loop; a client has ``read_timeout`` seconds to send a
whole request, and at most ``max_connections`` are open at once.

The model is loaded as predict.py loads it (``infer.model.load_model``: checked, then only trusted classes
built): once in this process on the CPU, so that a bad or crafted file is refused in one line
before anything starts, then in LitServe's inference worker for serving. Requests are read and
decoded in LitServe's API process; the worker only ever sees decoded pixels.
"""

# No ``from __future__ import annotations``: LitServe builds the route from decode_request's
# annotation, which must be the object (``Upload``), not a string.

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any

import litserve as ls
import numpy as np
import torch
from fastapi import Depends, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from omegaconf import DictConfig
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from cifarkit.core.devices import resolve_accelerator
from cifarkit.core.errors import UserError
from cifarkit.core.untrusted import ImageTooLarge, decode_image, shown, to_json
from cifarkit.infer.model import load_model
from cifarkit.infer.predict import top_classes
from cifarkit.infer.serve_page import PAGE

log = logging.getLogger(__name__)
ROUTES = (
    "/predict",
    "/health",
)  # LitServe's routes that are kept: not /info, /docs, /redoc, /openapi.json (docs/trust.md)
MAX_FIELDS = 16  # text fields of a multipart upload; its parts past this are not parsed


@dataclass(frozen=True)
class Limits:
    """What the API process needs to turn a request into the model's input."""

    image_size: int
    max_body: int  # bytes
    max_megapixels: float
    decoder: ThreadPoolExecutor  # decoding runs here, off the event loop: a bounded pool


async def upload(request: Request) -> np.ndarray:
    """The request's image as uint8 (size, size, 3), prepared as predict.py prepares a file, or
    an HTTPException with one line (415 content type, 413 too large, 400 unreadable)."""
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
    except ClientDisconnect:  # nobody will read the answer, but it is no server error
        raise HTTPException(400, "the client went away before sending the whole body") from None
    if not data:
        raise HTTPException(400, "the request carries no image; send a PNG or JPEG file")
    try:
        return await asyncio.get_running_loop().run_in_executor(
            limits.decoder,
            decode_image,
            data,
            limits.image_size,
            "the image",
            "send a PNG or JPEG file",
            limits.max_megapixels,
        )
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


Upload = Annotated[np.ndarray, Depends(upload)]


class ReadDeadline(HttpToolsProtocol):
    """uvicorn's HTTP protocol, with a deadline for each request to arrive whole (headers and
    body): uvicorn itself waits for a slow client forever. The clock starts when the connection
    opens and after each answer, and stops when the request is complete; at the deadline the
    connection is closed."""

    read_timeout = 10.0  # set per server by ``deadline_protocol``
    _deadline: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.read_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def deadline_protocol(read_timeout: float) -> type[ReadDeadline]:
    return type("ReadDeadline", (ReadDeadline,), {"read_timeout": read_timeout})


class Metrics:
    """What operators look for first, at ``GET /metrics`` in Prometheus's text format (prometheus_client):
    requests by route and status, their latency, and the size of the forward pass that answered each."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cifarkit_requests", "HTTP requests answered", ["path", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "cifarkit_request_seconds",
            "Time from a request's arrival to its answer's start",
            ["path"],
            registry=self.registry,
        )
        self.batch = Histogram(
            "cifarkit_batch_size",
            "Images in the forward pass that answered a /predict request",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """A pure ASGI middleware (nothing buffered) that counts every answer, 4xx and 5xx included."""

        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                return await app(scope, receive, send)
            path = scope["path"] if scope["path"] in (*ROUTES, "/", "/metrics") else "other"
            start = time.perf_counter()

            async def sending(message: Message) -> None:
                if message["type"] == "http.response.start":
                    self.requests.labels(path, str(message["status"])).inc()
                    self.latency.labels(path).observe(time.perf_counter() - start)
                    size = dict(message.get("headers", [])).get(b"x-batch-size")
                    if size is not None and size.isdigit():
                        self.batch.observe(int(size))
                await send(message)

            await app(scope, receive, sending)

        return counted

    async def page(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


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

    def decode_request(self, request: Upload) -> np.ndarray:
        return request  # decoded in the API process by ``upload``

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
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stopped_by: str | None = None  # the signal that stopped the server
        self._shutdown_once = threading.Lock()
        self._shut_down = False

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
            log.info(f"{name}: stopping the server")
            self.stopped_by = name
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


def serve(cfg: DictConfig) -> None:
    """Serve ``cfg.ckpt_path`` on ``cfg.host:cfg.port`` until SIGTERM or Ctrl+C (its options checked by
    cifarkit/run/schema.py)."""
    checked = load_model(cfg, device="cpu")  # refused here, in one line, if bad; the worker loads it on its device
    classes, size = checked.classes, checked.image_size
    device = "cpu" if str(cfg.ckpt_path).lower().endswith(".onnx") else resolve_accelerator(cfg.device)
    check_port_free(cfg.host, int(cfg.port))

    try:
        server = Server(Classifier(cfg), accelerator=device, devices=1)
    except ValueError as e:  # LitServe's own checks (batch_timeout must stay under its request timeout...)
        raise UserError(str(e).splitlines()[0]) from e
    decoder = ThreadPoolExecutor(
        int(cfg.decode_threads), thread_name_prefix="decode"
    )  # threads start in the API process
    server.app.state.limits = Limits(size, int(float(cfg.max_body_mb) * 2**20), float(cfg.max_megapixels), decoder)
    server.app.add_exception_handler(HTTPException, json_error)
    # LitServe's own pages go: "/" (a "litserve running" line), /info (the server's settings), and
    # FastAPI's /docs, /redoc and /openapi.json (Swagger's page loads its script from a CDN).
    server.app.router.routes = [r for r in server.app.router.routes if getattr(r, "path", None) in ROUTES]
    server.app.add_api_route("/", page, methods=["GET"], include_in_schema=False)
    metrics = Metrics()
    server.app.add_api_route("/metrics", metrics.page, methods=["GET"], include_in_schema=False)
    server.app.add_middleware(metrics.middleware)
    url = f"http://{'[::1]' if cfg.host == '::' else cfg.host}:{cfg.port}/"
    log.info(
        f"serving {cfg.ckpt_path} ({len(classes)} classes, {size}x{size}) on {device} at {url} "
        f"(POST /predict, GET /health, GET /metrics); batches of up to {cfg.max_batch_size}"
    )
    server.stop_on_signals()
    server.run(
        host=cfg.host,
        port=int(cfg.port),
        generate_client_file=False,
        http=deadline_protocol(float(cfg.read_timeout)),
        limit_concurrency=int(cfg.max_connections),
    )
    if server.stopped_by is None:
        codes = [w.exitcode for w in server.inference_workers]
        raise UserError(
            f"the inference worker stopped (exit code {', '.join(map(str, codes))}; its log is above), so the server "
            "did"
        )
    log.info("server stopped")
