"""How many pixels ``decode_image`` will hold for an upload, read from its header alone: what serve.py
weighs each decode by, so that the images being decoded at once hold a bounded number of pixels."""

from __future__ import annotations

import io

from PIL import Image

from cifarkit.core.untrusted.images import FORMATS


def decoded_megapixels(data: bytes, size: int) -> float:
    """Megapixels the decode of ``data`` at ``size`` will hold, as ``decode_image`` sees them (a JPEG at its
    reduced scale); 0 when the header cannot be read (``decode_image`` then says why, in one line)."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            im.draft("RGB", (size, size))
            width, height = im.size
    except Exception:  # any failure of any decoder: decode_image reports it
        return 0.0
    return width * height / 1e6
