"""Load on serve.py: requests/s and latency with dynamic batching on and off, and the README's screenshot.

    python benchmarks/serve_bench.py --ckpt CKPT [--clients 16] [--requests 800] [--image FILE]
                                     [--override key=value ...]
    python benchmarks/serve_bench.py --url http://127.0.0.1:8000 [--clients 16] [--requests 800]
    python benchmarks/serve_bench.py --ckpt CKPT --screenshot docs/serve.png [--photo FILE]

With ``--ckpt`` it starts ``serve.py`` twice on a free port of 127.0.0.1, first as configured
(serve.yaml's batching, or ``--override``) and then with ``max_batch_size=1``, and stops each with
SIGTERM; with ``--url`` it loads a server that is already running, once. Each run sends warm-up
requests, then ``--clients`` threads (one keep-alive connection each) post the same image until
``--requests`` answers are in: a 640x480 JPEG made here (a photo's size, so that decoding and
resizing count) unless ``--image``. It prints a table, then one JSON object as its last line:
requests/s, p50/p99 latency, the mean batch the server reported, and failed requests (any answer
but 200, or none), which should be 0.

``--screenshot PATH`` instead opens the page in Chromium (Playwright, /usr/bin/chromium), chooses
``--photo`` (default: scikit-image's ``data.chelsea()``, a cat photo in the public domain, cropped
square) and saves the page with its answer as a PNG.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from cifarkit.infer.serve_page import CHROMIUM, CHROMIUM_ARGS
from results import add_argument, machine, save

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 20


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--ckpt", help="a .ckpt or .onnx: start serve.py on it (batching on, then off)")
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--requests", type=int, default=800, help="answers to wait for, per run")
    p.add_argument("--image", help="the image every request sends (default: a 640x480 JPEG made here)")
    p.add_argument(
        "--override", nargs="*", default=[], help="serve.py options for the batching run, e.g. max_batch_size=32"
    )
    p.add_argument("--screenshot", help="save the page with --photo's answer to this PNG instead of timing")
    add_argument(p)
    p.add_argument(
        "--photo", help="the image for --screenshot (default: scikit-image's data.chelsea(), cropped square)"
    )
    return p.parse_args()


def jpeg_640x480() -> bytes:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    pixels = np.stack([x * 255 // 639, y * 255 // 479, (x + y) * 255 // 1118], axis=-1) + rng.integers(
        -20, 21, (480, 640, 3)
    )
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """``python serve.py`` in a subprocess on 127.0.0.1, until the ``with`` block ends (SIGTERM)."""

    def __init__(self, ckpt: str, overrides: list[str], log_dir: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.args = [
            sys.executable,
            str(ROOT / "serve.py"),
            f"ckpt_path={ckpt}",
            f"port={urlsplit(self.url).port}",
            f"paths.log_dir={log_dir}",
            *overrides,
        ]
        self.log = log_dir / f"serve-{len(list(log_dir.glob('serve-*.log')))}.log"

    def __enter__(self) -> str:
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, cwd=self.log.parent)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"serve.py stopped:\n{self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.read() == b"ok":
                        return self.url
            except OSError:
                time.sleep(0.2)
        raise SystemExit(f"serve.py was not ready in 300 s:\n{self.log.read_text()[-2000:]}")

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(120)
        if code != 0:
            print(f"serve.py exited with {code}:\n{self.log.read_text()[-2000:]}", file=sys.stderr)


def load(url: str, body: bytes, clients: int, requests: int) -> dict[str, Any]:
    """``clients`` threads post ``body`` until ``requests`` answers are in; throughput and latency."""
    split = urlsplit(url)
    lock, started = threading.Lock(), [0]
    latencies: list[float] = []
    batches: list[int] = []
    failed = [0]

    def client() -> None:
        conn = http.client.HTTPConnection(split.hostname, split.port, timeout=60)
        while True:
            with lock:
                if started[0] >= requests:
                    break
                started[0] += 1
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/predict", body=body, headers={"Content-Type": "image/jpeg"})
                r = conn.getresponse()
                r.read()
                ok, batch = r.status == 200, int(r.getheader("X-Batch-Size") or 0)
            except (OSError, http.client.HTTPException):
                conn.close()
                ok, batch = False, 0
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - t0)
                    batches.append(batch)
                else:
                    failed[0] += 1
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {
        "requests": requests,
        "clients": clients,
        "seconds": round(seconds, 2),
        "requests_per_s": round(len(latencies) / seconds, 1),
        "p50_ms": round(1000 * cuts[49], 1),
        "p99_ms": round(1000 * cuts[98], 1),
        "mean_batch": round(statistics.fmean(batches), 2) if batches else None,
        "failed": failed[0],
    }


def measure(url: str, body: bytes, args: argparse.Namespace) -> dict[str, Any]:
    load(url, body, min(args.clients, WARMUP), WARMUP)
    return load(url, body, args.clients, args.requests)


def screenshot(args: argparse.Namespace, log_dir: Path) -> None:
    from playwright.sync_api import sync_playwright

    photo = Path(args.photo) if args.photo else log_dir / "chelsea.png"
    if not args.photo:  # cropped square, as the model sees a square (predict.py resizes, never crops)
        from skimage import data  # scikit-image: a dev dependency, for this photo only

        cat = data.chelsea()
        side = min(cat.shape[:2])
        left = (cat.shape[1] - side) // 2
        Image.fromarray(cat[:side, left : left + side]).save(photo)
    with Served(args.ckpt, args.override, log_dir) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 800, "height": 340})
        page.goto(url + "/")
        page.set_input_files("#file", str(photo))
        page.wait_for_selector(".row", timeout=60_000)
        page.screenshot(path=args.screenshot)
        top = page.eval_on_selector_all(".row", "rows => rows.map(r => [r.dataset.name, Number(r.dataset.p)])")
        browser.close()
    print(
        json.dumps(
            {"screenshot": args.screenshot, "bytes": os.path.getsize(args.screenshot), "photo": photo.name, "top": top}
        )
    )


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="serve_bench-") as tmp:
        if args.screenshot:
            return screenshot(args, Path(tmp))
        body = Path(args.image).read_bytes() if args.image else jpeg_640x480()
        runs: dict[str, dict[str, Any]] = {}
        if args.url:
            runs["as running"] = measure(args.url, body, args)
        else:
            for name, overrides in (("batching", args.override), ("no batching", [*args.override, "max_batch_size=1"])):
                with Served(args.ckpt, overrides, Path(tmp)) as url:
                    runs[name] = measure(url, body, args)
    print(f"{'':<12} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} {'failed':>6}")
    for name, r in runs.items():
        print(
            f"{name:<12} {r['requests_per_s']:>8} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['mean_batch']!s:>6} "
            f"{r['failed']:>6}"
        )
    report = {"image_bytes": len(body), "clients": args.clients, "runs": runs, "machine": machine()}
    if not args.url:  # a server started here, on this machine
        save(args.results, "serve", report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
