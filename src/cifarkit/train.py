"""What ``train.py`` and ``eval.py`` do with a composed config: build, fit, test, write metrics."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from cifarkit.callbacks import Throughput
from cifarkit.checkpoints import AtomicCheckpointIO, data_info, load_checkpoint, rebuild_classifier
from cifarkit.data import ImageDataModule
from cifarkit.errors import UserError
from cifarkit.files import write_metrics
from cifarkit.module import ImageClassifier
from cifarkit.pictures import per_class

log = logging.getLogger(__name__)
SUMMARY_METRICS = ["val/acc_best", "test/acc", "test/loss", "test/calibration_error", "train/images_per_s"]


def resolve_accelerator(accelerator: str) -> str:
    """The device type a run will use; a requested accelerator that is absent is a user error."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if accelerator in ("gpu", "cuda") and not cuda:
        hint = "trainer.accelerator=mps" if mps else "trainer=cpu"
        raise UserError(f"trainer.accelerator={accelerator} but no CUDA GPU is available here; use {hint} or trainer.accelerator=auto")
    if accelerator == "mps" and not mps:
        raise UserError("trainer.accelerator=mps but Apple's MPS backend is not available here; use trainer=cpu or trainer.accelerator=auto")
    if accelerator == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    return "cuda" if accelerator == "gpu" else accelerator


def resolve_precision(precision: Any, device: str) -> Any:
    """``auto``: bf16 autocast where the hardware computes in bf16 (emulated bf16 is far slower
    than fp32), else fp16 autocast on CUDA, else fp32 (README, Speed, has the figures)."""
    if precision != "auto":
        return precision
    if device == "cuda":  # emulated bf16 (pre-Ampere) is slower than fp16 autocast
        return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"
    if device == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def build(cfg: DictConfig, with_loggers: bool = True, **data_overrides: Any) -> tuple[ImageDataModule, L.Trainer]:
    """Instantiate the data and the trainer from the config: every callback comes from
    ``cfg.callbacks`` (configs/callbacks/), every logger from ``cfg.logger``."""
    device = resolve_accelerator(cfg.trainer.accelerator)
    if cfg.trainer.get("sync_batchnorm") and device not in ("cuda", "xpu", "hpu"):
        raise UserError(f"trainer.sync_batchnorm=true needs GPUs (PyTorch's SyncBatchNorm does not run on {device}); set trainer.sync_batchnorm=false")
    datamodule: ImageDataModule = instantiate(cfg.data, _convert_="all", **data_overrides)  # plain hparams
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values() if lg and "_target_" in lg] if with_loggers else []
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


def final_metrics(trainer: L.Trainer) -> dict[str, Any]:
    """Scalars from the trainer's last logged values, as plain floats."""
    return {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}


def tested_metrics(trainer: L.Trainer, model: ImageClassifier) -> dict[str, Any]:
    """After trainer.test: the scalars, per-class accuracy as one dict, and the confusion matrix."""
    metrics = per_class(final_metrics(trainer))
    if model.test_confusion.update_called:  # every rank: the sum over ranks is a collective
        metrics["test/confusion_matrix"] = model.test_confusion.compute().cpu().tolist()  # rows: true, columns: predicted
    return metrics


def train(cfg: DictConfig) -> float:
    """Fit, test the best checkpoint, write ``metrics.json``; return ``cfg.optimized_metric``."""
    seed = L.seed_everything(cfg.seed, workers=True)
    ckpt = load_checkpoint(cfg.ckpt_path) if cfg.ckpt_path else None
    datamodule, trainer = build(cfg)
    if ckpt:
        check_same_classes(ckpt, datamodule.classes)
    model: ImageClassifier = instantiate(cfg.model, classes=datamodule.classes)
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    metrics = final_metrics(trainer)
    best_val = float(model.val_acc_best.max_value)  # persistent: known even when a resume had no epoch left
    if "val/acc_best" not in metrics and math.isfinite(best_val):
        metrics["val/acc_best"] = best_val

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if cfg.test:
        if not best:
            log.info("no best checkpoint was kept (no validation split, or no checkpoint callback); testing the final weights")
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update(tested_metrics(trainer, model))

    throughput = next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)
    if throughput and throughput.images_per_s:
        metrics["train/images_per_s"] = throughput.images_per_s
        metrics["train/seconds"] = throughput.seconds  # in training epochs, validation excluded
    metrics.update(
        status="completed",
        epochs=trainer.current_epoch,
        steps=trainer.global_step,
        seed=seed,
        precision=str(trainer.precision),
        best_ckpt=best,
    )
    if trainer.is_global_zero:
        write_metrics(cfg.paths.output_dir, metrics)
        log.info("metrics: %s", {k: metrics[k] for k in SUMMARY_METRICS if k in metrics})
    return optimized_value(cfg.optimized_metric, metrics, has_validation=bool(len(datamodule.splits["val"][1])))


def optimized_value(name: str, metrics: dict[str, Any], has_validation: bool) -> float:
    """The metric a sweeper optimizes; without a validation split (``data.val_size=0``) a
    validation metric cannot exist, so the test accuracy stands in, with a warning."""
    if name not in metrics and not has_validation and name.startswith("val/"):
        if "test/acc" not in metrics:  # test=false too: nothing to return, but the run itself is fine
            log.warning("no validation split and no test, so %s was not measured; returning nan", name)
            return math.nan
        log.warning("data.val_size=0 leaves no validation split, so %s was not measured; returning test/acc instead", name)
        name = "test/acc"
    if name not in metrics:
        raise UserError(f"optimized_metric={name} was not logged; use one of: {', '.join(sorted(metrics))}")
    return float(metrics[name])


def check_same_classes(ckpt: dict[str, Any], classes: list[str]) -> None:
    saved = ckpt.get("hyper_parameters", {}).get("classes")
    if saved and saved != classes:
        raise UserError(f"the checkpoint's classes {saved} differ from the data's {classes} (same names, same order); pick matching data or another checkpoint")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test a checkpoint and write ``metrics.json``. The test images are prepared as the
    checkpoint's ``data_info`` says (image size, mean/std), whatever the data options say."""
    L.seed_everything(cfg.seed, workers=True)
    ckpt = load_checkpoint(cfg.ckpt_path)
    info = data_info(ckpt, cfg.ckpt_path)
    model = rebuild_classifier(ckpt, cfg.ckpt_path, list(cfg.trusted_targets), cfg.tta)  # judged before anything is built
    datamodule, trainer = build(
        cfg, with_loggers=False, image_size=info["image_size"], normalize=True, mean=info["mean"], std=info["std"]
    )
    check_same_classes({"hyper_parameters": {"classes": info["classes"]}}, datamodule.classes)
    trainer.test(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    metrics = tested_metrics(trainer, model) | {"ckpt_path": str(cfg.ckpt_path), "tta": model.hparams.tta, "status": "completed"}
    if trainer.is_global_zero:
        write_metrics(cfg.paths.output_dir, metrics)
    return metrics
