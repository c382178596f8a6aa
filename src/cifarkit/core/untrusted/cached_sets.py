"""A corrupted test set cached under the data directory by an earlier run (cifarkit/robust/cache.py):
its record (JSON, held to a schema) and its raw uint8 pixels, used only when the record says it was made
by this generator from these images and the pixels' SHA-256 is the record's."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_RECORD_BYTES = 4096
MAX_SET_BYTES = 2**34  # 16 GiB: far above CIFAR's 10,000 x 3 x 32 x 32 (30 MB)


class SetRecord(BaseModel):
    """What a cached set's JSON record holds: how it was made and the SHA-256 of its pixels."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    generator: Annotated[str, Field(max_length=64)]
    corruption: Annotated[str, Field(max_length=64)]
    severity: Annotated[int, Field(ge=1, le=5)]
    seed: int
    source: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]  # SHA-256 of the clean images
    shape: Annotated[list[Annotated[int, Field(ge=1, le=2**31)]], Field(min_length=4, max_length=4)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def read_cached_set(pixels: Path, record: Path, expected: dict[str, Any]) -> tuple[torch.Tensor | None, str]:
    """The cached set as uint8 (N, C, H, W), or None and why it is stale or damaged (missing, a record
    that breaks the schema or was made otherwise than ``expected`` says, pixels of another length or
    checksum): the caller makes it again and never evaluates it."""
    try:
        if record.stat().st_size > MAX_RECORD_BYTES or pixels.stat().st_size > MAX_SET_BYTES:
            return None, "too large"
        meta = SetRecord.model_validate(json.loads(record.read_bytes()))
    except FileNotFoundError:
        return None, "not made yet"
    except (OSError, ValueError, RecursionError, ValidationError) as e:
        return None, f"unreadable record ({e.__class__.__name__})"
    mismatch = [k for k, v in expected.items() if getattr(meta, k) != v]
    if mismatch:
        return None, f"made with another {', '.join(mismatch)}"
    try:
        data = pixels.read_bytes()
    except OSError as e:
        return None, f"unreadable pixels ({e.__class__.__name__})"
    if len(data) != math.prod(meta.shape):
        return None, f"{len(data)} bytes where the record says {math.prod(meta.shape)}"
    if hashlib.sha256(data).hexdigest() != meta.sha256:
        return None, "checksum mismatch"
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(*meta.shape), "cached"
