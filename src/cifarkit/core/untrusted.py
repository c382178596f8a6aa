"""The one boundary for what a stranger hands the project: image bytes, names read from files,
and the plain data a checkpoint or a run folder holds. Every door (serve.py, predict.py, eval.py,
train.py, export.py) goes through these functions, so a new door cannot forget a check.

* ``decode_image``: PNG or JPEG only (Pillow's ``formats=``; no other decoder, Ghostscript
  included, is ever reached), at most ``max_megapixels`` decoded pixels (a JPEG is decoded at
  the smallest scale that still covers the target size, as ``Image.thumbnail`` does), 16-bit
  grey, CMYK, palette and alpha images brought to RGB, and any failure of any decoder, whatever
  it raises, as one ``UserError`` line.
* ``shown``: a name that came from a file (class name, path) made safe for a terminal or log line.
* ``to_json``: strict JSON; a NaN or infinity is an error, never ``NaN`` in the output.
* ``check_tree``: plain data (nested dicts/lists) within a depth and size limit, judged without
  recursion, before anything else walks it.
* ``read_json_object``: a run folder's own JSON file (metrics.json) as a dict, or None;
  ``inside``: whether a path a file names is a checkpoint in a given folder (a resume's carried files).
* ``invalid``: a pydantic ``ValidationError`` (the schemas of cifarkit/data/images.py and
  cifarkit/nets/saved.py) as one short phrase.

Lightning-free and torch-free.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from pydantic import ValidationError

from cifarkit.core.errors import UserError

FORMATS = ("PNG", "JPEG")  # Pillow's names; a JPEG file with a multi-picture (MPO) extension is a JPEG too
MAX_MEGAPIXELS = 16.0  # pixels actually decoded (after a JPEG's reduced-scale decoding): ~48 MB of RGB
BACKGROUND = (255, 255, 255)  # what a transparent pixel becomes
DECODER = "decode-2"  # changes whenever decode_image gives other pixels for the same file (a folder's cache key)
# Pillow warns from ~89 megapixels; the limit here is far lower and applied before decoding.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageTooLarge(UserError):
    """An image over the pixel limit, refused before it was decoded (serve.py: 413)."""


def decode_image(
    source: Path | bytes, size: int, name: str, fix: str, max_megapixels: float = MAX_MEGAPIXELS
) -> np.ndarray:
    """A PNG or JPEG file, or its bytes (an upload), as RGB uint8 (size, size, 3): upright (EXIF
    orientation), resized when it is another size; else a ``UserError`` "cannot read <name> (why); <fix>".

    Thread-safe (no process-wide state is touched), so serve.py decodes in a pool.
    """
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source), formats=FORMATS) as im:
            im.draft("RGB", (size, size))  # a JPEG: decode at 1/2, 1/4 or 1/8 scale when that still covers size
            width, height = im.size
            if width * height > max_megapixels * 1e6:
                raise ImageTooLarge(
                    f"cannot read {name}: too large to decode safely ({width}x{height} pixels is over "
                    f"max_megapixels={max_megapixels:g}); {fix}"
                )
            rgb = _as_rgb(ImageOps.exif_transpose(im))
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.BILINEAR)
            return np.asarray(rgb)
    except UserError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own limit, met while reading the header
        raise ImageTooLarge(f"cannot read {name}: too large to decode safely ({e}); {fix}") from e
    except Exception as e:
        why = (
            "not an image file of a format read here: PNG or JPEG"
            if e.__class__.__name__ == "UnidentifiedImageError"
            else _why(e)
        )
        raise UserError(f"cannot read {name} ({why}); {fix}") from e


def _why(e: Exception) -> str:
    text = " ".join(str(e).split())[:160]
    return f"{e.__class__.__name__}: {text}" if text else e.__class__.__name__


def _as_rgb(im: Image.Image) -> Image.Image:
    """Any mode a PNG or JPEG decodes to, as 8-bit RGB: 16-bit grey scaled to 8 bits (Pillow's own
    conversion clips it at 255: almost white), CMYK by Pillow's conversion (Adobe's inverted
    CMYK included), transparency laid on ``BACKGROUND``."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L"):
        im = Image.fromarray((np.asarray(im).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    return im.convert("RGB")


# ---------------------------------------------------------------------------------------------
# What goes out: terminal and log lines, JSON.


def shown(text: Any) -> str:
    """``text`` with every character a terminal would act on (escape sequences, newlines, tabs,
    NUL, bidi overrides, undecodable bytes of a file name) written as a Python escape instead."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii") for c in s)


def to_json(data: Any) -> str:
    """JSON that every parser reads: NaN or infinity raise ``ValueError`` rather than be written."""
    return json.dumps(data, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# Plain data from a file.

MAX_DEPTH = 12  # dicts and lists inside each other; train.py's deepest net config has 3
MAX_NODES = 100_000  # values in all; a shared sub-list pickled once counts each time it is reached


def check_tree(data: Any, where: str, fix: str, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> None:
    """Refuse nested data deeper than ``max_depth`` or larger than ``max_nodes`` in one line,
    walking it without recursion (a pickle can nest 100,000 deep, or reach one list a million
    times through shared references)."""
    stack, nodes = [(data, 0)], 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        nested = isinstance(node, (dict, list, tuple))
        if nodes > max_nodes or (nested and depth >= max_depth):
            what = f"holds over {max_nodes} values" if nodes > max_nodes else f"is nested over {max_depth} levels deep"
            raise UserError(f"{where} {what}; {fix}")
        if nested:
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))


def invalid(e: ValidationError) -> str:
    """A pydantic error as a short phrase: where in the data, and what is wrong there."""
    first = e.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "the value"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return shown(f"{where}: {first['msg']}{more}")[:300]


def inside(path: Any, folder: Path) -> bool:
    """Whether ``path`` (a string from a file) names a ``.ckpt`` file inside ``folder`` once every
    link and ``..`` is resolved."""
    if not isinstance(path, str) or not path.endswith(".ckpt"):
        return False
    resolved = Path(path).resolve()
    return resolved.parent == folder.resolve() and resolved.is_file()


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A run folder's JSON file (metrics.json) when it holds an object; None when it is missing,
    cut short, not JSON, or not an object: the folder is read as untrusted too."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None
