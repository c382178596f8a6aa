"""Shared fixtures and helpers: tiny datasets served as the real sources serve them, configs,
and the entry points.

* ``tiny_cifar10``, ``tiny_cifar100``, ``tiny_svhn``: the tiny official files of tiny_files.py,
  served over HTTP on 127.0.0.1 (``served``) with torchvision's URL and MD5 tables pointed at
  them, so the real download, MD5 check and extraction code runs.
* ``image_folder``: tiny_files.write_image_folder's tree, once per session.
* ``compose`` / ``compose_cfg``: a config as the entry points compose it, outputs under a temp folder.
* ``main``: an entry point run in this process as its command line runs it (``python train.py
  ...``): exit code, stdout and stderr. ``run_cli`` runs it in a subprocess, for what is about
  the process itself (signals, DDP, a missing Lightning).
* ``error_line``: the one ``error: `` line a bad input must end with.
* ``craft_checkpoint`` / ``Payload``: checkpoints in train.py's layout with chosen contents.
* ``start_train`` / ``wait_for``: train.py started in the background, and polling for a file it writes.
* ``SignalAt``, ``RESUME_KEYS``: a real signal mid-run, and the metrics a resumed run shares with one never stopped.
* ``free_port``: a free TCP port on 127.0.0.1.
"""

from __future__ import annotations

import functools
import http.server
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L  # imported before any test captures output: its log handler keeps the session's stderr
import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from cifarkit.data.loader import DeviceLoader
from cifarkit.run.cli import run
from cifarkit.run.resolvers import register_resolvers
from tiny_files import CLASSES3, write_cifar10_tarball, write_cifar100_tarball, write_image_folder, write_svhn_mats

register_resolvers()  # the configs' ${lr_for_batch:...}, as the entry points register it

if os.environ.get("PYTEST_XDIST_WORKER"):  # pyproject's -n 2: the workers share the cores, a thread each,
    os.environ["OMP_NUM_THREADS"] = "1"  # and so do the processes a test starts
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
ZERO, ONE = torch.zeros(3), torch.ones(3)


def random_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# Pearson chi-square critical values at p = 0.001 by degrees of freedom: a fair sampler exceeds
# them once in 1000 seeds.
CHI2_CRITICAL = {1: 10.83, 8: 26.12, 31: 61.10, 49: 85.35, 161: 222.19}


def chi_square(counts: torch.Tensor) -> float:
    """Pearson's statistic of ``counts`` against equal expected counts (len(counts) - 1 degrees of freedom)."""
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


def device_loader(images: torch.Tensor, labels: torch.Tensor | None = None, **kw: Any) -> DeviceLoader:
    """A training ``DeviceLoader`` over ``images`` (labels: their indices), mean 0 and std 1
    unless told, so an output times 255 is the uint8 pixel it came from."""
    labels = torch.arange(len(images)) if labels is None else labels
    mean, std, batch_size = kw.pop("mean", ZERO), kw.pop("std", ONE), kw.pop("batch_size", 50)
    return DeviceLoader(images, labels, mean, std, batch_size, train=kw.pop("train", True), **kw)


# ---------------------------------------------------------------------------------------------
# Data on disk.


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory):
    """(a folder, its URL): the folder served over HTTP on 127.0.0.1 for the whole session."""
    root = tmp_path_factory.mktemp("served")
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def served_tables(served: tuple[Path, str], name: str, write: Any) -> dict:
    """The tables of the files ``write(folder, url)`` writes into the served folder ``name``/."""
    root, url = served
    return write(root / name, f"{url}/{name}")


@pytest.fixture(scope="session")
def cifar10_tables(served: tuple[Path, str]) -> dict:
    return served_tables(served, "cifar10", write_cifar10_tarball)


@pytest.fixture(scope="session")
def cifar100_tables(served: tuple[Path, str]) -> dict:
    return served_tables(served, "cifar100", write_cifar100_tarball)


@pytest.fixture(scope="session")
def svhn_tables(served: tuple[Path, str]) -> dict:
    return served_tables(served, "svhn", write_svhn_mats)


def point_torchvision(dataset: type, tables: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Point a torchvision dataset class at the tiny files (its URL and MD5 tables)."""
    for key, value in tables.items():
        monkeypatch.setattr(dataset, key, value)
    return tables


@pytest.fixture
def tiny_cifar10(cifar10_tables: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    """torchvision's CIFAR10 pointed at the tiny tarball."""
    from torchvision.datasets import CIFAR10

    return point_torchvision(CIFAR10, cifar10_tables, monkeypatch)


@pytest.fixture
def tiny_cifar100(cifar100_tables: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    """torchvision's CIFAR100 pointed at the tiny tarball (train 120, test 60 images; cifar100_split)."""
    from torchvision.datasets import CIFAR100

    return point_torchvision(CIFAR100, cifar100_tables, monkeypatch)


@pytest.fixture
def tiny_svhn(svhn_tables: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    """torchvision's SVHN pointed at the tiny .mat files (train 60, test 30, extra 40; svhn_split)."""
    from torchvision.datasets import SVHN

    return point_torchvision(SVHN, svhn_tables, monkeypatch)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("folder"))


# ---------------------------------------------------------------------------------------------
# Configs and entry points.

# Overrides that keep a CPU run to a few seconds on tiny data. The progress bar is off only to
# keep captured output short; the DDP tests and test_cli.py's command-line run keep it on, as users do.
FAST = [
    "trainer=cpu",
    "trainer.max_epochs=1",
    "+trainer.num_sanity_val_steps=0",
    "+trainer.enable_model_summary=false",
    "callbacks.progress_bar=null",
    "data.batch_size=8",
    "data.eval_batch_size=16",
]


def folder_overrides(root: Path, tmp: Path) -> list[str]:
    return ["data=image_folder", f"data.root={root}", f"paths.data_dir={tmp / 'data'}", "data.val_size=12"]


def compose(tmp: Path, overrides: list[str], config_name: str = "train", with_hydra: bool = False) -> DictConfig:
    """The composed config with its outputs (out/, logs/) under ``tmp`` (and Hydra's own node, ``with_hydra``)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=with_hydra)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp / "out")
        cfg.paths.log_dir = str(tmp / "logs")
    return cfg


@pytest.fixture
def compose_cfg(tmp_path: Path):
    """compose_cfg(overrides, config_name='train') -> DictConfig with outputs under tmp_path."""
    return lambda overrides, config_name="train": compose(tmp_path, overrides, config_name)


def datamodule(tmp: Path, overrides: list[str], **kwargs: Any):
    """The data config's DataModule (``data=...`` and ``data.*`` overrides), as train.py instantiates it."""
    return instantiate(compose(tmp, overrides).data, _convert_="all", **kwargs)


@dataclass
class Ran:
    code: int
    out: str
    err: str


ENTRY_POINTS = {  # script: (module, task, config name)
    "train.py": ("cifarkit.run.jobs", "train_job", "train"),
    "eval.py": ("cifarkit.run.jobs", "eval_job", "eval"),
    "predict.py": ("cifarkit.infer.predict", "predict", "predict"),
    "export.py": ("cifarkit.infer.export", "export", "export"),
    "serve.py": ("cifarkit.infer.serve", "serve", "serve"),
}


@pytest.fixture
def main(capfd: pytest.CaptureFixture):
    """main(script, args) -> Ran: ``python <script> <args>`` run in this process through the same
    ``cifarkit.run.cli.run`` (Hydra's main, the command-line check, one-line errors)."""

    def call(script: str, args: list[str]) -> Ran:
        module, task, config = ENTRY_POINTS[script]
        argv, code = sys.argv, 0
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        capfd.readouterr()
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None  # as in a new process: no run is current (a test may have set one)
        sys.argv = [script, *args]
        try:
            run(getattr(importlib.import_module(module), task), CONFIG_DIR, config)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:  # as after a process: no run is current, and its log handlers are closed
            sys.argv = argv
            GlobalHydra.instance().clear()
            HydraConfig.instance().cfg = None
            for handler in root.handlers:
                if handler not in handlers:
                    handler.close()
            root.handlers, root.level = handlers, level
        out, err = capfd.readouterr()
        return Ran(code, out, err)

    return call


def run_cli(
    script: str, args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run an entry point in a subprocess, as a user would; outputs go under ``cwd``."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def last_line(err: str) -> str:
    """A run's last word on stderr, which a stop for bad input or a signal ends with; no traceback before it."""
    assert "Traceback" not in err and "Error executing job" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def error_line(err: str) -> str:
    """The run's one ``error: `` line, which must be its last word on stderr, with no traceback."""
    last = last_line(err)
    assert last.startswith("error: ") and err.count("\nerror: ") + err.startswith("error: ") == 1, err[-3000:]
    return last


def start_train(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """``python train.py <args>`` in the background, as a user starts it; outputs go under ``cwd``."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(p: subprocess.Popen, root: Path, pattern: str, timeout: float = 120) -> Path:
    """The first file matching ``pattern`` under ``root``, polled for while ``p`` runs (its stderr if it ends)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
        assert p.poll() is None, p.communicate()[1][-3000:]
        time.sleep(0.1)
    p.kill()
    raise AssertionError(f"{pattern} never appeared under {root}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The metrics a resumed run must share with a run that was never stopped.
RESUME_KEYS = ["val/acc_best", "test/acc", "test/loss", "val/loss", "train/loss", "train/acc", "epochs", "steps"]


class SignalAt(L.Callback):
    """Sends ``sig`` to this process as training step ``step`` starts (once): a real signal, mid-epoch."""

    def __init__(self, step: int, sig: int = signal.SIGTERM) -> None:
        self.step, self.sig, self.sent = step, sig, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.sig)


def run_dirs(log_dir: Path, task: str = "train") -> list[Path]:
    return sorted(p for p in (log_dir / task / "runs").glob("*") if p.is_dir())


def add_callback(monkeypatch: pytest.MonkeyPatch, callback) -> None:
    """Every trainer that cifarkit.run.build.build makes for a run or a budget's probe gets ``callback`` too."""
    import cifarkit.run.budget
    import cifarkit.run.train

    def adding(real_build):  # on top of what an earlier add_callback added
        def build(cfg, **kwargs):
            datamodule, trainer = real_build(cfg, **kwargs)
            trainer.callbacks.insert(0, callback)
            return datamodule, trainer

        return build

    for module in (cifarkit.run.train, cifarkit.run.budget):
        monkeypatch.setattr(module, "build", adding(module.build))


# ---------------------------------------------------------------------------------------------
# Crafted checkpoints.

DATA_INFO3 = {"classes": CLASSES3, "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 32}


def craft_checkpoint(path: Path, net: Any, weights: dict[str, torch.Tensor] | None = None, **extra: Any) -> Path:
    """A checkpoint in train.py's layout (plain data only) whose net config is ``net`` and whose
    net weights are ``weights``; ``extra`` replaces or adds top-level entries."""
    state = {f"net.{k}": v for k, v in (weights or {}).items()}
    ckpt = {"state_dict": state, "hyper_parameters": {"net": net, "classes": CLASSES3}, "data_info": DATA_INFO3} | extra
    torch.save(ckpt, path)
    return path


class Payload:
    """Unpickling this object runs ``touch <marker>``: what a malicious pickle does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------------------------------
# Memory a crafted file costs, measured in a process of its own.

# ``peak_mb()``: the process's peak resident memory, VmHWM, which starts afresh at exec (ru_maxrss starts at the
# parent's peak, the test process's, so a child's growth under it could not show).
PEAK_MB = """
import re
def peak_mb():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)) // 1024
"""


def run_measured(code: str, *args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``code`` (``peak_mb()`` defined) in a fresh interpreter that imports this checkout, ``args`` its argv."""
    return subprocess.run(
        [sys.executable, "-c", PEAK_MB + code, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def inflating(path: Path, size: int) -> Path:
    """A ``torch.save`` checkpoint of one ``size``-byte tensor whose records are deflated zeros: a tiny file that
    torch's reader would inflate to ``size`` bytes."""
    plain = path.with_suffix(".plain")
    torch.save({"state_dict": {"net.x": torch.empty(size, dtype=torch.uint8)}, "global_step": 5}, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for record in src.infolist():
            with src.open(record) as r, dst.open(record.filename, "w", force_zip64=True) as w:
                while chunk := r.read(2**24):
                    w.write(b"\0" * len(chunk))
    plain.unlink()
    return path
