"""Tiny datasets in the real on-disk formats, written by the tests themselves.

* ``class_images``: random images whose colour says their class, so a net learns something.
* ``write_cifar10_tarball``, ``write_cifar100_tarball``, ``write_svhn_mats``: each official
  format (CIFAR's pickled batches in their tarball, SVHN's .mat files) with torchvision's MD5
  tables for them; conftest.py serves them over HTTP.
* ``write_image_folder``: train/<class>/ and test/<class>/ with PNG and JPEG files of mixed
  sizes; ``hide_metadata_beside``: what macOS and tools leave beside them.
"""

from __future__ import annotations

import hashlib
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES3 = ["cat", "dog", "frog"]


def class_images(n: int, num_classes: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random images whose mean colour depends on the class (the same colours for every seed),
    so a net can learn something that carries from train to test."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    base = np.random.default_rng(0).integers(0, 256, size=(num_classes, 3), dtype=np.int64)
    noise = rng.integers(-60, 61, size=(n, size, size, 3))
    x = np.clip(base[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return x, labels


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def cifar_rows(x: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) images as CIFAR's pickles hold them: rows of R plane, G plane, B plane."""
    return x.transpose(0, 3, 1, 2).reshape(len(x), 3072)


def write_cifar_tarball(
    dest: Path,
    url: str,
    tarball: str,
    folder: str,
    train: dict[str, dict],
    test: dict[str, dict],
    meta: tuple[str, str, dict],
) -> dict:
    """``tarball`` holding ``folder``/ with each pickled batch and the meta file (its name, its
    names key, its content), as the official CIFAR tarballs are laid out; returns torchvision's
    tables for it, served from ``url``."""
    build = dest / "build" / folder
    build.mkdir(parents=True)
    meta_name, meta_key, meta_content = meta
    for name, content in {**train, **test, meta_name: meta_content}.items():
        with open(build / name, "wb") as f:
            pickle.dump(content, f)
    with tarfile.open(dest / tarball, "w:gz") as tar:
        tar.add(build, arcname=folder)
    return {
        "url": f"{url}/{tarball}",
        "tgz_md5": md5(dest / tarball),
        "train_list": [[name, md5(build / name)] for name in train],
        "test_list": [[name, md5(build / name)] for name in test],
        "meta": {"filename": meta_name, "key": meta_key, "md5": md5(build / meta_name)},
    }


def write_cifar10_tarball(dest: Path, url: str, per_batch: int = 40, n_test: int = 100) -> dict:
    """cifar-10-python.tar.gz as the official one is laid out; returns the MD5 tables."""
    from cifarkit.data.sources import CIFAR10_CLASSES

    def batch(name: str, n: int, seed: int) -> dict:
        x, y = class_images(n, 10, 32, seed)
        return {"batch_label": name, "labels": y.tolist(), "data": cifar_rows(x), "filenames": []}

    train = {f"data_batch_{i}": batch(f"data_batch_{i}", per_batch, seed=i) for i in range(1, 6)}
    meta = ("batches.meta", "label_names", {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": per_batch})
    return write_cifar_tarball(
        dest,
        url,
        "cifar-10-python.tar.gz",
        "cifar-10-batches-py",
        train,
        {"test_batch": batch("test_batch", n_test, seed=99)},
        meta,
    )


CIFAR100_SPLITS = {"train": (120, 1), "test": (60, 2)}  # images, seed


def cifar100_split(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tiny CIFAR-100's images (N, 32, 32, 3), fine labels and coarse labels, the coarse ones
    drawn apart from the fine ones (so only reading the right key gives them)."""
    n, seed = CIFAR100_SPLITS[split]
    x, fine = class_images(n, 100, 32, seed)
    return x, fine, np.random.default_rng(seed + 100).integers(0, 20, n)


def write_cifar100_tarball(dest: Path, url: str) -> dict:
    """cifar-100-python.tar.gz as the official one is laid out; returns the MD5 tables."""
    from cifarkit.data.sources import CIFAR100_COARSE, CIFAR100_FINE

    def batch(split: str) -> dict:
        x, fine, coarse = cifar100_split(split)
        return {
            "filenames": [],
            "batch_label": split,
            "fine_labels": fine.tolist(),
            "coarse_labels": coarse.tolist(),
            "data": cifar_rows(x),
        }

    meta = ("meta", "fine_label_names", {"fine_label_names": CIFAR100_FINE, "coarse_label_names": CIFAR100_COARSE})
    return write_cifar_tarball(
        dest,
        url,
        "cifar-100-python.tar.gz",
        "cifar-100-python",
        {"train": batch("train")},
        {"test": batch("test")},
        meta,
    )


SVHN_SPLITS = {"train": (60, 11), "test": (30, 12), "extra": (40, 13)}  # images, seed


def svhn_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The tiny SVHN's images (N, 32, 32, 3) and digits."""
    n, seed = SVHN_SPLITS[split]
    return class_images(n, 10, 32, seed)


def write_svhn_mats(dest: Path, url: str) -> dict:
    """train/test/extra_32x32.mat in SVHN's layout (X: (32, 32, 3, N) uint8; y: (N, 1), the
    digit 0 labelled 10); returns torchvision's table for them (``SVHN.split_list``), served from ``url``."""
    from scipy.io import savemat

    dest.mkdir(parents=True)
    split_list = {}
    for split in SVHN_SPLITS:
        x, digits = svhn_split(split)
        name = f"{split}_32x32.mat"
        savemat(
            dest / name,
            {"X": x.transpose(1, 2, 3, 0), "y": np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]},
        )
        split_list[split] = [f"{url}/{name}", name, md5(dest / name)]
    return {"split_list": split_list}


def write_image_folder(root: Path, n_train: int = 24, n_test: int = 12, classes: list[str] = CLASSES3) -> Path:
    """PNG and JPEG files, most 32x32, some 40x40 (resized on load)."""
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        x, y = class_images(n * len(classes), len(classes), 40, seed)
        for i, (img, label) in enumerate(zip(x, y)):
            d = root / split / classes[label]
            d.mkdir(parents=True, exist_ok=True)
            im = Image.fromarray(img)
            if i % 3 == 0:
                im.save(d / f"{i:04d}.png")  # 40x40: resized to 32
            elif i % 3 == 1:
                im.resize((32, 32)).save(d / f"{i:04d}.jpg", quality=95)
            else:
                im.resize((32, 32)).save(d / f"{i:04d}.png")
    return root


# What macOS writes as ``._name.jpg`` beside a file copied to a non-Mac disk: not an image.
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "


def hide_metadata_beside(root: Path) -> None:
    """What macOS and tools leave in a folder: ``._`` twins, .DS_Store, a hidden folder of a real image."""
    for p in sorted(root.rglob("*.*")):
        (p.parent / f"._{p.name}").write_bytes(APPLEDOUBLE)
        (p.parent / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        hidden = p.parent / ".thumbnails" / p.name
        hidden.parent.mkdir(exist_ok=True)
        shutil.copy(p, hidden)
