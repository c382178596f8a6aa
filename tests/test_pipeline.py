"""From uint8 images to training batches: the augmentation steps against torchvision (pixels and
distributions), what the loaders give each split and each DDP rank, and the test-time views."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from cifarkit.core.errors import UserError
from cifarkit.data import loader as loader_module
from cifarkit.data.augment import Augment, crop_flip, tta_logits
from cifarkit.data.images import normalize
from cifarkit.data.loader import DeviceLoader
from cifarkit.run.schema import check
from conftest import CHI2_CRITICAL, chi_square, compose, datamodule, device_loader, folder_overrides, random_images

MODES = {"zeros": ("constant", 4), "reflect": ("reflect", 2)}  # ours -> torchvision's padding_mode, a padding to test


def torchvision_crop(image: torch.Tensor, padding: int, mode: str, dy: int, dx: int, flip: bool) -> torch.Tensor:
    """RandomCrop(32, padding, padding_mode) + RandomHorizontalFlip on a PIL image, for one draw."""
    img = F.crop(
        F.pad(Image.fromarray(image.permute(1, 2, 0).numpy()), padding, padding_mode=MODES[mode][0]), dy, dx, 32, 32
    )
    return F.pil_to_tensor(F.hflip(img) if flip else img)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_crop_flip_matches_torchvision_exactly(mode: str, flip: bool) -> None:
    padding = MODES[mode][1]
    offsets = [(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)]
    images = random_images(len(offsets), seed=1)
    dy, dx = torch.tensor([o[0] for o in offsets]), torch.tensor([o[1] for o in offsets])
    out = crop_flip(images, padding, dy, dx, torch.full((len(offsets),), flip), mode=mode)
    for i, (oy, ox) in enumerate(offsets):
        assert torch.equal(out[i], torchvision_crop(images[i], padding, mode, oy, ox, flip)), (oy, ox, flip)


def crops_by_bytes(images: torch.Tensor, padding: int, mode: str) -> dict[bytes, int]:
    """Every (dy, dx, flip) crop of every image, by its bytes -> (image, draw) as one number.
    Built by slicing a padded copy, independently of ``crop_flip``."""
    padded = torch.nn.functional.pad(
        images.float(), (padding,) * 4, mode="constant" if mode == "zeros" else "reflect"
    ).to(torch.uint8)
    side, table = 2 * padding + 1, {}
    for dy in range(side):
        for dx in range(side):
            crop = padded[:, :, dy : dy + 32, dx : dx + 32]
            for flip in (0, 1):
                for i, img in enumerate(crop.flip(-1) if flip else crop):
                    table[img.contiguous().numpy().tobytes()] = i * 2 * side * side + (dy * side + dx) * 2 + flip
    assert len(table) == len(images) * side * side * 2  # all distinct, so a match is unambiguous
    return table


@pytest.mark.parametrize("mode", MODES)
def test_loader_crops_are_crops_of_their_image_drawn_uniformly(mode: str) -> None:
    """Every training output is one crop/flip of its own image (labels are image ids), every image
    comes once per epoch, each epoch draws anew, and offsets and flips are uniform and independent."""
    n, padding = 300, 2
    images = random_images(n, seed=2)
    table, cells = crops_by_bytes(images, padding, mode), 2 * (2 * padding + 1) ** 2
    dl = device_loader(images, augment=Augment(padding, mode, flip_p=0.5), seed=5)
    draws, epochs = [], []
    for epoch in range(2):
        dl.epoch = lambda e=epoch: e
        x, y = (torch.cat(t) for t in zip(*dl))
        epochs.append(x)
        found = torch.tensor(
            [table[img.numpy().tobytes()] for img in (x * 255).round().to(torch.uint8)]
        )  # KeyError: no crop
        assert torch.equal(found // cells, y) and sorted(y.tolist()) == list(range(n))
        draws.append(found % cells)
    assert not torch.equal(epochs[0], epochs[1])
    joint = torch.bincount(torch.cat(draws), minlength=cells)
    assert len(joint) == cells and chi_square(joint) < CHI2_CRITICAL[cells - 1], joint


def column_images(n: int) -> torch.Tensor:
    """Channel 0 holds column + 1: the left-most pixel tells whether an image was mirrored."""
    ar = torch.arange(1, 33, dtype=torch.uint8)
    return ar[None, None, None, :].expand(n, 3, 32, 32).contiguous()


def epoch_batches(dl: DeviceLoader, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch's (images, labels), concatenated over its batches."""
    dl.epoch = lambda: epoch
    x, y = zip(*dl)
    return torch.cat(x), torch.cat(y)


def test_alternating_flip_shows_each_image_both_ways_every_two_epochs() -> None:
    n = 400

    def flipped(dl: DeviceLoader, epoch: int) -> torch.Tensor:
        x, y = epoch_batches(dl, epoch)
        out = torch.zeros(n, dtype=torch.bool)
        out[y] = (x[:, 0, 0, 0] * 255).round() == 32
        return out

    dl = device_loader(column_images(n), augment=Augment(alternating_flip=True), seed=9)
    by_epoch = [flipped(dl, e) for e in range(4)]
    assert (
        torch.equal(by_epoch[1], ~by_epoch[0])
        and torch.equal(by_epoch[2], by_epoch[0])
        and torch.equal(by_epoch[3], ~by_epoch[0])
    )
    # Epoch 0's orientation is a fair coin per image, as RandomHorizontalFlip(0.5)'s is.
    assert chi_square(torch.bincount(by_epoch[0].long(), minlength=2)) < CHI2_CRITICAL[1]
    # Every DDP rank, and any batch size, agrees on it: it belongs to the image, not the batch.
    for rank in (0, 1):
        dl = device_loader(
            column_images(n), augment=Augment(alternating_flip=True), seed=9, rank=rank, world_size=2, batch_size=7
        )
        x, y = epoch_batches(dl, 0)
        assert torch.equal((x[:, 0, 0, 0] * 255).round() == 32, by_epoch[0][y])


def test_cutout_cuts_one_clipped_square_around_a_uniform_pixel() -> None:
    n, size = 2000, 8
    dl = device_loader(torch.full((n, 3, 32, 32), 255, dtype=torch.uint8), augment=Augment(cutout=size), seed=4)
    centres = []
    for epoch in range(2):
        for img in epoch_batches(dl, epoch)[0]:
            cut = img[0] == 0
            assert torch.equal(img == 0, cut.expand(3, 32, 32)) and ((img == 0) | (img == 1)).all()
            rows, cols = cut.any(1).nonzero().flatten(), cut.any(0).nonzero().flatten()
            # The centre, recovered from the square's edge that the border did not clip.
            cy = int(rows[-1]) + 1 - size // 2 if rows[-1] < 31 or rows[0] == 0 else int(rows[0]) + size // 2
            cx = int(cols[-1]) + 1 - size // 2 if cols[-1] < 31 or cols[0] == 0 else int(cols[0]) + size // 2
            square = torch.zeros(32, 32, dtype=torch.bool)  # the reference square, by slicing
            square[max(0, cy - size // 2) : cy - size // 2 + size, max(0, cx - size // 2) : cx - size // 2 + size] = (
                True
            )
            assert torch.equal(cut, square), (cy, cx)
            centres.append((cy, cx))
    c = torch.tensor(centres)
    for axis in (0, 1):
        counts = torch.bincount(c[:, axis], minlength=32)
        assert len(counts) == 32 and chi_square(counts) < CHI2_CRITICAL[31], counts


def test_a_resumed_epoch_continues_the_same_draws() -> None:
    augment = Augment(2, "reflect", alternating_flip=True, cutout=6)
    images = random_images(120, seed=3)
    whole = list(device_loader(images, augment=augment, seed=2, batch_size=16, epoch=lambda: 3))
    resumed = device_loader(images, augment=augment, seed=2, batch_size=16, epoch=lambda: 3)
    resumed.load_state_dict({"seed": 2, "epoch": 3, "batches": 4})
    tail = list(resumed)
    assert len(tail) == len(whole) - 4
    for (a, ya), (b, yb) in zip(whole[4:], tail):
        assert torch.equal(a, b) and torch.equal(ya, yb)


def test_preparing_batches_in_chunks_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    dl = device_loader(random_images(100), batch_size=8, seed=1, augment=Augment(4, flip_p=0.5))
    whole = list(dl)
    monkeypatch.setattr(loader_module, "CHUNK_IMAGES", 20)  # chunks of 16 images: batches never straddle one
    chunked = list(dl)
    assert [len(b[1]) for b in chunked] == [8] * 12 + [4]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole, chunked, strict=True))


@pytest.mark.parametrize("n", [64, 61])
def test_ddp_ranks_split_each_epoch_disjointly_and_completely(n: int) -> None:
    images = random_images(n)

    def rank(r: int, world: int = 2, seed: int = 7, train: bool = True) -> DeviceLoader:
        return device_loader(
            images, batch_size=8, seed=seed, rank=r, world_size=world, train=train, augment=Augment(4, flip_p=0.5)
        )

    dropped, perms = set(), []
    for epoch in range(4):
        (xa, a), (xb, b) = epoch_batches(rank(0), epoch), epoch_batches(rank(1), epoch)
        a, b = a.tolist(), b.tolist()
        assert len(rank(0)) == len(rank(1)) and len(a) == len(b) == n // 2  # same steps, or DDP would hang
        single = epoch_batches(rank(0, world=1), epoch)[1].tolist()
        # Interleaved, the two shares are the single-process epoch's permutation (its usable part).
        assert [i for pair in zip(a, b) for i in pair] == single[: n // 2 * 2]
        dropped |= set(range(n)) - set(a) - set(b)
        perms.append(single)
        again, xa2 = epoch_batches(rank(0), epoch)[1].tolist(), epoch_batches(rank(0), epoch)[0]
        assert again == a and torch.equal(xa, xa2)  # (seed, epoch) reproduces the epoch, augmentation included
        assert not torch.equal(xa, xb[: len(xa)])  # ranks draw their own augmentation
    assert len({tuple(p) for p in perms}) == len(perms)  # every epoch reshuffles
    assert len(dropped) > 1 if n % 2 else not dropped  # the left-over sample changes from epoch to epoch
    assert epoch_batches(rank(0, seed=8), 0)[1].tolist() != epoch_batches(rank(0), 0)[1].tolist()
    # Evaluation: every image exactly once over the ranks, in shares one batch apart at most.
    e0, e1 = (epoch_batches(rank(r, train=False), 0)[1].tolist() for r in (0, 1))
    assert sorted(e0 + e1) == list(range(n)) and abs(len(e0) - len(e1)) <= 1


@pytest.mark.parametrize(
    "steps, expected",
    [
        ({"crop_padding": 4}, "data.augment.crop_padding is not an option; data.augment takes crop, flip,"),
        ({"crop": {"pad": 4, "mode": "zeros"}}, "data.augment.crop.pad is not an option; data.augment.crop takes"),
        ({"crop": {"padding": 4}}, "data.augment.crop.mode is not set; pass data.augment.crop.mode=... (one of zeros"),
        ({"crop": {"padding": 2, "mode": "edge"}}, "data.augment.crop.mode=edge: must be one of zeros, reflect"),
        ({"flip": {"p": 0.5}, "alternating_flip": {}}, "both flip and alternating_flip"),
        ({"flip": 0.5}, "data.augment.flip=0.5: must be a mapping with p, or null"),
        ({"cutout": {"size": -1}}, "data.augment.cutout.size=-1: must be an integer of at least 0"),
    ],
)
def test_bad_steps_are_named(steps: dict, expected: str, tmp_path: Path) -> None:
    cfg = compose(tmp_path, [])
    with open_dict(cfg):
        cfg.data.augment = steps
    with pytest.raises(UserError, match=re.escape(expected)):
        check(cfg)


# ---------------------------------------------------------------------------------------------
# The DataModule's loaders.


@pytest.fixture(scope="module")
def folder_dm(tmp_path_factory: pytest.TempPathFactory, image_folder: Path):
    tmp = tmp_path_factory.mktemp("dm")
    dm = datamodule(tmp, folder_overrides(image_folder, tmp) + ["data.batch_size=8", "data.eval_batch_size=5"])
    dm.setup()
    return dm


@pytest.mark.parametrize("pipeline", ["device", "torchvision"])
@pytest.mark.parametrize("split", ["val", "test"])
def test_validation_and_test_are_never_augmented(folder_dm, split: str, pipeline: str, monkeypatch) -> None:
    monkeypatch.setattr(folder_dm, "pipeline", pipeline)
    x, y = folder_dm.splits[split]
    expected = normalize(x, torch.tensor(folder_dm.mean), torch.tensor(folder_dm.std))
    for _ in range(2):  # and not on a second pass either
        batches = list(getattr(folder_dm, f"{split}_dataloader")())
        assert torch.equal(torch.cat([b[0] for b in batches]), expected)
        assert torch.equal(torch.cat([b[1] for b in batches]), y)


def test_training_batches_of_both_pipelines(folder_dm, monkeypatch) -> None:
    """The device pipeline: whole batches of float images with int64 labels, the last one short;
    the torchvision pipeline runs the same steps per sample, and draws anew for each item."""
    x, y = folder_dm.splits["train"]
    batches = list(folder_dm.train_dataloader())
    assert [len(b[1]) for b in batches] == [8] * (len(y) // 8) + ([len(y) % 8] if len(y) % 8 else [])
    assert all(
        bx.dtype == torch.float32 and by.dtype == torch.int64 and bx.shape[1:] == (3, 32, 32) for bx, by in batches
    )
    monkeypatch.setattr(folder_dm, "pipeline", "torchvision")
    train_tf = folder_dm.train_dataloader().dataset.transform
    assert [type(t) for t in train_tf.transforms[:2]] == [T.RandomCrop, T.RandomHorizontalFlip] and train_tf.transforms[
        0
    ].padding == 4
    ds = folder_dm.train_dataloader().dataset
    draws = torch.stack([ds[0][0] for _ in range(20)])
    assert (draws != draws[0]).any(dim=(1, 2, 3)).sum() > 5


def test_no_steps_is_every_image_once_normalized(tmp_path: Path, image_folder: Path) -> None:
    dm = datamodule(
        tmp_path,
        folder_overrides(image_folder, tmp_path)
        + ["data.val_size=0", "data.augment.crop=null", "data.augment.flip=null"],
    )
    dm.setup()
    x, _ = dm.splits["train"]
    out = torch.cat([b[0] for b in dm.train_dataloader()])
    expected = normalize(x, torch.tensor(dm.mean), torch.tensor(dm.std))
    assert sorted(out.sum(dim=(1, 2, 3)).tolist()) == pytest.approx(
        sorted(expected.sum(dim=(1, 2, 3)).tolist()), rel=1e-5
    )


def test_steps_that_cannot_run_are_refused(tmp_path: Path, image_folder: Path) -> None:
    base = folder_overrides(image_folder, tmp_path)
    with pytest.raises(UserError, match=r"data.augment.crop.padding=32 must be below data.image_size \(32\)"):
        check(compose(tmp_path, base + ["data.augment.crop.padding=32", "data.augment.crop.mode=reflect"]))
    with pytest.raises(UserError, match="device pipeline only"):
        check(compose(tmp_path, base + ["data.pipeline=torchvision", "+data.augment.cutout={size: 8}"]))


# ---------------------------------------------------------------------------------------------
# Test-time augmentation.


def test_tta_views_and_weights() -> None:
    """A 'net' that reports the top-left pixel of channel 0: every view moves it somewhere else."""
    x = torch.arange(16.0).view(1, 1, 4, 4)  # x[r, c] = 4r + c

    def corner(v: torch.Tensor) -> torch.Tensor:
        return v[:, 0, 0, 0:1]

    assert tta_logits(corner, x, "none").item() == 0
    assert tta_logits(corner, x, "flip").item() == pytest.approx(0.5 * (0 + 3))
    # shifted up-left by reflect padding: top-left is x[1, 1] = 5, its mirror x[1, 2] = 6;
    # shifted down-right: top-left x[1, 1] = 5, its mirror x[1, 2] = 6
    expected = 0.5 * 1.5 + 0.5 * (0.5 * (0.5 * (5 + 6)) + 0.5 * (0.5 * (5 + 6)))
    assert tta_logits(corner, x, "flip_translate").item() == pytest.approx(expected)
