"""The tasks of train.py and eval.py: plan, run, record the run's metrics.json, answer a sweeper."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from cifarkit.core import rundir
from cifarkit.core.files import write_json, write_metrics
from cifarkit.core.ranks import global_zero
from cifarkit.fit.metrics import SUMMARY, optimized_value
from cifarkit.run.plan import plan
from cifarkit.run.train import evaluate, train

log = logging.getLogger(__name__)


def train_job(cfg: DictConfig) -> float:
    """Train as ``cfg`` says, write ``metrics.json`` and return ``cfg.optimized_metric`` (a sweeper reads a
    pruned trial's status from metrics.json)."""
    the_plan = plan(cfg)
    if global_zero() and the_plan.budget and the_plan.ckpt is None:  # decided now: what a resume continues with
        write_json(the_plan.run_dir / rundir.BUDGET, the_plan.budget)
    metrics = train(the_plan)
    value = optimized_value(cfg.optimized_metric, metrics, has_validation=cfg.data.get("val_size") != 0)
    if global_zero():
        write_metrics(the_plan.run_dir, metrics)
        log.info("metrics: %s", {k: metrics[k] for k in SUMMARY if k in metrics})
    return value


def eval_job(cfg: DictConfig) -> dict[str, Any]:
    """Test ``cfg.ckpt_path`` and write ``metrics.json``."""
    the_plan = plan(cfg)
    metrics = evaluate(the_plan)
    if global_zero():
        write_metrics(the_plan.run_dir, metrics)
    return metrics
