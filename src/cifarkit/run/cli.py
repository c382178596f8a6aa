"""The entry points' shell: the command line composed once, Hydra's run, and one-line errors.

``run(task, config_dir, config_name)``. A single run's config is composed once (Hydra's compose API),
given its directory (``ckpt_path=auto`` continues an unfinished run in that run's own directory), and
run by Hydra's ``run_job``, which creates the directory, saves ``.hydra/`` and sets up the log, as
``hydra.main`` would. Hydra's own flags (``--cfg``, ``--info``, ``--help``, ...) and sweeps (``-m``) go to
``hydra.main`` unchanged; a sweep's launcher composes each job's config. Inside a run (``guarded``), its
rank 0 holds the directory's lock, and bad input (a ``UserError``, a Hydra, OmegaConf or Lightning
configuration error) prints one line and exits 1; in a sweep the job is marked failed in its
``metrics.json`` and the sweep goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import configure_log, run_job
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import HydraContext, RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict, read_write

from cifarkit.core import rundir
from cifarkit.core.errors import (
    USER_ERRORS,
    RunInUse,
    TrainingStopped,
    UserError,
    bounded,
    lost_ranks,
    misconfiguration,
    one_line,
)
from cifarkit.core.extras import require
from cifarkit.core.files import DiskFull, disk_full, write_metrics
from cifarkit.core.ranks import from_lightning, global_zero
from cifarkit.core.untrusted import shown
from cifarkit.run.resolvers import register_resolvers
from cifarkit.run.schema import check
from cifarkit.run.sweep import check_sweeper

log = logging.getLogger(__name__)
# Options of the command line that need an extra (option, or its key and "=": the extra and its packages),
# checked before Hydra composes anything: without them Hydra would say only that a plugin's config is missing,
# or a search would fail once it starts.
EXTRA_OPTIONS = {
    "hydra/launcher=slurm": ("slurm", ("hydra_plugins.hydra_submitit_launcher",)),
    "hydra/sweeper=optuna": ("search", ("optuna", "sqlalchemy")),
    "hparams_search=": ("search", ("optuna", "sqlalchemy")),
}
# What a failed multirun job returns: the Optuna sweeper records a non-float as a FAIL trial and
# goes on, the basic sweeper ignores it; metrics.json says "failed".
FAILED_JOB = None


def fail(message: str) -> None:
    print(f"error: {bounded(shown(message))}", file=sys.stderr)  # a stranger's name cannot steer the terminal
    raise SystemExit(1)


def run(task: Callable[[DictConfig], Any], config_dir: Path, config_name: str) -> None:
    """Entry point of train.py, eval.py, predict.py, export.py and serve.py."""
    register_resolvers()
    args = sys.argv[1:]
    try:
        check_extras(args)
    except UserError as e:
        fail(str(e))
    if any(a.startswith("-") for a in args) or _sweeps(args):  # Hydra's flags and sweeps, Hydra's way
        _hydra_main(task, config_dir, config_name)
        return
    try:
        cfg = compose(config_dir, config_name, args, job_name=Path(sys.argv[0]).stem)
        if cfg.hydra.mode == RunMode.MULTIRUN:  # a preset that is a sweep (hparams_search=...) without -m
            GlobalHydra.instance().clear()
            _hydra_main(task, config_dir, config_name)
            return
        check(cfg)  # every option's type and bounds (cifarkit/run/schema.py)
        place(cfg)
    except (*USER_ERRORS, *misconfiguration()) as e:
        fail(one_line(e))
    configure_log(cfg.hydra.hydra_logging, cfg.hydra.verbose)
    callbacks = HydraCallbacks(cfg)
    callbacks.on_run_start(config=cfg, config_name=config_name)
    context = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=callbacks)
    ret = run_job(guarded(task), cfg, job_dir_key="hydra.run.dir", job_subdir_key=None, hydra_context=context)
    callbacks.on_run_end(config=cfg, config_name=config_name, job_return=ret)
    _ = ret.return_value  # a bug's exception, raised here with its traceback


def _sweeps(args: list[str]) -> bool:
    """Whether the command line sweeps a value (``lr=1e-3,1e-2``, ``choice(...)``): a sweep, as a preset that
    is one (``hparams_search=...``) takes it without ``-m``; Hydra says so in one line where it is not."""
    try:
        return any(o.is_sweep_override() for o in OverridesParser.create().parse_overrides(args))
    except HydraException:  # a malformed override: the composition says which, in one line
        return False


def check_extras(args: list[str]) -> None:
    """Each option of ``args`` that needs an extra finds its packages (``EXTRA_OPTIONS``); a search, this
    project's sweeper."""
    for arg in args:
        for option, (extra, packages) in EXTRA_OPTIONS.items():
            if arg == option or (option.endswith("=") and arg.startswith(option)):
                require(arg, extra, *packages)
                if extra == "search":
                    check_sweeper()


def compose(config_dir: Path, config_name: str, overrides: list[str], job_name: str = "app") -> DictConfig:
    """The config of a single run (Hydra's node included): the one composition of the command line."""
    GlobalHydra.instance().clear()
    hydra.initialize_config_dir(config_dir=str(config_dir), job_name=job_name, version_base="1.3")
    cfg = hydra.compose(config_name, overrides=overrides, return_hydra_config=True)
    if cfg.hydra.mode is None:
        with read_write(cfg.hydra):
            cfg.hydra.mode = RunMode.RUN
    return cfg


def place(cfg: DictConfig) -> None:
    """Give a single run its directory before Hydra creates one. ``ckpt_path=auto`` continues the newest
    unfinished run of the same configuration in that run's directory, or what a directory the command line
    names holds (every rank looks there); ranks > 0 without a named directory look in their own."""
    named = any(o.startswith("hydra.run.dir=") for o in cfg.hydra.overrides.hydra)
    fixed_dir = Path(cfg.hydra.run.dir) if named else None
    if fixed_dir is not None and global_zero() and rundir.is_running(fixed_dir):  # before Hydra writes there
        raise rundir.in_use(fixed_dir)
    if cfg.get("ckpt_path") == rundir.AUTO and (fixed_dir or global_zero()):
        point, line = rundir.resolve_auto(cfg, fixed_dir)
        if global_zero():  # every rank of a named directory finds the same; one says so
            print(line, file=sys.stderr)
        cfg.ckpt_path = str(point.ckpt) if point else None
        if point:
            with read_write(cfg.hydra):
                cfg.hydra.run.dir = str(point.run_dir)
    if not global_zero():  # another node's or rank's process: rank 0 writes the run's .hydra/
        with read_write(cfg.hydra):
            cfg.hydra.output_subdir = None


class HydraCallbacks:
    """The ``hydra.callbacks`` of a single run, called at the points of a run that ``hydra.main`` calls them."""

    def __init__(self, cfg: DictConfig) -> None:
        self.callbacks: list[Callback] = [instantiate(c) for c in (cfg.hydra.get("callbacks") or {}).values()]

    def __getattr__(self, point: str) -> Callable[..., None]:
        def call(**kwargs: Any) -> None:
            for callback in self.callbacks:
                getattr(callback, point)(**kwargs)

        return call


def _hydra_main(task: Callable[[DictConfig], Any], config_dir: Path, config_name: str) -> None:
    """``hydra.main``, with the errors of composing the command line (or of starting a sweep) in one line."""
    before = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra hands its errors to the caller instead of printing them
    try:
        hydra.main(version_base="1.3", config_path=str(config_dir), config_name=config_name)(guarded(task))()
    except (*USER_ERRORS, *misconfiguration()) as e:
        fail(one_line(e))
    finally:
        if before is None:
            del os.environ["HYDRA_FULL_ERROR"]
        else:
            os.environ["HYDRA_FULL_ERROR"] = before


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
            if multirun:  # each job's own values: its launcher composed them
                check(cfg)
            if out is not None and global_zero():  # the run directory is this process's while it lives
                lock = rundir.hold_run(out)
            if cfg.get("ckpt_path") == rundir.AUTO:  # a sweep's job, or a rank > 0 started with the command line
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
                raise  # a bug: its traceback
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
