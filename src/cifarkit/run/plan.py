"""A run's plan, made once before its trainer is built: the config as composed (once, by the shell), the
directory it writes, the checkpoint it continues from and what its time budget decided.

A budget's decision before the run (its net) is a list of overrides applied to the config as the command
line's are, with the most steps the budget could buy until the run's first steps fix the count
(cifarkit/run/budget.py); the replay line its log prints is the same plan with that count. The plan's
config is read-only: what runs is what was planned. The shell (cifarkit/run/cli.py) has already resolved
``ckpt_path=auto``; a sweep's jobs are planned the same way, each in its own directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, read_write

from cifarkit.core import rundir
from cifarkit.core.untrusted.budget_file import read_budget
from cifarkit.run import budget


@dataclass(frozen=True)
class Plan:
    """What a run does, decided before it starts."""

    cfg: DictConfig  # read-only: the composed config with the budget's overrides
    run_dir: Path
    ckpt: Path | None  # the checkpoint the run starts from
    budget: dict[str, Any]  # the budget's decision, as budget.json and metrics.json record it; {}: none
    expected_warnings: tuple[str, ...]  # Lightning's warnings that only restate what this plan means to do


def plan(cfg: DictConfig) -> Plan:
    """The plan of the run ``cfg`` describes (``cfg`` itself is left as it is)."""
    run_dir = Path(cfg.paths.output_dir)
    ckpt = rundir.checkpoint_file(cfg.ckpt_path) if cfg.get("ckpt_path") else None  # before any data is decoded
    in_place = ckpt is not None and rundir.of_checkpoint(ckpt) == run_dir.resolve()  # continued in its own directory
    recorded = _recorded_budget(cfg, ckpt) if ckpt else None
    decision, overrides = budget.decide(cfg, recorded)
    planned = with_overrides(cfg, overrides)
    OmegaConf.set_readonly(planned, True)
    return Plan(planned, run_dir, ckpt, decision, expected_warnings(planned, in_place))


def _recorded_budget(cfg: DictConfig, ckpt: Path) -> tuple[Path, dict[str, Any] | None] | None:
    """Where a checkpoint's run recorded its budget's decision and what it says, checked against this run's
    ``budget_s`` (a run folder is read as untrusted); None where no budget sizes this run."""
    if cfg.get("budget_s") is None or cfg.trainer.max_steps not in (None, -1):
        return None
    path = rundir.budget_file(rundir.of_checkpoint(ckpt))
    return path, read_budget(path, float(cfg.budget_s))


def with_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """A copy of ``cfg`` with command-line ``overrides`` (``key=value``) applied as Hydra applies them."""
    out = cfg.copy()
    with read_write(out):
        for override in OverridesParser.create().parse_overrides(overrides):
            OmegaConf.update(out, override.key_or_group, override.value(), merge=True)
    return out


def expected_warnings(cfg: DictConfig, in_place: bool) -> tuple[str, ...]:
    """Lightning's warnings that only restate the plan, so they are not shown: without a validation split
    (``data.val_size=0``) the validation loader is empty and the best checkpoint finds no val/acc (the final
    weights are tested, and the log says so); a run continued in its own directory finds its checkpoints there."""
    patterns = []
    if cfg.data.get("val_size") == 0:
        patterns += ["Total length of `DeviceLoader` across ranks is zero", r"`ModelCheckpoint\(monitor='val/"]
    if in_place:
        patterns.append("Checkpoint directory .* exists and is not empty")
    return tuple(patterns)
