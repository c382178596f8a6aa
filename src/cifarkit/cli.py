"""The entry points' shell: Hydra's ``main`` plus one-line errors for bad input.

``run(task, config_dir, config_name)`` first composes the config from the command line (first
value of each sweep) so that an unknown key or option fails in one line before anything
starts, then hands over to ``hydra.main``. Inside a run, a ``UserError`` (or a Hydra/Lightning
configuration error) prints one line and exits 1; in a multirun the job is marked failed in
its ``metrics.json`` and the sweep goes on.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cifarkit.errors import RunInUse, TrainingStopped, UserError
from cifarkit.files import DiskFull, disk_full, write_metrics
from cifarkit.resume import AUTO, completed, find_unfinished, hold_run, in_use, is_running
from cifarkit.sweep import check_sweeper, study_seed

log = logging.getLogger(__name__)
USER_ERRORS = (UserError, HydraException, OmegaConfBaseException)  # and Lightning's, see _misconfiguration
# What a failed multirun job returns: the Optuna sweeper records a non-float as a FAIL trial and
# goes on (optuna 2.x raises on NaN), the basic sweeper ignores it; metrics.json says "failed".
FAILED_JOB = None


def _lightning(module: str, name: str) -> tuple[Any, ...]:
    """``(module.name,)`` from Lightning, or ``()`` if Lightning was never imported.

    Then none of its exceptions can have been raised and no strategy has set the rank; and
    predict.py on an ``.onnx`` model must run where Lightning is not installed, so nothing here
    imports it.
    """
    if sys.modules.get("lightning") is None:
        return ()
    return (getattr(importlib.import_module(module), name),)


def _misconfiguration() -> tuple[type[Exception], ...]:
    """Lightning's configuration error, bad input like Hydra's and OmegaConf's."""
    return _lightning("lightning.fabric.utilities.exceptions", "MisconfigurationException")


def _global_zero() -> bool:
    """Whether this process is the run's global rank 0: not if Lightning's strategy gave it another
    rank, nor if the launcher's environment says so (torchrun's RANK, SLURM's SLURM_PROCID, a node
    rank or a local rank), read by the rules of Lightning's cluster environments."""
    rank_zero_only = _lightning("lightning.pytorch.utilities", "rank_zero_only")
    if rank_zero_only and rank_zero_only[0].rank != 0:
        return False
    keys = ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK")
    return all(int(os.environ.get(key) or 0) == 0 for key in keys)


def one_line(e: BaseException) -> str:
    """An exception (and the config error that caused it) as a single line; a ``UserError``
    raised while Hydra instantiated a class speaks for itself."""
    if isinstance(e.__cause__, UserError):
        e = e.__cause__
    parts = [str(e)]
    if isinstance(e.__cause__, (OmegaConfBaseException, *_misconfiguration())):
        parts.append(str(e.__cause__).splitlines()[0])
    text = " ".join(part.strip() for p in parts for part in p.splitlines() if part.strip())
    return text.replace("\t", " ")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


def _concrete_overrides(args: list[str]) -> list[str] | None:
    """The command line's overrides with each sweep replaced by its first value.

    None when the command line carries flags we do not check (Hydra's own --help, --cfg...).
    """
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return None
    overrides = [a for a in args if not a.startswith("-")]
    out = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if not o.is_sweep_override():
            out.append(o.input_line)
            continue
        try:
            first = next(iter(o.sweep_string_iterator()))
        except Exception:  # a sweeper-specific range such as interval(): the sweeper checks it
            continue
        out.append(f"{o.get_key_element()}={first}")
    return out


def check_command_line(config_dir: Path, config_name: str, args: list[str]) -> DictConfig | None:
    """Compose once before Hydra starts, so a typo costs one clear line and no run directory;
    the composed config (Hydra's node included), or None for Hydra's own flags."""
    try:
        overrides = _concrete_overrides(args)
        if overrides is None:
            return None
        with hydra.initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return hydra.compose(config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        fail(one_line(e))
        raise  # not reached: fail exits


def auto_resume(cfg: DictConfig) -> list[str]:
    """``ckpt_path=auto`` on a single run: the overrides that continue the newest unfinished run
    of this configuration in its own directory, or start a new one; says which in one line.
    (A sweep's job looks in its own directory instead: cifarkit.train.)"""
    runs = Path(cfg.paths.log_dir) / cfg.task_name / "runs"
    found, running = find_unfinished(runs, cfg)
    busy = f" ({len(running)} still training, left alone: {', '.join(map(str, running))})" if running else ""
    if found is None:
        print(f"ckpt_path=auto: no unfinished run of this configuration under {runs}{busy}; starting a new one", file=sys.stderr)
        return ["ckpt_path=null"]
    run_dir, ckpt = found
    print(f"ckpt_path=auto: continuing {run_dir} from {ckpt.name}{busy}", file=sys.stderr)
    return [f"ckpt_path={ckpt}", f"hydra.run.dir={run_dir}"]


def _output_dir() -> Path | None:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return None


def guarded(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Wrap a task so bad input ends in one line (run) or a failed job (multirun)."""

    def wrapper(cfg: DictConfig) -> Any:
        multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
        out, lock = _output_dir(), None
        try:
            if out is not None and _global_zero():  # the run directory is this process's while it lives
                lock = hold_run(out)
            return task(cfg)
        except TrainingStopped as e:
            _mark_failed("failed" if e.exit_code == 1 else "interrupted", str(e))
            print(e, file=sys.stderr)
            if multirun and e.exit_code == 1:  # a diverged job, not a user's Ctrl-C: the sweep goes on
                return FAILED_JOB
            raise SystemExit(e.exit_code) from None
        except _lightning("lightning.pytorch.utilities.exceptions", "SIGTERMException"):
            # Lightning's own SIGTERM (a SystemExit(0)), outside the training loop (sanity check, test)
            _mark_failed("interrupted", "stopped by SIGTERM outside training")
            print("stopped by SIGTERM outside training; nothing new was saved", file=sys.stderr)
            raise SystemExit(128 + signal.SIGTERM) from None
        except Exception as e:
            lost, full = lost_ranks(e), disk_full(e) and not isinstance(e, DiskFull)
            user = lost or full or isinstance(e, (*USER_ERRORS, *_misconfiguration()))
            if not multirun and not user:
                raise  # a bug: Hydra prints the traceback
            msg = one_line(e) if user else f"{e.__class__.__name__}: {e}"
            if full:  # a write outside files.atomic_write (a logger's): the disk, not the file, is known
                msg = (f"the disk is full ({msg[:200]}); the checkpoints already written are intact: "
                       "free space and run again (training continues with ckpt_path=auto)")
            if lost:
                msg = (f"the DDP ranks lost each other ({msg[:200]}): a rank stalled or died; the checkpoints already "
                       "saved are intact; raise trainer.strategy.timeout.seconds if a step legitimately takes longer")
            if not isinstance(e, RunInUse):  # that directory is another live run's
                _mark_failed("failed", msg)
            if multirun:
                (log.error if user else log.exception)("job failed: %s", msg)
                return FAILED_JOB
            fail(msg)
        finally:
            if lock is not None:
                lock.close()

    return wrapper


def lost_ranks(e: BaseException) -> bool:
    """Whether ``e`` is a distributed collective or rendezvous that failed (a timeout, a dead peer)."""
    import torch.distributed as dist

    text = str(e).lower()
    words = ("timed out", "timeout", "pair closure", "connection closed by peer", "connection reset by peer")
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(w in text for w in words))


def _mark_failed(status: str, message: str) -> None:
    """Record a run that did not complete, unless it completed before failing (or the disk is full)."""
    out = _output_dir()
    if not _global_zero() or out is None or completed(out):
        return
    with contextlib.suppress(OSError, UserError):
        write_metrics(out, {"status": status, "error": message})


def lr_for_batch(lr_per_1024: float, batch_size: int) -> float:
    """A learning rate quoted per 1024 images, at ``batch_size``: the linear scaling rule, so a
    preset's lr follows ``data.batch_size`` (``${lr_for_batch:1.5,${data.batch_size}}``)."""
    return lr_per_1024 * batch_size / 1024


def register_resolvers() -> None:
    """The configs' own resolvers: ``lr_for_batch``, and ``study_seed`` for the Optuna sampler
    (configs/hparams_search)."""
    OmegaConf.register_new_resolver("lr_for_batch", lr_for_batch, replace=True)
    OmegaConf.register_new_resolver("study_seed", study_seed, replace=True)


def run(task: Callable[[DictConfig], Any], config_dir: Path, config_name: str) -> None:
    """Entry point for train.py / eval.py / predict.py / export.py."""
    register_resolvers()
    cfg = check_command_line(config_dir, config_name, sys.argv[1:])
    args = sys.argv[1:]
    multirun = bool({"-m", "--multirun"} & set(args)) or (cfg is not None and cfg.hydra.mode == RunMode.MULTIRUN)
    # A run directory named on the command line: every rank looks there for ckpt_path=auto (cifarkit.train).
    fixed_dir = next((Path(a.split("=", 1)[1]) for a in reversed(args) if a.startswith("hydra.run.dir=")), None)
    if cfg is not None and cfg.get("ckpt_path") == AUTO and not multirun and fixed_dir is None and _global_zero():
        sys.argv = [*sys.argv, *auto_resume(cfg)]  # the last override of a key wins
    if fixed_dir is not None and not multirun and _global_zero() and is_running(fixed_dir):  # before Hydra writes there
        fail(str(in_use(fixed_dir)))
    if cfg is not None and multirun:
        try:
            check_sweeper(cfg)  # the Optuna sweeper's study opens, before any job starts
        except UserError as e:
            fail(str(e))
    if not _global_zero():  # another node's or rank's process: rank 0 writes the run's .hydra/
        sys.argv = [*sys.argv, "hydra.output_subdir=null"]
    hydra.main(version_base="1.3", config_path=str(config_dir), config_name=config_name)(guarded(task))()
