"""Callbacks and plugins that train.py adds to every run: they are how a run stays safe and visible.

* ``AtomicCheckpointIO``: a checkpoint is written beside its target and renamed into place.
* ``GracefulStop``: SIGTERM / Ctrl-C save a checkpoint and end the run within a step.
* ``CarryCheckpoints``: a run resumed into a new folder keeps the old run's best checkpoint.
* ``NonFiniteGuard``: a NaN/inf loss stops training before a bad checkpoint is written.
* ``Throughput``: training images per second, logged as ``train/images_per_s``.
* ``HParamsSummary``: the run's config in TensorBoard's HPARAMS tab, next to its final metrics.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

from cifarkit.errors import UserError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same folder, fsync, then ``os.replace``.

    A run killed mid-save leaves the previous ``last.ckpt`` intact (at worst a hidden
    ``.last.ckpt.*.tmp`` file after a SIGKILL), never a truncated checkpoint under the real name.
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
        dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class TrainingStopped(Exception):
    """Raised to end fit() early; train.py turns it into one line and an exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class GracefulStop(L.Callback):
    """On SIGTERM or SIGINT, finish the current step, save ``checkpoints/interrupted.ckpt``, stop.

    The handlers only set a flag (they replace Lightning's own SIGTERM handler and its
    KeyboardInterrupt path while training); the save happens after a training step
    or a validation, where the state is whole and resumable. All ranks agree on the stop, so
    DDP does not hang. A second Ctrl-C while saving is ignored rather than leaving a
    half-written file, and diverged weights are never saved.
    """

    def __init__(self, dirpath: str, every_n_steps: int = 20) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning has installed its SIGTERM handler (so ours replaces it, not wraps it).
        self.signum = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handler)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _maybe_stop(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False):
            return
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        name = signal.Signals(self.signum or signal.SIGTERM).name
        where = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
        if not all(bool(torch.isfinite(p).all()) for p in pl_module.parameters()):
            raise TrainingStopped(f"stopped by {name} at {where}; the weights are NaN/inf, so no checkpoint was saved", 1)
        path = self.dirpath / "interrupted.ckpt"
        trainer.save_checkpoint(path, weights_only=False)
        self._restore()
        raise TrainingStopped(
            f"stopped by {name} at {where}; checkpoint saved, continue with ckpt_path={path}",
            exit_code=128 + (self.signum or signal.SIGTERM),
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # Agreeing across DDP ranks costs a collective: do it every few steps there, every step alone.
        if trainer.world_size == 1 or trainer.global_step % self.every_n_steps == 0:
            self._maybe_stop(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._maybe_stop(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()


class CarryCheckpoints(L.Callback):
    """Resuming into a new run folder keeps ``ModelCheckpoint``'s best and top-k.

    ``ckpt_path=<old run>/checkpoints/last.ckpt`` starts a new run folder, and Lightning's
    ``ModelCheckpoint`` forgets its scores when its folder changes: the resumed run would
    then pick its best among the new epochs only and test other weights than a run that was
    never stopped. The kept checkpoints are linked (or copied) into the new folder and the
    saved state is pointed at them before ``ModelCheckpoint`` loads it.
    """

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("callbacks", {})
        for cb in trainer.checkpoint_callbacks:
            state = states.get(cb.state_key)
            if not state or not cb.dirpath or state.get("dirpath") in (None, cb.dirpath):
                continue
            new = Path(cb.dirpath)
            if trainer.is_global_zero:
                new.mkdir(parents=True, exist_ok=True)
                for old in state.get("best_k_models", {}):
                    _link_or_copy(Path(old), new / Path(old).name)
            trainer.strategy.barrier("CarryCheckpoints")

            def moved(p: str) -> str:
                return str(new / Path(p).name) if p else p

            kept = {moved(p): v for p, v in state.get("best_k_models", {}).items()}
            state["best_k_models"] = {p: v for p, v in kept.items() if Path(p).is_file()}
            for key in ("best_model_path", "kth_best_model_path"):  # empty where the old file is gone
                path = moved(state.get(key, ""))
                state[key] = path if path in state["best_k_models"] else ""
            state["last_model_path"] = moved(state.get("last_model_path", ""))
            state["dirpath"] = cb.dirpath


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists() or not src.is_file():
        return
    try:
        os.link(src, dst)  # no extra disk; ModelCheckpoint deleting it later leaves the old run's file
    except OSError:
        shutil.copy2(src, dst)


class NonFiniteGuard(L.Callback):
    """Stop with the step number when the training loss becomes NaN or infinite.

    On an accelerator the check stays on the device (no host sync per step) and is read every
    ``check_every_n_steps`` steps and before each validation (on the CPU: every step), so no
    checkpoint of diverged weights is ever saved: ``last.ckpt`` stays the last good one. The
    ranks of a DDP run decide together, so they all stop.
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
        if step % self.every == 0 or loss.device.type == "cpu":  # on the CPU a check costs no sync
            self._check(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._check(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def _check(self, trainer: L.Trainer) -> None:
        local = self.first_bad is not None and int(self.first_bad) >= 0
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            return
        step = int(self.first_bad) if local else trainer.global_step
        ckpt = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt" if trainer.checkpoint_callback else None
        keep = f"last good checkpoint: {ckpt}" if ckpt and ckpt.exists() else "no checkpoint had been saved yet"
        raise TrainingStopped(
            f"training loss became NaN/inf at step {step} (epoch {trainer.current_epoch}); "
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

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_train_epoch_start(trainer, pl_module)  # a run resumed mid-epoch gets no epoch start

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


def check_targets(node: Any, trusted: Sequence[str], where: str = "net") -> None:
    """Refuse any ``_target_`` in a saved config outside the trusted prefixes, and any interpolation.

    train.py saves resolved configs, so a ``${...}`` can only be crafted: a resolver such as
    ``oc.create`` could otherwise smuggle in a ``_target_`` that appears only once resolved.
    """
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None and not (isinstance(target, str) and target.startswith(tuple(trusted))):
            raise UserError(
                f"the checkpoint's {where} config names _target_={target!r}, outside the trusted "
                f"{list(trusted)}; refusing to build it (add its package to trusted_targets only if you trust the file)"
            )
        for key, value in node.items():
            check_targets(value, trusted, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_targets(value, trusted, f"{where}[{i}]")
    elif isinstance(node, str) and "${" in node:
        raise UserError(f"the checkpoint's {where} config holds an interpolation {node!r}, which train.py never saves; refusing to build it")
