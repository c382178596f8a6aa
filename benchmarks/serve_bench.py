"""Load on serve.py: requests/s and latency with dynamic batching on and off, against the model's own
batched forward rate; and the README's screenshot.

    python benchmarks/serve_bench.py --ckpt CKPT [--clients 16 ...] [--requests 800] [--image FILE]
                                     [--png32] [--raw] [--batching-only] [--override key=value ...]
    python benchmarks/serve_bench.py --url http://127.0.0.1:8000 [--clients 16] [--requests 800]
    python benchmarks/serve_bench.py --ckpt CKPT --screenshot docs/serve.png [--photo FILE]

With ``--ckpt`` it starts ``serve.py`` twice on a free port of 127.0.0.1, first as configured
(serve.yaml's batching, or ``--override``) and then with ``max_batch_size=1`` (not with
``--batching-only``), and stops each with SIGTERM; with ``--url`` it loads a server that is already
running, once. Each run sends warm-up requests, then for each ``--clients`` count that many threads (one
keep-alive connection each) post the same image until ``--requests`` answers are in: a 640x480 JPEG made
here (a photo's size, so that decoding and resizing count) unless ``--image`` or ``--png32`` (a 32x32
PNG). ``--raw`` first times the model alone in this process, before any server starts: batches of
``max_batch_size`` 32x32 images through the same scorer serve.py uses (``infer.model.load_model``), with
torch using every core and with one thread, so each served rate has a ratio to the raw rate on the same
cores. It prints a table, then one JSON object as its last line: requests/s, p50/p99 latency, the mean
batch the server reported, failed requests (any answer but 200, or none; should be 0) and the ratios.

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
    p.add_argument("--clients", type=int, nargs="+", default=[16], help="concurrent clients (one run each)")
    p.add_argument("--requests", type=int, default=800, help="answers to wait for, per run")
    p.add_argument("--image", help="the image every request sends (default: a 640x480 JPEG made here)")
    p.add_argument("--png32", action="store_true", help="send a 32x32 PNG made here instead")
    p.add_argument("--raw", action="store_true", help="time the model's own batched forward pass first")
    p.add_argument("--batching-only", action="store_true", help="skip the run with max_batch_size=1")
    p.add_argument("--profile", metavar="PREFIX", help="py-spy the server in the largest run: PREFIX-<role>.txt")
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


def png_32x32() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def raw_rate(ckpt: str, overrides: list[str], seconds: float = 5.0) -> dict[str, Any]:
    """Images/s of the model alone: ``max_batch_size`` images a pass through serve.py's own scorer, at
    every core's threads and at one, after warm-up passes."""
    import torch
    from hydra import compose, initialize_config_dir

    from cifarkit.infer.model import load_model

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="serve", overrides=[f"ckpt_path={ckpt}", *overrides])
    model = load_model(cfg, device="cpu")
    batch = np.random.default_rng(0).integers(
        0, 256, (int(cfg.max_batch_size), model.image_size, model.image_size, 3), dtype=np.uint8
    )
    rates = {}
    for threads in (os.cpu_count() or 1, 1):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            for _ in range(10):
                model.score(batch)
            passes, t0 = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - t0) < seconds:
                model.score(batch)
                passes += 1
        rates[f"threads_{threads}"] = round(passes * len(batch) / elapsed, 1)
    return {"batch": len(batch), "images_per_s": rates}


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

    def __enter__(self) -> Served:
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, cwd=self.log.parent)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"serve.py stopped:\n{self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=5) as r:
                    if r.status == 200:
                        return self
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
                conn.request("POST", "/predict", body=body, headers={"Content-Type": "application/octet-stream"})
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


def processes(root: int | None) -> dict[str, int]:
    """This process (the clients) and the server's, by role: main, worker (the model, spawned), and the two it
    forks, LitServe's queue manager first, then the API process (uvicorn)."""
    found = {"clients": os.getpid()}
    if root is None:
        return found
    found["main"] = root
    forked = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if ppid == root and b"resource_tracker" not in cmdline:
            if b"spawn_main" in cmdline:
                found["worker"] = int(stat.parent.name)
            else:
                forked.append(int(stat.parent.name))
    found.update(zip(("manager", "api"), sorted(forked)))
    return found


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and its threads so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(url: str, body: bytes, args: argparse.Namespace, server: int | None = None) -> dict[str, dict[str, Any]]:
    """Each ``--clients`` run after a warm-up; with ``server`` (its main pid), the CPU time each process spent per
    request, and with ``--profile`` a py-spy profile of the busiest server processes during the largest run."""
    load(url, body, min(max(args.clients), WARMUP), WARMUP)
    runs = {}
    for clients in args.clients:
        procs = processes(server)
        before = {role: cpu_seconds(pid) for role, pid in procs.items()}
        spies = []
        if args.profile and server is not None and clients == max(args.clients):
            spies = [
                subprocess.Popen(
                    [
                        str(Path(sys.executable).parent / "py-spy"),
                        "record",
                        "--format",
                        "raw",
                        "--nonblocking",
                        "-r",
                        "200",
                        "-o",
                        f"{args.profile}-{role}.txt",
                        "-p",
                        str(pid),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for role, pid in procs.items()
                if role not in ("clients", "main")
            ]
            time.sleep(1)
        r = load(url, body, clients, args.requests)
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        if server is not None:
            r["cpu_ms_per_request"] = {
                role: round(1000 * (cpu_seconds(pid) - before[role]) / r["requests"], 3) for role, pid in procs.items()
            }
        runs[str(clients)] = r
    return runs


def screenshot(args: argparse.Namespace, log_dir: Path) -> None:
    from playwright.sync_api import sync_playwright

    photo = Path(args.photo) if args.photo else log_dir / "chelsea.png"
    if not args.photo:  # cropped square, as the model sees a square (predict.py resizes, never crops)
        from skimage import data  # scikit-image: a dev dependency, for this photo only

        cat = data.chelsea()
        side = min(cat.shape[:2])
        left = (cat.shape[1] - side) // 2
        Image.fromarray(cat[:side, left : left + side]).save(photo)
    with Served(args.ckpt, args.override, log_dir) as served, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 800, "height": 340})
        page.goto(served.url + "/")
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
        body = Path(args.image).read_bytes() if args.image else png_32x32() if args.png32 else jpeg_640x480()
        raw = raw_rate(args.ckpt, args.override) if args.raw and args.ckpt else None
        runs: dict[str, dict[str, dict[str, Any]]] = {}
        if args.url:
            runs["as running"] = measure(args.url, body, args)
        else:
            plans = [("batching", args.override)]
            if not args.batching_only:
                plans.append(("no batching", [*args.override, "max_batch_size=1"]))
            for name, overrides in plans:
                with Served(args.ckpt, overrides, Path(tmp)) as served:
                    runs[name] = measure(served.url, body, args, served.proc.pid)
    best = max(raw["images_per_s"].values()) if raw else None
    print(f"{'':<12} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} {'failed':>6} {'of raw':>7}")
    for name, by_clients in runs.items():
        for clients, r in by_clients.items():
            if best:
                r["of_raw"] = round(r["requests_per_s"] / best, 3)
            print(
                f"{name:<12} {clients:>7} {r['requests_per_s']:>8} {r['p50_ms']:>8} {r['p99_ms']:>8} "
                f"{r['mean_batch']!s:>6} {r['failed']:>6} {r.get('of_raw', '')!s:>7}"
            )
    if raw:
        print(f"raw batched forward ({raw['batch']} images a pass): {raw['images_per_s']} images/s")
    report = {"image_bytes": len(body), "raw": raw, "runs": runs, "machine": machine()}
    if not args.url:  # a server started here, on this machine
        save(args.results, "serve-png32" if args.png32 else "serve", report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
