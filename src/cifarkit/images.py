"""Image files in, net-ready tensors out, and the record of how a net's images are prepared.

Lightning-free: predict.py on an exported ``.onnx`` model (and anything serving one) imports
this without the training stack.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cifarkit.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass(frozen=True)
class DataInfo:
    """What a trained net expects: class names in label order, the per-channel mean/std its
    inputs were normalized with, and the square image size. A checkpoint carries it as
    ``data_info`` and an exported model as metadata, so new images are prepared without the dataset."""

    classes: list[str]
    mean: list[float]
    std: list[float]
    image_size: int

    @classmethod
    def check(cls, raw: Any, where: str) -> DataInfo:
        """``raw`` (from a file a stranger may have made) as a ``DataInfo``, or one line naming ``where``."""
        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        ok = (
            isinstance(raw, dict) and {"classes", "mean", "std", "image_size"} <= raw.keys()
            and isinstance(raw["classes"], list) and len(raw["classes"]) >= 2 and all(isinstance(c, str) for c in raw["classes"])
            and all(isinstance(raw[k], list) and len(raw[k]) == 3 and all(map(number, raw[k])) for k in ("mean", "std"))
            and all(v > 0 for v in raw["std"])
            and isinstance(raw["image_size"], int) and not isinstance(raw["image_size"], bool) and raw["image_size"] > 0
        )
        if not ok:
            raise UserError(f"{where} lacks a valid data_info (classes, mean/std, image size); "
                            "pass a .ckpt written by train.py or a model written by export.py")
        return cls(list(raw["classes"]), [float(v) for v in raw["mean"]], [float(v) for v in raw["std"]], raw["image_size"])

    def as_metadata(self) -> dict[str, str]:
        """Each field as a JSON string (ONNX ``metadata_props`` hold strings only)."""
        return {k: json.dumps(v) for k, v in asdict(self).items()}


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float, then (x - mean) / std: the same ops as ToTensor + Normalize, bit for bit."""
    # In place on the one float copy: the same ops in the same order, a third of the allocations.
    return images.to(torch.float32, copy=True).div_(255).sub_(mean[:, None, None]).div_(std[:, None, None])


def load_image(path: Path, size: int) -> np.ndarray:
    """Decode one image file to RGB uint8 (size, size, 3), upright, resized when it is another size
    (``decode_image``'s rules), or one line that names the file."""
    return decode_image(Path(path), size, f"image {path}", "remove or replace it")


def decode_image(source: Path | bytes, size: int, name: str, fix: str) -> np.ndarray:
    """A file or the bytes of one (an upload) as RGB uint8 (size, size, 3), upright, resized when
    it is another size; otherwise a ``UserError`` "cannot read <name> (why); <fix>".

    A camera's EXIF orientation tag is applied, so a phone photo is not learned sideways. An
    image over PIL's decompression-bomb limit (warning level included: ~90 megapixels) is
    refused before decoding, as one bad file must not take gigabytes of memory.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                return np.asarray(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"cannot read {name}: too large to decode safely ({e}); {fix}") from e
    except (OSError, SyntaxError, ValueError) as e:
        # PIL names a nameless buffer by its repr (an address): say what it means instead
        why = "not an image file" if isinstance(e, UnidentifiedImageError) and not isinstance(source, Path) else e
        raise UserError(f"cannot read {name} ({why}); {fix}") from e


def is_hidden(path: Path, under: Path) -> bool:
    """Whether any part of ``path`` below ``under`` starts with a dot: macOS's AppleDouble
    ``._name.jpg`` twins, ``.DS_Store``, ``.git`` and thumbnail folders are not images."""
    return any(part.startswith(".") for part in path.relative_to(under).parts)


def image_files(inputs: str) -> list[Path]:
    """The file itself, or every visible file under the folder (recursively, sorted)."""
    p = Path(inputs)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and not is_hidden(f, p))
    raise UserError(f"inputs={inputs} does not exist; pass an image file or a folder of images")
