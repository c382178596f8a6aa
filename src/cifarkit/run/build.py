"""The data and the trainer a config describes: what a run, the budget's probe and an evaluation each fit or test."""

from __future__ import annotations

from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from omegaconf import DictConfig

from cifarkit.core.devices import resolve_accelerator, resolve_precision
from cifarkit.core.errors import UserError
from cifarkit.data.datamodule import ImageDataModule
from cifarkit.fit.checkpoint_io import AtomicCheckpointIO
from cifarkit.fit.console import quiet_lightning


def build(cfg: DictConfig, with_loggers: bool = True, **data_overrides: Any) -> tuple[ImageDataModule, L.Trainer]:
    """Instantiate the data and the trainer from the config: every callback comes from
    ``cfg.callbacks`` (configs/callbacks/), every logger from ``cfg.logger``; Lightning's first screen is
    quieted as cifarkit/fit/console.py says."""
    quiet_lightning()
    device = resolve_accelerator(cfg.trainer.accelerator)
    if cfg.trainer.get("sync_batchnorm") and device not in ("cuda", "xpu", "hpu"):
        raise UserError(
            f"trainer.sync_batchnorm=true needs GPUs (PyTorch's SyncBatchNorm does not run on {device}); set "
            "trainer.sync_batchnorm=false"
        )
    datamodule: ImageDataModule = instantiate(cfg.data, _convert_="all", **data_overrides)  # plain hparams
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    loggers = (
        [instantiate(lg) for lg in (cfg.get("logger") or {}).values() if lg and "_target_" in lg]
        if with_loggers
        else []
    )
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        precision=resolve_precision(cfg.trainer.precision, device),
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],
    )
    # DDP's script launcher starts ranks > 0 by re-running the command line, -m too: not inside a local sweep.
    strategy = cfg.trainer.get("strategy")
    if isinstance(strategy, str):  # a registered name: ddp (popen), ddp_spawn, ddp_fork...
        options = StrategyRegistry[strategy]["init_params"] if strategy in StrategyRegistry else {}
    else:
        options = strategy or {}
    if (
        HydraConfig.initialized()
        and HydraConfig.get().mode == RunMode.MULTIRUN
        and isinstance(trainer.strategy, DDPStrategy)
        and options.get("start_method", "popen") == "popen"  # DDPStrategy's default re-runs the command line
        and not trainer.strategy.cluster_environment.creates_processes_externally  # torchrun, SLURM: ranks exist
        and trainer.num_devices > 1
    ):
        raise UserError(
            f"trainer.strategy=ddp with {trainer.num_devices} devices cannot run inside a local sweep (-m); "
            "add +trainer.strategy.start_method=spawn on one machine, or use hydra/launcher=slurm on a cluster"
        )
    return datamodule, trainer
