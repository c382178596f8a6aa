"""Crafted inputs for the boundary tests (test_untrusted.py, test_serve.py): images in every
format Pillow writes, mutated with a seed; an EPS file that Pillow would hand to Ghostscript;
a fake ``gs`` that records any call."""

from __future__ import annotations

import io
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

# What an EPS upload starts with: Pillow's EPS plugin would run Ghostscript on it to draw it.
EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
    b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n"
)


def fake_gs(folder: Path, record: Path) -> Path:
    """A ``gs`` in ``folder`` that appends its arguments to ``record``: put ``folder`` first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    gs = folder / "gs"
    gs.write_text(f'#!/bin/sh\necho "$@" >> {record}\nexit 1\n')
    gs.chmod(gs.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return gs


def written(fmt: str) -> bytes | None:
    """A small picture saved in ``fmt`` by Pillow (None where this Pillow cannot write it here)."""
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    modes = {
        "XBM": "1",
        "MSP": "1",
        "PALM": "P",
        "BLP": "P",
        "SPIDER": "F",
        "GIF": "P",
        "WMF": None,
        "BUFR": None,
        "GRIB": None,
        "HDF5": None,
    }
    if fmt in modes and modes[fmt] is None:
        return None  # these write only through a handler an application installs
    if fmt in modes:
        im = im.convert(modes[fmt])
    out = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # Pillow's IM format, to be removed in Pillow 15
            im.save(out, fmt, **({"sizes": [(16, 16)]} if fmt == "ICO" else {}))
    except Exception:
        return None
    return out.getvalue()


def seeds() -> dict[str, bytes]:
    """One file in every format Pillow writes here."""
    Image.init()
    return {fmt: data for fmt in sorted(Image.SAVE) if (data := written(fmt)) is not None}


def mutants(data: bytes, n: int, seed: int) -> Iterator[bytes]:
    """``n`` mutations of ``data``: flipped bytes, a cut, inserted and repeated runs, header
    fields overwritten with large numbers; the same ones for the same seed."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        b = bytearray(data)
        kind = rng.integers(5)
        if kind == 0:
            for i in rng.integers(0, len(b), rng.integers(1, 9)):
                b[i] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            b = b[: rng.integers(1, len(b))]
        elif kind == 2:
            at = rng.integers(len(b))
            b[at:at] = rng.integers(0, 256, rng.integers(1, 64), dtype=np.uint8).tobytes()
        elif kind == 3:
            at, size = rng.integers(len(b)), rng.integers(1, 256)
            b[at:at] = b[at : at + size] * int(rng.integers(2, 20))
        else:  # a header field: a length, a width, a count
            at = rng.integers(0, min(len(b), 64))
            b[at : at + 4] = rng.choice(
                [b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x00", b"\x00\x01\x00\x00"]
            )
        yield bytes(b)
