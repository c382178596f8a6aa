"""Data sources: where the images come from and how their files decode into uint8 tensors.

Each is an ``ImageDataModule`` (cifarkit/data/datamodule.py) that says what its classes are (``source_classes``), what
identifies its files (the cache key) and how to decode them; everything after decoding is shared.

* ``CIFAR10DataModule``, ``CIFAR100DataModule``, ``SVHNDataModule``: the official 32x32 files,
  downloaded and MD5-checked by torchvision (``DownloadedDataModule`` says what to do when
  they are missing, corrupt or cannot be fetched).
* ``ImageFolderDataModule``: your own ``root/train/<class>/*`` and ``root/test/<class>/*`` images.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.datasets.folder import find_classes, make_dataset

from cifarkit.core.errors import UserError
from cifarkit.core.extras import require
from cifarkit.core.untrusted import DECODER, read_cifar_pickle, shown
from cifarkit.data.datamodule import ImageDataModule
from cifarkit.data.images import IMAGE_SUFFIXES, check_class_folders, is_hidden, load_image

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# CIFAR-100's names as its meta file lists them (checked against it when decoding). They are
# written out because the model is built from the classes before any file is fetched.
CIFAR100_FINE = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man
maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain
plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip
turtle wardrobe whale willow_tree wolf woman worm""".split()
CIFAR100_COARSE = """aquatic_mammals fish flowers food_containers fruit_and_vegetables household_electrical_devices
household_furniture insects large_carnivores large_man-made_outdoor_things large_natural_outdoor_scenes
large_omnivores_and_herbivores medium_mammals non-insect_invertebrates people reptiles small_mammals trees vehicles_1
vehicles_2""".split()
SVHN_CLASSES = [str(digit) for digit in range(10)]
log = logging.getLogger(__name__)


class DownloadedDataModule(ImageDataModule):
    """Official 32x32 files in ``data_dir``, fetched there when ``download``. torchvision checks
    every file's MD5 whenever it opens them, and fetches what is missing or corrupt when allowed."""

    title = ""  # the dataset's name in messages
    key = ""  # the cache key's prefix
    files = ""  # what to put in data_dir by hand

    def __init__(self, data_dir: str, download: bool, **kwargs: Any) -> None:
        if kwargs["image_size"] != 32:  # the schema checks the option; eval.py passes a checkpoint's size here
            raise UserError(
                f"{self.title} images are 32x32, not data.image_size={kwargs['image_size']}; use data=image_folder "
                "to resize"
            )
        super().__init__(**kwargs)
        self.data_dir, self.download = Path(data_dir), download

    def _splits(self) -> tuple[str, ...]:
        """The file sets ``_open`` opens; all are checked before decoding."""
        return ("train", "test")

    def _open(self, split: str) -> Any:
        """torchvision's dataset of ``split`` in ``data_dir`` (downloading when allowed)."""
        raise NotImplementedError

    def _source_key(self) -> str:
        return f"{self.key}:{self.data_dir.resolve()}"

    def _dataset(self, split: str) -> Any:
        try:
            return self._open(split)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted" / "File not found or corrupted"
            fix = (
                f"delete the corrupt files to download them again, or put {self.files} there and run with "
                "data.download=false"
                if self.download
                else f"put {self.files} there, or run with data.download=true"
            )
            raise UserError(f"{self.title} in data.data_dir={self.data_dir} is missing or corrupt ({e}); {fix}") from e
        except OSError as e:  # no network, DNS failure, HTTP error
            raise UserError(
                f"could not download {self.title} into data.data_dir={self.data_dir} ({e.__class__.__name__}: {e}); "
                f"put {self.files} there and run with data.download=false"
            ) from e

    def prepare_data(self) -> None:
        if self.download or not self.cache_file.exists():
            # Always verify the files when downloading is allowed; the cache alone is trusted otherwise.
            for split in self._splits():
                self._dataset(split)
        super().prepare_data()


class CIFAR10DataModule(DownloadedDataModule):
    """The official CIFAR-10 python batches."""

    title, key, files = "CIFAR-10", "cifar10", "the extracted 'cifar-10-batches-py' folder"

    @property
    def source_classes(self) -> list[str]:
        return CIFAR10_CLASSES

    def _open(self, split: str) -> Any:
        from torchvision.datasets import CIFAR10

        return CIFAR10(str(self.data_dir), train=split == "train", download=self.download)

    def _decode(self) -> dict[str, torch.Tensor]:
        out = {}
        for split in self._splits():
            ds = self._dataset(split)
            out[f"{split}_x"] = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            out[f"{split}_y"] = torch.tensor(ds.targets, dtype=torch.int64)
        return out


class CIFAR100DataModule(CIFAR10DataModule):
    """The official CIFAR-100 python batches: ``labels=fine`` (100 classes) or ``coarse`` (their
    20 superclasses). torchvision reads only the fine labels; the coarse ones and both name
    lists are read here from the same verified files."""

    title, key, files = "CIFAR-100", "cifar100", "the extracted 'cifar-100-python' folder"

    def __init__(self, labels: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.labels = labels

    @property
    def source_classes(self) -> list[str]:
        return CIFAR100_FINE if self.labels == "fine" else CIFAR100_COARSE

    def _open(self, split: str) -> Any:
        from torchvision.datasets import CIFAR100

        return CIFAR100(str(self.data_dir), train=split == "train", download=self.download)

    def _source_key(self) -> str:
        return f"{super()._source_key()}:{self.labels}"

    def _decode(self) -> dict[str, torch.Tensor]:
        from torchvision.datasets import CIFAR100

        out = super()._decode()  # every file verified, the fine labels read
        folder = self.data_dir / CIFAR100.base_folder
        fix = "delete it to download it again"
        names = read_cifar_pickle(folder / CIFAR100.meta["filename"], fix).get(f"{self.labels}_label_names")
        if names != self.source_classes:
            raise UserError(
                f"{folder} lists other {self.labels} class names than CIFAR-100's; delete it to download it again"
            )
        if self.labels == "coarse":
            for split, files in (("train", CIFAR100.train_list), ("test", CIFAR100.test_list)):
                coarse = [
                    label for name, _ in files for label in read_cifar_pickle(folder / name, fix)["coarse_labels"]
                ]
                out[f"{split}_y"] = torch.tensor(coarse, dtype=torch.int64)
        return out


class SVHNDataModule(DownloadedDataModule):
    """The official SVHN cropped digits (.mat files, read with scipy): train and test, plus the
    531,131 easier ``extra`` images added to training when ``extra``. The files label the digit
    0 as 10; torchvision maps it to 0, so class ``"d"`` is digit d."""

    title, key = "SVHN", "svhn"

    def __init__(self, extra: bool, **kwargs: Any) -> None:
        require("data=svhn", "svhn", "scipy.io")  # torchvision's SVHN reads the .mat files with it
        super().__init__(**kwargs)
        self.extra = extra
        self.files = (
            "train_32x32.mat, test_32x32.mat and extra_32x32.mat" if extra else "train_32x32.mat and test_32x32.mat"
        )

    @property
    def source_classes(self) -> list[str]:
        return SVHN_CLASSES

    def _splits(self) -> tuple[str, ...]:
        return ("train", "test", "extra") if self.extra else ("train", "test")

    def _open(self, split: str) -> Any:
        from torchvision.datasets import SVHN

        return SVHN(str(self.data_dir), split=split, download=self.download)

    def _source_key(self) -> str:
        return f"{super()._source_key()}:extra={self.extra}"

    def _decode(self) -> dict[str, torch.Tensor]:
        parts = {split: self._dataset(split) for split in self._splits()}  # data: (N, 3, 32, 32) uint8
        train = [parts["train"], *([parts["extra"]] if self.extra else [])]
        return {
            "train_x": torch.from_numpy(np.concatenate([ds.data for ds in train])),
            "train_y": torch.from_numpy(np.concatenate([ds.labels for ds in train])).to(torch.int64),
            "test_x": torch.from_numpy(np.ascontiguousarray(parts["test"].data)),
            "test_y": torch.from_numpy(parts["test"].labels).to(torch.int64),
        }


def once_each(found: list[tuple[str, int]], seen: set[tuple[int, int]]) -> list[tuple[str, int]]:
    """Each file once, at the first path that reaches it, and none already in ``seen`` (which it extends): a file
    is known by its device and inode once links are resolved, so neither a link loop (``cat/again -> .``, which
    torchvision's walk follows: every image 40 times over) nor a symbolic or hard link into another split
    counts an image twice."""
    kept = []
    for path, label in found:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            kept.append((path, label))
    return kept


class ImageFolderDataModule(ImageDataModule):
    """Your own images: ``root/train/<class>/*`` and ``root/test/<class>/*`` (PNG or JPEG, any
    size: resized to ``image_size``), found with torchvision's ``find_classes`` and
    ``make_dataset``. Hidden files and folders are skipped (classes included): macOS writes an
    AppleDouble ``._name.jpg`` beside every file it copies to a foreign disk."""

    def __init__(self, root: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self._told_shared = False

    def _class_dirs(self, split: str) -> list[str]:
        d = self.root / split
        if not d.is_dir():
            raise UserError(
                f"image folder {d} does not exist; set data.root to a folder with train/<class>/ and test/<class>/"
            )
        try:
            found, _ = find_classes(d)
        except FileNotFoundError:  # no class folder at all
            found = []
        return [name for name in found if not name.startswith(".")]

    @property
    def source_classes(self) -> list[str]:
        train, test = self._class_dirs("train"), self._class_dirs("test")
        if len(train) < 2:
            raise UserError(
                f"{self.root / 'train'} has {len(train)} class folder(s); a classifier needs at least 2 "
                "(train/<class>/<image>)"
            )
        odd = next((name for name in train if not name.isprintable()), None)
        if odd is not None:
            raise UserError(
                f"class folder {shown(self.root / 'train' / odd)} has a character in its name that a terminal "
                "would act on (a control character, a newline, a tab); rename it"
            )
        check_class_folders(train, self.root / "train")
        if train != test:
            diff = sorted(set(train) ^ set(test))
            raise UserError(
                f"train and test classes differ in {self.root} (only in one: {', '.join(diff)}); make them match"
            )
        return train

    def _files(self) -> dict[str, list[tuple[Path, int]]]:
        """Each split's (image, label) pairs, class by class, in torchvision's walking order; a file that is in
        both splits (the same file linked into each) is a test image only."""
        classes = {name: i for i, name in enumerate(self.source_classes)}
        files: dict[str, list[tuple[Path, int]]] = {}
        seen: set[tuple[int, int]] = set()
        for split in ("test", "train"):  # the test split first: it keeps a file both name
            d = self.root / split

            def is_image(path: str, d: Path = d) -> bool:
                p = Path(path)
                return p.suffix.lower() in IMAGE_SUFFIXES and not is_hidden(p, d)

            found = make_dataset(str(d), classes, is_valid_file=is_image, allow_empty=True)
            if split == "train" and not self._told_shared:
                shared = {(st.st_dev, st.st_ino) for st in (os.stat(p) for p, _ in found)} & seen
                if shared:
                    log.warning(
                        "%d files under %s are test images too (linked into both splits): not trained on",
                        len(shared),
                        d,
                    )
                self._told_shared = True  # once: the cache key and the decoding both walk the folder
            files[split] = [(Path(p), label) for p, label in once_each(found, seen)]
            if not files[split]:
                raise UserError(f"no PNG or JPEG images under {d}; add images to its class folders")
        return {"train": files["train"], "test": files["test"]}

    def _source_key(self) -> str:
        h = hashlib.sha1(DECODER.encode())
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
