"""The experiment trackers users already run, as Lightning loggers: MLflow and Weights & Biases.

Each is an optional extra (``pip install -e ".[mlflow]"``, ``".[wandb]"``); choosing one whose
package is missing stops in one line that names the extra (cifarkit/core/extras.py). configs/logger/
holds their options.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

from cifarkit.core.extras import require


def run_name(run_dir: str) -> str:
    """A run's name from its directory: ``<date>_<time>``, or ``<date>_<time>/<job>`` in a sweep."""
    path = Path(run_dir)
    return f"{path.parent.name}/{path.name}" if path.name.isdigit() else path.name


class BestCheckpointMLFlowLogger(MLFlowLogger):
    """Lightning's ``MLFlowLogger`` that uploads the checkpoints of a ``ModelCheckpoint`` that
    monitors a metric (the best one, which train.py tests) and not those of one that monitors
    none (last.ckpt, the resume point).

    With ``log_model=True`` Lightning uploads, when training ends, the files of whichever
    checkpoint callback saved last; with configs/callbacks/'s two that is last.ckpt's.
    """

    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        if checkpoint_callback.monitor is not None:
            super().after_save_checkpoint(checkpoint_callback)


def mlflow_logger(tracking_uri: str, artifact_location: str, run_dir: str, **kwargs: Any) -> MLFlowLogger:
    """The MLflow logger of ``logger=mlflow``: a local store gets its database folder created and
    keeps its artifacts at ``artifact_location`` (absolute, so any working directory finds them);
    a server decides where artifacts go."""
    require("logger=mlflow", "mlflow", "mlflow")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow 3 reports usage to its makers unless told not to
    local = tracking_uri.startswith(("sqlite:", "file:"))
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return BestCheckpointMLFlowLogger(
        tracking_uri=tracking_uri,
        artifact_location=str(Path(artifact_location).resolve()) if local else None,
        run_name=run_name(run_dir),
        tags={"run_dir": str(Path(run_dir).resolve())},
        **kwargs,
    )


def wandb_logger(run_dir: str, **kwargs: Any) -> WandbLogger:
    """The W&B logger of ``logger=wandb``. A run still open in this process (the previous job of
    an in-process sweep) is finished first: Lightning's ``WandbLogger`` would log into it."""
    wandb = require("logger=wandb", "wandb", "wandb")

    if wandb.run is not None:
        wandb.finish()
    return WandbLogger(name=run_name(run_dir), **kwargs)
