"""Writing files that a reader may open at any moment: a crash leaves the old file or none.

Lightning-free, so that cifarkit/run/cli.py can record a failed run's ``metrics.json`` on every
path, predict.py on an ``.onnx`` model (without Lightning installed) included.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from cifarkit.core import rundir
from cifarkit.core.errors import UserError

_UMASK = os.umask(0o022)  # reading the umask means setting it: put it straight back
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync, then rename it into place.

    The file gets the permissions a plain ``open`` would give it (``mkstemp`` alone makes it
    owner-only), so checkpoints and exported models can be shared as before. A full disk raises
    ``DiskFull`` (one line: the file, the disk, the space) and leaves the old file as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DiskFull(path, 0) from e
        raise
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        written = Path(tmp).stat().st_size if Path(tmp).exists() else 0
        Path(tmp).unlink(missing_ok=True)
        if disk_full(e):
            raise DiskFull(path, written) from e
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def disk_full(e: BaseException | None) -> bool:
    """Whether ``e`` or what it arose from is "No space left on device" (torch.save turns it into
    a RuntimeError about the zip writer's position, with the OSError as its context)."""
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


class DiskFull(UserError):
    """A file could not be written because its disk is full; the message names both and the space."""

    def __init__(self, path: Path, written: int) -> None:
        mount = path.resolve().parent
        while not os.path.ismount(mount):
            mount = mount.parent
        # What the file needs: the size of the file it replaces, or of its largest sibling of the same kind.
        like = [path, *path.parent.glob(f"*{path.suffix}")] if path.suffix else [path]
        sizes = [p.stat().st_size for p in like if p.is_file()]
        need = f"about {_size(max(sizes))}" if sizes else f"more than {_size(written)}"
        free = _size(shutil.disk_usage(mount).free)
        super().__init__(
            f"the disk is full: could not write {path} ({mount} has {free} free; the file needs {need}); "
            f"the files already written are intact: {rundir.after_full_disk(path)}"
        )


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.0f} kB" if n >= 1_000 else f"{n} bytes"


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()))


def write_metrics(output_dir: str | Path, metrics: dict[str, Any]) -> Path:
    return write_json(Path(output_dir) / rundir.METRICS, metrics)
