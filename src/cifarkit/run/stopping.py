"""Stopping a run: a run stops cleanly on a signal and never saves diverged weights.

* ``GracefulStop``: SIGTERM / Ctrl-C save ``checkpoints/interrupted.ckpt`` and end the run within a step, on every rank;
  SLURM's warning signal does the same and requeues the job.
* ``NonFiniteGuard``: a NaN/inf loss stops training before a bad checkpoint is written.

Under DDP every rank runs the same hooks, but the progress bar runs on rank 0 only, and at the
end of a training epoch it computes (and so syncs across ranks) the epoch's metrics. A
collective issued from ``on_train_epoch_end`` would then meet a different collective on the
other ranks and wait forever, so these callbacks agree across ranks only at a training batch's
end or after validation, where every rank is at the same point.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from cifarkit.core import rundir
from cifarkit.core.errors import TrainingStopped

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)  # SLURM's warnings before a pre-emption or the time limit


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

    SLURM's warning before a pre-emption or the time limit (``sbatch --signal=USR1@120``; USR2
    for submitit's jobs, which hydra/launcher=slurm starts) is a stop like SIGTERM, after which
    rank 0 puts the job back in the queue with ``scontrol requeue``; the requeued job's
    ``ckpt_path=auto`` continues from the checkpoint. Lightning's own auto-requeue saves from
    inside the signal handler, mid-step; this waits for the step's end, so the continued run
    equals one that was never stopped.
    """

    in_budget_probe = False  # it watches the run rather than train: cifarkit/run/budget.py's probe leaves it out

    def __init__(self, dirpath: str, every_n_steps: int, grace_s: float) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.grace_s = grace_s
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._launcher: Any = None  # Lightning's launcher of this process's ranks, if it started any
        self._watchdog: threading.Timer | None = None

    def _handler(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        self.signum = signum
        if not first:
            return
        if self._launcher is not None:  # the ranks Lightning's launcher started from this process
            self._launcher.kill(signum)
        self._watchdog = threading.Timer(self.grace_s, self._give_up, args=(signum,))
        self._watchdog.daemon = True
        self._watchdog.start()

    def _give_up(self, signum: int) -> None:
        print(
            f"stopped by {signal.Signals(signum).name}: no training step ended within {self.grace_s:g} s "
            f"(a stalled run?); exiting without a new checkpoint, those in {self.dirpath} are intact",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + signum)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning has installed its SIGTERM handler (so ours replaces it, not wraps it).
        self.signum = None
        self._launcher = trainer.strategy.launcher
        for sig in (*STOP_SIGNALS, *REQUEUE_SIGNALS):
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
            raise TrainingStopped(
                f"stopped by {name} at {where}; the weights are NaN/inf, so no checkpoint was saved", 1
            )
        path = self.dirpath / rundir.INTERRUPTED
        trainer.save_checkpoint(path, weights_only=False)
        self._restore()
        then = f"continue with ckpt_path={path}"
        if self.signum in REQUEUE_SIGNALS and trainer.is_global_zero:
            then = self._requeue()
        raise TrainingStopped(
            f"stopped by {name} at {where}; checkpoint saved, {then}", exit_code=128 + (self.signum or signal.SIGTERM)
        )

    def _requeue(self) -> str:
        """Put this SLURM job back in the queue; what the stop's line says next."""
        job = os.environ.get("SLURM_JOB_ID")
        if job is None:
            return "not a SLURM job, so nothing was requeued; continue with ckpt_path=auto"
        if os.environ.get("SLURM_ARRAY_JOB_ID"):
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        try:
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"but scontrol requeue {job} failed ({e}); requeue it and continue with ckpt_path=auto"
        if done.returncode:
            why = done.stderr.strip()[:200]
            return f"but scontrol requeue {job} failed ({why}); requeue it and continue with ckpt_path=auto"
        return f"SLURM job {job} requeued: it continues with ckpt_path=auto"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # Agreeing across DDP ranks costs a collective: do it every few steps there; alone, only once signalled.
        if (self.signum is not None) if trainer.world_size == 1 else trainer.global_step % self.every_n_steps == 0:
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
        # A failing rank 0 takes down the ranks it started, which would otherwise wait for it until their timeout,
        # or forever (SIGTERM where there is no SIGKILL: Windows).
        if not isinstance(exception, TrainingStopped) and self._launcher is not None:
            self._launcher.kill(getattr(signal, "SIGKILL", signal.SIGTERM))


class NonFiniteGuard(L.Callback):
    """Stop with the step number when the training loss becomes NaN or infinite.

    Each step's loss is looked at: on the CPU its value is read (no stall there), on an
    accelerator the check stays on the device (no host sync per step). The run stops at once
    on a single CPU device; otherwise the ranks decide together every ``check_every_n_steps``
    steps, at the epoch's or the run's last step and before each validation, so that no
    checkpoint of diverged weights is ever saved: ``last.ckpt`` stays the last good one.
    """

    def __init__(self, check_every_n_steps: int) -> None:
        self.every = check_every_n_steps
        self.first_bad = -1  # the first step whose loss was not finite, once read
        self._on_device: torch.Tensor | None = None  # the same on an accelerator, read at a check

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        step = trainer.global_step  # already advanced past this step's optimizer update
        if loss.device.type == "cpu":
            if self.first_bad < 0 and not math.isfinite(loss.item()):
                self.first_bad = step
        else:
            if self._on_device is None:
                self._on_device = torch.full((), -1, dtype=torch.long, device=loss.device)
            bad = ~torch.isfinite(loss.detach()) & (self._on_device < 0)
            self._on_device = torch.where(bad, torch.full_like(self._on_device, step), self._on_device)
        # The epoch's and the run's last steps are checked too, before the checkpoint saved at the
        # epoch's end (not from on_train_epoch_end: see the module docstring).
        last = batch_idx + 1 >= trainer.num_training_batches or 0 < trainer.max_steps <= step
        if (trainer.world_size == 1 and self.first_bad >= 0) or step % self.every == 0 or last:
            self._check(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._check(trainer)

    def _check(self, trainer: L.Trainer) -> None:
        if self.first_bad < 0 and self._on_device is not None:
            self.first_bad = int(self._on_device)
        if not trainer.strategy.reduce_boolean_decision(self.first_bad >= 0, all=False):
            return
        step = self.first_bad if self.first_bad >= 0 else trainer.global_step
        ckpt = Path(trainer.checkpoint_callback.dirpath) / rundir.LAST if trainer.checkpoint_callback else None
        keep = f"last good checkpoint: {ckpt}" if ckpt and ckpt.exists() else "no checkpoint had been saved yet"
        raise TrainingStopped(
            f"training loss became NaN/inf at step {step} (epoch {trainer.current_epoch}); "
            f"{keep}; lower model.optimizer.lr or check the data",
            exit_code=1,
        )
