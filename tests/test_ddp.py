"""trainer=ddp_sim: two CPU processes train one run, each on its own half of the data.

``RankProbe`` is loaded into both ranks (PYTHONPATH=tests) and records, per rank, a digest of
every training image it was fed (augmentation off, so an image's digest is stable) and how
many validation/test images it evaluated.
"""

from __future__ import annotations

import json
import math
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from cifarkit.core.errors import lost_ranks
from cifarkit.nets.saved import read_checkpoint
from cifarkit.run.jobs import eval_job
from conftest import ROOT, folder_overrides, free_port, run_cli, run_dirs, start_train, wait_for


class RankProbe(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.seen: dict[str, list] = {"train": [], "val": [], "test": []}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == 0:
            self.seen["train"] += [round(float(x.double().sum()), 3) for x in batch[0]]

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.current_epoch == 0 and not trainer.sanity_checking:
            self.seen["val"].append(len(batch[1]))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.seen["test"].append(len(batch[1]))

    def on_test_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))


# What a user types, on tiny data: the default callbacks (Rich progress bar, sanity check, pictures,
# graceful stop...) stay on, since a rank-0-only progress bar is what deadlocked DDP before.
DDP = ["trainer=ddp_sim", "trainer.max_epochs=2", "data.batch_size=8", "data.eval_batch_size=16"]
PYTHONPATH = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}


def probed_ddp(image_folder: Path, tmp_path: Path) -> list[str]:
    """DDP on the tiny folder, logs under tmp_path/logs, unaugmented (so each rank's share can be
    checked from the pixels), and RankProbe writing what each rank saw to tmp_path/probe."""
    return (
        DDP
        + folder_overrides(image_folder, tmp_path)
        + [
            "data.augment.crop=null",
            "data.augment.flip=null",
            f"paths.log_dir={tmp_path / 'logs'}",
            "+callbacks.rank_probe._target_=test_ddp.RankProbe",
            f"+callbacks.rank_probe.out={tmp_path / 'probe'}",
        ]
    )


def test_ddp_sim_trains_one_run_on_split_data(image_folder: Path, tmp_path: Path, compose_cfg) -> None:
    logs, probe = tmp_path / "logs", tmp_path / "probe"
    args = probed_ddp(image_folder, tmp_path)
    r = run_cli("train.py", args, cwd=tmp_path, env=PYTHONPATH, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]

    (run,) = run_dirs(logs)  # one run directory, with one of everything
    assert sorted(p.name for p in run.glob("*.log")) == ["train.log"]
    assert len(list(run.rglob("metrics.json"))) == 1
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(ckpts) == 2 and ckpts[0].startswith("epoch_") and ckpts[1] == "last.ckpt", ckpts
    assert len(list(run.rglob("hparams.yaml"))) == 1

    # Each rank trained on its own half: 60 training images, 30 per rank, batch 8.
    seen = [json.loads((probe / f"rank{i}.json").read_text()) for i in (0, 1)]
    s0, s1 = set(seen[0]["train"]), set(seen[1]["train"])
    assert len(seen[0]["train"]) == len(seen[1]["train"]) == 30
    assert not s0 & s1
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 2
    assert metrics["steps"] == 2 * math.ceil(30 / 8)

    # Validation and test: every image evaluated once over both ranks, metrics synced across them.
    assert sum(seen[0]["val"]) + sum(seen[1]["val"]) == 12
    assert sum(seen[0]["test"]) + sum(seen[1]["test"]) == 36
    eval_args = ["trainer=cpu", *folder_overrides(image_folder, tmp_path), f"ckpt_path={metrics['best_ckpt']}"]
    cfg = compose_cfg(eval_args, config_name="eval")
    single = eval_job(cfg)
    assert math.isclose(single["test/acc"], metrics["test/acc"], abs_tol=1e-6)
    assert math.isclose(single["test/loss"], metrics["test/loss"], rel_tol=1e-3)


def in_terminal(args: list[str], cwd: Path, timeout: float = 240) -> tuple[int, str]:
    """Run train.py with a pseudo-terminal as stdin/stdout/stderr, as from a shell: Rich draws live."""
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    p = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        close_fds=True,
    )
    os.close(slave)
    out, end = b"", time.monotonic() + timeout
    while time.monotonic() < end:
        if select.select([master], [], [], 1.0)[0]:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # the terminal closed: every process writing to it is gone
                break
            if not chunk:
                break
            out += chunk
        elif p.poll() is not None:
            break
    else:
        p.kill()
        raise AssertionError("train.py in a terminal did not finish: " + out.decode(errors="replace")[-2000:])
    os.close(master)
    return p.wait(timeout=30), out.decode(errors="replace")


@pytest.mark.slow  # two more DDP runs; the default-callbacks DDP run above stays in the default suite
@pytest.mark.parametrize("how", ["terminal", "callbacks=none"])
def test_ddp_sim_finishes_from_a_terminal_and_without_callbacks(how: str, image_folder: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    args = DDP + folder_overrides(image_folder, tmp_path) + [f"paths.log_dir={logs}"]
    if how == "terminal":
        code, out = in_terminal(args, tmp_path)
        assert code == 0, out[-3000:]
    else:
        r = run_cli("train.py", args + ["callbacks=none"], cwd=tmp_path, timeout=240)
        code, out = r.returncode, r.stderr
        assert code == 0, out[-3000:]
    (run,) = run_dirs(logs)
    (metrics_file,) = run.rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 2 and "test/acc" in metrics
    if how == "callbacks=none":  # nothing of the project's: no pictures, no throughput, no graceful stop
        assert not list(run.glob("*.png")) and "train/images_per_s" not in metrics


class StallRank1(L.Callback):
    """Rank 1 stops taking part in its second epoch, as a hung data read or a dead GPU would."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == 1 and trainer.global_step == 5:
            time.sleep(3600)


def leftover_processes(marker: Path) -> list[str]:
    r = subprocess.run(["pgrep", "-f", str(marker)], capture_output=True, text=True)
    return r.stdout.split()


@pytest.mark.slow  # waits out a 40 s collective timeout
def test_a_stalled_rank_ends_the_run_in_one_line(image_folder: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    # Long enough for rank 1 to start on a busy 2-core machine (the rendezvous waits as long).
    args = (
        DDP
        + folder_overrides(image_folder, tmp_path)
        + [
            f"paths.log_dir={logs}",
            "trainer.strategy.timeout.seconds=40",
            "+callbacks.stall._target_=test_ddp.StallRank1",
        ]
    )
    t0 = time.monotonic()
    r = run_cli("train.py", args, cwd=tmp_path, env=PYTHONPATH, timeout=240)
    assert r.returncode == 1, r.stderr[-3000:]
    assert time.monotonic() - t0 < 200
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors and "DDP ranks lost each other" in errors[0] and "trainer.strategy.timeout.seconds" in errors[0], (
        r.stderr[-3000:]
    )
    assert "Traceback" not in r.stderr
    time.sleep(2)
    assert leftover_processes(tmp_path) == []  # the stalled rank was ended too
    (run,) = run_dirs(logs)
    assert json.loads((run / "metrics.json").read_text())["status"] == "failed"
    assert (run / "checkpoints" / "last.ckpt").is_file()  # epoch 0's checkpoint survives, loadable
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0


# Two gloo ranks with a 3 s collective timeout; rank 1 stalls or dies after one all_reduce, and rank 0 prints
# whether lost_ranks recognizes what its next all_reduce raises, and that exception's type.
GLOO_PAIR = """
import datetime, os, sys, time
import torch, torch.distributed as dist
from cifarkit.core.errors import lost_ranks
rank, how = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=3))
t = torch.ones(2)
dist.all_reduce(t)
if rank == 1:
    time.sleep(60) if how == "stall" else os._exit(9)
try:
    dist.all_reduce(t)
except Exception as e:
    print(lost_ranks(e), type(e).__name__, flush=True)
    os._exit(0)
"""


@pytest.mark.parametrize("how", ["stall", "die"])
def test_lost_ranks_recognizes_what_gloo_raises(how: str) -> None:
    """What gloo really raises for a stalled and a dead peer is recognized; torch's DistError types are, and
    the same words outside a process group (a DataLoader's timeout) are not."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    command = [sys.executable, "-c", GLOO_PAIR]
    ranks = [subprocess.Popen([*command, str(r), how], env=env, stdout=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        out, _ = ranks[0].communicate(timeout=120)
    finally:
        for r in ranks:
            r.kill()
            r.wait()
    assert out.split() == ["True", "RuntimeError"], out  # gloo: no DistError type of its own
    assert lost_ranks(torch.distributed.DistNetworkError("the store went away"))
    assert not lost_ranks(RuntimeError("DataLoader worker (pid 1234) timed out after 5 seconds"))


@pytest.mark.slow
def test_sigterm_to_rank_0_stops_every_rank(image_folder: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    args = DDP + folder_overrides(image_folder, tmp_path) + [f"paths.log_dir={logs}", "trainer.max_epochs=1000"]
    p = start_train(args, tmp_path)
    wait_for(p, logs, "train/runs/*/checkpoints/last.ckpt", timeout=180)
    p.send_signal(signal.SIGTERM)  # to rank 0 only, as `kill PID` does
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "checkpoint saved, continue with ckpt_path=" in err and "Traceback" not in err
    time.sleep(2)
    assert leftover_processes(tmp_path) == []
    (run,) = run_dirs(logs)
    ckpt = torch.load(run / "checkpoints" / "interrupted.ckpt", weights_only=True)
    assert ckpt["epoch"] >= 1


def start_nodes(args: list[str], run_dir: Path, cwd: Path) -> list[subprocess.Popen]:
    """Two node processes on 127.0.0.1, one device each, started as a cluster's launcher starts
    them: the standard environment (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, NODE_RANK, LOCAL_RANK)
    and one run directory named on the command line."""
    env = {
        **os.environ,
        **PYTHONPATH,
        "PYTHONUNBUFFERED": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
    }
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *args,
        "trainer.devices=1",
        "trainer.num_nodes=2",
        f"hydra.run.dir={run_dir}",
    ]
    return [
        subprocess.Popen(
            command,
            cwd=cwd,
            env={**env, "NODE_RANK": str(node)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]


@pytest.mark.slow  # two nodes of two processes
def test_two_nodes_train_one_run(image_folder: Path, tmp_path: Path) -> None:
    run, probe = tmp_path / "logs" / "train" / "runs" / "two_nodes", tmp_path / "probe"
    args = probed_ddp(image_folder, tmp_path)
    nodes = start_nodes(args, run, tmp_path)
    outs = [node.communicate(timeout=240) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert run_dirs(tmp_path / "logs") == [run] and len(list(run.rglob("metrics.json"))) == 1
    assert sorted(p.name for p in (run / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert (
        len(ckpts) == 2 and ckpts[1] == "last.ckpt" and read_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] == 1
    )
    seen = [json.loads((probe / f"rank{i}.json").read_text()) for i in (0, 1)]  # global ranks 0 and 1: one per node
    assert len(seen[0]["train"]) == len(seen[1]["train"]) == 30 and not set(seen[0]["train"]) & set(seen[1]["train"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 2 * math.ceil(30 / 8)
    assert sum(seen[0]["test"]) + sum(seen[1]["test"]) == 36


@pytest.mark.slow  # waits for the surviving node to notice
def test_a_killed_node_ends_the_other_in_one_line(image_folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "logs" / "train" / "runs" / "two_nodes"
    args = (
        DDP
        + folder_overrides(image_folder, tmp_path)
        + [f"paths.log_dir={tmp_path / 'logs'}", "trainer.max_epochs=1000", "trainer.strategy.timeout.seconds=40"]
    )
    first, second = start_nodes(args, run, tmp_path)
    wait_for(first, run, "checkpoints/last.ckpt", timeout=180)
    t0 = time.monotonic()
    second.kill()
    second.communicate(timeout=30)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 1 and time.monotonic() - t0 < 60, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "DDP ranks lost each other" in errors[0] and "Traceback" not in err, err[-3000:]
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] >= 0  # what was saved stays loadable
