"""The DataModules: download + integrity check, caching, the split, mean/std, image folders, bad data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES3, write_image_folder
from PIL import Image

from cifarkit import data as D
from cifarkit.errors import UserError


def cifar(tmp_path: Path, **kw) -> D.CIFAR10DataModule:
    return D.CIFAR10DataModule(data_dir=str(tmp_path / "data"), val_size=kw.pop("val_size", 50), **kw)


def test_cifar10_downloads_verifies_and_splits(tiny_cifar10: dict, tmp_path: Path) -> None:
    dm = cifar(tmp_path)
    dm.prepare_data()
    assert (tmp_path / "data" / "cifar-10-python.tar.gz").exists()
    assert (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_5").exists()
    assert dm.cache_file.exists()
    dm.setup("fit")
    (tx, ty), (vx, vy), (sx, sy) = dm.splits["train"], dm.splits["val"], dm.splits["test"]
    assert tx.shape == (150, 3, 32, 32) and tx.dtype == torch.uint8 and ty.dtype == torch.int64
    assert len(vy) == 50 and len(sy) == 100 and sx.shape[1:] == (3, 32, 32)
    assert dm.classes == D.CIFAR10_CLASSES


def test_split_is_fixed_disjoint_and_complete(tiny_cifar10: dict, tmp_path: Path) -> None:
    a, b = cifar(tmp_path), cifar(tmp_path)
    torch.manual_seed(0)
    a.setup()
    torch.manual_seed(1)  # the global seed must not move the split
    b.setup()
    assert torch.equal(a.splits["val"][0], b.splits["val"][0])
    both = torch.cat([a.splits["train"][0], a.splits["val"][0]]).flatten(1)
    full = torch.load(a.cache_file, weights_only=True)["train_x"].flatten(1)
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, full.tolist()))
    other = cifar(tmp_path, split_seed=7)
    other.setup()
    assert not torch.equal(other.splits["val"][0], a.splits["val"][0])


def test_mean_std_from_training_split_cached_and_overridable(tiny_cifar10: dict, tmp_path: Path, monkeypatch) -> None:
    dm = cifar(tmp_path)
    dm.setup()
    x = dm.splits["train"][0].numpy().astype(np.float64) / 255
    assert np.allclose(dm.mean, x.mean(axis=(0, 2, 3)), atol=1e-9)
    assert np.allclose(dm.std, x.transpose(1, 0, 2, 3).reshape(3, -1).std(axis=1, ddof=1), atol=1e-9)
    assert list(dm.cache_file.parent.glob("*.stats-*.json"))
    monkeypatch.setattr(D, "channel_stats", lambda *_: pytest.fail("stats recomputed instead of read from cache"))
    again = cifar(tmp_path)
    again.setup()
    assert again.mean == pytest.approx(dm.mean)
    fixed = cifar(tmp_path, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    fixed.setup()
    assert fixed.mean == [0.5] * 3 and fixed.std == [0.25] * 3


def test_corrupt_cifar10_is_detected(tiny_cifar10: dict, tmp_path: Path) -> None:
    cifar(tmp_path).prepare_data()
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:-10] + b"0123456789")
    fresh = D.CIFAR10DataModule(data_dir=str(tmp_path / "data"), download=False, cache_dir=str(tmp_path / "fresh"))
    with pytest.raises(UserError, match="missing or corrupt"):
        fresh.prepare_data()


def test_missing_cifar10_without_download(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"missing or corrupt.*data.download=true"):
        cifar(tmp_path, download=False).prepare_data()


def test_download_failure_names_the_fix(tiny_cifar10: dict, tmp_path: Path, monkeypatch) -> None:
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # nothing listens there
    with pytest.raises(UserError, match=r"could not download CIFAR-10.*data.download=false"):
        cifar(tmp_path).prepare_data()


def test_image_folder_reads_png_jpeg_and_resizes(image_folder: Path, tmp_path: Path) -> None:
    dm = D.ImageFolderDataModule(root=str(image_folder), cache_dir=str(tmp_path / "cache"), val_size=0.25)
    assert dm.classes == CLASSES3
    dm.setup()
    (tx, ty), (vx, _), (sx, sy) = dm.splits["train"], dm.splits["val"], dm.splits["test"]
    assert len(tx) + len(vx) == 72 and len(vx) == 18 and len(sy) == 36
    assert tx.shape[1:] == (3, 32, 32) and sx.dtype == torch.uint8
    assert set(sy.tolist()) == {0, 1, 2}
    # a 40x40 PNG is resized to 32x32 exactly as load_image does it
    png = sorted((image_folder / "test" / "cat").glob("*.png"))[0]
    assert Image.open(png).size == (40, 40)
    expected = torch.from_numpy(D.load_image(png, 32)).permute(2, 0, 1)
    assert any(torch.equal(expected, img) for img in sx)


def test_image_folder_cache_follows_the_files(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "imgs", n_train=6, n_test=3)
    dm = D.ImageFolderDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), val_size=3)
    dm.prepare_data()
    first = dm.cache_file
    Image.new("RGB", (32, 32), "red").save(root / "train" / "cat" / "new.png")
    dm2 = D.ImageFolderDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), val_size=3)
    assert dm2.cache_file != first
    dm2.setup()
    assert len(dm2.splits["train"][1]) + 3 == 19


@pytest.mark.parametrize(
    "breakage,message",
    [
        ("no_root", "does not exist"),
        ("no_images", "no PNG or JPEG images"),
        ("classes_differ", "train and test classes differ"),
        ("not_an_image", "cannot read image"),
    ],
)
def test_bad_image_folders(tmp_path: Path, breakage: str, message: str) -> None:
    root = tmp_path / "imgs"
    if breakage != "no_root":
        write_image_folder(root, n_train=3, n_test=3)
    if breakage == "no_images":
        for p in (root / "test").rglob("*.*"):
            p.unlink()
    if breakage == "classes_differ":
        shutil.move(root / "test" / "frog", root / "test" / "toad")
    if breakage == "not_an_image":
        (root / "train" / "cat" / "broken.png").write_text("not a png")
    dm = D.ImageFolderDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), val_size=1)
    with pytest.raises(UserError, match=message):
        dm.prepare_data()


def test_torchvision_pipeline_augments_train_only(image_folder: Path, tmp_path: Path) -> None:
    dm = D.ImageFolderDataModule(
        root=str(image_folder), cache_dir=str(tmp_path / "cache"), val_size=0.25, pipeline="torchvision", batch_size=16
    )
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # the same training image twice: crops/flips differ between draws
    ds = dm.train_dataloader().dataset
    draws = torch.stack([ds[0][0] for _ in range(20)])
    assert (draws != draws[0]).any(dim=(1, 2, 3)).sum() > 5
    # validation and test: normalize only, identical on every draw and equal to (x/255 - mean)/std
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        vx, _ = next(iter(loader))
        raw = loader.dataset.images[: len(vx)]
        assert torch.allclose(vx, D.normalize(raw, torch.tensor(dm.mean), torch.tensor(dm.std)), atol=1e-6)


def test_unknown_pipeline_and_half_stats_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="data.pipeline"):
        D.ImageFolderDataModule(root="x", cache_dir=str(tmp_path), pipeline="gpu")
    with pytest.raises(UserError, match="data.mean and data.std"):
        D.ImageFolderDataModule(root="x", cache_dir=str(tmp_path), mean=[0.5, 0.5, 0.5])
