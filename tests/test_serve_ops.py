"""serve.py as a deployer runs it behind a load balancer: an API key, live and ready routes, the model's
identity on every answer, a drain on SIGTERM, browser hardening, request logs and a bounded decode queue.

One tiny training run and one real server on 127.0.0.1 (a key in a file, JSON request logs, one decoding
thread with two places in its queue) are shared by the module; the drain test stops the server, last.
"""

from __future__ import annotations

import hashlib
import io
import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from cifarkit.core.errors import UserError
from cifarkit.infer.serve import check_key
from cifarkit.infer.serve_page import CHROMIUM, CHROMIUM_ARGS
from cifarkit.run.jobs import train_job
from cifarkit.run.schema import check
from conftest import FAST, compose, folder_overrides
from test_serve import Reply, Server, call, start, strict

KEY = "k3y-0123456789abcdef-ops"
GRACE = 40
HEADERS = {  # on every answer, whatever its route or status
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}


@dataclass
class Ops:
    server: Server
    ckpt: Path
    image: bytes  # a 32x32 PNG
    statuses: list[tuple[int, int]]  # (ready, live) as polled from the process's start until ready


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError):
        return 0  # not listening yet


@pytest.fixture(scope="module")
def ops(image_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("serve-ops")
    train_job(compose(root, FAST + folder_overrides(image_folder, root) + ["test=false"], "train"))
    ckpt = root / "out" / "checkpoints" / "last.ckpt"
    (root / "key").write_text(KEY + "\n")
    server = start(
        ckpt,
        root,
        f"api_key_file={root / 'key'}",
        "request_log=json",
        "decode_threads=1",
        "max_decode_queue=2",
        "max_batch_size=8",
        "batch_timeout=0.05",
        f"drain_grace={GRACE}",
    )
    try:
        statuses = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert server.proc.poll() is None, server.log.read_text()[-3000:]
            statuses.append((status_of(server.url + "/ready"), status_of(server.url + "/live")))
            if statuses[-1][0] == 200:
                break
            time.sleep(0.05)
        png = io.BytesIO()
        Image.new("RGB", (32, 32), (200, 30, 30)).save(png, "PNG")
        yield Ops(server, ckpt, png.getvalue(), statuses)
    finally:
        if server.proc.poll() is None:
            server.proc.terminate()
            server.proc.wait(60)


def post(ops: Ops, body: bytes | None = None, headers: dict[str, str] | None = None, path: str = "/predict") -> Reply:
    return call(
        urllib.request.Request(
            ops.server.url + path,
            data=ops.image if body is None else body,
            headers={"Content-Type": "image/png", **(headers or {})},
            method="POST",
        )
    )


def get(ops: Ops, path: str, key: str | None = KEY) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(ops.server.url + path, headers={"X-API-Key": key} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def test_ready_waits_for_the_warm_model_and_live_does_not(ops: Ops) -> None:
    """From the process's start: /live answers 200 while /ready still says 503 (the model loading and warming
    up), then /ready says 200 with the model's identity."""
    assert ops.statuses[-1] == (200, 200), ops.statuses[-5:]
    assert (503, 200) in ops.statuses, ops.statuses
    assert all(live == 200 for ready, live in ops.statuses if ready == 503), ops.statuses
    status, _, body = get(ops, "/ready", key=None)
    model = strict(body)["model"]
    assert status == 200 and strict(body)["ready"] is True
    assert model == {
        "file": "last.ckpt",
        "sha256": hashlib.sha256(ops.ckpt.read_bytes()).hexdigest(),
        "classes": ["cat", "dog", "frog"],
        "image_size": 32,
    }


def test_the_key_is_required_and_compared(ops: Ops) -> None:
    """No key or a wrong one (shorter, same length, longer): a JSON 401 in one line; the key in X-API-Key or as
    a bearer token: 200. The page, its files and the health routes need none; /metrics does."""
    for headers in ({}, {"X-API-Key": "nope"}, {"X-API-Key": KEY[:-1] + "x"}, {"X-API-Key": KEY + "x"}):
        reply = post(ops, headers=headers)
        assert reply.status == 401 and list(reply.body) == ["error"] and "API key" in reply.body["error"], reply
        assert reply.headers["content-type"] == "application/json"
    for headers in ({"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}):
        reply = post(ops, headers=headers)
        assert reply.status == 200 and len(reply.body["top"]) == 3, reply
    for path in ("/", "/page.js", "/page.css", "/live", "/ready", "/health"):
        assert get(ops, path, key=None)[0] == 200, path
    assert get(ops, "/metrics", key=None)[0] == 401
    assert get(ops, "/metrics")[0] == 200


def test_every_answer_names_the_model_and_carries_the_headers(ops: Ops) -> None:
    """200, 401, 404, 400 and the 431 of too many headers, and the page and its files: each names the model
    (file name and hash), has a request id, and the security headers; the CSP allows no inline code; /metrics
    labels carry the identity."""
    _, _, body = get(ops, "/ready", key=None)
    sha = strict(body)["model"]["sha256"]
    replies = [
        post(ops, headers={"X-API-Key": KEY}).headers,
        post(ops).headers,
        post(ops, headers={"X-API-Key": KEY}, path="/nowhere").headers,
        post(ops, b"not an image", headers={"X-API-Key": KEY}).headers,
        *(get(ops, path)[1] for path in ("/", "/page.js", "/page.css", "/live", "/ready", "/metrics")),
    ]
    with socket.create_connection(("127.0.0.1", ops.server.port), timeout=30) as s:
        s.sendall(b"GET /live HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 101 + b"\r\n")
        head = s.recv(65536).split(b"\r\n\r\n")[0].decode().split("\r\n")
    assert head[0] == "HTTP/1.1 431 Request Header Fields Too Large"
    replies.append({k.lower(): v for k, v in (line.split(": ", 1) for line in head[1:])})
    ids = set()
    for headers in replies:
        assert headers["x-model"] == f"last.ckpt sha256:{sha[:16]}", headers
        assert all(headers[k] == v for k, v in HEADERS.items()), headers
        csp = headers["content-security-policy"]
        assert "script-src 'self';" in csp and "style-src 'self';" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp and "default-src 'none'" in csp
        ids.add(headers.get("x-request-id"))
    assert len(ids) == len(replies)  # the 431 has none: None, once
    page = get(ops, "/")[2].decode()
    assert "<script src=" in page and "<script>" not in page and "<style" not in page and " style=" not in page
    counts = metrics_with_model(ops)
    assert any(k.startswith("cifarkit_model_info{") and f'sha256="{sha}"' in k for k in counts), counts
    assert counts[f'cifarkit_requests_total{{model="{sha[:16]}",path="/predict",status="200"}}'] >= 1


def metrics_with_model(ops: Ops) -> dict[str, float]:
    _, _, text = get(ops, "/metrics")
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.decode().splitlines()
        if line and not line.startswith("#")
    }


def test_request_log_lines(ops: Ops) -> None:
    """request_log=json: one JSON line per request (time, id, status, latency, batch size, model), with what the
    client sent only as the route's name or escaped, and never the image's bytes."""
    marker = b"\x89PNG-marker-\x1b[31m"
    reply = post(ops, ops.image + marker, headers={"X-API-Key": KEY})
    assert reply.status == 200
    request_id = reply.headers["x-request-id"]
    raw = socket.create_connection(("127.0.0.1", ops.server.port), timeout=30)
    with raw:
        raw.sendall(
            b"GET /%1b[2J%0aevil?q=evil%1b HTTP/1.1\r\nHost: x\r\nUser-Agent: evil\x1b[31m\r\nX-API-Key: "
            + KEY.encode()
            + b"\r\n\r\n"
        )
        raw.recv(4096)
    deadline = time.monotonic() + 10
    while request_id not in ops.server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    text = ops.server.log.read_bytes()
    assert b"\x1b" not in text and b"marker" not in text and b"evil" not in text
    lines = [json.loads(line) for line in text.decode().splitlines() if line.startswith('{"time"')]
    (line,) = [line for line in lines if line["id"] == request_id]
    assert set(line) == {"time", "id", "method", "path", "status", "ms", "batch", "model"}
    assert line["path"] == "/predict" and line["status"] == 200 and line["batch"] >= 1 and line["ms"] > 0
    assert line["model"] == reply.headers["x-model"].split(":")[-1]
    assert {line["path"] for line in lines} <= {
        "/predict",
        "/",
        "/page.js",
        "/page.css",
        "/live",
        "/ready",
        "/health",
        "/metrics",
        "other",
    }


def test_a_full_decode_queue_answers_503_at_once(ops: Ops) -> None:
    """One decoding thread and two places in its queue: of 8 costly PNGs sent together, those past the queue
    get a JSON 503 at once, the rest are answered."""
    near_limit = io.BytesIO()
    Image.new("L", (4000, 3990), 90).save(near_limit, "PNG")
    go = threading.Barrier(8)

    def send() -> tuple[Reply, float]:
        go.wait()
        start = time.monotonic()
        reply = post(ops, near_limit.getvalue(), headers={"X-API-Key": KEY})
        return reply, time.monotonic() - start

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: send(), range(8)))
    busy = [(r, t) for r, t in replies if r.status == 503]
    assert busy and all(r.status == 200 for r, _ in replies if r.status != 503), replies
    assert len(busy) <= 5  # one decoding, two waiting: at least three are answered
    for reply, took in busy:
        assert list(reply.body) == ["error"] and "busy" in reply.body["error"] and took < 1, (reply, took)


def test_refusals_before_serving(ops: Ops, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, main) -> None:
    """Beyond this machine without a key: one line, unless allow_anonymous=true; a key file that is missing, too
    short or two keys set: one line; the key is no option of the command line."""
    monkeypatch.delenv("CIFARKIT_API_KEY", raising=False)
    base = [f"ckpt_path={ops.ckpt}"]
    for host in ("0.0.0.0", "::"):
        cfg = compose(tmp_path, [*base, f"host={host}"], "serve")
        check(cfg)
        with pytest.raises(UserError, match=f"host={host} answers other machines, and no API key is set") as e:
            check_key(cfg)
        assert "allow_anonymous=true" in str(e.value) and "\n" not in str(e.value)
        assert check_key(compose(tmp_path, [*base, f"host={host}", "allow_anonymous=true"], "serve")) is None
    (tmp_path / "short").write_text("abc\n")
    cases = [
        ([f"api_key_file={tmp_path / 'missing'}"], "api_key_file=.*missing does not exist"),
        ([f"api_key_file={tmp_path / 'short'}"], "is not 16 to 256 printable ASCII characters"),
    ]
    for overrides, message in cases:
        with pytest.raises(UserError, match=message):
            check_key(compose(tmp_path, [*base, *overrides], "serve"))
    monkeypatch.setenv("CIFARKIT_API_KEY", KEY)
    assert check_key(compose(tmp_path, [*base, "host=0.0.0.0"], "serve")) == KEY
    with pytest.raises(UserError, match="both \\$CIFARKIT_API_KEY and api_key_file="):
        check_key(compose(tmp_path, [*base, f"api_key_file={tmp_path / 'short'}"], "serve"))
    ran = main("serve.py", [*base, f"api_key={KEY}", f"paths.log_dir={tmp_path}"])
    assert ran.code != 0 and "Traceback" not in ran.err


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install chromium)"
)
def test_page_with_a_key_under_its_csp(ops: Ops, tmp_path: Path) -> None:
    """In Chromium: the page loads its own script and style under the CSP, asks for the key at the first 401,
    shows the answer, and does not ask again for a second image; no CSP violation is reported."""
    from playwright.sync_api import sync_playwright

    images = []
    for i, color in enumerate(((200, 30, 30), (30, 200, 30))):
        Image.new("RGB", (40, 40), color).save(tmp_path / f"{i}.png")
        images.append(tmp_path / f"{i}.png")
    console: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: console.append(m.text))
            page.add_init_script(
                "window.__csp = []; document.addEventListener('securitypolicyviolation', "
                "e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
            )
            page.goto(ops.server.url + "/")
            assert page.evaluate("getComputedStyle(document.querySelector('#drop')).borderStyle") == "dashed"
            page.set_input_files("#file", str(images[0]))
            page.wait_for_selector("#keyform:not([hidden])", timeout=60_000)
            page.fill("#key", KEY)
            page.click("#keysave")
            page.wait_for_selector(".row", timeout=60_000)
            first = page.eval_on_selector_all(".row", "rows => rows.map(r => r.dataset.name)")
            page.set_input_files("#file", str(images[1]))
            page.wait_for_selector('#hint:text-is("1.png")', timeout=60_000)  # no wait_for_function: CSP forbids eval
            assert page.is_hidden("#keyform") and page.text_content("#error") == ""
            second = page.eval_on_selector_all(".row", "rows => rows.map(r => r.dataset.name)")
            violations = page.evaluate("window.__csp")
        finally:
            browser.close()
    assert len(first) == len(second) == 3 and set(first) <= {"cat", "dog", "frog"}
    assert violations == [], violations
    assert not [m for m in console if "Content Security Policy" in m or "Refused to" in m], console


def test_sigterm_drains_the_requests_in_flight(ops: Ops) -> None:
    """16 requests in flight (their bodies half sent) at SIGTERM: /ready says 503 and /live 200, a new request
    gets a JSON 503 (not a reset), the 16 are all answered 200 once their bodies arrive, and the process exits
    0 within drain_grace. (Last: it stops the module's server.)"""
    server = ops.server
    head = (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nX-API-Key: %s\r\nContent-Length: %d\r\n\r\n"
        % (KEY.encode(), len(ops.image))
    )
    half = len(ops.image) // 2
    clients = [socket.create_connection(("127.0.0.1", server.port), timeout=60) for _ in range(16)]
    try:
        for s in clients:
            s.sendall(head + ops.image[:half])
        deadline = time.monotonic() + 30  # until the 16 requests have entered the application
        while metrics_with_model(ops).get("cifarkit_predict_in_flight", 0) < 16 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metrics_with_model(ops)["cifarkit_predict_in_flight"] == 16
        stopped = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while status_of(server.url + "/ready") != 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status_of(server.url + "/ready") == 503 and status_of(server.url + "/live") == 200
        late = call(
            urllib.request.Request(
                server.url + "/predict",
                data=ops.image,
                headers={"Content-Type": "image/png", "X-API-Key": KEY},
                method="POST",
            )
        )
        assert late.status == 503 and "stopping" in late.body["error"], late
        statuses = []
        for s in clients:
            s.sendall(ops.image[half:])
            reply = s.recv(65536).split(b"\r\n", 1)[0]
            statuses.append(reply)
        assert statuses == [b"HTTP/1.1 200 OK"] * 16, statuses
        assert server.proc.wait(GRACE) == 0
        assert time.monotonic() - stopped < GRACE
    finally:
        for s in clients:
            s.close()
    log = server.log.read_text()
    assert "Traceback" not in log and "SIGTERM: draining" in log and "server stopped" in log, log[-3000:]
