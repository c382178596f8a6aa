"""Writing files that a reader may open at any moment: a crash leaves the old file or none.

Lightning-free, so that cifarkit/cli.py can record a failed run's ``metrics.json`` on every
path, predict.py on an ``.onnx`` model (without Lightning installed) included.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

_UMASK = os.umask(0o022)  # reading the umask means setting it: put it straight back
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync, then rename it into place.

    The file gets the permissions a plain ``open`` would give it (``mkstemp`` alone makes it
    owner-only), so checkpoints and exported models can be shared as before.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def write_metrics(output_dir: str | Path, metrics: dict[str, Any]) -> Path:
    text = json.dumps(metrics, indent=2, sort_keys=True) + "\n"
    return atomic_write(Path(output_dir) / "metrics.json", lambda f: f.write(text.encode()))
