"""Data sources: where the images come from and how their files decode into uint8 tensors.

Each is an ``ImageDataModule`` (cifarkit/datamodule.py) that says what its classes are, what
identifies its files (the cache key) and how to decode them; everything after decoding is shared.

* ``CIFAR10DataModule``: the official python batches, downloaded and MD5-checked by torchvision.
* ``ImageFolderDataModule``: your own ``root/train/<class>/*`` and ``root/test/<class>/*`` images.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.datasets.folder import find_classes, make_dataset

from cifarkit.datamodule import ImageDataModule
from cifarkit.errors import UserError
from cifarkit.images import IMAGE_SUFFIXES, is_hidden, load_image

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class CIFAR10DataModule(ImageDataModule):
    """The official CIFAR-10 files in ``data_dir``, fetched there when ``download`` (torchvision
    verifies every file's MD5 either way when downloading is allowed)."""

    def __init__(self, data_dir: str, download: bool, **kwargs: Any) -> None:
        if kwargs["image_size"] != 32:
            raise UserError(f"CIFAR-10 images are 32x32, not data.image_size={kwargs['image_size']}; use data=image_folder to resize")
        super().__init__(**kwargs)
        self.data_dir, self.download = Path(data_dir), download

    @property
    def classes(self) -> list[str]:
        return CIFAR10_CLASSES

    def _source_key(self) -> str:
        return f"cifar10:{self.data_dir.resolve()}"

    def _dataset(self, train: bool) -> Any:
        from torchvision.datasets import CIFAR10

        fix = f"check data.data_dir={self.data_dir}"
        try:
            if self.download:
                CIFAR10(str(self.data_dir), train=train, download=True)  # verifies MD5s, fetches if needed
            return CIFAR10(str(self.data_dir), train=train, download=False)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted" / "File not found or corrupted"
            how = fix + (" or run with data.download=true" if not self.download else " (delete it to download again)")
            raise UserError(f"CIFAR-10 in {self.data_dir} is missing or corrupt ({e}); {how}") from e
        except OSError as e:  # no network, DNS failure, HTTP error
            raise UserError(
                f"could not download CIFAR-10 into {self.data_dir} ({e.__class__.__name__}: {e}); "
                f"put the extracted 'cifar-10-batches-py' folder there and run with data.download=false"
            ) from e

    def _decode(self) -> dict[str, torch.Tensor]:
        out = {}
        for split, train in (("train", True), ("test", False)):
            ds = self._dataset(train)
            out[f"{split}_x"] = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            out[f"{split}_y"] = torch.tensor(ds.targets, dtype=torch.int64)
        return out

    def prepare_data(self) -> None:
        if self.download or not self.cache_file.exists():
            # Always verify the files when downloading is allowed; the cache alone is trusted otherwise.
            for train in (True, False):
                self._dataset(train)
        super().prepare_data()


class ImageFolderDataModule(ImageDataModule):
    """Your own images: ``root/train/<class>/*`` and ``root/test/<class>/*`` (PNG or JPEG, any
    size: resized to ``image_size``), found with torchvision's ``find_classes`` and
    ``make_dataset``. Hidden files and folders are skipped (classes included): macOS writes an
    AppleDouble ``._name.jpg`` beside every file it copies to a foreign disk."""

    def __init__(self, root: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)

    def _class_dirs(self, split: str) -> list[str]:
        d = self.root / split
        if not d.is_dir():
            raise UserError(f"image folder {d} does not exist; set data.root to a folder with train/<class>/ and test/<class>/")
        try:
            found, _ = find_classes(d)
        except FileNotFoundError:  # no class folder at all
            found = []
        return [name for name in found if not name.startswith(".")]

    @property
    def classes(self) -> list[str]:
        train, test = self._class_dirs("train"), self._class_dirs("test")
        if len(train) < 2:
            raise UserError(f"{self.root / 'train'} has {len(train)} class folder(s); a classifier needs at least 2 (train/<class>/<image>)")
        if train != test:
            diff = sorted(set(train) ^ set(test))
            raise UserError(f"train and test classes differ in {self.root} (only in one: {', '.join(diff)}); make them match")
        return train

    def _files(self) -> dict[str, list[tuple[Path, int]]]:
        """Each split's (image, label) pairs, class by class, in torchvision's walking order."""
        classes = {name: i for i, name in enumerate(self.classes)}
        files: dict[str, list[tuple[Path, int]]] = {}
        for split in ("train", "test"):
            d = self.root / split

            def is_image(path: str) -> bool:
                p = Path(path)
                return p.suffix.lower() in IMAGE_SUFFIXES and not is_hidden(p, d)

            files[split] = [(Path(p), label) for p, label in make_dataset(str(d), classes, is_valid_file=is_image, allow_empty=True)]
            if not files[split]:
                raise UserError(f"no PNG or JPEG images under {d}; add images to its class folders")
        return files

    def _source_key(self) -> str:
        h = hashlib.sha1()
        for split, items in self._files().items():
            for p, label in items:
                st = p.stat()
                h.update(f"{split}/{p.relative_to(self.root)}:{st.st_size}:{st.st_mtime_ns}:{label}\n".encode())
        return f"folder:{self.root.resolve()}:{self.image_size}:{h.hexdigest()}"

    def _decode(self) -> dict[str, torch.Tensor]:
        out = {}
        for split, items in self._files().items():
            x = np.empty((len(items), self.image_size, self.image_size, 3), dtype=np.uint8)
            for i, (p, _) in enumerate(items):
                x[i] = load_image(p, self.image_size)
            out[f"{split}_x"] = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
            out[f"{split}_y"] = torch.tensor([label for _, label in items], dtype=torch.int64)
        return out
