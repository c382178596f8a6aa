"""logger=mlflow and logger=wandb: what a run leaves in each tracker, read back with the tracker's
own reader (MLflow's client on the SQLite store, W&B's offline-log reader), and the one line a
missing extra costs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from lightning.fabric.utilities.logger import _flatten_dict

from cifarkit.fit.trackers import run_name
from cifarkit.run.jobs import train_job
from conftest import FAST, compose, folder_overrides

TINY = ["data.image_size=8"]  # a 1.6M-parameter BasicCNN: small checkpoints to write and upload


def test_run_names_come_from_the_run_directory() -> None:
    assert run_name("logs/train/runs/2025-01-31_12-00-00") == "2025-01-31_12-00-00"
    assert run_name("logs/train/multiruns/2025-01-31_12-00-00/3") == "2025-01-31_12-00-00/3"


# ---------------------------------------------------------------------------------------------
# MLflow: one two-epoch run, read back from its SQLite store by MLflow's own client.


@pytest.fixture(scope="module")
def mlflow_run(image_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    """(MLflow client, the MLflow run, metrics.json, run directory) of a run with logger=mlflow."""
    tmp = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow 3 reports usage to its servers unless told not to
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        pytest.importorskip("mlflow")
        from mlflow.tracking import MlflowClient

        cfg = compose(
            tmp, FAST + folder_overrides(image_folder, tmp) + TINY + ["logger=mlflow", "trainer.max_epochs=2"]
        )
        train_job(cfg)
        db = tmp / "logs" / "mlflow.db"
        assert db.is_file() and cfg.logger.mlflow.tracking_uri == f"sqlite:///{db}"
        client = MlflowClient(tracking_uri=f"sqlite:///{db}")
        (run,) = client.search_runs([client.get_experiment_by_name("train").experiment_id])
        out = tmp / "out"
        yield client, run, json.loads((out / "metrics.json").read_text()), out


def test_mlflow_params_are_the_configuration_once(mlflow_run) -> None:
    """Lightning's model and data hyperparameters (flattened as its MLFlowLogger flattens them),
    plus the ``trainer/...`` part of TensorBoard's HPARAMS tab, and nothing else: each once."""
    _, run, metrics, out = mlflow_run
    assert run.info.run_name == "out" and run.info.status == "FINISHED"
    assert run.data.tags["run_dir"] == str(out.resolve())
    ckpt = torch.load(metrics["best_ckpt"], weights_only=True)
    config = _flatten_dict({**ckpt["hyper_parameters"], **ckpt["datamodule_hyper_parameters"]})
    trainer = {
        "trainer/max_epochs": "2",
        "trainer/max_steps": "-1",
        "trainer/world_size": "1",
        "trainer/budget_s": "None",
        "trainer/precision": metrics["precision"],
    }
    assert run.data.params == {k: str(v) for k, v in config.items()} | trainer
    assert run.data.params["optimizer/lr"] == "0.001" and run.data.params["batch_size"] == "8"


def test_mlflow_metrics_over_steps_and_the_final_ones(mlflow_run) -> None:
    client, run, metrics, _ = mlflow_run
    history = client.get_metric_history(run.info.run_id, "val/acc")
    assert len(history) == 2 and history[0].step < history[1].step  # one per epoch, at its step
    assert max(m.value for m in history) == pytest.approx(metrics["val/acc_best"])
    for key in ("test/acc", "test/loss", "test/calibration_error", "val/acc_best"):
        assert run.data.metrics[key] == pytest.approx(metrics[key], rel=1e-6), key
    for name, acc in metrics["test/acc_class"].items():
        assert run.data.metrics[f"test/acc_class/{name}"] == pytest.approx(acc)


def test_mlflow_artifacts_are_the_pictures_and_the_best_checkpoint(mlflow_run, tmp_path: Path) -> None:
    """The pictures byte for byte, and the best checkpoint (not last.ckpt) with Lightning's
    metadata.yaml and aliases.txt beside it."""
    client, run, metrics, out = mlflow_run
    best = Path(metrics["best_ckpt"])
    listed, folders = set(), [None]
    while folders:
        for a in client.list_artifacts(run.info.run_id, folders.pop()):
            if a.is_dir:
                folders.append(a.path)
            else:
                listed.add(a.path)
    assert listed == {
        "samples.png",
        "confusion_matrix.png",
        f"{best.stem}/{best.name}",
        f"{best.stem}/metadata.yaml",
        f"{best.stem}/aliases.txt",
    }

    def fetch(path: str) -> Path:
        return Path(client.download_artifacts(run.info.run_id, path, str(tmp_path)))

    for name in ("samples.png", "confusion_matrix.png"):
        assert fetch(name).read_bytes() == (out / name).read_bytes()
    uploaded = fetch(f"{best.stem}/{best.name}")
    assert uploaded.read_bytes() == best.read_bytes()
    assert torch.load(uploaded, weights_only=True)["state_dict"]  # plain tensors: loads without pickled code
    meta = yaml.safe_load(fetch(f"{best.stem}/metadata.yaml").read_text())
    assert meta["original_filename"] == best.name and meta["score"] == pytest.approx(metrics["val/acc_best"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # starts MLflow's server
def test_mlflow_ui_serves_the_runs_of_the_projects_store(mlflow_run) -> None:
    """`mlflow ui` as the README starts it, on the run's SQLite store (127.0.0.1, a free port): its
    page, and the runs search its experiment page makes, name the run; then it is stopped, every
    process it started with it."""
    client, run, _, _ = mlflow_run
    store, port = client._tracking_client.tracking_uri, free_port()
    assert store.startswith("sqlite:///")
    mlflow = Path(sys.executable).parent / "mlflow"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    ui = subprocess.Popen(
        [
            str(mlflow),
            "ui",
            "--backend-store-uri",
            store,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],  # its default, 4, takes minutes to start on a loaded 2-core machine
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{base}/", timeout=5) as page:
                    html = page.read().decode()
                break
            except OSError:
                assert ui.poll() is None, ui.stderr.read()[-3000:]
                assert time.monotonic() < deadline, "mlflow ui did not answer within 300 s"
                time.sleep(0.5)
        assert page.status == 200 and "<title>MLflow" in html
        body = json.dumps({"experiment_ids": [run.info.experiment_id]}).encode()
        search = urllib.request.Request(
            f"{base}/ajax-api/2.0/mlflow/runs/search", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(search, timeout=30) as answer:
            runs = json.loads(answer.read())["runs"]
        assert [(r["info"]["run_id"], r["info"]["run_name"]) for r in runs] == [(run.info.run_id, "out")]
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait(timeout=30)
    for _ in range(100):  # its workers too: nothing is left in its process group
        try:
            os.killpg(ui.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("mlflow ui left processes behind")


# ---------------------------------------------------------------------------------------------
# W&B offline: the run's transaction log, read by W&B's own reader, and not one network request.


class Trap(BaseHTTPRequestHandler):
    """Every request W&B might send (its API address and any proxy point here) is recorded in its server's ``seen``."""

    def do_GET(self) -> None:
        self.server.seen.append(f"{self.command} {self.path}")
        self.send_error(503)

    do_POST = do_PUT = do_CONNECT = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def no_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """W&B's environment for a test: offline, quiet, its folders under tmp_path, its server and any
    proxy a local trap; a connection from this process to anything but loopback fails. Yields
    (requests the trap saw, addresses refused)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Trap)
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    trap = f"http://127.0.0.1:{server.server_address[1]}"
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_ERROR_REPORTING": "false",
        "WANDB_BASE_URL": trap,
        "HTTP_PROXY": trap,
        "HTTPS_PROXY": trap,
    }
    for name in ("CONFIG", "CACHE", "DATA", "ARTIFACT"):
        env[f"WANDB_{name}_DIR"] = str(tmp_path / f"wandb-{name.lower()}")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    outside: list[object] = []
    connect = socket.socket.connect

    def local_only(sock: socket.socket, address: object) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            outside.append(address)
            raise OSError(f"test: no network ({address})")
        connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    yield server.seen, outside
    server.shutdown()


@pytest.mark.slow  # a run with W&B offline
def test_wandb_offline_run_lives_in_the_run_directory(image_folder: Path, tmp_path: Path, no_network) -> None:
    pytest.importorskip("wandb")
    import wandb

    train_job(compose(tmp_path, FAST + folder_overrides(image_folder, tmp_path) + TINY + ["logger=wandb"]))
    wandb.finish()  # what the end of the process does
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    (offline,) = (out / "wandb").glob("offline-run-*")
    (log,) = offline.glob("run-*.wandb")
    reader = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    records = [json.loads(line) for line in reader.stdout.splitlines()]
    kinds = {}
    for r in records:
        kinds.setdefault(r["type"], []).append(r[r["type"]])

    (run,) = kinds["run"]
    assert (run["display_name"], run["project"], run["job_type"]) == ("out", "cifarkit", "train")
    config = {}
    for update in kinds["config"]:
        config |= update["update"]
    assert config["optimizer"]["lr"] == 0.001 and config["batch_size"] == 8 and config["trainer"]["max_epochs"] == 1
    history = [h["item"] for h in kinds["history"]]
    assert [h["val/acc"] for h in history if "val/acc" in h] == [pytest.approx(metrics["val/acc_best"])]
    (tested,) = [h for h in history if "test/acc" in h]
    assert tested["test/acc"] == pytest.approx(metrics["test/acc"])
    for name in ("samples", "confusion_matrix"):
        (picture,) = [h for h in history if f"{name}._type" in h]
        (file,) = picture[f"{name}.filenames"]
        assert (offline / "files" / file).read_bytes() == (out / f"{name}.png").read_bytes()
    assert kinds["exit"][0]["exit_code"] == 0
    assert no_network == ([], [])
