"""Image files in, net-ready tensors out, and the record of how a net's images are prepared.

Lightning-free: predict.py on an exported ``.onnx`` model (and anything serving one) imports
this without the training stack.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import AfterValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from cifarkit.core.errors import UserError, existing
from cifarkit.core.untrusted import MAX_MEGAPIXELS, decode_image, invalid, shown

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


MAX_CLASSES = 10_000
MAX_CLASS_NAME = 200  # characters
MAX_IMAGE_SIZE = 1024  # pixels a side: a net's input, (3, 1024, 1024) floats = 12 MB an image


def _class_names(names: list[str]) -> list[str]:
    for i, name in enumerate(names):
        if not name.isprintable():
            raise ValueError(f"class {i} holds a character a terminal would act on ({shown(name)[:60]})")
    if len(set(names)) != len(names):
        raise ValueError(f"a class name repeats ({shown(next(n for n in names if names.count(n) > 1))[:60]})")
    return names


ClassName = Annotated[str, Field(min_length=1, max_length=MAX_CLASS_NAME)]
ClassNames = Annotated[list[ClassName], Field(min_length=2, max_length=MAX_CLASSES), AfterValidator(_class_names)]
Stat = Annotated[float, Field(ge=-10, le=10)]


@pydantic_dataclass(frozen=True, config=ConfigDict(strict=True, allow_inf_nan=False))
class DataInfo:
    """What a trained net expects: class names in label order, the per-channel mean/std its
    inputs were normalized with, and the square image size. A checkpoint carries it as
    ``data_info`` and an exported model as metadata, so new images are prepared without the dataset.

    Validated whenever one is made (pydantic): a training run whose folder names a class the
    checkpoint could not be read back with stops at once, and a stranger's file is held to the
    same bounds (finite statistics in a sane range, a bounded image size, printable unique names).
    """

    classes: ClassNames
    mean: Annotated[list[Stat], Field(min_length=3, max_length=3)]
    std: Annotated[list[Annotated[float, Field(ge=1e-3, le=10)]], Field(min_length=3, max_length=3)]
    image_size: Annotated[int, Field(ge=8, le=MAX_IMAGE_SIZE)]

    @classmethod
    def check(cls, raw: Any, where: str) -> DataInfo:
        """``raw`` (from a file a stranger may have made) as a ``DataInfo``, or one line naming ``where``."""
        fields = ("classes", "mean", "std", "image_size")
        try:
            return cls(**{k: raw.get(k) for k in fields} if isinstance(raw, dict) else {})
        except ValidationError as e:  # not a mapping: every field is missing
            raise UserError(
                f"{where} has an invalid data_info ({invalid(e)}); pass a .ckpt written by train.py or a model written "
                "by export.py"
            ) from None

    def as_metadata(self) -> dict[str, str]:
        """Each field as a JSON string (ONNX ``metadata_props`` hold strings only)."""
        return {k: json.dumps(v) for k, v in asdict(self).items()}


_CLASS_NAMES = TypeAdapter(ClassNames, config=ConfigDict(strict=True))


def check_class_folders(names: list[str], folder: Path) -> None:
    """Class folder names held to the limits of a checkpoint's ``DataInfo`` before training starts, so a name no
    checkpoint can hold stops the run in one line now rather than at its first checkpoint."""
    try:
        _CLASS_NAMES.validate_python(names)
    except ValidationError as e:
        first = e.errors()[0]
        index = first["loc"][0] if first["loc"] else None
        if isinstance(index, int):  # one name: its length
            raise UserError(
                f"class folder {shown(folder / names[index])[:120]} cannot be a checkpoint's class name "
                f"({first['msg']}); rename it to at most {MAX_CLASS_NAME} characters"
            ) from None
        raise UserError(
            f"the class folders of {shown(folder)} cannot be a checkpoint's classes ({invalid(e)}); keep at most "
            f"{MAX_CLASSES}, each once"
        ) from None


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float, then (x - mean) / std: the same ops as ToTensor + Normalize, bit for bit."""
    # In place on the one float copy: the same ops in the same order, a third of the allocations.
    return images.to(torch.float32, copy=True).div_(255).sub_(mean[:, None, None]).div_(std[:, None, None])


def load_image(path: Path, size: int, max_megapixels: float = MAX_MEGAPIXELS) -> np.ndarray:
    """Decode one image file to RGB uint8 (size, size, 3), upright, resized when it is another size
    (``cifarkit.core.untrusted.decode_image``'s rules), or one line that names the file."""
    return decode_image(Path(path), size, f"image {shown(path)}", "remove or replace it", max_megapixels)


def is_hidden(path: Path, under: Path) -> bool:
    """Whether any part of ``path`` below ``under`` starts with a dot: macOS's AppleDouble
    ``._name.jpg`` twins, ``.DS_Store``, ``.git`` and thumbnail folders are not images."""
    return any(part.startswith(".") for part in path.relative_to(under).parts)


def image_files(inputs: str) -> list[Path]:
    """The file itself, or every visible file under the folder (recursively, sorted)."""
    p = existing("inputs", inputs, "an image file or a folder of images", folder=True)
    if p.is_file():
        return [p]
    return sorted(f for f in p.rglob("*") if f.is_file() and not is_hidden(f, p))
