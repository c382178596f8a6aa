"""``callbacks.optuna_pruning`` (configs/hparams_search/lr_optuna.yaml): a sweep's job reports its
monitored metric to its Optuna trial after every validation, and stops when the study's pruner
prunes it there.

The step reported is the number of epochs trained, so trials compare at the same epoch whatever
their batch size. The last validation of a run is reported but never pruned: the trial is complete.
Under DDP only global rank 0 talks to the study; its verdict is broadcast, so
every rank stops after the same validation. Lightning then ends ``fit`` as after early stopping:
the checkpoints of that validation are written as usual, and train.py records the run as
``status: pruned`` in its metrics.json, which the sweeper reads and tells the study.
Outside a sweep (``optuna_trial`` null) it does nothing.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class OptunaPruning(Callback):
    def __init__(
        self,
        trial: int | None,
        storage: Any,
        study_name: str | None,
        pruner: Any = None,
        monitor: str = "val/acc",
        first_step: int = 0,
    ) -> None:
        """``trial``: the trial's number in the study ``study_name`` at ``storage`` (both the
        sweeper's); ``pruner``: the sweeper's (it is not stored in the study); ``monitor``: the
        logged metric reported; ``first_step``: epochs the trial trained before this run (the earlier
        folds of a cross-validated job), counted on so that no step is reported twice."""
        self.number, self.storage, self.study_name = trial, storage, study_name
        self.first_step = first_step
        self.pruner, self.monitor = pruner, monitor
        self.pruned = False  # set on every rank when the pruner stopped the run; the run reads it (run/train.py)
        self._trial: Any = None
        self._reported: set[int] = set()
        self._unreachable = False  # the study could not be opened: the run goes on unpruned

    def __getstate__(self) -> dict[str, Any]:  # DDP's spawn start method pickles callbacks: not the study's connection
        return self.__dict__ | {"_trial": None}

    def _get_trial(self) -> Any:
        if self._trial is None and not self._unreachable:
            from cifarkit.core.errors import UserError
            from hydra_plugins.cifarkit_optuna_sweeper._study import load_trial

            try:
                self._trial = load_trial(self.storage, self.study_name, self.number, self.pruner)
            except UserError as e:  # an in-memory study in another process: train on, unpruned
                log.warning("optuna_pruning: %s; this trial is not pruned", e)
                self._unreachable = True
        return self._trial

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.number is None or trainer.sanity_checking or self.pruned:
            return
        # epochs trained (the validation at an epoch's end runs before it counts), on from earlier folds'
        step = self.first_step + trainer.current_epoch + 1
        prune = False
        if trainer.is_global_zero and step not in self._reported:
            value = trainer.callback_metrics.get(self.monitor)
            if value is None:
                log.warning(
                    "optuna_pruning: %s was not logged; nothing reported to trial %s", self.monitor, self.number
                )
            elif math.isfinite(value := float(value)) and (trial := self._get_trial()) is not None:
                trial.report(value, step)
                self._reported.add(step)
                prune = not last_validation(trainer, trainer.current_epoch + 1) and trial.should_prune()
        prune = trainer.strategy.broadcast(prune, src=0)
        if prune:
            self.pruned = True
            trainer.should_stop = True
            if trainer.is_global_zero:
                log.info(
                    "trial %s pruned after epoch %d (%s = %.4f)",
                    self.number,
                    step,
                    self.monitor,
                    float(trainer.callback_metrics[self.monitor]),
                )


def last_validation(trainer: L.Trainer, epochs: int) -> bool:
    """Whether training ends after this validation anyway: stopping there would save nothing, and
    the trial is complete, whatever the pruner would say."""
    return (trainer.max_epochs not in (None, -1) and epochs >= trainer.max_epochs) or (
        trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps
    )
