"""The entry points' shell: Hydra's ``main`` plus one-line errors for bad input.

``run(task, config_dir, config_name)`` first composes the config from the command line (first
value of each sweep) so that an unknown key or option fails in one line before anything
starts, resolves ``ckpt_path=auto`` (cifarkit/core/rundir.py) before Hydra picks the run directory,
then hands over to ``hydra.main``. Inside a run, its rank 0 holds the directory's lock, and a
``UserError`` (or a Hydra/Lightning configuration error) prints one line and exits 1; in a
multirun the job is marked failed in its ``metrics.json`` and the sweep goes on.
"""

from __future__ import annotations

import contextlib
import logging
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
from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException

from cifarkit.core import rundir
from cifarkit.core.errors import (
    USER_ERRORS,
    RunInUse,
    TrainingStopped,
    UserError,
    lost_ranks,
    misconfiguration,
    one_line,
)
from cifarkit.core.extras import require
from cifarkit.core.files import DiskFull, disk_full, write_metrics
from cifarkit.core.ranks import from_lightning, global_zero
from cifarkit.core.untrusted import shown
from cifarkit.run.resolvers import register_resolvers
from cifarkit.run.sweep import check_sweeper

log = logging.getLogger(__name__)
# Options whose config comes from a Hydra plugin of an extra: without it, Hydra would say only that a
# config is missing. Option: (the plugin's package, the extra).
PLUGIN_OPTIONS = {"hydra/launcher=slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm")}
# What a failed multirun job returns: the Optuna sweeper records a non-float as a FAIL trial and
# goes on (optuna 2.x raises on NaN), the basic sweeper ignores it; metrics.json says "failed".
FAILED_JOB = None


def fail(message: str) -> None:
    print(f"error: {shown(message)}", file=sys.stderr)  # a name from a stranger's file cannot steer the terminal
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
    """Compose once before Hydra starts, so a typo (or an option whose extra is missing) costs one clear
    line and no run directory; the composed config (Hydra's node included), or None for Hydra's own flags."""
    try:
        overrides = _concrete_overrides(args)
        if overrides is None:
            return None
        for option, (package, extra) in PLUGIN_OPTIONS.items():
            if option in overrides:
                require(option, extra, package)
        with hydra.initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return hydra.compose(config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, UserError) as e:
        fail(one_line(e))
        raise  # not reached: fail exits


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
            if out is not None and global_zero():  # the run directory is this process's while it lives
                lock = rundir.hold_run(out)
            if cfg.get("ckpt_path") == rundir.AUTO:  # still: a sweep's job, or a rank > 0 started with the command line
                _continue_in(cfg, out)
            return task(cfg)
        except TrainingStopped as e:
            _mark_failed("failed" if e.exit_code == 1 else "interrupted", str(e))
            print(e, file=sys.stderr)
            if multirun and e.exit_code == 1:  # a diverged job, not a user's Ctrl-C: the sweep goes on
                return FAILED_JOB
            raise SystemExit(e.exit_code) from None
        except from_lightning("lightning.pytorch.utilities.exceptions", "SIGTERMException"):
            # Lightning's own SIGTERM (a SystemExit(0)), outside the training loop (sanity check, test)
            _mark_failed("interrupted", "stopped by SIGTERM outside training")
            print("stopped by SIGTERM outside training; nothing new was saved", file=sys.stderr)
            raise SystemExit(128 + signal.SIGTERM) from None
        except Exception as e:
            lost, full = lost_ranks(e), disk_full(e) and not isinstance(e, DiskFull)
            user = lost or full or isinstance(e, (*USER_ERRORS, *misconfiguration()))
            if not multirun and not user:
                raise  # a bug: Hydra prints the traceback
            msg = one_line(e) if user else f"{e.__class__.__name__}: {e}"
            if full:  # a write outside files.atomic_write (a logger's): the disk, not the file, is known
                then = rundir.after_full_disk(rundir.metrics_file(out)) if out else "free space and run again"
                msg = f"the disk is full ({msg[:200]}); the checkpoints already written are intact: {then}"
            if lost:
                msg = (
                    f"the DDP ranks lost each other ({msg[:200]}): a rank stalled or died; the checkpoints already "
                    "saved are intact; raise trainer.strategy.timeout.seconds if a step legitimately takes longer"
                )
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


def _continue_in(cfg: DictConfig, out: Path | None) -> None:
    """``ckpt_path=auto`` where the directory is Hydra's to pick: continue what it holds, if anything."""
    point, line = rundir.resolve_auto(cfg, out)
    log.info("%s", line)
    with open_dict(cfg):
        cfg.ckpt_path = str(point.ckpt) if point else None


def _mark_failed(status: str, message: str) -> None:
    """Record a run that did not complete, unless it completed before failing (or the disk is full)."""
    out = _output_dir()
    if not global_zero() or out is None or rundir.completed(out):
        return
    with contextlib.suppress(OSError, UserError):
        write_metrics(out, {"status": status, "error": message})


def run(task: Callable[[DictConfig], Any], config_dir: Path, config_name: str) -> None:
    """Entry point for train.py / eval.py / predict.py / export.py."""
    register_resolvers()
    cfg = check_command_line(config_dir, config_name, sys.argv[1:])
    args = sys.argv[1:]
    multirun = bool({"-m", "--multirun"} & set(args)) or (cfg is not None and cfg.hydra.mode == RunMode.MULTIRUN)
    # ckpt_path=auto resolves here, before Hydra creates a directory: a single run continues the newest
    # unfinished run of its configuration in that run's directory, or what the directory it names holds
    # (every rank looks there). A sweep's jobs, and ranks > 0 without a named directory, look in their own.
    fixed_dir = next((Path(a.split("=", 1)[1]) for a in reversed(args) if a.startswith("hydra.run.dir=")), None)
    if fixed_dir is not None and not multirun and global_zero() and rundir.is_running(fixed_dir):  # before Hydra writes
        fail(str(rundir.in_use(fixed_dir)))
    if cfg is not None and cfg.get("ckpt_path") == rundir.AUTO and not multirun and (fixed_dir or global_zero()):
        point, line = rundir.resolve_auto(cfg, fixed_dir)
        if global_zero():  # every rank of a named directory finds the same; one says so
            print(line, file=sys.stderr)
        found = [f"ckpt_path={point.ckpt}", f"hydra.run.dir={point.run_dir}"] if point else ["ckpt_path=null"]
        sys.argv = [*sys.argv, *found]  # the last override of a key wins
    if cfg is not None and multirun:
        try:
            check_sweeper(cfg)  # the Optuna sweeper's study opens, before any job starts
        except UserError as e:
            fail(str(e))
    if not global_zero():  # another node's or rank's process: rank 0 writes the run's .hydra/
        sys.argv = [*sys.argv, "hydra.output_subdir=null"]
    hydra.main(version_base="1.3", config_path=str(config_dir), config_name=config_name)(guarded(task))()
