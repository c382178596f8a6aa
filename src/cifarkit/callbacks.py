"""The run's own callbacks, all composed from configs/callbacks/ (``callbacks=none`` drops them).

* ``GracefulStop``: SIGTERM / Ctrl-C save a checkpoint and end the run within a step, on every rank.
* ``NonFiniteGuard``: a NaN/inf loss stops training before a bad checkpoint is written.
* ``Throughput``: training images per second, logged as ``train/images_per_s``.
* ``HParamsSummary``: the run's hyperparameters in TensorBoard's HPARAMS tab, next to its final metrics.
* ``Lookahead``: airbench's weight averaging (Lightning's ``WeightAveraging``, weights reset to the average).
* ``FreezeParameters``: stop training named parameters after some epochs (airbench's whitening bias).
(``CarryCheckpoints`` lives with the checkpoints, ``RunPictures`` with the pictures.)

Under DDP every rank runs the same hooks, but the progress bar runs on rank 0 only, and at the
end of a training epoch it computes (and so syncs across ranks) the epoch's metrics. A
collective issued from ``on_train_epoch_end`` would then meet a different collective on the
other ranks and wait forever, so these callbacks agree across ranks only at a training batch's
end or after validation, where every rank is at the same point.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

from cifarkit.errors import TrainingStopped, UserError
from cifarkit.optim import run_steps


class GracefulStop(L.Callback):
    """On SIGTERM or SIGINT, finish the current step, save ``checkpoints/interrupted.ckpt``, stop.

    The handlers only set a flag (they replace Lightning's own SIGTERM handler and its
    KeyboardInterrupt path while training); the save happens after a training step or a
    validation, where the state is whole and resumable (the device loader's position is in
    it, so a resume continues mid-epoch exactly). Under DDP, rank 0 passes the signal on to the
    ranks it started and all ranks agree on the stop before saving. A second Ctrl-C while saving
    is ignored, and diverged weights are never saved. If no step ends within ``grace_s`` after
    the signal (a stalled run), the process says so in one line and exits anyway; and if rank 0
    fails, it ends the ranks it started rather than leave them waiting.
    """

    def __init__(self, dirpath: str, every_n_steps: int = 20, grace_s: float = 120.0) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.grace_s = grace_s
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._children: list[Any] = []
        self._watchdog: threading.Timer | None = None

    def _handler(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        self.signum = signum
        if not first:
            return
        for proc in self._children:  # the ranks Lightning's launcher started from this process
            if proc.poll() is None:
                proc.send_signal(signum)
        self._watchdog = threading.Timer(self.grace_s, self._give_up, args=(signum,))
        self._watchdog.daemon = True
        self._watchdog.start()

    def _give_up(self, signum: int) -> None:
        print(
            f"stopped by {signal.Signals(signum).name}: no training step ended within {self.grace_s:g} s "
            f"(a stalled run?); exiting without a new checkpoint, those in {self.dirpath} are intact",
            file=sys.stderr, flush=True,
        )
        os._exit(128 + signum)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning has installed its SIGTERM handler (so ours replaces it, not wraps it).
        self.signum = None
        self._children = list(getattr(getattr(trainer.strategy, "launcher", None), "procs", []))
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

    def _finish(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._restore()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._finish()
        if not isinstance(exception, TrainingStopped):  # a failing rank 0 takes down the ranks it started,
            for proc in self._children:  # which would otherwise wait for it until their timeout, or forever
                if proc.poll() is None:
                    proc.kill()


class NonFiniteGuard(L.Callback):
    """Stop with the step number when the training loss becomes NaN or infinite.

    On an accelerator the check stays on the device (no host sync per step) and is read every
    ``check_every_n_steps`` steps, at the epoch's last step and before each validation (on the
    CPU: every step), so no
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
        # On the CPU a check costs no sync. The epoch's last step is checked too, before a run
        # without validation saves its checkpoint at the epoch's end (not from on_train_epoch_end:
        # see the module docstring).
        if step % self.every == 0 or loss.device.type == "cpu" or batch_idx + 1 >= trainer.num_training_batches:
            self._check(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
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


class Lookahead(WeightAveraging):
    """airbench's lookahead: every ``every_n_steps`` optimizer steps the weights (and, with
    ``use_buffers``, the BatchNorm statistics) are folded into a moving average, and training
    continues from that average. The average's decay grows with the run's progress t/T as
    ``decay ** every_n_steps * (t / T) ** power``: near 0 early, so the average follows the
    weights while the lr is high, and ``decay ** every_n_steps`` at the end, where it smooths
    the noise of the last steps. Validation, the saved checkpoints and the model after training
    hold the average, as with Lightning's ``EMAWeightAveraging``; unlike it, the weights being
    trained are pulled back to the average too. T is the run's own step count
    (``trainer.estimated_stepping_batches``)."""

    def __init__(self, every_n_steps: int = 5, decay: float = 0.95, power: float = 3.0, use_buffers: bool = True) -> None:
        super().__init__(use_buffers=use_buffers, avg_fn=self._fold)
        if every_n_steps < 1 or not 0 <= decay <= 1:
            raise UserError(f"Lookahead needs every_n_steps >= 1 and 0 <= decay <= 1, got {every_n_steps} and {decay}")
        self.every_n_steps, self.decay, self.power = every_n_steps, decay, power
        self.total_steps = 1
        self.weight = 0.0  # the average's share in the update being made

    def _fold(self, average: torch.Tensor, current: torch.Tensor, n_averaged: torch.Tensor) -> torch.Tensor:
        return torch.lerp(average, current.to(average.dtype), 1.0 - self.weight) if average.is_floating_point() else current

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.total_steps = run_steps(trainer, "callbacks.lookahead's decay ramp")

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if step_idx is None or (step_idx + 1) % self.every_n_steps:
            return False
        progress = min(1.0, (step_idx + 1) / self.total_steps)
        self.weight = self.decay**self.every_n_steps * progress**self.power
        return True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        if self._latest_update_step == trainer.global_step:  # just averaged: go on from the average
            self._copy_average_to_current(pl_module)


class FreezeParameters(L.Callback):
    """Stop training the parameters named in ``names`` (as in ``pl_module.named_parameters()``,
    e.g. ``net.whiten.bias``) from epoch ``after_epochs`` on: their gradients are dropped just
    before each optimizer step, so neither the step, its momentum nor weight decay moves them.
    Dropping the gradient (instead of switching ``requires_grad`` off) keeps the set of
    parameters that DDP synchronizes fixed."""

    def __init__(self, names: list[str], after_epochs: int) -> None:
        self.names, self.after_epochs = list(names), after_epochs
        self.params: list[torch.nn.Parameter] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        named = dict(pl_module.named_parameters())
        unknown = [n for n in self.names if n not in named]
        if unknown:
            raise UserError(f"FreezeParameters: no parameter named {', '.join(unknown)}; names look like {next(iter(named), '?')}")
        self.params = [named[n] for n in self.names]

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if trainer.current_epoch >= self.after_epochs:
            for p in self.params:
                p.grad = None


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
    """The run's hyperparameters (the model's as ``model/...``, the data's as ``data/...``, and the
    trainer's precision and epochs) in TensorBoard's HPARAMS tab, beside ``metrics``.

    Only the metric names are declared here; their values are the scalars the run logs, so
    the tab fills in as the run ends (and a killed run still shows its last values).
    """

    def __init__(self, metrics: list[str]) -> None:
        self.metrics = list(metrics)

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from torch.utils.tensorboard.summary import hparams

        params = flatten({
            "model": dict(pl_module.hparams),
            "data": dict(getattr(trainer.datamodule, "hparams", {})),
            "trainer": {"precision": trainer.precision, "max_epochs": trainer.max_epochs, "world_size": trainer.world_size},
        })
        for logger in trainer.loggers:
            if isinstance(logger, L.pytorch.loggers.TensorBoardLogger):
                exp, ssi, sei = hparams(params, {m: 0.0 for m in self.metrics})
                writer = logger.experiment._get_file_writer()
                for summary in (exp, ssi, sei):
                    writer.add_summary(summary)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"optimizer": {"lr": 0.001}}}`` as ``{"model/optimizer/lr": 0.001}``; other values as text."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in flatten(value, f"{prefix}{key}/").items()}
    value = node if isinstance(node, (int, float, str, bool)) else str(node)
    return {prefix.rstrip("/"): value}
