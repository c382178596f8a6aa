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

A run still training is not unfinished: its rank 0 holds an OS lock on ``run.lock`` in its
directory for as long as the process lives (``hold_run``; released however the process ends,
even by SIGKILL), and ``ckpt_path=auto`` leaves a locked run alone (``is_running``), so two
commands never write one run directory. Where the OS has no ``fcntl`` (Windows) there is no lock.
Lightning-free.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any

from omegaconf import DictConfig, OmegaConf

from cifarkit.errors import RunInUse

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

AUTO = "auto"
CANDIDATES = ("interrupted.ckpt", "hpc_ckpt_*.ckpt", "last.ckpt")
LOCK = "run.lock"  # held by a training run's rank 0 while it lives


def _try_lock(f: IO[str]) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def is_running(run_dir: Path) -> bool:
    """Whether another process holds ``run_dir``'s lock: a run training there now."""
    if fcntl is None or not (run_dir / LOCK).is_file():
        return False
    with open(run_dir / LOCK, "a") as f:  # closing releases the probe's own lock
        return not _try_lock(f)


def hold_run(run_dir: str | Path) -> IO[str] | None:
    """Lock ``run_dir`` for as long as the returned file stays open (close it when the run
    ends; the OS drops it if the process dies). Another process holding it: ``RunInUse``."""
    if fcntl is None:
        return None
    path = Path(run_dir) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a")
    for _ in range(20):  # another command's is_running may hold it for an instant
        if _try_lock(f):
            return f
        time.sleep(0.05)
    f.close()
    raise in_use(run_dir)


def in_use(run_dir: str | Path) -> RunInUse:
    return RunInUse(f"another process is still training in {run_dir}; let it finish or stop it first, "
                    "or start a separate run (without hydra.run.dir)")


def completed(run_dir: Path) -> bool:
    """Whether the run's ``metrics.json`` says it completed, or that an Optuna pruner ended it
    (finished too: nothing to continue); no file, or a half-written one from a killed run: it did not."""
    try:
        return json.loads((run_dir / "metrics.json").read_text()).get("status") in ("completed", "pruned")
    except (OSError, ValueError):
        return False


def resumable_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint an unfinished run continues from, or None (finished, or nothing saved)."""
    if completed(run_dir):
        return None
    found = [p for pattern in CANDIDATES for p in (run_dir / "checkpoints").glob(pattern) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def _comparable(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    plain = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    plain.pop("ckpt_path", None)
    plain.pop("hydra", None)
    return plain


def find_unfinished(runs_dir: Path, cfg: DictConfig) -> tuple[tuple[Path, Path] | None, list[Path]]:
    """The unfinished run under ``runs_dir`` composed from the same configuration as ``cfg`` whose
    checkpoint is the newest, with that checkpoint (or None); and the runs of that configuration
    still training, which are left alone."""
    wanted = _comparable(cfg)
    found, running = [], []
    for run_dir in runs_dir.glob("*"):
        ckpt = resumable_checkpoint(run_dir) if (run_dir / ".hydra" / "config.yaml").is_file() else None
        if ckpt is not None and _comparable(OmegaConf.load(run_dir / ".hydra" / "config.yaml")) == wanted:
            (running if is_running(run_dir) else found).append((run_dir, ckpt))
    newest = max(found, key=lambda found: found[1].stat().st_mtime_ns, default=None)
    return newest, sorted(run_dir for run_dir, _ in running)


def own_run(output_dir: str | Path) -> Path | None:
    """The checkpoint to continue from when this job's own directory holds an unfinished run."""
    return resumable_checkpoint(Path(output_dir))
