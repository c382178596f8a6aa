"""A time budget instead of a step count: ``budget_s=600`` trains for the steps this machine does in
about 600 seconds.

``size_to_budget`` runs a short probe before the run and returns the step count it decides, which
train.py sets as ``trainer.max_steps``: the same data, model, trainer and the
callbacks that act on training steps, for a few warm-up steps (the first one compiles with
``model.compile=true``) and then timed ones, in the run's own strategy (under DDP every rank
takes part, so the probe pays the same all-reduce). From the steady time per step and the
warm-up's extra time it sizes the step count so that the run's training (``train/seconds``)
ends at ``TARGET`` of the budget; under DDP every rank takes rank 0's count. The run itself is
then an ordinary run with ``trainer.max_steps`` set: the schedule, lookahead's ramp and the
freeze point are sized from it as from any step count, and ``trainer.max_steps=<count>
trainer.max_epochs=-1`` reproduces it exactly on any machine. The probe's steps train a copy of
the model that is thrown away; the run starts from the seed like any other. The decision is kept
in the run directory (``budget.json``), so a resumed run continues with the same count. A run
that Lightning cuts short by design (``trainer.fast_dev_run``) has nothing to size: ``skipped``
says so in one line and the budget steps aside.
"""

from __future__ import annotations

import json
import logging
import math
from time import perf_counter
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from omegaconf import DictConfig, open_dict

from cifarkit import rundir
from cifarkit.errors import UserError
from cifarkit.files import write_json

log = logging.getLogger(__name__)
TARGET = 0.95  # of the budget: what the probe cannot see (logging, the progress bar, load) gets the rest
WARMUP_STEPS = 3  # untimed: memory allocation, kernel selection, compilation
MIN_TIMED_STEPS, MIN_TIMED_S, MAX_TIMED_STEPS = 10, 2.0, 100
# Lightning's callbacks that write the run's files, need a logger or draw the progress: left out of the
# probe. The project's own callbacks say so themselves (``in_budget_probe = False``).
LIGHTNING_NOT_PROBED = (ModelCheckpoint, LearningRateMonitor, ProgressBar)


def probed(callback: L.Callback) -> bool:
    """Whether the probe keeps ``callback``: those that act on training steps, not those that watch the run."""
    return getattr(callback, "in_budget_probe", not isinstance(callback, LIGHTNING_NOT_PROBED))


class StepClock(L.Callback):
    """Times the probe: the warm-up steps from the start of training, then steps until enough
    of them and enough seconds are measured (the device synced only at those points)."""

    def __init__(self) -> None:
        self.start = self.warm = self.end = 0.0
        self.timed = 0

    def _now(self, pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = self._now(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == WARMUP_STEPS:
            self.warm = self._now(pl_module)
        elif trainer.global_step > WARMUP_STEPS:
            self.end, self.timed = self._now(pl_module), trainer.global_step - WARMUP_STEPS
            if self.timed >= MIN_TIMED_STEPS and self.end - self.warm >= MIN_TIMED_S:
                trainer.should_stop = True

    @property
    def seconds_per_step(self) -> float:
        return (self.end - self.warm) / self.timed

    @property
    def warmup_extra_s(self) -> float:
        """What the warm-up steps took beyond steady steps: paid again by the run's first steps."""
        return max(0.0, self.warm - self.start - WARMUP_STEPS * self.seconds_per_step)


def steps_for(budget_s: float, seconds_per_step: float, warmup_extra_s: float) -> int:
    """The step count whose training ends at ``TARGET`` of the budget."""
    return max(1, math.floor((TARGET * budget_s - warmup_extra_s) / seconds_per_step))


def skipped(cfg: DictConfig) -> str | None:
    """Why this run has no steps to size, in one line; None when a budget applies. Lightning cuts a
    ``fast_dev_run`` short by design (N batches of each split, whatever the step count says)."""
    fast = cfg.trainer.get("fast_dev_run")
    if not fast:
        return None
    n = 1 if fast is True else int(fast)
    return (
        f"budget_s={cfg.budget_s} is not used: trainer.fast_dev_run={str(fast).lower()} runs {n} "
        f"batch{'es' if n > 1 else ''} of each split and stops"
    )


def size_to_budget(cfg: DictConfig, build: Any) -> dict[str, Any]:
    """Probe this machine's rate and decide the step count that fits ``cfg.budget_s`` (``"steps"``);
    return the decision, which metrics.json records. ``build`` is train.py's; ``cfg`` is not changed."""
    budget = float(cfg.budget_s)
    if budget <= 0:
        raise UserError(f"budget_s={cfg.budget_s} must be a number of seconds above 0, or null")
    if cfg.ckpt_path:  # a resume keeps the step count its run was sized to (its schedule depends on it)
        return _resumed(cfg)
    probe_cfg = cfg.copy()
    with open_dict(probe_cfg):
        probe_cfg.trainer.update(
            max_steps=WARMUP_STEPS + MAX_TIMED_STEPS,
            max_epochs=-1,
            max_time=None,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_model_summary=False,
        )
    datamodule, trainer = build(probe_cfg, with_loggers=False)
    clock = StepClock()
    trainer.callbacks = [c for c in trainer.callbacks if probed(c)] + [clock]
    trainer.fit(instantiate(cfg.model, classes=datamodule.classes), datamodule=datamodule)
    if clock.timed == 0:
        raise UserError(
            "the budget probe could not time a step (fewer training batches than its warm-up); set trainer.max_steps "
            "instead"
        )
    decided = trainer.strategy.broadcast(
        (clock.seconds_per_step, clock.warmup_extra_s), src=0
    )  # rank 0's, on every rank
    steps = steps_for(budget, *decided)
    decision = {"seconds": budget, "steps": steps, "seconds_per_step": decided[0], "warmup_extra_s": decided[1]}
    if trainer.is_global_zero:
        write_json(rundir.budget_file(cfg.paths.output_dir), decision)
    log.info(
        "budget %g s: %d steps of %.4f s (after %d warm-up steps, %.1f s extra), training for about %.0f s; "
        "trainer.max_steps=%d trainer.max_epochs=-1 reproduces this run",
        budget,
        steps,
        decided[0],
        WARMUP_STEPS,
        decided[1],
        steps * decided[0] + decided[1],
        steps,
    )
    return decision


def _resumed(cfg: DictConfig) -> dict[str, Any]:
    """The decision the checkpoint's run recorded beside its checkpoints (``budget.json``)."""
    recorded = rundir.budget_file(rundir.of_checkpoint(cfg.ckpt_path))
    try:
        decision = json.loads(recorded.read_text())
    except (OSError, ValueError):
        raise UserError(
            f"budget_s is set but {recorded} does not say the step count the run was sized to; "
            "add trainer.max_steps=<its steps, from its log> to resume it"
        ) from None
    log.info("budget %g s: resuming the run sized to %d steps (%s)", decision["seconds"], decision["steps"], recorded)
    return decision
