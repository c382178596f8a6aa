"""Serve a trained model over HTTP with LitServe: ``python serve.py ckpt_path=... [port=8000]``.

* ``POST /predict``: an image (PNG, JPEG, any size; the raw body, or one file of a
  multipart/form-data upload) -> ``{"top": [[class, probability], ...]}``, the numbers predict.py
  prints for the same file. Requests that wait together share one forward pass (LitServe's
  dynamic batching: ``max_batch_size``, ``batch_timeout``); the ``X-Batch-Size`` and
  ``X-Forward-Pass`` headers say which pass answered and how many images it held.
* ``GET /``: a page to choose or drop an image on; ``GET /health``: "ok" once the model is loaded.
* Bad input gets a 4xx ``{"error": "<one line>"}`` and the server goes on.

The model is loaded as predict.py loads it (``model_scorer``: checked, then only trusted classes
built): once in this process on the CPU, so that a bad or crafted file is refused in one line
before anything starts, then in LitServe's inference worker for serving. Requests are read and
decoded in LitServe's API process; the worker only ever sees decoded pixels.
"""

# No ``from __future__ import annotations``: LitServe builds the route from decode_request's
# annotation, which must be the object (``Upload``), not a string.

import asyncio
import email.message
import email.parser
import email.policy
import json
import logging
import multiprocessing
import os
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any

import litserve as ls
import numpy as np
import torch
from fastapi import Depends, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from cifarkit.devices import resolve_accelerator
from cifarkit.errors import UserError
from cifarkit.images import decode_image
from cifarkit.predict import model_scorer, top_classes
from cifarkit.serve_page import PAGE

log = logging.getLogger(__name__)
HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # the addresses LitServe binds
# One decoding thread: load_image's bomb check turns a warning into an error with
# warnings.catch_warnings, whose filters are process-wide, so decodes must not overlap.
DECODER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")


@dataclass(frozen=True)
class Limits:
    """What the API process needs to turn a request into the model's input."""

    image_size: int
    max_body: int  # bytes


async def upload(request: Request) -> np.ndarray:
    """The request's image as uint8 (size, size, 3), prepared as predict.py prepares a file, or
    an HTTPException with one line (415 content type, 413 too large, 400 unreadable)."""
    limits: Limits = request.app.state.limits
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    if not (kind in ("", "application/octet-stream", "multipart/form-data") or kind.startswith("image/")):
        raise HTTPException(415, f"Content-Type {kind} is not an image; send the image file as the body "
                                 "(image/png, image/jpeg) or as a multipart/form-data upload")
    too_large = f"the request body is over max_body_mb ({limits.max_body / 2**20:g} MB); send a smaller image"
    if int(request.headers.get("content-length") or 0) > limits.max_body:
        raise HTTPException(413, too_large)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body:
                raise HTTPException(413, too_large)
    except ClientDisconnect:  # nobody will read the answer, but it is no server error
        raise HTTPException(400, "the client went away before sending the whole body") from None
    try:
        multipart = content_type if kind == "multipart/form-data" else None
        return await asyncio.get_running_loop().run_in_executor(DECODER, image, bytes(body), limits.image_size, multipart)
    except UserError as e:
        bomb = isinstance(e.__cause__, (Image.DecompressionBombError, Image.DecompressionBombWarning))
        raise HTTPException(413 if bomb else 400, str(e)) from None


def image(body: bytes, size: int, multipart: str | None) -> np.ndarray:
    """The body's image, decoded and resized: the body itself, or the one file of a
    multipart/form-data body whose Content-Type is ``multipart``."""
    data = body if multipart is None else file_part(multipart, body)
    if not data:
        raise HTTPException(400, "the request carries no image; send a PNG or JPEG file")
    return decode_image(data, size, "the image", "send a PNG or JPEG file")


def file_part(content_type: str, body: bytes) -> bytes:
    """The one file of a multipart/form-data body (RFC 7578): the part whose Content-Disposition
    names a filename, between the body's boundary lines."""
    header = email.message.EmailMessage(policy=email.policy.HTTP)
    header["Content-Type"] = content_type
    boundary = header.get_param("boundary")
    files = []
    for part in (b"\r\n" + body).split(b"\r\n--" + str(boundary).encode("latin-1"))[1:] if boundary else []:
        if part.startswith(b"--"):  # the closing boundary
            break
        head, _, content = part.partition(b"\r\n\r\n")
        if email.parser.BytesHeaderParser(policy=email.policy.HTTP).parsebytes(head.strip() + b"\r\n").get_filename() is not None:
            files.append(content)
    if len(files) != 1:
        raise HTTPException(400, f"a multipart/form-data upload must carry one file, this one has {len(files)}")
    return files[0]


Upload = Annotated[np.ndarray, Depends(upload)]


@dataclass(frozen=True)
class Answer:
    top: list[list]
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
        self.score, self.classes, _ = model_scorer(self.cfg)

    def decode_request(self, request: Upload) -> np.ndarray:
        return request  # decoded in the API process by ``upload``

    @torch.inference_mode()
    def predict(self, images: np.ndarray) -> list[Answer] | Answer:
        """One forward pass: a stack of images when batching (LitServe's ``batch``), else one image."""
        batch = images if self.max_batch_size > 1 else images[None]
        self.passes += 1
        answers = [Answer(top, self.passes, len(batch)) for top in top_classes(self.score(batch), self.classes, int(self.cfg.top_k))]
        return answers if self.max_batch_size > 1 else answers[0]

    def encode_response(self, answer: Answer) -> Response:
        return Response(json.dumps({"top": answer.top}), media_type="application/json",
                        headers={"X-Batch-Size": str(answer.batch_size), "X-Forward-Pass": str(answer.forward_pass)})


async def json_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Every HTTP error (ours, FastAPI's 404/405, LitServe's 500) as ``{"error": "<one line>"}``."""
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def page() -> HTMLResponse:
    return HTMLResponse(PAGE)


def check_options(cfg: DictConfig) -> None:
    for key, ok, want in (
        ("top_k", int(cfg.top_k) >= 1, "at least 1"),
        ("max_batch_size", int(cfg.max_batch_size) >= 1, "at least 1"),
        ("batch_timeout", float(cfg.batch_timeout) >= 0, "0 or more seconds"),
        ("max_body_mb", float(cfg.max_body_mb) > 0, "over 0"),
        ("threads", cfg.threads is None or int(cfg.threads) >= 1, "at least 1, or null"),
        ("port", 1024 <= int(cfg.port) <= 65535, "from 1024 to 65535"),
    ):
        if not ok:
            raise UserError(f"{key}={cfg[key]} must be {want}")
    if cfg.host not in HOSTS:
        raise UserError(f"host={cfg.host} cannot be served by LitServe; use 127.0.0.1 (this machine), or 0.0.0.0 or :: (every interface)")


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
    """Serve ``cfg.ckpt_path`` on ``cfg.host:cfg.port`` until SIGTERM or Ctrl+C."""
    check_options(cfg)
    is_onnx = str(cfg.ckpt_path).lower().endswith(".onnx")
    device = "cpu" if is_onnx else resolve_accelerator(cfg.device)
    _, classes, size = model_scorer(OmegaConf.merge(cfg, {"device": "cpu"}))  # refused here, in one line, if bad
    check_port_free(cfg.host, int(cfg.port))

    try:
        server = Server(Classifier(cfg), accelerator=device, devices=1)
    except ValueError as e:  # LitServe's own checks (batch_timeout must stay under its request timeout...)
        raise UserError(str(e).splitlines()[0]) from e
    server.app.state.limits = Limits(size, int(float(cfg.max_body_mb) * 2**20))
    server.app.add_exception_handler(HTTPException, json_error)
    server.app.router.routes = [r for r in server.app.router.routes if getattr(r, "path", None) != "/"]  # LitServe's "litserve running"
    server.app.add_api_route("/", page, methods=["GET"], include_in_schema=False)
    url = f"http://{'[::1]' if cfg.host == '::' else cfg.host}:{cfg.port}/"
    log.info(f"serving {cfg.ckpt_path} ({len(classes)} classes, {size}x{size}) on {device} at {url} "
             f"(POST /predict, GET /health); batches of up to {cfg.max_batch_size}")
    server.stop_on_signals()
    server.run(host=cfg.host, port=int(cfg.port), generate_client_file=False)
    if server.stopped_by is None:
        codes = [w.exitcode for w in server.inference_workers]
        raise UserError(f"the inference worker stopped (exit code {', '.join(map(str, codes))}; its log is above), so the server did")
    log.info("server stopped")
