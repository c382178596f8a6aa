"""Image bytes from anywhere (an upload, a file for predict.py, a training or test folder): PNG or JPEG only
(Pillow's ``formats=``; no other decoder, Ghostscript included, is ever reached), at most ``max_megapixels``
decoded pixels, every mode brought to 8-bit RGB, any failure of any decoder as one ``UserError`` line."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from cifarkit.core.errors import UserError

FORMATS = ("PNG", "JPEG")  # Pillow's names; a JPEG file with a multi-picture (MPO) extension is a JPEG too
MAX_MEGAPIXELS = 16.0  # pixels actually decoded (after a JPEG's reduced-scale decoding): ~48 MB of RGB
BACKGROUND = (255, 255, 255)  # what a transparent pixel becomes
BAND_ROWS = 64  # rows of a 16-bit grey image converted at once
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
            rgb = _as_rgb_or_grey(ImageOps.exif_transpose(im))
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.BILINEAR)
            return np.asarray(rgb.convert("RGB"))  # grey resized first: the same pixels, a quarter of the memory
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


def _grey_to_8_bits(im: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer) grey as 8-bit grey, its top 8 bits, converted a band of rows at a time: the
    whole image through NumPy's int64 took 8 bytes a pixel three times over, 1.7x an 8-bit RGB image's peak."""
    width, height = im.size
    grey = np.empty((height, width), np.uint8)
    for top in range(0, height, BAND_ROWS):
        band = np.asarray(im.crop((0, top, width, min(height, top + BAND_ROWS))))
        grey[top : top + BAND_ROWS] = band.clip(0, 65535) >> 8
    return Image.fromarray(grey, "L")


def _as_rgb_or_grey(im: Image.Image) -> Image.Image:
    """Any mode a PNG or JPEG decodes to, as 8-bit RGB or 8-bit grey (opaque grey stays grey until it is
    resized): 16-bit grey scaled to 8 bits (Pillow's own conversion clips it at 255: almost white), CMYK by
    Pillow's conversion (Adobe's inverted CMYK included), transparency laid on ``BACKGROUND``."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L"):
        im = _grey_to_8_bits(im)
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    return im if im.mode == "L" else im.convert("RGB")
