"""What ``train.py`` and ``eval.py`` do with a composed config: build, fit, test, write metrics.json."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from cifarkit.core import rundir
from cifarkit.core.devices import resolve_accelerator, resolve_precision
from cifarkit.core.errors import UserError
from cifarkit.core.files import write_metrics
from cifarkit.data.datamodule import ImageDataModule
from cifarkit.fit.checkpoint_io import AtomicCheckpointIO
from cifarkit.fit.classifier import ImageClassifier, check_same_classes
from cifarkit.fit.console import quiet_lightning
from cifarkit.fit.metrics import SUMMARY, final_metrics, log_hyperparams, tested_metrics, throughput
from cifarkit.nets.saved import SavedNet, checkpoint_file
from cifarkit.run.budget import size_to_budget, skipped
from hydra_plugins.cifarkit_optuna_sweeper.pruning import was_pruned
from hydra_plugins.cifarkit_optuna_sweeper.study import Pruned

log = logging.getLogger(__name__)


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
    check_launcher(trainer)
    return datamodule, trainer


def check_launcher(trainer: L.Trainer) -> None:
    """Refuse DDP's script launcher in a local sweep: it starts ranks > 0 by re-running the command line (-m too)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    launcher = getattr(trainer.strategy, "launcher", None)
    relaunches = isinstance(launcher, _SubprocessScriptLauncher) and not (
        launcher.cluster_environment.creates_processes_externally  # torchrun, SLURM: ranks already exist
    )
    if multirun and relaunches and trainer.num_devices > 1:
        raise UserError(
            f"trainer.strategy=ddp with {trainer.num_devices} devices cannot run inside a local sweep (-m); "
            "add +trainer.strategy.start_method=spawn on one machine, or use hydra/launcher=slurm on a cluster"
        )


def expected_warnings(cfg: DictConfig) -> list[str]:
    """Lightning's warnings that only restate what the run means to do, so they are not shown:
    without a validation split (``data.val_size=0``) the validation loader is empty and the best
    checkpoint finds no val/acc (the final weights are tested, and the log says so); a run
    continued in its own directory finds its checkpoints there."""
    patterns = []
    if cfg.data.get("val_size") == 0:
        patterns += ["Total length of `DeviceLoader` across ranks is zero", r"`ModelCheckpoint\(monitor='val/"]
    ckpt = cfg.get("ckpt_path")
    if ckpt and Path(ckpt).parent.resolve() == rundir.checkpoint_dir(cfg.paths.output_dir).resolve():
        patterns.append("Checkpoint directory .* exists and is not empty")
    return patterns


def train(cfg: DictConfig) -> float:
    """Fit, test the best checkpoint, write ``metrics.json``; return ``cfg.optimized_metric``.

    A ``ckpt_path`` is read once, by Lightning through ``AtomicCheckpointIO`` (safely, in one
    line when bad); the classifier refuses it there if its classes are not the data's.
    """
    with warnings.catch_warnings():
        for pattern in expected_warnings(cfg):
            warnings.filterwarnings("ignore", message=pattern)
        return _train(cfg)


def _train(cfg: DictConfig) -> float:
    seed = L.seed_everything(cfg.seed, workers=True)
    if cfg.ckpt_path:
        checkpoint_file(cfg.ckpt_path)  # a missing file stops before the data is decoded
    budget = {}
    if cfg.get("budget_s") is not None and cfg.trainer.max_steps in (None, -1):  # a given step count wins
        if why := skipped(cfg):
            log.info(why)
        else:
            budget = size_to_budget(cfg, build)
            with open_dict(cfg):  # from here the run is one with this net and step count, as the log line says
                cfg.trainer.max_steps, cfg.trainer.max_epochs = budget["steps"], -1
                if "net" in budget:
                    cfg.model.net = OmegaConf.merge(cfg.model.net, budget["net"])
            L.seed_everything(cfg.seed, workers=True)  # the run starts as one with trainer.max_steps set would
    datamodule, trainer = build(cfg)
    model: ImageClassifier = instantiate(cfg.model, classes=datamodule.classes)
    metrics: dict[str, Any] = {}
    pruned = False
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        pruned = was_pruned(trainer)  # an Optuna trial its study's pruner stopped: not tested
        metrics = final_metrics(trainer)
        best_val = float(model.val_acc_best.max_value)  # persistent: known even when a resume had no epoch left
        if "val/acc_best" not in metrics and math.isfinite(best_val):
            metrics["val/acc_best"] = best_val
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if cfg.test and not pruned:
            if not best:
                log.info(
                    "no best checkpoint was kept (no validation split, or no checkpoint callback); testing the final "
                    "weights"
                )
            trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
            metrics.update(tested_metrics(trainer, model))
    finally:  # the HPARAMS tab gets a row for a run that stopped early too
        metrics = (metrics or final_metrics(trainer)) | throughput(trainer)
        log_hyperparams(trainer, model, datamodule, metrics, cfg.get("budget_s"))
    metrics.update(
        **({"budget": budget} if budget else {}),
        status="pruned" if pruned else "completed",
        epochs=trainer.current_epoch,
        steps=trainer.global_step,
        seed=seed,
        precision=str(trainer.precision),
        best_ckpt=best,
    )
    if trainer.is_global_zero:
        write_metrics(cfg.paths.output_dir, metrics)
        log.info("metrics: %s", {k: metrics[k] for k in SUMMARY if k in metrics})
    value = optimized_value(cfg.optimized_metric, metrics, has_validation=bool(len(datamodule.splits["val"][1])))
    return Pruned(value) if pruned else value


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


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test a checkpoint and write ``metrics.json``. The test images are prepared as the
    checkpoint's ``data_info`` says (image size, mean/std), whatever the data options say."""
    L.seed_everything(cfg.seed, workers=True)
    saved = SavedNet.read(cfg.ckpt_path)
    net = saved.rebuild(list(cfg.trusted_targets))  # the whole net config is judged before anything is built
    model = ImageClassifier(
        net,
        saved.data.classes,
        optimizer=None,
        scheduler=None,
        param_groups=None,
        label_smoothing=saved.label_smoothing,
        tta=cfg.tta or saved.tta,
        channels_last=saved.channels_last,
        compile=False,
    )
    info = saved.data
    datamodule, trainer = build(
        cfg, with_loggers=False, image_size=info.image_size, normalize=True, mean=info.mean, std=info.std
    )
    check_same_classes(info.classes, datamodule.classes)
    trainer.test(model, datamodule=datamodule)
    metrics = tested_metrics(trainer, model) | {
        "ckpt_path": str(cfg.ckpt_path),
        "tta": model.hparams.tta,
        "status": "completed",
    }
    if trainer.is_global_zero:
        write_metrics(cfg.paths.output_dir, metrics)
    return metrics
