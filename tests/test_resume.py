"""Runs that resume themselves: ckpt_path=auto after a signal, after SLURM's requeue signal and
after a full disk, into the same run directory, with the metrics of a run never stopped."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from cifarkit.core.files import DiskFull, atomic_write, write_metrics
from cifarkit.core.rundir import find_unfinished, is_running, resolve_auto, runs_dir
from cifarkit.nets.saved import read_checkpoint
from conftest import (
    FAST,
    RESUME_KEYS,
    SignalAt,
    add_callback,
    compose,
    error_line,
    folder_overrides,
    last_line,
    run_dirs,
    start_train,
    wait_for,
)


def args(image_folder: Path, tmp_path: Path, logs: str, *extra: str) -> list[str]:
    return (
        FAST
        + folder_overrides(image_folder, tmp_path)
        + [
            "data.image_size=16",
            "data.batch_size=16",
            "trainer.max_epochs=2",
            f"paths.log_dir={tmp_path / logs}",
            *extra,
        ]
    )


def finished(tmp_path: Path, logs: str) -> dict:
    (run,) = run_dirs(tmp_path / logs)
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.slow  # three runs; test_faults' mid-epoch resume stays in the default suite
def test_auto_continues_an_interrupted_run_in_its_directory_exactly(
    image_folder: Path, tmp_path: Path, main, monkeypatch, recwarn
) -> None:
    assert main("train.py", args(image_folder, tmp_path, "whole")).code == 0
    add_callback(monkeypatch, SignalAt(6))  # 4 steps an epoch: in epoch 1
    stopped = main("train.py", args(image_folder, tmp_path, "logs", "ckpt_path=auto"))
    assert stopped.code == 128 + signal.SIGTERM and "interrupted.ckpt" in last_line(stopped.err)
    assert "no unfinished run of this configuration" in stopped.err  # the first time: a new run
    monkeypatch.undo()
    (run,) = run_dirs(tmp_path / "logs")
    events = set((run / "tensorboard").glob("events.out.tfevents.*"))
    resumed = main("train.py", args(image_folder, tmp_path, "logs", "ckpt_path=auto"))
    assert resumed.code == 0, resumed.err[-3000:]
    assert f"ckpt_path=auto: continuing {run} from interrupted.ckpt" in resumed.err
    assert not [w for w in recwarn if "exists and is not empty" in str(w.message)]  # its own checkpoints: no warning
    assert run_dirs(tmp_path / "logs") == [run]  # the same run directory, and its TensorBoard version:
    assert set((run / "tensorboard").glob("events.out.tfevents.*")) > events and not [
        p for p in (run / "tensorboard").iterdir() if p.is_dir()
    ]
    metrics, whole = finished(tmp_path, "logs"), finished(tmp_path, "whole")
    assert metrics["status"] == "completed" and {k: metrics[k] for k in RESUME_KEYS} == {
        k: whole[k] for k in RESUME_KEYS
    }

    again = main("train.py", args(image_folder, tmp_path, "logs", "ckpt_path=auto"))  # a finished run is never resumed
    assert (
        again.code == 0
        and "no unfinished run of this configuration" in again.err
        and len(run_dirs(tmp_path / "logs")) == 2
    )


def unfinished_run(run: Path, cfg) -> Path:
    """A run directory of ``cfg`` that stopped after saving last.ckpt."""
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return run


def test_auto_looks_for_the_same_configuration_only(tmp_path: Path) -> None:
    """An unfinished run of another configuration (here another seed) is not this run's."""
    cfg = compose(tmp_path, ["trainer=cpu", "seed=1"])
    run = unfinished_run(tmp_path / "runs" / "earlier", cfg)
    assert find_unfinished(tmp_path / "runs", cfg) == ((run, run / "checkpoints" / "last.ckpt"), [])
    assert find_unfinished(tmp_path / "runs", compose(tmp_path, ["trainer=cpu", "seed=2"])) == (None, [])
    write_metrics(run, {"status": "completed"})
    assert find_unfinished(tmp_path / "runs", cfg) == (None, [])  # finished


def test_auto_reports_a_run_whose_checkpoints_cannot_be_read(tmp_path: Path) -> None:
    """A run whose only checkpoint is cut short is named in one line, not silently skipped; beside
    a good checkpoint of an earlier step, the good one is continued from, whatever its name."""
    cfg = compose(tmp_path, ["trainer=cpu"])
    run = unfinished_run(runs_dir(cfg) / "earlier", cfg)
    unreadable = (
        f"ckpt_path=auto: {run} did not finish, but none of its checkpoints can be read (last.ckpt); starting a new one"
    )
    assert resolve_auto(cfg, None) == (None, unreadable)
    torch.save({"state_dict": {}, "global_step": 4}, run / "checkpoints" / "epoch_000.ckpt")
    point, line = resolve_auto(cfg, None)
    assert point.ckpt == run / "checkpoints" / "epoch_000.ckpt"
    assert line == f"ckpt_path=auto: continuing {run} from epoch_000.ckpt (step 4)"


def hold_in_another_process(run: Path) -> subprocess.Popen:
    """A process that holds ``run``'s lock as a training run's rank 0 does, until it is killed."""
    code = (
        "import sys, time; from cifarkit.core.rundir import hold_run; f = hold_run(sys.argv[1]); "
        "print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


@pytest.mark.slow  # waits for a training process to hold its directory
def test_auto_leaves_a_run_that_is_still_training_alone(image_folder: Path, tmp_path: Path, main, monkeypatch) -> None:
    """While another process holds an interrupted run's lock (as its rank 0 does while it trains),
    ckpt_path=auto starts a new run beside it and names it, and a command aimed at its directory
    stops in one line without touching it; once that process is SIGKILLed the OS frees the lock
    and auto continues the run."""
    argv = args(image_folder, tmp_path, "logs", "ckpt_path=auto")
    add_callback(monkeypatch, SignalAt(2))
    assert main("train.py", argv).code == 128 + signal.SIGTERM
    monkeypatch.undo()
    (run,) = run_dirs(tmp_path / "logs")
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    holder = hold_in_another_process(run)
    try:
        assert find_unfinished(run.parent, cfg) == (None, [run])
        before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        time.sleep(1.1)  # run directories are named by the second (configs/hydra/default.yaml): the new one is another
        r = main("train.py", argv)
        assert r.code == 0, r.err[-3000:]
        assert f"under {run.parent} (1 still training, left alone: {run}); starting a new one" in r.err
        assert len(run_dirs(tmp_path / "logs")) == 2
        r = main("train.py", argv + [f"hydra.run.dir={run}"])
        assert r.code == 1
        assert error_line(r.err) == (
            f"error: another process is still training in {run}; let it finish or stop it first, "
            "or start a separate run (without hydra.run.dir)"
        )
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing of it touched
    finally:
        holder.kill()
        holder.wait()
    r = main("train.py", argv)
    assert r.code == 0 and f"ckpt_path=auto: continuing {run} from interrupted.ckpt" in r.err, r.err[-3000:]
    assert json.loads((run / "metrics.json").read_text())["status"] == "completed"


class Look(L.Callback):
    """Records, as training starts, whether the run directory is locked."""

    def __init__(self) -> None:
        self.locked: list[bool] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.locked.append(is_running(Path(trainer.checkpoint_callback.dirpath).parent))


def test_a_run_holds_its_directory_while_it_trains(image_folder: Path, tmp_path: Path, main, monkeypatch) -> None:
    """The lock is taken before training and given back when the command ends."""
    look = Look()
    add_callback(monkeypatch, look)
    r = main("train.py", args(image_folder, tmp_path, "logs"))
    assert r.code == 0, r.err[-3000:]
    (run,) = run_dirs(tmp_path / "logs")
    assert look.locked == [True] and (run / "run.lock").is_file() and not is_running(run)


FAKE_SCONTROL = """#!/bin/sh
echo "$@" >> "{log}"
"""


@pytest.mark.slow  # a run stopped, requeued and continued in processes
def test_slurm_requeue_signal_saves_requeues_and_the_job_continues(image_folder: Path, tmp_path: Path, main) -> None:
    """SLURM's warning signal to a real run: it saves, calls ``scontrol requeue <job>`` and stops in
    one line; the requeued job's same command continues it."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL.format(log=calls))
    (bin_dir / "scontrol").chmod(0o755)
    command = args(image_folder, tmp_path, "logs", "ckpt_path=auto", "trainer.max_epochs=8", "data.batch_size=4")
    p = start_train(
        command, tmp_path, env={"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    )
    wait_for(p, tmp_path / "logs", "train/runs/*/checkpoints/last.ckpt")
    p.send_signal(signal.SIGUSR1)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGUSR1, err[-3000:]
    assert last_line(err).endswith("checkpoint saved, SLURM job 4242 requeued: it continues with ckpt_path=auto"), err[
        -2000:
    ]
    assert calls.read_text().split() == ["requeue", "4242"]
    (run,) = run_dirs(tmp_path / "logs")
    assert read_checkpoint(run / "checkpoints" / "interrupted.ckpt")["epoch"] < 7
    requeued = main("train.py", command)  # the requeued job runs the same command
    assert requeued.code == 0, requeued.err[-3000:]
    assert f"continuing {run} from interrupted.ckpt" in requeued.err and run_dirs(tmp_path / "logs") == [run]
    assert finished(tmp_path, "logs")["status"] == "completed"


# ---------------------------------------------------------------------------------------------
# A full disk.


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MB tmpfs (mounting needs root, as CI runs; elsewhere the test is skipped)."""
    where = tmp_path / "disk"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(disk: Path, leave: int = 0) -> Path:
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


class FillAtEpoch(L.Callback):
    """Fills the disk, but for ``leave`` bytes, as epoch ``epoch`` starts (once)."""

    def __init__(self, disk: Path, epoch: int, leave: int) -> None:
        self.disk, self.epoch, self.leave, self.done = disk, epoch, leave, False

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch and not self.done:
            self.done = True
            fill(self.disk, self.leave)


@pytest.mark.slow  # a run filling a disk, then its resume, in processes
def test_a_full_disk_stops_in_one_line_and_auto_resumes_once_freed(
    image_folder: Path, tmp_path: Path, small_disk: Path, main, monkeypatch
) -> None:
    tiny = ["model=airbench", "model.net.widths=[8,16,16]", "trainer.max_epochs=3"]
    assert main("train.py", args(image_folder, tmp_path, "whole", *tiny)).code == 0
    add_callback(monkeypatch, FillAtEpoch(small_disk, epoch=1, leave=20_000))
    on_disk = [*tiny, f"paths.log_dir={small_disk / 'logs'}"]
    full = main("train.py", args(image_folder, tmp_path, "unused", *on_disk, "ckpt_path=auto"))
    assert full.code == 1
    line = error_line(full.err)
    assert (
        line.startswith("error: the disk is full: could not write ")
        and str(small_disk) in line
        and "needs about" in line
    ), line
    (run,) = run_dirs(small_disk / "logs")
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] == 0  # the last good checkpoint, intact
    assert not list((run / "checkpoints").glob(".*.tmp"))  # no partial file left
    monkeypatch.undo()
    (small_disk / "filler").unlink()
    resumed = main("train.py", args(image_folder, tmp_path, "unused", *on_disk, "ckpt_path=auto"))
    assert resumed.code == 0 and f"continuing {run} from last.ckpt" in resumed.err, resumed.err[-3000:]
    metrics, whole = finished(tmp_path / "disk", "logs"), finished(tmp_path, "whole")
    assert {k: metrics[k] for k in RESUME_KEYS} == {k: whole[k] for k in RESUME_KEYS}


def test_every_writer_reports_a_full_disk_and_keeps_the_old_file(
    image_folder: Path, tmp_path: Path, small_disk: Path
) -> None:
    """metrics.json, a checkpoint, a picture, the dataset cache and an export: one line each, old file intact."""
    from cifarkit.fit.checkpoint_io import AtomicCheckpointIO
    from cifarkit.infer.export import export_model
    from cifarkit.nets.models import BasicCNN
    from conftest import craft_checkpoint, datamodule

    write_metrics(small_disk, {"status": "completed", "test/acc": 0.5})
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(10)}}, small_disk / "last.ckpt")
    before = {p.name: p.read_bytes() for p in small_disk.iterdir()}
    fill(small_disk, leave=2_000)
    writers = {
        "metrics.json": lambda: write_metrics(
            small_disk, {"status": "completed", "test/acc": 0.6, "pad": "x" * 10_000}
        ),
        "last.ckpt": lambda: AtomicCheckpointIO().save_checkpoint(
            {"state_dict": {"w": torch.zeros(100_000)}}, small_disk / "last.ckpt"
        ),
        "samples.png": lambda: atomic_write(small_disk / "samples.png", lambda f: f.write(os.urandom(50_000))),
        "cache": lambda: datamodule(
            tmp_path, folder_overrides(image_folder, tmp_path) + [f"data.cache_dir={small_disk / 'cache'}"]
        ).prepare_data(),
        "model.onnx": lambda: export_model(
            str(
                craft_checkpoint(
                    tmp_path / "c.ckpt",
                    {"_target_": "cifarkit.nets.models.BasicCNN"},
                    BasicCNN(num_classes=3).state_dict(),
                )
            ),
            "onnx",
            str(small_disk / "model.onnx"),
            ["cifarkit."],
        ),
    }
    for name, write in writers.items():
        with pytest.raises(
            DiskFull,
            match=rf"^the disk is full: could not write {small_disk}.* free; the file needs .*ckpt_path=auto\)$",
        ) as e:
            write()
        assert "\n" not in str(e.value) and isinstance(e.value.__cause__, (OSError, RuntimeError)), name
    assert {p.name: p.read_bytes() for p in small_disk.iterdir() if p.name in before} == before  # intact
    assert sorted(p.name for p in small_disk.iterdir() if p.name.startswith(".")) == []  # no partial files


def disk_full_at(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Writing checkpoint ``name`` fails as on a full disk: part of it reaches the file, then ENOSPC."""
    from cifarkit.fit.checkpoint_io import AtomicCheckpointIO

    real_io_save, real_save, writing = AtomicCheckpointIO.save_checkpoint, torch.save, [""]

    def io_save(self, checkpoint, path, *args, **kwargs):
        writing[0] = Path(path).name
        return real_io_save(self, checkpoint, path, *args, **kwargs)

    def save(obj, f, *args, **kwargs):
        if writing[0] != name:
            return real_save(obj, f, *args, **kwargs)
        whole = io.BytesIO()
        real_save(obj, whole, *args, **kwargs)
        f.write(whole.getvalue()[: len(whole.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", io_save)
    monkeypatch.setattr(torch, "save", save)


@pytest.mark.slow  # a run filling a disk, then its resume
def test_auto_continues_a_run_that_failed_on_a_full_disk_from_its_newest_good_checkpoint(
    image_folder: Path, tmp_path: Path, main, monkeypatch
) -> None:
    """The disk fills as last.ckpt is first written, just after epoch 0's best checkpoint: the error line
    says what ckpt_path=auto will do, and the same command with it does that: the same run directory,
    from epoch_000.ckpt's step, and the metrics of a run never stopped."""
    assert main("train.py", args(image_folder, tmp_path, "whole")).code == 0
    disk_full_at(monkeypatch, "last.ckpt")
    full = main("train.py", args(image_folder, tmp_path, "logs", "ckpt_path=auto"))
    monkeypatch.undo()
    (run,) = run_dirs(tmp_path / "logs")
    ckpts = run / "checkpoints"
    assert full.code == 1 and sorted(p.name for p in ckpts.iterdir()) == ["epoch_000.ckpt"]  # no partial file either
    step = read_checkpoint(ckpts / "epoch_000.ckpt")["global_step"]
    assert step == 4  # 4 steps an epoch
    assert error_line(full.err).endswith(
        f"the files already written are intact: free space there and run the same command with ckpt_path=auto: "
        f"it continues {run} from epoch_000.ckpt (step {step})"
    )
    assert json.loads((run / "metrics.json").read_text())["status"] == "failed"
    resumed = main("train.py", args(image_folder, tmp_path, "logs", "ckpt_path=auto"))
    assert resumed.code == 0, resumed.err[-3000:]
    assert f"ckpt_path=auto: continuing {run} from epoch_000.ckpt (step {step})" in resumed.err
    assert run_dirs(tmp_path / "logs") == [run]
    metrics, whole = finished(tmp_path, "logs"), finished(tmp_path, "whole")
    assert metrics["status"] == "completed"
    assert {k: metrics[k] for k in RESUME_KEYS} == {k: whole[k] for k in RESUME_KEYS}
