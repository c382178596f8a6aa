"""Runs that resume themselves: ``ckpt_path=auto`` finds the newest unfinished run of the same
task and configuration and continues it, in its own run directory.

A run is unfinished when its ``metrics.json`` does not say ``completed`` (it was interrupted,
failed, for instance on a full disk, or was killed before writing one) and it left a checkpoint
to continue from: the newest of ``interrupted.ckpt``, Lightning's SLURM ``hpc_ckpt_*.ckpt`` and
``last.ckpt``. The configuration is compared as composed (the command line and the YAML files,
interpolations unresolved), leaving out ``ckpt_path`` itself. A finished run is never resumed.

``cifarkit.cli`` asks before Hydra creates a run directory, so that the continued run writes into
the old one (its checkpoints, logs and TensorBoard version); a job whose own directory already
holds an unfinished run (a requeued SLURM job of a sweep) continues there (``own_run``).
Lightning-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

AUTO = "auto"
CANDIDATES = ("interrupted.ckpt", "hpc_ckpt_*.ckpt", "last.ckpt")


def resumable_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint an unfinished run continues from, or None (finished, or nothing saved)."""
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        try:
            if json.loads(metrics.read_text()).get("status") == "completed":
                return None
        except (OSError, ValueError):  # a half-written file from a killed run: it did not complete
            pass
    found = [p for pattern in CANDIDATES for p in (run_dir / "checkpoints").glob(pattern) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def _comparable(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    plain = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    plain.pop("ckpt_path", None)
    plain.pop("hydra", None)
    return plain


def find_unfinished(runs_dir: Path, cfg: DictConfig) -> tuple[Path, Path] | None:
    """The unfinished run under ``runs_dir`` composed from the same configuration as ``cfg`` whose
    checkpoint is the newest, and that checkpoint."""
    wanted = _comparable(cfg)
    found = []
    for run_dir in runs_dir.glob("*"):
        ckpt = resumable_checkpoint(run_dir) if (run_dir / ".hydra" / "config.yaml").is_file() else None
        if ckpt is not None and _comparable(OmegaConf.load(run_dir / ".hydra" / "config.yaml")) == wanted:
            found.append((run_dir, ckpt))
    return max(found, key=lambda found: found[1].stat().st_mtime_ns, default=None)


def own_run(output_dir: str | Path) -> Path | None:
    """The checkpoint to continue from when this job's own directory holds an unfinished run."""
    return resumable_checkpoint(Path(output_dir))
