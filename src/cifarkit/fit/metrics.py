"""What a run reports: its progress and training throughput, and the metrics gathered for
metrics.json and TensorBoard's HPARAMS tab."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn

from cifarkit.core.errors import UserError

log = logging.getLogger(__name__)

# The metrics train.py logs when it ends and shows beside the configuration in the HPARAMS tab.
SUMMARY = ["val/acc_best", "test/acc", "test/loss", "test/calibration_error", "train/images_per_s"]


class Throughput(L.Callback):
    """Training images per second (all ranks together), in training steps only: validation
    inside a training epoch is not counted.

    Lightning's ``ThroughputMonitor`` would do the counting, but it synchronizes a CUDA device
    at every batch (a stall per step); here the clock is read at epoch and validation
    boundaries only, where the device is synced anyway.
    """

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._t0 = 0.0
        self._n0 = 0
        self._epoch_seconds = 0.0

    def _now(self, pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_train_epoch_start(trainer, pl_module)  # a run resumed mid-epoch gets no epoch start

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._n0, self._epoch_seconds = self._now(pl_module), self.images, 0.0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.images += len(batch[1]) * trainer.world_size

    def _in_fit(self, trainer: L.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._in_fit(trainer):  # validation inside a training epoch: stop the clock
            self._epoch_seconds += self._now(pl_module) - self._t0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._in_fit(trainer):
            self._t0 = self._now(pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning validates before this hook, so the clock restarted after it.
        dt = self._epoch_seconds + self._now(pl_module) - self._t0
        self.seconds += dt
        if dt > 0:
            pl_module.log("train/images_per_s", (self.images - self._n0) / dt, rank_zero_only=True)

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.seconds if self.seconds else None


class ProgressBar(RichProgressBar):
    """Lightning's ``RichProgressBar``, whose training bar and metrics are brought up to date
    every ``refresh_rate`` steps and at an epoch's last one: Lightning's reads the metrics at
    every step, which costs the host about as much as all of the project's callbacks together."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        done = batch_idx + 1
        if self.refresh_rate and (done % self.refresh_rate == 0 or done >= trainer.num_training_batches):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The classifier logs an epoch's training metrics after the bar's own epoch end: show the last ones.
        self._update_metrics(trainer, pl_module)
        super().on_train_end(trainer, pl_module)


def throughput(trainer: L.Trainer) -> dict[str, float]:
    """The whole run's ``train/images_per_s`` and ``train/seconds``, when it measured them."""
    measured = next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)
    if measured is None or not measured.images_per_s:
        return {}
    return {"train/images_per_s": measured.images_per_s, "train/seconds": measured.seconds}


def final_metrics(trainer: L.Trainer) -> dict[str, Any]:
    """Scalars from the trainer's last logged values, as plain floats."""
    return {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}


def per_class(metrics: dict[str, Any], prefix: str = "test/acc_class/") -> dict[str, Any]:
    """Fold ``test/acc_class/<name>`` scalars into one ``test/acc_class: {name: acc}`` entry."""
    classes = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
    out = {k: v for k, v in metrics.items() if not k.startswith(prefix)}
    if classes:
        out[prefix.rstrip("/")] = classes
    return out


def tested_metrics(trainer: L.Trainer, model: L.LightningModule) -> dict[str, Any]:
    """After ``trainer.test``: the scalars, per-class accuracy as one dict, and the confusion matrix."""
    metrics = per_class(final_metrics(trainer))
    if model.test_confusion.update_called:  # every rank: the sum over ranks is a collective
        metrics["test/confusion_matrix"] = (
            model.test_confusion.compute().cpu().tolist()
        )  # rows: true, columns: predicted
    return metrics


def log_hyperparams(
    trainer: L.Trainer,
    model: L.LightningModule,
    datamodule: L.LightningDataModule,
    metrics: dict[str, Any],
    budget_s: float | None,
) -> None:
    """The run's configuration (``model/...``, ``data/...``, ``trainer/...``, flattened by
    Lightning) beside its ``SUMMARY`` metrics in TensorBoard's HPARAMS tab (rank 0 writes).

    MLflow and W&B got the model's and the data's hyperparameters from Lightning when fitting
    started, and every metric as it was logged: they get the ``trainer/...`` part only.
    """
    params = {
        "model": dict(model.hparams),
        "data": dict(datamodule.hparams),
        "trainer": {
            "precision": trainer.precision,
            "max_epochs": trainer.max_epochs,
            "max_steps": trainer.max_steps,
            "world_size": trainer.world_size,
            "budget_s": budget_s,
        },
    }
    summary = {k: metrics[k] for k in SUMMARY if isinstance(metrics.get(k), float)}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and summary:
            logger.log_hyperparams(params, summary, step=trainer.global_step)
        elif isinstance(logger, (MLFlowLogger, WandbLogger)):
            logger.log_hyperparams({"trainer": params["trainer"]})


def optimized_value(name: str, metrics: dict[str, Any], has_validation: bool) -> float:
    """The metric a sweeper optimizes. A validation metric may not exist although the run went
    well: without a validation split (``data.val_size=0``) the test accuracy stands in, and a
    run that ended before its first validation (a step count or budget inside epoch 0) gives
    nan; each with a warning."""
    if name not in metrics and name.startswith("val/") and not any(k.startswith("val/") for k in metrics):
        if not has_validation and "test/acc" in metrics:
            log.warning(
                "data.val_size=0 leaves no validation split, so %s was not measured; returning test/acc instead", name
            )
            return float(metrics["test/acc"])
        why = (
            "data.val_size=0 leaves no validation split"
            if not has_validation
            else "the run ended before its first validation"
        )
        log.warning(
            "%s%s, so %s was not measured; returning nan", why, "" if has_validation else " and test=false", name
        )
        return math.nan
    if name not in metrics:
        raise UserError(f"optimized_metric={name} was not logged; use one of: {', '.join(sorted(metrics))}")
    return float(metrics[name])
