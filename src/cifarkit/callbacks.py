"""Callbacks and plugins that train.py adds to every run: they are how a run stays safe and visible.

* ``AtomicCheckpointIO``: a checkpoint is written beside its target and renamed into place.
* ``GracefulStop``: SIGTERM / Ctrl-C save a checkpoint and end the run within a step.
* ``NonFiniteGuard``: a NaN/inf loss stops training before a bad checkpoint is written.
* ``Throughput``: training images per second, logged as ``train/images_per_s``.
* ``HParamsSummary``: the run's config in TensorBoard's HPARAMS tab, next to its final metrics.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from cifarkit.errors import UserError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same folder, fsync, then ``os.replace``.

    A run killed mid-save leaves the previous ``last.ckpt`` intact (at worst a stray
    ``*.tmp`` file), never a truncated checkpoint under the real name.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class TrainingStopped(Exception):
    """Raised to end fit() early; train.py turns it into one line and an exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class GracefulStop(L.Callback):
    """On SIGTERM or SIGINT, finish the current step, save ``checkpoints/interrupted.ckpt``, stop.

    The handlers only set a flag; the save happens between steps, where the state is whole.
    A second Ctrl-C while saving is ignored rather than leaving a half-written file.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1 and not trainer.is_global_zero:
            return  # rank 0 owns the signal; the others stop when it raises
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handler)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.signum is None:
            return
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        path = self.dirpath / "interrupted.ckpt"
        trainer.save_checkpoint(path)
        self._restore()
        name = signal.Signals(self.signum).name
        raise TrainingStopped(
            f"stopped by {name} at epoch {trainer.current_epoch}, step {trainer.global_step}; "
            f"checkpoint saved, continue with ckpt_path={path}",
            exit_code=128 + self.signum,
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()


class NonFiniteGuard(L.Callback):
    """Stop with the step number when the training loss becomes NaN or infinite.

    The check is kept on the device (no host sync per step) and read every
    ``check_every_n_steps`` steps and before each validation, so no checkpoint of diverged
    weights is ever saved: ``last.ckpt`` stays the last good one.
    """

    def __init__(self, check_every_n_steps: int = 50) -> None:
        self.every = check_every_n_steps
        self.first_bad: torch.Tensor | None = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach())
        step = trainer.global_step  # already advanced past this step's optimizer update
        self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, step), self.first_bad)
        if step % self.every == 0:
            self._check(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._check(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def _check(self, trainer: L.Trainer) -> None:
        if self.first_bad is None or int(self.first_bad) < 0:
            return
        ckpt = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt" if trainer.checkpoint_callback else None
        keep = f"last good checkpoint: {ckpt}" if ckpt and ckpt.exists() else "no checkpoint had been saved yet"
        raise TrainingStopped(
            f"training loss became NaN/inf at step {int(self.first_bad)} (epoch {trainer.current_epoch}); "
            f"{keep}; lower model.optimizer.lr or check the data",
            exit_code=1,
        )


class Throughput(L.Callback):
    """Training images per second (all ranks together), excluding validation."""

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._t0 = 0.0
        self._n0 = 0

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(pl_module)
        self._t0, self._n0 = time.perf_counter(), self.images

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.images += len(batch[1]) * trainer.world_size

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(pl_module)
        dt = time.perf_counter() - self._t0
        self.seconds += dt
        if dt > 0:
            pl_module.log("train/images_per_s", (self.images - self._n0) / dt, rank_zero_only=True)

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.seconds if self.seconds else None


class HParamsSummary(L.Callback):
    """Register the run's flattened config with the metrics that TensorBoard's HPARAMS tab shows.

    Only the metric names are declared here; their values are the scalars the run logs, so
    the tab fills in as the run ends (and a killed run still shows its last values).
    """

    def __init__(self, params: dict[str, Any], metrics: list[str]) -> None:
        self.params, self.metrics = params, metrics

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from torch.utils.tensorboard.summary import hparams

        for logger in trainer.loggers:
            if isinstance(logger, L.pytorch.loggers.TensorBoardLogger):
                exp, ssi, sei = hparams(self.params, {m: 0.0 for m in self.metrics})
                writer = logger.experiment._get_file_writer()
                for summary in (exp, ssi, sei):
                    writer.add_summary(summary)


def check_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (no code runs: ``weights_only``) or stop with one clear line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"ckpt_path={path} does not exist; pass the path of a .ckpt file (e.g. <run>/checkpoints/last.ckpt)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"ckpt_path={path} is not a readable checkpoint ({e.__class__.__name__}); pass a .ckpt written by train.py") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"ckpt_path={path} is not a Lightning checkpoint (no state_dict); pass a .ckpt written by train.py")
    return ckpt
