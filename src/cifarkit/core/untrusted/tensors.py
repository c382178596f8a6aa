"""Every tensor file read here (checkpoints, ``model.net.weights`` files, the data cache) goes through
``read_torch_file`` or ``read_weights_file``, read once:

* the file's records are checked against its size before anything is inflated (``torch.save`` writes
  a zip archive of uncompressed records, so a compressed record, or records adding up to more than
  the file, were made by hand);
* ``torch.load(weights_only=True)``: no pickled code runs;
* the plain data around the tensors within a depth and size limit (``check_tree``);
* ``plain_tensor``: a dense, strided tensor whose storage holds all its elements (no sparse,
  quantized or nested tensor, no view that stretches a few bytes to a large shape).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from cifarkit.core.errors import UserError
from cifarkit.core.untrusted.plain import check_tree
from cifarkit.core.untrusted.text import shown


def check_records(path: Path, where: str, what: str, fix: str) -> None:
    """Refuse a file whose records would inflate past the file's own size, before any is read."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise UserError(
            f"{where} is not a readable {what} (not the zip archive torch.save writes: {e.__class__.__name__}); {fix}"
        ) from None
    inflated = sum(r.file_size for r in records)
    size = path.stat().st_size
    if any(r.compress_type != zipfile.ZIP_STORED or r.file_size != r.compress_size for r in records) or inflated > size:
        raise UserError(
            f"{where} holds compressed records ({inflated / 1e6:.1f} MB from a {size / 1e6:.1f} MB file), "
            f"which torch.save never writes, so nothing was inflated; {fix}"
        )


def read_torch_file(path: Path, where: str, fix: str, what: str = "file", mmap: bool = False) -> Any:
    """A ``torch.save`` file's content (``what``: a checkpoint...), read safely, or one line ``<where> ...; <fix>``.
    ``mmap``: the tensors stay on disk until touched (a scan that reads a few numbers of many files)."""
    check_records(path, where, what, fix)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise UserError(f"{where} is not a readable {what} ({e.__class__.__name__}); {fix}") from e
    check_tree(data, where, fix)
    return data


def plain_tensor(value: Any) -> bool:
    """Whether ``value`` is a dense, strided tensor whose storage holds all its elements."""
    return (
        isinstance(value, torch.Tensor)
        and value.layout == torch.strided
        and not value.is_quantized
        and not value.is_nested
        and type(value) in (torch.Tensor, torch.nn.Parameter)
        and value.numel() * value.element_size() <= value.untyped_storage().nbytes()
    )


def read_weights_file(path: Path, where: str, fix: str) -> dict[str, torch.Tensor]:
    """A state dict of plain tensors from a ``.safetensors`` file or a ``torch.save`` file (a state dict, or
    one under ``state_dict``/``model``, as timm's files hold it), read once; or one line ``<where> ...; <fix>``."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data: Any = load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{where} is not a readable weights file ({e.__class__.__name__}); {fix}") from e
    else:
        data = read_torch_file(path, where, fix, "weights file")
        for key in ("state_dict", "model"):
            if isinstance(data, dict) and isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not data:
        raise UserError(f"{where} holds no state dict of tensors; {fix}")
    bad = next((k for k, v in data.items() if not (isinstance(k, str) and plain_tensor(v))), None)
    if bad is not None:
        raise UserError(f"{where} has an entry {shown(bad)[:80]} that is not a plain dense tensor; {fix}")
    return {k.removeprefix("module."): v for k, v in data.items()}  # a DDP-wrapped net's names, as timm cleans them


CACHE_KEYS = ("train_x", "train_y", "test_x", "test_y")


def read_image_cache(path: Path, num_classes: int) -> dict[str, torch.Tensor]:
    """A data cache (decoded images of an earlier run) held to what the decoder writes: uint8 images
    (N, 3, H, W) of a square size from 8 to 1024, int64 labels within the source's ``num_classes``, as
    many labels as images; else a ``UserError`` that says what is off (a cache: the caller decodes again)."""
    where = f"the dataset cache {shown(path)}"
    data = read_torch_file(path, where, "it is decoded again", "data cache")
    if not isinstance(data, dict) or sorted(data) != sorted(CACHE_KEYS):
        raise UserError(f"{where} does not hold {', '.join(CACHE_KEYS)}")
    for split in ("train", "test"):
        x, y = data[f"{split}_x"], data[f"{split}_y"]
        if not (plain_tensor(x) and plain_tensor(y)):
            raise UserError(f"{where} holds a {split} split that is not plain tensors")
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3]:
            raise UserError(f"{where} holds {split} images of {x.dtype} {tuple(x.shape)}, not uint8 (N, 3, H, H)")
        if not 8 <= x.shape[2] <= 1024 or y.dtype != torch.int64 or tuple(y.shape) != (x.shape[0],):
            raise UserError(f"{where} holds {split} images or labels out of shape ({tuple(x.shape)}, {tuple(y.shape)})")
        if len(y) and not (0 <= int(y.min()) and int(y.max()) < num_classes):
            raise UserError(f"{where} holds {split} labels outside the {num_classes} classes of its source")
    return data
