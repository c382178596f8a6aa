"""A corrupted test set is data: made once on the run's device, written under the data directory with its
checksum, read back through the trust boundary after, and made again when stale or damaged."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from cifarkit.core.files import atomic_write, write_json
from cifarkit.core.untrusted.cached_sets import read_cached_set
from cifarkit.robust.corruptions import GENERATOR, corrupt

log = logging.getLogger(__name__)


def digest(images: torch.Tensor) -> str:
    """SHA-256 of a uint8 image tensor's shape and pixels: which clean images a set was made from."""
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.contiguous().numpy().tobytes())
    return h.hexdigest()


def set_files(folder: Path, name: str, severity: int) -> tuple[Path, Path]:
    """The pixels and the record of one cached set."""
    return folder / f"{name}-{severity}.u8", folder / f"{name}-{severity}.json"


def make_set(
    images: torch.Tensor, index: torch.Tensor, name: str, severity: int, seed: int, device: torch.device, batch: int
) -> torch.Tensor:
    """``images`` (uint8, CPU) under one corruption and severity, made ``batch`` images at a time on ``device``."""
    parts = [
        corrupt(images[i : i + batch].to(device), name, severity, index[i : i + batch], seed).cpu()
        for i in range(0, len(images), batch)
    ]
    return torch.cat(parts)


def cached_set(
    images: torch.Tensor,
    index: torch.Tensor,
    name: str,
    severity: int,
    seed: int,
    folder: Path,
    device: torch.device,
    batch: int,
    source: str,
) -> tuple[torch.Tensor, bool]:
    """The set of ``images`` (whose ``digest`` is ``source``) under ``name`` at ``severity``, and whether it
    came from the cache; a missing, stale or damaged cached set is made and written again."""
    pixels, record = set_files(folder, name, severity)
    expected = {
        "generator": GENERATOR,
        "corruption": name,
        "severity": severity,
        "seed": seed,
        "source": source,
        "shape": list(images.shape),
    }
    data, why = read_cached_set(pixels, record, expected)
    if data is not None:
        return data, True
    if why != "not made yet":
        log.warning("the cached set %s is %s; making it again", pixels, why)
    data = make_set(images, index, name, severity, seed, device, batch)
    raw = data.contiguous().numpy().tobytes()
    atomic_write(pixels, lambda f: f.write(raw))
    write_json(record, expected | {"sha256": hashlib.sha256(raw).hexdigest()})
    return data, False
