"""Training survives faults: signals, SIGKILL, a diverging loss, a save cut short.

A bad ckpt_path: test_checkpoints.py."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from cifarkit.core.errors import TrainingStopped
from cifarkit.fit.checkpoint_io import AtomicCheckpointIO
from cifarkit.nets.saved import read_checkpoint
from cifarkit.run.jobs import train_job
from conftest import (
    FAST,
    RESUME_KEYS,
    SignalAt,
    add_callback,
    folder_overrides,
    last_line,
    run_cli,
    run_dirs,
    start_train,
    wait_for,
)

SMALL = ["data.image_size=16"]  # a 4x smaller first fc layer: same code paths, faster steps


def long_run(image_folder: Path, tmp_path: Path) -> list[str]:
    return (
        FAST
        + SMALL
        + folder_overrides(image_folder, tmp_path)
        + ["trainer.max_epochs=1000", f"paths.log_dir={tmp_path / 'logs'}"]
    )


def resume_to_completion(
    image_folder: Path, tmp_path: Path, ckpt: Path, epochs: int, extra: tuple[str, ...] = ()
) -> dict:
    args = (
        FAST
        + SMALL
        + folder_overrides(image_folder, tmp_path)
        + list(extra)
        + [f"trainer.max_epochs={epochs}", f"ckpt_path={ckpt}", f"paths.log_dir={tmp_path / 'resumed'}"]
    )
    r = run_cli("train.py", args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return json.loads((run_dirs(tmp_path / "resumed")[0] / "metrics.json").read_text())


@pytest.mark.slow  # a process stopped by a signal, then resumed; test_sigterm_mid_epoch stays in the default suite
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_stops_in_one_line_and_resumes(sig, image_folder, tmp_path):
    p = start_train(long_run(image_folder, tmp_path), tmp_path)
    wait_for(p, tmp_path / "logs", "train/runs/*/checkpoints/last.ckpt")  # epoch 0 done: it is training now
    p.send_signal(sig)
    t0 = time.monotonic()
    _, err = p.communicate(timeout=60)
    assert time.monotonic() - t0 < 20
    assert p.returncode == 128 + sig
    run = run_dirs(tmp_path / "logs")[0]
    ckpt = run / "checkpoints" / "interrupted.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] >= 1  # after epoch 0 (on a fast machine the signal may land an epoch later)
    assert last_line(err) == (
        f"stopped by {sig.name} at epoch {saved['epoch']}, step {saved['global_step']}; "
        f"checkpoint saved, continue with ckpt_path={ckpt}"
    )
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"
    assert (run / "train.log").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert "val/acc" in events.Tags()["scalars"]
    if sig == signal.SIGINT:  # the end-to-end resume (the fast in-process one is below)
        epochs = saved["epoch"] + 2  # the interrupted epoch and one more
        metrics = resume_to_completion(image_folder, tmp_path, ckpt, epochs=epochs)
        assert metrics["status"] == "completed" and metrics["epochs"] == epochs


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_from_last(image_folder, tmp_path):
    p = start_train(long_run(image_folder, tmp_path) + ["data.batch_size=4"], tmp_path)
    last = wait_for(p, tmp_path / "logs", "train/runs/*/checkpoints/last.ckpt")
    time.sleep(1.0)  # somewhere in epoch 1
    p.kill()
    p.communicate(timeout=30)
    epochs = read_checkpoint(last)["epoch"] + 2  # whole, whichever epoch the kill came after; one more to train
    resumed = resume_to_completion(image_folder, tmp_path, last, epochs=epochs, extra=("data.batch_size=4",))
    whole = run_cli(
        "train.py",
        FAST
        + SMALL
        + folder_overrides(image_folder, tmp_path)
        + [f"trainer.max_epochs={epochs}", "data.batch_size=4", f"paths.log_dir={tmp_path / 'whole'}"],
        cwd=tmp_path,
    )
    assert whole.returncode == 0, whole.stderr[-3000:]
    whole_metrics = json.loads((run_dirs(tmp_path / "whole")[0] / "metrics.json").read_text())
    assert {k: resumed[k] for k in RESUME_KEYS} == {k: whole_metrics[k] for k in RESUME_KEYS}


def run_in_process(
    compose_cfg, image_folder: Path, tmp_path: Path, name: str, epochs: int, ckpt: Path | None = None
) -> dict:
    cfg = compose_cfg(
        FAST + SMALL + folder_overrides(image_folder, tmp_path) + [f"trainer.max_epochs={epochs}", "data.batch_size=16"]
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / name)
        cfg.ckpt_path = str(ckpt) if ckpt else None
    train_job(cfg)
    return json.loads((tmp_path / name / "metrics.json").read_text())


@pytest.mark.slow  # three runs to compare
def test_resume_at_epoch_boundary_gives_the_same_metrics(compose_cfg, image_folder, tmp_path):
    whole = run_in_process(compose_cfg, image_folder, tmp_path, "whole", 2)
    run_in_process(compose_cfg, image_folder, tmp_path, "first", 1)
    resumed = run_in_process(
        compose_cfg, image_folder, tmp_path, "resumed", 2, ckpt=tmp_path / "first" / "checkpoints" / "last.ckpt"
    )
    assert {k: resumed[k] for k in RESUME_KEYS} == {k: whole[k] for k in RESUME_KEYS}
    # the best checkpoint was carried into the new run folder, the old run's files untouched
    assert Path(resumed["best_ckpt"]).name == Path(whole["best_ckpt"]).name
    assert Path(resumed["best_ckpt"]).parent == tmp_path / "resumed" / "checkpoints"
    assert (tmp_path / "first" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    "step", [pytest.param(1, marks=pytest.mark.slow), 6]
)  # 4 steps an epoch: in epoch 0, in epoch 1
def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(
    step, compose_cfg, image_folder, tmp_path, monkeypatch
):
    whole = run_in_process(compose_cfg, image_folder, tmp_path, "whole", 2)
    add_callback(monkeypatch, SignalAt(step))
    with pytest.raises(TrainingStopped, match=f"stopped by SIGTERM at epoch {step // 4}, step {step + 1}"):
        run_in_process(compose_cfg, image_folder, tmp_path, "stopped", 2)
    monkeypatch.undo()
    ckpt = tmp_path / "stopped" / "checkpoints" / "interrupted.ckpt"
    (loader_state,) = read_checkpoint(ckpt)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state["epoch"] == step // 4 and loader_state["batches"] == (step + 1) % 4  # mid-epoch
    resumed = run_in_process(compose_cfg, image_folder, tmp_path, "resumed", 2, ckpt=ckpt)
    assert {k: resumed[k] for k in RESUME_KEYS} == {k: whole[k] for k in RESUME_KEYS}


def test_resuming_a_finished_run_keeps_its_metrics(compose_cfg, image_folder, tmp_path):
    """A kill can land after the last epoch's checkpoint: resuming then trains nothing, but
    still tests and reports the run's best validation accuracy."""
    first = run_in_process(compose_cfg, image_folder, tmp_path, "first", 1)
    again = run_in_process(
        compose_cfg, image_folder, tmp_path, "again", 1, ckpt=tmp_path / "first" / "checkpoints" / "last.ckpt"
    )
    assert again["status"] == "completed" and again["epochs"] == 1
    assert again["val/acc_best"] == first["val/acc_best"] and again["test/acc"] == first["test/acc"]


@pytest.fixture
def saved(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the files the trainer wrote through AtomicCheckpointIO (it is the trainer's plugin)."""
    names: list[str] = []
    real_save = AtomicCheckpointIO.save_checkpoint

    def save(self, checkpoint, path, *args, **kwargs):
        names.append(Path(path).name)
        return real_save(self, checkpoint, path, *args, **kwargs)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save)
    return names


class DivergeAt(L.Callback):
    """Makes every loss from ``epoch`` on non-finite, as a too-high learning rate would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch >= self.epoch:
            with torch.no_grad():
                pl_module.net.fc3.bias.fill_(float("nan"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(compose_cfg, image_folder, tmp_path, monkeypatch, saved):
    add_callback(monkeypatch, DivergeAt(1))
    with pytest.raises(
        TrainingStopped, match=r"training loss became NaN/inf at step 5 \(epoch 1\); last good checkpoint: .*last.ckpt"
    ):
        run_in_process(compose_cfg, image_folder, tmp_path, "run", 3)
    assert sorted(saved) == ["epoch_000.ckpt", "last.ckpt"]  # ModelCheckpoint saves go through the plugin
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 0
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point())


def test_graceful_stop_saves_through_the_atomic_plugin(compose_cfg, image_folder, tmp_path, monkeypatch, saved):

    class CtrlC(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered to this process

    add_callback(monkeypatch, CtrlC())
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingStopped, match="stopped by SIGINT at epoch 0, step 3") as e:
        run_in_process(compose_cfg, image_folder, tmp_path, "run", 3)
    assert e.value.exit_code == 130
    assert saved == ["interrupted.ckpt"]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers given back
    monkeypatch.undo()
    metrics = run_in_process(
        compose_cfg, image_folder, tmp_path, "resumed", 1, ckpt=tmp_path / "run" / "checkpoints" / "interrupted.ckpt"
    )
    assert metrics["status"] == "completed" and metrics["steps"] == 4


def test_nan_loss_from_the_command_line_is_one_line_exit_1(image_folder, tmp_path, main):
    args = (
        FAST
        + SMALL
        + folder_overrides(image_folder, tmp_path)
        + ["trainer.max_epochs=3", "model.optimizer.lr=1e6", f"paths.log_dir={tmp_path / 'logs'}"]
    )
    r = main("train.py", args)
    assert r.code == 1
    assert "training loss became NaN/inf at step" in last_line(r.err)
    assert "lower model.optimizer.lr" in last_line(r.err)
    metrics = json.loads((run_dirs(tmp_path / "logs")[0] / "metrics.json").read_text())
    assert metrics["status"] == "failed"


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 0}, target)
    before = target.read_bytes()

    def dies_midway(obj, f, *a, **kw):
        f.write(before[: len(before) // 2])
        raise KeyboardInterrupt  # e.g. a kill while writing

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 1}, target)
    assert target.read_bytes() == before
    assert read_checkpoint(target)["epoch"] == 0
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no temp file left
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # as shareable as a plain file


def test_sigterm_before_training_is_one_line_not_exit_0(compose_cfg, image_folder, tmp_path, monkeypatch, capsys):
    """Lightning's own SIGTERM path (here: during the sanity check) is a SystemExit with code 0."""
    from cifarkit.run.cli import guarded

    class Term(L.Callback):
        def on_validation_batch_start(self, trainer, *args):
            os.kill(os.getpid(), signal.SIGTERM)

    add_callback(monkeypatch, Term())
    cfg = compose_cfg(FAST + SMALL + folder_overrides(image_folder, tmp_path) + ["trainer.num_sanity_val_steps=1"])
    with pytest.raises(SystemExit) as e:
        guarded(train_job)(cfg)
    assert e.value.code == 128 + signal.SIGTERM
    assert last_line(capsys.readouterr().err) == "stopped by SIGTERM outside training; nothing new was saved"


def test_last_ckpt_follows_every_epoch_even_without_a_new_best(compose_cfg, image_folder, tmp_path):
    """lr=0: val/acc never improves after epoch 0, yet last.ckpt must be the latest epoch's."""
    cfg = compose_cfg(
        FAST
        + SMALL
        + folder_overrides(image_folder, tmp_path)
        + ["trainer.max_epochs=3", "model.optimizer.lr=0", "test=false", "data.batch_size=16"]
    )
    train_job(cfg)
    ckpts = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_000.ckpt", "last.ckpt"]
    last = read_checkpoint(ckpts / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (2, 3 * 4)
    assert read_checkpoint(ckpts / "epoch_000.ckpt")["global_step"] == 4
