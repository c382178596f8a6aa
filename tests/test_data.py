"""The data sources: download + integrity check, caching, the split, mean/std, image folders, bad data, edge inputs."""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifarkit.core.errors import UserError
from cifarkit.data import datamodule as datamodule_module
from cifarkit.data.images import load_image
from cifarkit.data.sources import CIFAR10_CLASSES
from cifarkit.run.schema import check
from conftest import FAST, compose, datamodule, error_line, folder_overrides
from tiny_files import APPLEDOUBLE, CLASSES3, class_images, hide_metadata_beside, write_image_folder


def cifar(tmp_path: Path, *overrides: str):
    """The CIFAR-10 source under tmp_path/data (50 validation images unless told)."""
    return datamodule(tmp_path, ["data=cifar10", f"paths.data_dir={tmp_path / 'data'}", "data.val_size=50", *overrides])


def folder(root: Path, tmp_path: Path, *overrides: str):
    return datamodule(tmp_path, [*folder_overrides(root, tmp_path), *overrides])


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
    assert dm.classes == CIFAR10_CLASSES
    # The pixels and labels the fixture pickled (5 batches of 40, seeds 1..5; 100 test, seed 99), exactly.
    batches = [class_images(40, 10, 32, seed) for seed in range(1, 6)]
    train_x = torch.from_numpy(np.concatenate([x for x, _ in batches])).permute(0, 3, 1, 2)
    train_y = torch.from_numpy(np.concatenate([y for _, y in batches]))
    cached = torch.load(dm.cache_file, weights_only=True)
    assert torch.equal(cached["train_x"], train_x) and torch.equal(cached["train_y"], train_y)
    test_x, test_y = class_images(100, 10, 32, seed=99)
    assert torch.equal(sx, torch.from_numpy(test_x).permute(0, 3, 1, 2)) and torch.equal(sy, torch.from_numpy(test_y))
    # train + val hold every training image once, each still with its own label.
    assert pairs(torch.cat([tx, vx]), torch.cat([ty, vy])) == pairs(train_x, train_y)


def pairs(x: torch.Tensor, y: torch.Tensor) -> list[tuple[bytes, int]]:
    """(image bytes, label) of each sample, sorted: equal for two sets of the same labelled images."""
    return sorted((img.numpy().tobytes(), int(label)) for img, label in zip(x, y))


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
    other = cifar(tmp_path, "data.split_seed=7")
    other.setup()
    assert not torch.equal(other.splits["val"][0], a.splits["val"][0])


def test_mean_std_from_training_split_cached_and_overridable(tiny_cifar10: dict, tmp_path: Path, monkeypatch) -> None:
    dm = cifar(tmp_path)
    dm.setup()
    x = dm.splits["train"][0].numpy().astype(np.float64) / 255
    assert np.allclose(dm.mean, x.mean(axis=(0, 2, 3)), atol=1e-9)
    assert np.allclose(dm.std, x.transpose(1, 0, 2, 3).reshape(3, -1).std(axis=1, ddof=1), atol=1e-9)
    assert list(dm.cache_file.parent.glob("*.stats-*.json"))
    monkeypatch.setattr(
        datamodule_module, "channel_stats", lambda *_: pytest.fail("stats recomputed instead of read from cache")
    )
    again = cifar(tmp_path)
    again.setup()
    assert again.mean == pytest.approx(dm.mean)
    fixed = cifar(tmp_path, "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]")
    fixed.setup()
    assert fixed.mean == [0.5] * 3 and fixed.std == [0.25] * 3


def test_corrupt_cifar10_is_detected(tiny_cifar10: dict, tmp_path: Path) -> None:
    cifar(tmp_path).prepare_data()
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:-10] + b"0123456789")
    fresh = cifar(tmp_path, "data.download=false", f"data.cache_dir={tmp_path / 'fresh'}")
    with pytest.raises(UserError, match="missing or corrupt"):
        fresh.prepare_data()


def test_missing_cifar10_without_download(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"missing or corrupt.*data.download=true"):
        cifar(tmp_path, "data.download=false").prepare_data()


def test_download_failure_names_the_fix(tiny_cifar10: dict, tmp_path: Path, monkeypatch) -> None:
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # nothing listens there
    with pytest.raises(UserError, match=r"could not download CIFAR-10.*data.download=false"):
        cifar(tmp_path).prepare_data()


def test_image_folder_reads_png_jpeg_and_resizes(image_folder: Path, tmp_path: Path) -> None:
    dm = folder(image_folder, tmp_path, "data.val_size=0.25")
    assert dm.classes == CLASSES3
    dm.setup()
    (tx, _), (vx, _), (sx, sy) = dm.splits["train"], dm.splits["val"], dm.splits["test"]
    assert len(tx) + len(vx) == 72 and len(vx) == 18 and len(sy) == 36
    assert tx.shape[1:] == (3, 32, 32) and sx.dtype == torch.uint8
    assert set(sy.tolist()) == {0, 1, 2}
    # a 40x40 PNG is resized to 32x32 exactly as load_image does it
    png = sorted((image_folder / "test" / "cat").glob("*.png"))[0]
    assert Image.open(png).size == (40, 40)
    expected = torch.from_numpy(load_image(png, 32).copy()).permute(2, 0, 1)
    assert any(torch.equal(expected, img) for img in sx)


def test_image_folder_decodes_exact_pixels_with_labels_in_sorted_class_order(tmp_path: Path) -> None:
    """Lossless 32x32 files come back bit for bit, class by class; a class's label is its sorted rank."""
    root = tmp_path / "imgs"
    classes = ["zebra", "ant", "moth"]  # written in this order; labelled ant=0, moth=1, zebra=2
    rng = np.random.default_rng(5)
    expected: dict[str, list[tuple[Path, np.ndarray, int]]] = {"train": [], "test": []}
    for split, n in (("train", 4), ("test", 2)):
        for name in classes:
            for i in range(n):
                path = root / split / name / ("deeper" if i == 0 else "") / f"{i:02d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                if i == 1:  # a greyscale PNG comes back as three equal channels
                    img = np.repeat(img[..., :1], 3, axis=2)
                    Image.fromarray(img[..., 0]).save(path)  # mode L
                else:
                    Image.fromarray(img).save(path)
                expected[split].append((path, img, sorted(classes).index(name)))
    dm = folder(root, tmp_path, "data.val_size=3")
    assert dm.classes == ["ant", "moth", "zebra"]
    dm.prepare_data()
    cached = torch.load(dm.cache_file, weights_only=True)
    for split, items in expected.items():
        items.sort(key=lambda item: (item[2], item[0]))  # class by class, sorted paths within one
        x = torch.from_numpy(np.stack([img for _, img, _ in items])).permute(0, 3, 1, 2)
        assert torch.equal(cached[f"{split}_x"], x), split
        assert cached[f"{split}_y"].tolist() == [label for _, _, label in items], split


def test_image_folder_cache_follows_the_files(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "imgs", n_train=6, n_test=3)
    dm = folder(root, tmp_path, "data.val_size=3")
    dm.prepare_data()
    first = dm.cache_file
    Image.new("RGB", (32, 32), "red").save(root / "train" / "cat" / "new.png")
    dm2 = folder(root, tmp_path, "data.val_size=3")
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
    dm = folder(root, tmp_path, "data.val_size=1")
    with pytest.raises(UserError, match=message):
        dm.prepare_data()


def test_unknown_pipeline_and_half_stats_are_user_errors(tmp_path: Path) -> None:
    base = folder_overrides(tmp_path / "x", tmp_path)
    with pytest.raises(UserError, match="data.pipeline=gpu: must be one of device, torchvision"):
        check(compose(tmp_path, [*base, "data.pipeline=gpu"]))
    with pytest.raises(UserError, match="data.mean and data.std"):
        check(compose(tmp_path, [*base, "data.mean=[0.5,0.5,0.5]"]))


# ---------------------------------------------------------------------------------------------
# Edge inputs: camera photos, decompression bombs, macOS metadata files.


@pytest.mark.parametrize(
    "orientation,stored",
    [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)],
)
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, stored: Image.Transpose) -> None:
    """A camera stores its sensor's pixels plus a tag saying how to turn them: the image loads upright."""
    upright = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide: left half red, right half blue
    upright[:, :20] = (255, 0, 0)
    upright[:, 20:] = (0, 0, 255)
    im = Image.fromarray(upright).transpose(stored)
    exif = im.getexif()
    exif[0x0112] = orientation  # Orientation
    path = tmp_path / "photo.jpg"
    im.save(path, quality=95, exif=exif)
    out = load_image(path, 32).astype(np.float64)  # resized to 32x32 after turning
    assert np.abs(out[:, :14].mean(axis=(0, 1)) - (255, 0, 0)).max() < 25, out[:, :14].mean(axis=(0, 1))
    assert np.abs(out[:, 18:].mean(axis=(0, 1)) - (0, 0, 255)).max() < 25, out[:, 18:].mean(axis=(0, 1))


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A valid 8x8 PNG whose header (CRC fixed up) claims width x height: a bomb that costs no memory to make."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


# 30000^2 is over PIL's error limit (2 * MAX_IMAGE_PIXELS); 10000^2 only over its warning limit.
@pytest.mark.parametrize("side", [30_000, 10_000])
def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path, side: int) -> None:
    bomb = bomb_png(tmp_path / "huge.png", side, side)
    with pytest.raises(UserError, match="too large to decode safely") as e:
        load_image(bomb, 32)
    message = str(e.value)
    assert str(bomb) in message and message.endswith("remove or replace it") and "\n" not in message
    if side == 10_000:  # the warning became an error inside load_image only
        with pytest.warns(Image.DecompressionBombWarning), Image.open(bomb):
            pass


def test_decompression_bomb_in_an_image_folder_ends_train_py_in_one_line(tmp_path: Path, main) -> None:
    root = write_image_folder(tmp_path / "imgs", n_train=6, n_test=2)
    bomb = bomb_png(root / "train" / "dog" / "0100.png", 10_000, 10_000)  # 100 megapixels
    r = main("train.py", FAST + folder_overrides(root, tmp_path) + [f"paths.log_dir={tmp_path / 'logs'}"])
    assert r.code == 1
    last = error_line(r.err)
    assert last.startswith(f"error: cannot read image {bomb}: too large to decode safely"), last
    assert last.endswith("remove or replace it"), last


def test_hidden_files_in_an_image_folder_are_not_images(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / ".cache" / "imgs", n_train=2, n_test=1)  # a hidden parent is fine
    real = {
        split: [(p, label) for label, c in enumerate(CLASSES3) for p in sorted((root / split / c).iterdir())]
        for split in ("train", "test")
    }
    hide_metadata_beside(root)
    assert (root / "train" / "cat" / "._0000.png").read_bytes() == APPLEDOUBLE
    (root / "train" / ".thumbnails").mkdir()  # a hidden folder beside the classes is no class
    dm = folder(root, tmp_path, "data.val_size=1")
    assert dm.classes == CLASSES3 and dm._files() == real
    dm.setup()
    cached = torch.load(dm.cache_file, weights_only=True)
    for split, items in real.items():
        x = torch.from_numpy(np.stack([load_image(p, 32) for p, _ in items])).permute(0, 3, 1, 2)
        assert torch.equal(cached[f"{split}_x"], x) and cached[f"{split}_y"].tolist() == [label for _, label in items]
