"""What a plan does: build the data and the trainer, fit, test; and the test of a saved checkpoint."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate

from cifarkit.data.augment import tta_logits
from cifarkit.fit.classifier import ImageClassifier, check_same_classes
from cifarkit.fit.metrics import final_metrics, log_hyperparams, tested_metrics, throughput
from cifarkit.nets.saved import SavedNet
from cifarkit.robust.report import Options, benchmark
from cifarkit.run import budget
from cifarkit.run.build import build
from cifarkit.run.plan import Plan

log = logging.getLogger(__name__)


def train(plan: Plan) -> dict[str, Any]:
    """Fit, test the best checkpoint; return what metrics.json records.

    A checkpoint to continue from is read once, by Lightning through ``AtomicCheckpointIO`` (safely, in
    one line when bad); the classifier refuses it there if its classes are not the data's.
    """
    cfg = plan.cfg
    with warnings.catch_warnings():
        for pattern in plan.expected_warnings:
            warnings.filterwarnings("ignore", message=pattern)
        seed = L.seed_everything(cfg.seed, workers=True)
        datamodule, trainer = build(cfg)
        clock = budget.run_callback(plan.budget, cfg, plan.run_dir)
        if clock is not None:
            trainer.callbacks.append(clock)
        model: ImageClassifier = instantiate(cfg.model, classes=datamodule.classes)
        metrics: dict[str, Any] = {}
        pruned = False
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=plan.ckpt)
            # A search's pruning callback stopped this trial (it says so itself): a trial is not tested.
            pruned = any(getattr(c, "pruned", False) for c in trainer.callbacks)
            metrics = final_metrics(trainer)
            best_val = float(model.val_acc_best.max_value)  # persistent: known even when a resume had no epoch left
            if "val/acc_best" not in metrics and math.isfinite(best_val):
                metrics["val/acc_best"] = best_val
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            if cfg.test and not pruned:
                if not best:
                    log.info(
                        "no best checkpoint was kept (no validation split, or no checkpoint callback); testing the "
                        "final weights"
                    )
                trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
                metrics.update(tested_metrics(trainer, model))
        finally:  # the HPARAMS tab gets a row for a run that stopped early too
            metrics = (metrics or final_metrics(trainer)) | throughput(trainer)
            log_hyperparams(trainer, model, datamodule, metrics, cfg.get("budget_s"))
    return metrics | {
        **({"budget": clock.record} if clock is not None and clock.record else {}),
        "status": "pruned" if pruned else "completed",
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "seed": seed,
        "precision": str(trainer.precision),
        "best_ckpt": best,
    }


def evaluate(plan: Plan) -> dict[str, Any]:
    """Test a checkpoint; return what metrics.json records. The test images are prepared as the
    checkpoint's ``data_info`` says (image size, mean/std), whatever the data options say."""
    cfg = plan.cfg
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
    robustness = cfg.get("robustness")
    options = Options.of(robustness) if robustness else None  # a bad corruption's name stops before any work
    datamodule, trainer = build(
        cfg, with_loggers=options is not None, image_size=info.image_size, normalize=True, mean=info.mean, std=info.std
    )
    check_same_classes(info.classes, datamodule.classes)
    trainer.test(model, datamodule=datamodule)
    metrics = tested_metrics(trainer, model)
    if options is not None:
        device = trainer.strategy.root_device
        model.to(device).eval()
        metrics |= benchmark(
            lambda x: tta_logits(model, x, model.hparams.tta),
            datamodule.splits["test"],
            info,
            options,
            Path(cfg.paths.data_dir) / "robustness",
            plan.run_dir,
            device,
            trainer.precision_plugin.forward_context,
            trainer.loggers,
        )
    return metrics | {
        "ckpt_path": str(cfg.ckpt_path),
        "tta": model.hparams.tta,
        "status": "completed",
    }
