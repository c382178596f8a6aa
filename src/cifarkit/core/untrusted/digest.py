"""A file's content hash: the served model's identity, read as bytes and never parsed."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_of(path: str | Path) -> str:
    """The SHA-256 of the file's bytes, read in 1 MB chunks (a model of any size in constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()
