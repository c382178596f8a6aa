"""Bad input ends a run with one line that names the problem and the fix, not a traceback.

The project's own errors, and the classification cifarkit/run/cli.py's wrapper applies to any other:
bad input (one line), lost DDP ranks, or a bug (a traceback). Lightning-free, so that cli.py
catches these without loading the training stack.
"""

from __future__ import annotations

from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from cifarkit.core.ranks import from_lightning


class UserError(Exception):
    """A problem with the user's input (data, paths, config); its message says how to fix it."""


def existing(option: str, path: str | Path, what: str, folder: bool = False) -> Path:
    """The file (or ``folder``: the file or folder) an option names, or the one line that says it does not
    exist and what to pass instead."""
    if not (Path(path).exists() if folder else Path(path).is_file()):
        raise UserError(f"{option}={path} does not exist; pass {what}")
    return Path(path)


class RunInUse(UserError):
    """Another live process trains in the run directory: this command writes nothing there."""


class TrainingStopped(Exception):
    """Raised to end fit() early; cli.guarded turns it into one line and an exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# What counts as bad input (one line) rather than a bug (a traceback): these, and Lightning's
# configuration error (``misconfiguration``).
USER_ERRORS = (UserError, HydraException, OmegaConfBaseException)


def misconfiguration() -> tuple[type[Exception], ...]:
    """Lightning's configuration error, bad input like Hydra's and OmegaConf's."""
    return from_lightning("lightning.fabric.utilities.exceptions", "MisconfigurationException")


def one_line(e: BaseException) -> str:
    """An exception (and the config error that caused it) as a single line; a ``UserError`` raised while
    Hydra instantiated a class (or a class inside one) or OmegaConf resolved an interpolation speaks for
    itself (OmegaConf chains its errors as the context, not the cause)."""
    cause, seen = e.__cause__ or e.__context__, 0
    while cause is not None and not isinstance(cause, UserError) and seen < 10:
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    e = cause if isinstance(cause, UserError) else e
    parts = [str(e)]
    if isinstance(e.__cause__, (OmegaConfBaseException, *misconfiguration())):
        parts.append(str(e.__cause__).splitlines()[0])
    text = " ".join(part.strip() for p in parts for part in p.splitlines() if part.strip())
    return bounded(text.replace("\t", " "))


MAX_LINE = 500  # characters of an error line; a crafted name or config cannot make one longer


def bounded(text: str, limit: int = MAX_LINE) -> str:
    """``text`` cut to about ``limit`` characters, its middle left out: the start says what is wrong, the end
    says how to fix it."""
    if len(text) <= limit:
        return text
    head, tail = limit * 2 // 3, limit // 4
    return f"{text[:head]} [... {len(text) - head - tail} characters left out ...] {text[-tail:]}"


# gloo (the CPU backend) reports a collective's timeout and a dead peer as a plain RuntimeError that only its words tell
# apart, as measured on a stalled and on a killed rank: "Application timeout caused pair closure", "Timed out waiting
# 5000ms for recv operation to complete", "Connection closed by peer", "Connection reset by peer". NCCL's watchdog and
# the rendezvous's store raise torch's own DistError types.
GLOO_LOST = ("timed out", "timeout caused pair closure", "connection closed by peer", "connection reset by peer")


def lost_ranks(e: BaseException) -> bool:
    """Whether ``e`` is a distributed collective or rendezvous that failed (a timeout, a dead peer): one of torch's
    DistError types, or gloo's plain RuntimeError while this process is in a process group."""
    import torch.distributed as dist

    if isinstance(e, dist.DistError):
        return True
    in_group = dist.is_available() and dist.is_initialized()
    return in_group and type(e) is RuntimeError and any(w in str(e).lower() for w in GLOO_LOST)
