"""The tasks of train.py and eval.py: plan, run, record the run's metrics.json, answer a sweeper."""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, read_write

from cifarkit.core import rundir
from cifarkit.core.errors import UserError
from cifarkit.core.files import write_json, write_metrics
from cifarkit.core.ranks import global_zero
from cifarkit.fit.metrics import SUMMARY, optimized_value
from cifarkit.run.plan import plan
from cifarkit.run.train import evaluate, train

log = logging.getLogger(__name__)


def train_job(cfg: DictConfig) -> float:
    """Train as ``cfg`` says, write ``metrics.json`` and return ``cfg.optimized_metric`` (a sweeper reads a
    pruned trial's status from metrics.json)."""
    if cfg.data.get("fold") == "all":
        return cross_validate(cfg)
    return _train_one(cfg)[0]


def cross_validate(cfg: DictConfig) -> float:
    """``data.fold=all``: every fold in turn in this job, each a run of its own in ``fold-<i>/``; the job's
    metrics.json holds their means and its value is the mean of theirs.

    Folds inside one job rather than one job per fold, so that a search's sampler is told one value per
    configuration, the cross-validated one, and never compares one fold with another. A pruned fold prunes
    the job: its pruning callback counts epochs on from the folds before it, so a trial's reports never
    repeat a step. A cross-validated job starts every fold afresh (a search re-runs a killed one whole).
    """
    if cfg.get("ckpt_path"):
        raise UserError(
            f"ckpt_path={cfg.ckpt_path} with data.fold=all: every fold starts from the beginning; continue one fold's "
            "run with data.fold=<i> and its own ckpt_path"
        )
    run_dir = Path(cfg.paths.output_dir)
    values: list[float] = []
    runs: list[dict[str, Any]] = []
    for fold in range(cfg.data.folds):
        fold_cfg = cfg.copy()
        with read_write(fold_cfg):
            OmegaConf.update(fold_cfg, "data.fold", fold)
            OmegaConf.update(fold_cfg, "paths.output_dir", str(run_dir / f"fold-{fold}"))
            if (cfg.get("callbacks") or {}).get("optuna_pruning"):
                epochs = sum(r["epochs"] for r in runs)
                OmegaConf.update(fold_cfg, "callbacks.optuna_pruning.first_step", epochs, force_add=True)
        value, metrics = _train_one(fold_cfg)
        values.append(value)
        runs.append(metrics)
        if metrics["status"] != "completed":
            break
    if global_zero():
        write_metrics(run_dir, folds_record(runs))
    return statistics.fmean(values) if len(values) == cfg.data.folds else math.nan


def folds_record(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A cross-validated job's metrics.json: each metric every fold has, as its mean over the folds; under
    ``folds``, their count, each metric's standard deviation and its values fold by fold."""
    shared = [
        k
        for k in runs[0]
        if "/" in k and all(isinstance(r.get(k), int | float) and not isinstance(r.get(k), bool) for r in runs)
    ]
    return {k: statistics.fmean(r[k] for r in runs) for k in shared} | {
        "status": next((r["status"] for r in runs if r["status"] != "completed"), "completed"),
        "epochs": sum(r["epochs"] for r in runs),
        "steps": sum(r["steps"] for r in runs),
        "seed": runs[0]["seed"],
        "precision": runs[0]["precision"],
        "folds": {
            "n": len(runs),
            "std": {k: statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0 for k in shared},
            "values": {k: [r[k] for r in runs] for k in shared},
        },
    }


def _train_one(cfg: DictConfig) -> tuple[float, dict[str, Any]]:
    """One training run as ``cfg`` says: its value for a sweeper and what its metrics.json records."""
    the_plan = plan(cfg)
    if global_zero() and the_plan.budget and the_plan.ckpt is None:  # decided now: what a resume continues with
        write_json(the_plan.run_dir / rundir.BUDGET, the_plan.budget)
    metrics = train(the_plan)
    value = optimized_value(cfg.optimized_metric, metrics, has_validation=cfg.data.get("val_size") != 0)
    if global_zero():
        write_metrics(the_plan.run_dir, metrics)
        log.info("metrics: %s", {k: metrics[k] for k in SUMMARY if k in metrics})
    return value, metrics


def eval_job(cfg: DictConfig) -> dict[str, Any]:
    """Test ``cfg.ckpt_path`` and write ``metrics.json``."""
    the_plan = plan(cfg)
    metrics = evaluate(the_plan)
    if global_zero():
        write_metrics(the_plan.run_dir, metrics)
    return metrics
