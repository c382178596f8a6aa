"""serve.py: a trained model over HTTP, talked to as a client would, on 127.0.0.1.

One tiny training run is shared by the module, and two real servers run in subprocesses for
most tests: the .ckpt with batching (up to 8 images a pass) and its ONNX export without
(``max_batch_size=1``). They answer what predict.py prints for the same files, share forward
passes between concurrent requests (the pass number and size come back in headers), refuse bad
input with a 4xx and one line while going on serving, and stop on SIGTERM with no process left.
The page is driven in Debian's Chromium by Playwright.

Longer than the other test modules on purpose: starting the two servers takes most of its time,
so every test that talks to them shares this module's one setup.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from cifarkit.core.errors import UserError
from cifarkit.infer.export import export_model
from cifarkit.infer.serve import serve
from cifarkit.infer.serve_page import CHROMIUM, CHROMIUM_ARGS
from cifarkit.run.jobs import train_job
from cifarkit.run.schema import check
from conftest import FAST, ROOT, compose, folder_overrides, free_port
from test_data import bomb_png
from untrusted_files import EPS, fake_gs, mutants, seeds

MAX_BODY_MB = 1


@dataclass
class Reply:
    status: int
    body: dict
    headers: dict[str, str]  # names in lower case


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path  # its stdout and stderr

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post(self, data: bytes, content_type: str = "image/png", path: str = "/predict") -> Reply:
        return call(
            urllib.request.Request(self.url + path, data=data, headers={"Content-Type": content_type}, method="POST")
        )

    def top(self, image: Path) -> list:
        r = self.post(image.read_bytes())
        assert r.status == 200, r
        return r.body["top"]


def call(request: urllib.request.Request, timeout: float = 60) -> Reply:
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return Reply(r.status, strict(r.read()), {k.lower(): v for k, v in r.headers.items()})
    except urllib.error.HTTPError as e:
        return Reply(e.code, strict(e.read()), {k.lower(): v for k, v in e.headers.items()})


def form(*files: tuple[str, bytes]) -> tuple[bytes, str]:
    """A multipart/form-data body as a browser or ``curl -F`` sends it: a text field, then each
    (filename, content) as a file field; and its Content-Type."""
    boundary = b"----cifarkit-7MA4YWxkTrZu0gW"
    parts = [b'Content-Disposition: form-data; name="note"\r\n\r\nnot a file']
    parts += [
        b'Content-Disposition: form-data; name="file"; filename="%s"\r\nContent-Type: '
        b"application/octet-stream\r\n\r\n%s" % (name.encode(), content)
        for name, content in files
    ]
    body = b"".join(b"--%s\r\n%s\r\n" % (boundary, part) for part in parts) + b"--%s--\r\n" % boundary
    return body, f"multipart/form-data; boundary={boundary.decode()}"


def start(model: Path, tmp: Path, *overrides: str) -> Server:
    """A server in a subprocess, with a fake ``gs`` first on its PATH (``gs_calls``: what it was called with)."""
    port, log = free_port(), tmp / f"serve-{model.suffix[1:]}.log"
    fake_gs(tmp / "bin", gs_calls(tmp))
    args = [
        sys.executable,
        str(ROOT / "serve.py"),
        f"ckpt_path={model}",
        f"port={port}",
        f"paths.log_dir={tmp / 'logs'}",
        *overrides,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": f"{tmp / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=tmp, stdout=out, stderr=subprocess.STDOUT, env=env)
    return Server(proc, port, log)


def gs_calls(tmp: Path) -> Path:
    return tmp / "gs-calls"


def wait_ready(server: Server, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, server.log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=5) as r:
                if r.status == 200 and r.read() == b"ok":
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"not ready in {timeout} s\n{server.log.read_text()[-3000:]}")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


@dataclass
class Setup:
    ckpt: Path
    onnx: Path
    images: list[Path]  # PNG and JPEG, several sizes, one with an EXIF rotation
    batched: Server  # the .ckpt, max_batch_size=8
    single: Server  # the .onnx, max_batch_size=1


@pytest.fixture(scope="module")
def setup(image_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("serve")
    train_job(compose(root, FAST + folder_overrides(image_folder, root) + ["test=false"], "train"))
    ckpt = root / "out" / "checkpoints" / "last.ckpt"
    # read_timeout=5 (not 10): the slow-client test waits to see its connections closed
    servers = [
        start(ckpt, root, "max_batch_size=8", "batch_timeout=0.05", f"max_body_mb={MAX_BODY_MB}", "read_timeout=5")
    ]
    try:
        onnx, _ = export_model(str(ckpt), "onnx", None, ["cifarkit."])
        servers.append(start(onnx, root, "max_batch_size=1"))
        images = root / "images"
        images.mkdir()
        for cls in ("cat", "dog", "frog"):
            for f in sorted((image_folder / "test" / cls).glob("*"))[:2]:
                (images / f"{cls}-{f.name}").write_bytes(f.read_bytes())
        Image.new("RGB", (57, 41), (200, 30, 30)).save(images / "wide.jpeg", quality=90)
        photo = Image.open(min((image_folder / "test" / "dog").glob("*"))).resize((64, 48))
        exif = photo.getexif()
        exif[0x0112] = 6  # Orientation: turn it upright
        photo.save(images / "camera.jpg", exif=exif)
        for server in servers:
            wait_ready(server)
        yield Setup(ckpt, onnx, sorted(images.iterdir()), *servers)
    finally:
        for server in servers:
            if server.proc.poll() is None:
                server.proc.terminate()
                server.proc.wait(60)


def predict_py(main, model: Path, images: list[Path], tmp_path: Path) -> dict[str, list]:
    r = main(
        "predict.py",
        [f"ckpt_path={model}", f"inputs={images[0].parent}", "format=json", f"paths.log_dir={tmp_path / 'logs'}"],
    )
    assert r.code == 0, r.err
    return {Path(row["path"]).name: row["top"] for row in map(json.loads, r.out.splitlines())}


def assert_same(got: list, expected: list) -> None:
    assert [c for c, _ in got] == [c for c, _ in expected]
    assert [p for _, p in got] == pytest.approx([p for _, p in expected], abs=1e-5)


@pytest.mark.parametrize("kind", ["batched", "single"])
def test_answers_are_predict_pys(kind: str, setup: Setup, main, tmp_path: Path) -> None:
    """The .ckpt and the .onnx server each answer every file, raw or as a form upload, with the
    top-3 classes and probabilities that predict.py prints for it."""
    server, model = (setup.batched, setup.ckpt) if kind == "batched" else (setup.single, setup.onnx)
    expected = predict_py(main, model, setup.images, tmp_path)
    assert len(expected) == len(setup.images) == 8
    for image in setup.images:
        assert_same(server.top(image), expected[image.name])
        upload = server.post(*form((image.name, image.read_bytes())))
        assert upload.status == 200 and upload.body == {"top": server.top(image)}
        assert len(expected[image.name]) == 3


def test_concurrent_requests_share_a_forward_pass(setup: Setup) -> None:
    """Requests that arrive together are answered by one forward pass (the batching server's
    headers name the pass and its size), with the same answers as one at a time; without batching
    every request has a pass of its own."""
    for server, batched in ((setup.batched, True), (setup.single, False)):
        alone = {image: server.top(image) for image in setup.images}
        start = threading.Barrier(len(setup.images))

        def ask(image: Path, server: Server = server, start: threading.Barrier = start) -> tuple[Path, Reply]:
            start.wait()
            return image, server.post(image.read_bytes())

        with ThreadPoolExecutor(len(setup.images)) as pool:
            replies = list(pool.map(ask, setup.images))
        passes: dict[int, list[int]] = {}
        for image, r in replies:
            assert r.status == 200, r
            assert_same(r.body["top"], alone[image])
            passes.setdefault(int(r.headers["x-forward-pass"]), []).append(int(r.headers["x-batch-size"]))
        for sizes in passes.values():  # each pass answered at most the images it held, all saying the same size
            assert len(set(sizes)) == 1 and len(sizes) <= sizes[0], passes
        if batched:
            assert max(len(sizes) for sizes in passes.values()) > 1, f"no pass answered two requests: {passes}"
        else:
            assert all(sizes == [1] for sizes in passes.values()) and len(passes) == len(setup.images), passes


def raw(server: Server, head: bytes, body: bytes = b"") -> Reply:
    """One request written by hand on a socket (a Content-Length the body never reaches, chunks); a server
    that answers before the body is all sent and closes (a 413) is read as a browser reads it."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        try:
            s.sendall(head + body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the answer came first: it waits in the socket
        r = http.client.HTTPResponse(s)
        r.begin()
        return Reply(r.status, json.loads(r.read()), {k.lower(): v for k, v in r.getheaders()})


def bad_requests(server: Server, tmp_path: Path, good: bytes) -> dict[str, tuple[Callable[[], Reply], int, str]]:
    """Each bad request (to send), the status it must get and a phrase its error must hold."""
    big = MAX_BODY_MB * 2**20
    chunks = (
        b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in [good] + [b"\0" * 65536] * (big // 65536 + 1)) + b"0\r\n\r\n"
    )
    bomb, bomb2 = bomb_png(tmp_path / "bomb.png", 30_000, 30_000), bomb_png(tmp_path / "bomb2.png", 10_000, 10_000)
    return {
        "not an image": (lambda: server.post(b"just some text\n"), 400, "not an image file"),
        "truncated": (lambda: server.post(good[: len(good) // 2]), 400, "cannot read the image"),
        "bomb": (lambda: server.post(bomb.read_bytes()), 413, "too large to decode safely"),
        "bomb (warning level)": (lambda: server.post(bomb2.read_bytes()), 413, "too large to decode safely"),
        "empty": (lambda: server.post(b""), 400, "carries no image"),
        "json": (lambda: server.post(b'{"image": 1}', "application/json"), 415, "is not an image"),
        "GET": (lambda: call(urllib.request.Request(server.url + "/predict")), 405, "Method Not Allowed"),
        "two files": (lambda: server.post(*form(("a.png", good), ("b.png", good))), 400, "one file, this one has 2"),
        "no file": (lambda: server.post(*form()), 400, "one file, this one has 0"),
        "unknown path": (lambda: server.post(good, path="/predict/v2"), 404, "Not Found"),
        # 100 MB announced, 10 bytes sent: refused from the header, without waiting for the body
        "announced too large": (
            lambda: raw(
                server,
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 104857600\r\n\r\n",
                good[:10],
            ),
            413,
            "over max_body_mb",
        ),
        "chunked too large": (
            lambda: raw(
                server,
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n",
                chunks,
            ),
            413,
            "over max_body_mb",
        ),
    }


def test_bad_input_gets_a_4xx_and_the_server_goes_on(setup: Setup, tmp_path: Path) -> None:
    image = setup.images[0]
    expected = setup.batched.top(image)
    for name, (send, status, phrase) in bad_requests(setup.batched, tmp_path, image.read_bytes()).items():
        reply = send()
        assert reply.status == status, (name, reply)
        assert list(reply.body) == ["error"] and phrase in reply.body["error"] and "\n" not in reply.body["error"], (
            name,
            reply,
        )
        assert reply.headers["content-type"] == "application/json", (name, reply)
        assert setup.batched.top(image) == expected, name
    # a client that goes away halfway through its body: nothing to answer, no server error either
    with socket.create_connection(("127.0.0.1", setup.batched.port), timeout=60) as s:
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\n"
            + image.read_bytes()[:100]
        )
    assert setup.batched.top(image) == expected
    # chunked and within the limit is fine
    ok = raw(
        setup.batched,
        b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"%x\r\n%s\r\n0\r\n\r\n" % (len(image.read_bytes()), image.read_bytes()),
    )
    assert ok.status == 200 and ok.body["top"] == expected
    log = setup.batched.log.read_text()
    assert "Traceback" not in log and "Internal server error" not in log, log[-3000:]


def test_page_health_and_address(setup: Setup) -> None:
    with urllib.request.urlopen(setup.batched.url + "/", timeout=60) as r:
        page = r.read().decode()
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
    with urllib.request.urlopen(setup.batched.url + "/page.js", timeout=60) as r:
        script = r.read().decode()
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/javascript")
    assert '<input id="file" type="file"' in page and '<script src="page.js">' in page and "fetch(" in script
    assert not any(x in text for text in (page, script) for x in ("http://", "https://"))  # no external assets
    with urllib.request.urlopen(setup.batched.url + "/health", timeout=60) as r:
        assert r.status == 200 and r.read() == b"ok"
    # listening on 127.0.0.1 only (state 0A: LISTEN)
    listening = [
        line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:] if line.split()[3] == "0A"
    ]
    assert f"0100007F:{setup.batched.port:04X}" in listening
    assert f"00000000:{setup.batched.port:04X}" not in listening


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install chromium)"
)
def test_page_shows_the_top_classes(setup: Setup) -> None:
    """In a real browser: choose a file, see it and its top classes as bars, as the API answers."""
    from playwright.sync_api import sync_playwright

    image = setup.images[-1]
    expected = setup.batched.top(image)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(setup.batched.url + "/")
            page.set_input_files("#file", str(image))
            page.wait_for_selector(".row", timeout=60_000)
            rows = page.eval_on_selector_all(
                ".row",
                """rows => rows.map(r => [r.dataset.name, Number(r.dataset.p),
                r.querySelector('.name').textContent, r.querySelector('.pct').textContent,
                r.querySelector('.bar').style.width])""",
            )
            assert page.get_attribute("#preview", "src").startswith("blob:")
            assert page.text_content("#error") == ""
        finally:
            browser.close()
    assert [[name, p] for name, p, *_ in rows] == expected
    for (name, p, label, pct, width), _ in zip(rows, expected):
        assert (
            label == name and pct == f"{100 * p:.1f}%" and float(width.rstrip("%")) == pytest.approx(100 * p, abs=0.051)
        )


def test_bad_options_are_one_line(setup: Setup, tmp_path: Path) -> None:
    """Refused before any server starts (and a crafted checkpoint too: test_checkpoints.py)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cases = [
            (["top_k=0"], "top_k=0: must be an integer of at least 1"),
            (["max_batch_size=0"], "max_batch_size=0"),
            (["batch_timeout=-1"], "batch_timeout=-1"),
            (["max_body_mb=0"], "max_body_mb=0"),
            (["threads=0"], "threads=0"),
            (["batch_timeout=60"], "batch_timeout must be less than request_timeout"),  # LitServe's own check
            (["port=80"], "port=80: must be an integer from 1024 to 65535"),
            (["host=localhost"], r"host=localhost: must be 127.0.0.1 \(this machine\), or 0.0.0.0 or ::"),
            ([f"ckpt_path={tmp_path / 'missing.ckpt'}"], "does not exist"),
            ([f"ckpt_path={tmp_path / 'missing.onnx'}"], "does not exist"),
            ([f"port={taken.getsockname()[1]}"], f"port={taken.getsockname()[1]} cannot be used on 127.0.0.1"),
        ]
        for overrides, message in cases:
            cfg = compose(tmp_path, [f"ckpt_path={setup.ckpt}", *overrides], "serve")
            with pytest.raises(UserError, match=message) as e:
                check(cfg)  # as serve.py's command line checks it first
                serve(cfg)
            assert "\n" not in str(e.value)


def answered_json(reply: Reply) -> None:
    """A 200 with classes, or a 4xx with one error line: strict JSON either way (``call`` parsed it)."""
    assert reply.status == 200 or (400 <= reply.status < 500 and list(reply.body) == ["error"]), reply
    assert reply.headers["content-type"] == "application/json", reply


def strict(body: bytes) -> dict:
    return json.loads(body, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))


def test_ghostscript_never_runs_on_an_upload(setup: Setup) -> None:
    """%!PS bytes, raw or as a form upload, to both servers: 400 in one line, and the fake ``gs``
    first on the servers' PATH records no call (Pillow's EPS plugin would have run it)."""
    for server in (setup.batched, setup.single):
        for reply in (server.post(EPS, "application/postscript"), server.post(EPS), server.post(*form(("a.eps", EPS)))):
            assert reply.status in (400, 415) and list(reply.body) == ["error"], reply
    assert not gs_calls(setup.ckpt.parents[2]).exists(), gs_calls(setup.ckpt.parents[2]).read_text()


def test_fuzzed_uploads_get_an_answer_or_a_4xx(setup: Setup) -> None:
    """150 seeded mutations of files in every format Pillow writes, posted raw: each gets 200 or a
    JSON 4xx, none a 500; the server answers a good request the same afterwards."""
    image = setup.images[0]
    expected = setup.batched.top(image)
    files = seeds()
    bodies = [m for fmt in ("PNG", "JPEG") for m in mutants(files[fmt], 40, seed=len(fmt))]
    bodies += [m for i, fmt in enumerate(sorted(files)) for m in mutants(files[fmt], 3, seed=100 + i)]
    # A body over max_body_mb (an ICNS file's mutants) is answered 413 from its header while the client is still
    # sending, and the socket closed: urllib then fails with a broken pipe, or not, as the two race. That answer
    # is tested on a raw socket (bad_requests: "announced too large", "chunked too large"); the decoders here.
    bodies = [b for b in bodies if len(b) <= MAX_BODY_MB * 2**20]
    assert len(bodies) >= 150
    statuses = set()
    for body in bodies:
        reply = setup.batched.post(body, "application/octet-stream")
        answered_json(reply)
        statuses.add(reply.status)
    assert 200 in statuses and 400 in statuses, statuses
    assert setup.batched.top(image) == expected
    log = setup.batched.log.read_text()
    assert "Traceback" not in log and "Internal server error" not in log, log[-3000:]


def empty_parts(size: int) -> tuple[bytes, str]:
    """A multipart body of ``size`` bytes made of parts that hold nothing (the first one named)."""
    first = b'--B\r\nContent-Disposition: form-data; name="a"\r\n\r\n\r\n'
    return first + b"--B\r\n\r\n\r\n" * ((size - len(first)) // 9), "multipart/form-data; boundary=B"


def test_a_good_request_is_answered_while_costly_ones_are_in_flight(setup: Setup, tmp_path: Path) -> None:
    """A 10 MB body of empty multipart parts and three PNGs just under max_megapixels (16: 4000x3990,
    a few kB each) sent together: a good request sent meanwhile is still answered, within a
    generous 10 s (one decoding thread held all of them before: 13.7 s for the empty parts alone)."""
    server = setup.single  # the default max_body_mb (10) and max_megapixels (16)
    near_limit = io.BytesIO()
    Image.new("L", (4000, 3990), 90).save(near_limit, "PNG")
    body, content_type = empty_parts(10_000_000)
    image = setup.images[0]
    expected = server.top(image)
    go = threading.Barrier(5)  # the four costly requests and the good one

    def costly(data: bytes, kind: str) -> Reply | None:
        go.wait()
        try:
            return server.post(data, kind)
        except urllib.error.URLError:  # answered and closed while the rest of the body was still on its way
            return None

    refused = metrics(server).get('cifarkit_requests_total{path="/predict",status="400"}', 0)
    with ThreadPoolExecutor(4) as pool:
        heavy = [pool.submit(costly, near_limit.getvalue(), "image/png") for _ in range(3)]
        parts = pool.submit(costly, body, content_type)
        go.wait()
        good = call(
            urllib.request.Request(
                server.url + "/predict", data=image.read_bytes(), headers={"Content-Type": "image/png"}, method="POST"
            ),
            timeout=10,
        )
        assert good.status == 200 and good.body["top"] == expected
        for reply in heavy:
            assert reply.result() is not None and reply.result().status == 200, reply.result()
        assert parts.result() is None or (parts.result().status == 400 and "multipart" in parts.result().body["error"])
    assert metrics(server)['cifarkit_requests_total{path="/predict",status="400"}'] == refused + 1  # the empty parts


def server_pids(server: Server) -> list[int]:
    return [server.proc.pid, *descendants(server.proc.pid)]


def memory_growth(server: Server, during: Callable[[], None]) -> float:
    """MB that the server's processes' peak memory (VmHWM, reset first through clear_refs) grew by over their
    memory before ``during`` ran, summed over the processes."""

    def status(pid: int, field: str) -> int:
        line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1])  # kB

    pids = server_pids(server)
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = {pid: status(pid, "VmRSS") for pid in pids}
    during()
    return sum(status(pid, "VmHWM") - before[pid] for pid in pids) / 1024


def timed_good_request(server: Server, image: Path, expected: list) -> float:
    """Seconds a good request took; it must be answered as when the server is idle."""
    start = time.monotonic()
    reply = server.post(image.read_bytes())
    took = time.monotonic() - start
    assert reply.status == 200 and reply.body["top"] == expected, reply
    return took


def test_idle_connections_neither_count_nor_stay(setup: Setup) -> None:
    """70 idle sockets (past max_requests=64): a good request is answered within 1 s, memory grows under
    100 MB more than for good requests alone, and the server closes an idle connection after keep_alive (5 s)."""
    server, image = setup.single, setup.images[0]
    expected = server.top(image)
    control = memory_growth(server, lambda: [server.top(image) for _ in range(3)])
    took: list[float] = []
    closed_after: list[float] = []

    def attack() -> None:
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(70)]
        try:
            opened = time.monotonic()
            time.sleep(0.3)
            took.extend(timed_good_request(server, image, expected) for _ in range(3))
            assert idle[0].recv(1) == b""  # closed by the server (a reset would raise)
            closed_after.append(time.monotonic() - opened)
        finally:
            for s in idle:
                s.close()

    growth = memory_growth(server, attack)
    assert max(took) < 1, took
    assert closed_after[0] < 5 + 2, closed_after
    assert growth - control < 100, (growth, control)


def test_header_floods_are_cut_short(setup: Setup) -> None:
    """10 MB of small headers that never end: the server cuts each connection short once its headers pass the
    bound (so it takes several), a good request meanwhile is answered within 1 s, and memory grows under
    100 MB more than for good requests alone. A whole request with 101 headers gets a one-line JSON 431."""
    server, image = setup.single, setup.images[0]
    expected = server.top(image)
    control = memory_growth(server, lambda: [server.top(image) for _ in range(3)])
    line = b"X: y\r\n"  # the smallest headers cost uvicorn the most: a tuple of two bytes objects each
    chunk = line * (65536 // len(line))
    started, answers, took = threading.Event(), [], []

    def flood() -> None:
        sent = 0
        while sent < 10_000_000:
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
                try:
                    s.sendall(b"GET /live HTTP/1.1\r\nHost: x\r\n")
                    while sent < 10_000_000:
                        s.sendall(chunk)
                        sent += len(chunk)
                        if sent > 1_000_000:
                            started.set()
                    answers.append(s.recv(4096))
                except OSError:  # reset: closed by the server while the flood was still coming
                    answers.append(b"reset")

    def attack() -> None:
        with ThreadPoolExecutor(1) as pool:
            done = pool.submit(flood)
            started.wait(60)
            took.extend(timed_good_request(server, image, expected) for _ in range(3))
            done.result()

    growth = memory_growth(server, attack)
    assert max(took) < 1, took
    assert len(answers) >= 2 and all(a == b"reset" or a.startswith(b"HTTP/1.1 431 ") for a in answers), answers
    assert growth - control < 100, (growth, control)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"GET /live HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 101 + b"\r\n")
        head, body = s.recv(65536).split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 431 ") and b"content-type: application/json" in head, head
    error = strict(body)["error"]
    assert "headers are over 100 lines or 32 kB" in error and "\n" not in error


def test_abandoned_uploads_are_not_decoded(setup: Setup) -> None:
    """30 clients each send a PNG just under max_megapixels (0.1 s and 76 MB to decode) and go away half a second
    later, their uploads read and waiting to be decoded: those whose turn comes after their client has gone
    are not decoded (counted as 499s, most of the 30), a good request right after is answered within 1 s, and
    memory grows under 100 MB more than for one such upload whose client waits for the answer."""
    server, image = setup.single, setup.images[0]
    expected = server.top(image)
    near_limit = io.BytesIO()
    Image.new("L", (4000, 3990), 90).save(near_limit, "PNG")
    request = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n%s" % (
        len(near_limit.getvalue()),
        near_limit.getvalue(),
    )
    # the control: one such upload from a client that waits for its answer (its decode's memory is allowed)
    control = memory_growth(server, lambda: [server.post(near_limit.getvalue()), server.top(image)])
    gone = 'cifarkit_requests_total{path="/predict",status="499"}'
    before = metrics(server).get(gone, 0)
    took: list[float] = []

    def attack() -> None:
        clients = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(30)]
        for s in clients:
            s.sendall(request)
        time.sleep(0.5)
        for s in clients:
            s.close()
        took.append(timed_good_request(server, image, expected))
        deadline = time.monotonic() + 30  # until every abandoned upload is answered or skipped
        while time.monotonic() < deadline and metrics(server).get(gone, 0) < before + 20:
            time.sleep(0.1)
        time.sleep(1)

    growth = memory_growth(server, attack)
    assert took[0] < 1, took
    assert metrics(server).get(gone, 0) >= before + 20
    assert growth - control < 100, (growth, control)


def test_slow_clients_are_cut_off_and_do_not_stall_others(setup: Setup) -> None:
    """8 clients on 127.0.0.1 that send their headers (4) or their body (4) one byte at a time:
    good requests are answered meanwhile, and each slow connection is closed by the server after
    read_timeout (5 s here), long before its bounded drip would end."""
    server, image = setup.batched, setup.images[0]
    expected = server.top(image)
    heads = [b"POST /predict HTTP/1.1\r\nHost: x\r\n"] * 4
    heads += [b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"] * 4
    sockets = [socket.create_connection(("127.0.0.1", server.port), timeout=60) for _ in heads]
    try:
        for s, head in zip(sockets, heads):
            s.sendall(head)
            s.settimeout(0.05)
        open_ = set(range(len(sockets)))
        deadline = time.monotonic() + 60  # the drip's bound: 12x the read timeout
        answered = 0
        while open_ and time.monotonic() < deadline:
            for i in list(open_):
                try:
                    sockets[i].sendall(b"a")
                    if sockets[i].recv(4096) == b"":
                        open_.discard(i)
                except TimeoutError:
                    pass
                except OSError:  # reset or broken pipe: closed by the server
                    open_.discard(i)
            assert server.top(image) == expected
            answered += 1
        assert not open_, f"{len(open_)} slow connections still open after 60 s"
        assert answered >= 2
    finally:
        for s in sockets:
            s.close()


def metrics(server: Server) -> dict[str, float]:
    """GET /metrics, read as Prometheus's text format: each sample's name and labels (but the model's, which
    tests/test_serve_ops.py checks), and its value."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=60) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {
        re.sub(r',?model="[0-9a-f]{16}"', "", line.rsplit(" ", 1)[0]).replace("{,", "{"): float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_metrics_and_routes(setup: Setup) -> None:
    """GET /metrics in Prometheus's text format: requests by status, latency, batch sizes. LitServe's
    and FastAPI's other pages (/info, /docs, /redoc, /openapi.json) are not served."""
    server, image = setup.batched, setup.images[0]
    server.top(image)
    assert server.post(b"not an image").status == 400
    counts = metrics(server)
    assert counts['cifarkit_requests_total{path="/predict",status="200"}'] >= 1
    assert counts['cifarkit_requests_total{path="/predict",status="400"}'] >= 1
    assert counts['cifarkit_request_seconds_count{path="/predict"}'] >= 2
    assert counts['cifarkit_batch_size_bucket{le="8.0"}'] == counts["cifarkit_batch_size_count"] >= 1
    for path in ("/info", "/docs", "/redoc", "/openapi.json"):
        reply = call(urllib.request.Request(server.url + path))
        assert reply.status == 404 and list(reply.body) == ["error"], (path, reply)


def assert_all_gone(children: set[int]) -> None:
    deadline = time.monotonic() + 30
    while (left := [pid for pid in children if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, left


def test_sigterm_stops_everything(setup: Setup) -> None:
    """SIGTERM ends the server, its API process, inference worker and queue manager: exit 0, no
    traceback. (Near the end of the module: it stops the shared server.)"""
    server = setup.batched
    children = descendants(server.proc.pid)
    assert len(children) >= 3, children  # LitServe's inference worker, API process and manager at least
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(120) == 0
    assert_all_gone(children)
    log = server.log.read_text()
    assert "Traceback" not in log and "SIGTERM: stopping the server" in log and "server stopped" in log, log[-3000:]
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(server.url + "/health", timeout=5)


def test_a_dead_worker_stops_the_server(setup: Setup) -> None:
    """An inference worker killed from outside (the OOM killer) ends the whole server in one line,
    exit 1, rather than leaving it up with nothing to answer. (Last: it stops the other server.)"""
    server = setup.single
    children = descendants(server.proc.pid)
    (worker,) = [pid for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
    os.kill(worker, signal.SIGKILL)
    assert server.proc.wait(120) == 1
    assert_all_gone(children)
    log = server.log.read_text()
    assert (
        log.rstrip().splitlines()[-1]
        == "error: the inference worker stopped (exit code -9; its log is above), so the server did"
    )
    assert "Traceback" not in log, log[-3000:]
