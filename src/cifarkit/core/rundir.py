"""The run directory: what a run leaves where, which runs are unfinished, and what ``ckpt_path=auto``
continues. Every other module and config asks here for these names.

A training run's directory (``${paths.output_dir}``)::

    .hydra/config.yaml   the configuration as composed (Hydra writes it)
    checkpoints/         epoch_NNN.ckpt (the best by val/acc), last.ckpt (after every epoch),
                         interrupted.ckpt (a signal), hpc_ckpt_N.ckpt (Lightning's own SLURM requeue)
    metrics.json         how the run ended ("status") and its metrics
    budget.json          the net and step count a ``budget_s`` run was sized to (cifarkit/run/budget.py)
    run.lock             held by the run's rank 0 while it trains
    train.log, tensorboard/, samples.png, ...

A run is unfinished when its ``metrics.json`` says it was interrupted (a signal) or failed (a full
disk, a NaN loss, lost DDP ranks...), or there is no readable one (killed before writing it); and
it left a checkpoint. It continues from its newest good checkpoint, by the step saved in it,
whatever the file's name (``epoch_000.ckpt`` when the disk filled before ``last.ckpt``).

``ckpt_path=auto`` resolves here, once (``resolve_auto``): before Hydra creates a run directory,
a single run looks for the newest unfinished run of the same task and configuration, compared as
composed (interpolations unresolved, ``ckpt_path`` left out), and continues it in its own
directory (its checkpoints, logs and TensorBoard version); a run given a directory
(``hydra.run.dir``) or a sweep's job (a requeued SLURM job) continues what its own directory holds.
A finished run is never resumed.

A run still training is not unfinished: its rank 0 holds an OS lock on ``run.lock`` (``filelock``'s
``FileLock``: ``flock`` on Unix, ``msvcrt`` on Windows) for as long as the process lives (``hold_run``;
released however the process ends, even by SIGKILL), and ``ckpt_path=auto`` leaves a locked run alone
(``is_running``), so two commands never write one run directory. Lightning-free.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cifarkit.core.errors import RunInUse, UserError, existing
from cifarkit.core.untrusted import read_json_object
from cifarkit.core.untrusted.plain import read_yaml

AUTO = "auto"
CONFIG = Path(".hydra") / "config.yaml"
CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
INTERRUPTED = "interrupted.ckpt"
METRICS = "metrics.json"
BUDGET = "budget.json"
LOCK = "run.lock"
UNFINISHED = ("interrupted", "failed")  # metrics.json's statuses of a run to continue; none at all: killed


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def metrics_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / METRICS


def budget_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / BUDGET


def checkpoint_file(path: str | Path, option: str = "ckpt_path") -> Path:
    """``path`` if it is a file, else the one line that says so, naming ``option`` (before any work starts)."""
    return existing(option, path, f"the path of a .ckpt file (e.g. <run>/{CHECKPOINTS}/{LAST})")


def of_checkpoint(ckpt: str | Path) -> Path:
    """The run directory a checkpoint of its ``checkpoints/`` belongs to."""
    return Path(ckpt).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# The lock of a run that is training.


def is_running(run_dir: Path) -> bool:
    """Whether another process holds ``run_dir``'s lock: a run training there now."""
    if not (run_dir / LOCK).is_file():  # a probe must not create the file (nor its directory)
        return False
    try:
        with FileLock(run_dir / LOCK, thread_local=False).acquire(blocking=False):  # the probe's own lock, released
            return False
    except Timeout:
        return True


def hold_run(run_dir: str | Path) -> ExitStack:
    """Lock ``run_dir`` until the returned stack is closed (when the run ends; the OS drops the lock if
    the process dies). Another process holding it: ``RunInUse``."""
    lock = FileLock(Path(run_dir) / LOCK, thread_local=False)  # the process's, whichever thread releases it
    try:
        lock.acquire(timeout=1)  # another command's is_running may hold it for an instant
    except Timeout:
        raise in_use(run_dir) from None
    held = ExitStack()
    held.callback(lock.release)
    return held


def in_use(run_dir: str | Path) -> RunInUse:
    return RunInUse(
        f"another process is still training in {run_dir}; let it finish or stop it first, "
        "or start a separate run (without hydra.run.dir)"
    )


# ---------------------------------------------------------------------------------------------
# Finished or not, and where an unfinished run continues from.


class RunRecord(BaseModel):
    """What a run's ``metrics.json`` must hold to be believed: one of the statuses train.py and eval.py write,
    and metrics (``<stage>/<name>`` keys) that are finite numbers (per class, or a confusion matrix: nested
    finite numbers); other keys pass as written."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    status: Literal["completed", "pruned", "failed", "interrupted"]
    steps: Annotated[int, Field(ge=0)] | None = None
    epochs: Annotated[int, Field(ge=0)] | None = None
    error: Annotated[str, Field(max_length=4000)] | None = None

    @model_validator(mode="after")
    def _finite_metrics(self) -> RunRecord:
        for key, value in (self.model_extra or {}).items():
            if "/" in key and not _finite(value):
                raise ValueError(f"{key} is not a finite number (or per-class numbers)")
        return self


def _finite(value: Any, depth: int = 0) -> bool:
    """A finite number, or a mapping or list of them (per-class accuracy, a confusion matrix), two levels at most."""
    if isinstance(value, dict | list) and depth < 2:
        return all(_finite(v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``metrics.json`` when it meets ``RunRecord``; None without one (or a half-written one from a
    killed run, or one edited into something else: a run folder is read as untrusted)."""
    metrics = read_json_object(metrics_file(run_dir))
    try:
        return RunRecord.model_validate(metrics).model_dump(exclude_none=True) if metrics is not None else None
    except ValidationError:
        return None


def status(run_dir: Path) -> str | None:
    """What the run's believable ``metrics.json`` says of its end, or None."""
    metrics = read_metrics(run_dir)
    return metrics["status"] if metrics is not None else None


def completed(run_dir: Path) -> bool:
    """Whether the run's ``metrics.json`` says it finished: completed, or ended by an Optuna pruner
    (nothing to continue either way)."""
    return status(run_dir) in ("completed", "pruned")


def checkpoint_step(path: Path) -> int | None:
    """The training step a checkpoint was saved at, or None when it cannot be read (cut short, not a
    checkpoint, made by hand). Through the one tensor-file reader, memory-mapped: no tensor is read."""
    from cifarkit.core.untrusted.tensors import read_torch_file  # torch: only here, cli.py imports this module early

    try:
        ckpt = read_torch_file(path, str(path), "", "checkpoint", mmap=True)
    except UserError:
        return None
    step = ckpt.get("global_step") if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict) else None
    return step if isinstance(step, int) else None


@dataclass(frozen=True)
class ResumePoint:
    """An unfinished run and the checkpoint it continues from; ``step`` None: none of ``ckpts`` is readable."""

    run_dir: Path
    ckpt: Path
    step: int | None
    ckpts: tuple[Path, ...]

    def continues(self) -> str:
        """Which file and step the run continues from, or that its checkpoints cannot be read (one line)."""
        if self.step is None:
            names = ", ".join(p.name for p in self.ckpts)
            return f"{self.run_dir} did not finish, but none of its checkpoints can be read ({names})"
        return f"{self.run_dir} from {self.ckpt.name} (step {self.step})"


def resume_point(run_dir: Path) -> ResumePoint | None:
    """Where an unfinished run continues: its newest good checkpoint by step (the newer file of two
    at one step); None when it finished or saved nothing."""
    if status(run_dir) not in (*UNFINISHED, None):
        return None
    ckpts = tuple(sorted(p for p in checkpoint_dir(run_dir).glob("*.ckpt") if p.is_file()))
    if not ckpts:
        return None
    steps = {p: checkpoint_step(p) for p in ckpts}
    good = [p for p in ckpts if steps[p] is not None]
    newest = max(good or ckpts, key=lambda p: (steps[p] or 0, p.stat().st_mtime_ns))
    return ResumePoint(run_dir, newest, steps[newest], ckpts)


def _comparable(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    plain = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    plain.pop("ckpt_path", None)
    plain.pop("hydra", None)
    return plain


def _saved_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's composed config, or None when it has none, or one cut short or not a mapping."""
    saved = read_yaml(run_dir / CONFIG)
    return _comparable(saved) if isinstance(saved, DictConfig) else None


def find_unfinished(runs_dir: Path, cfg: DictConfig) -> tuple[tuple[Path, Path] | None, list[Path]]:
    """The unfinished run under ``runs_dir`` composed from the same configuration as ``cfg`` whose
    checkpoint is the newest, with that checkpoint (or None); and the runs of that configuration
    still training, which are left alone. A run with a readable checkpoint goes before one without."""
    point, running = _newest_unfinished(runs_dir, cfg)
    return ((point.run_dir, point.ckpt) if point else None), running


def _newest_unfinished(runs_dir: Path, cfg: DictConfig) -> tuple[ResumePoint | None, list[Path]]:
    wanted = _comparable(cfg)
    found, running = [], []
    for run_dir in runs_dir.glob("*"):
        if _saved_config(run_dir) != wanted:
            continue
        point = resume_point(run_dir)
        if point is not None:
            (running if is_running(run_dir) else found).append(point)
    newest = max(found, key=lambda p: (p.step is not None, p.ckpt.stat().st_mtime_ns), default=None)
    return newest, sorted(p.run_dir for p in running)


def runs_dir(cfg: DictConfig) -> Path:
    """Where a task's single runs are: ``${paths.log_dir}/<task>/runs`` (configs/hydra/default.yaml)."""
    return Path(cfg.paths.log_dir) / cfg.task_name / "runs"


def resolve_auto(cfg: DictConfig, run_dir: Path | None) -> tuple[ResumePoint | None, str]:
    """``ckpt_path=auto``: what to continue and the one line that says so. In ``run_dir`` (a run
    given its directory, a sweep's job) its own unfinished run; without, the newest unfinished run
    of ``cfg``'s configuration among the task's runs, before Hydra creates a new directory."""
    if run_dir is not None:
        point, where = resume_point(run_dir), f"nothing unfinished in {run_dir}"
        busy = ""
    else:
        point, running = _newest_unfinished(runs_dir(cfg), cfg)
        where = f"no unfinished run of this configuration under {runs_dir(cfg)}"
        busy = f" ({len(running)} still training, left alone: {', '.join(map(str, running))})" if running else ""
    if point is None:
        return None, f"ckpt_path=auto: {where}{busy}; starting a new one"
    if point.step is None:
        return None, f"ckpt_path=auto: {point.continues()}{busy}; starting a new one"
    return point, f"ckpt_path=auto: continuing {point.continues()}{busy}"


def after_full_disk(path: Path) -> str:
    """What to do once a write of ``path`` found the disk full. For a file of a run directory (its
    own or a checkpoint), exactly what ``ckpt_path=auto`` will do with that run."""
    run_dir = next((d for d in (path.parent, path.parent.parent) if (d / CONFIG).is_file()), None)
    if run_dir is None:
        return "free space there and run again (training continues with ckpt_path=auto)"
    point = resume_point(run_dir)
    if point is None or point.step is None:
        does = f"starts a new run, as {run_dir} holds no checkpoint to continue from"
    else:
        does = f"continues {point.continues()}"
    return f"free space there and run the same command with ckpt_path=auto: it {does}"
