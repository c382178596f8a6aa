"""The augmentation steps of cifarkit/augment.py: pixels against torchvision, distributions, YAML checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as F

from conftest import CHI2_CRITICAL, chi_square, random_images

from cifarkit.augment import Augment, crop_flip
from cifarkit.data import DeviceLoader, ImageFolderDataModule
from cifarkit.errors import UserError

PAD = 2
ZERO, ONE = torch.zeros(3), torch.ones(3)


def torchvision_reflect(image: torch.Tensor, dy: int, dx: int, flip: bool) -> torch.Tensor:
    """RandomCrop(32, padding=2, padding_mode='reflect') + RandomHorizontalFlip, for one draw."""
    img = Image.fromarray(image.permute(1, 2, 0).numpy())
    img = F.crop(F.pad(img, PAD, padding_mode="reflect"), dy, dx, 32, 32)
    if flip:
        img = F.hflip(img)
    return F.pil_to_tensor(img)


@pytest.mark.parametrize("flip", [False, True])
def test_reflect_crop_matches_torchvision_exactly(flip: bool) -> None:
    offsets = [(dy, dx) for dy in range(2 * PAD + 1) for dx in range(2 * PAD + 1)]
    images = random_images(len(offsets), seed=1)
    dy, dx = torch.tensor([o[0] for o in offsets]), torch.tensor([o[1] for o in offsets])
    out = crop_flip(images, PAD, dy, dx, torch.full((len(offsets),), flip), mode="reflect")
    for i, (oy, ox) in enumerate(offsets):
        assert torch.equal(out[i], torchvision_reflect(images[i], oy, ox, flip)), (oy, ox, flip)


def loader(images: torch.Tensor, augment: Augment, **kw) -> DeviceLoader:
    return DeviceLoader(images, torch.arange(len(images)), ZERO, ONE, kw.pop("batch_size", 50), train=True, augment=augment, **kw)


def epochs_of(dl: DeviceLoader, epochs: range) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each epoch's (images, labels), concatenated over its batches."""
    out = []
    for epoch in epochs:
        dl.epoch = lambda e=epoch: e
        batches = list(dl)
        out.append((torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])))
    return out


def test_reflect_crops_are_torchvision_crops_with_uniform_offsets() -> None:
    """Every training image is one of torchvision's 50 reflect crops of its source, and the
    offsets and flips are drawn uniformly and independently, as RandomCrop's are."""
    n = 300
    images = random_images(n, seed=2)
    draws = [(dy, dx, flip) for dy in range(2 * PAD + 1) for dx in range(2 * PAD + 1) for flip in (False, True)]
    crops = {(i, torchvision_reflect(images[i], *d).numpy().tobytes()): k for i in range(n) for k, d in enumerate(draws)}
    found = []
    for x, y in epochs_of(loader(images, Augment(PAD, "reflect", flip_p=0.5), seed=5), range(2)):
        for img, label in zip((x * 255).round().to(torch.uint8), y):
            found.append(crops[(int(label), img.numpy().tobytes())])  # a KeyError: not a torchvision crop
    joint = torch.bincount(torch.tensor(found), minlength=50)
    assert len(joint) == 50 and chi_square(joint) < CHI2_CRITICAL[49], joint


def column_images(n: int) -> torch.Tensor:
    """Channel 0 holds column + 1: the left-most pixel tells whether an image was mirrored."""
    ar = torch.arange(1, 33, dtype=torch.uint8)
    return ar[None, None, None, :].expand(n, 3, 32, 32).contiguous()


def is_flipped(x: torch.Tensor) -> torch.Tensor:
    return (x[:, 0, 0, 0] * 255).round() == 32


def test_alternating_flip_shows_each_image_both_ways_every_two_epochs() -> None:
    n = 400
    by_epoch = []
    for x, y in epochs_of(loader(column_images(n), Augment(alternating_flip=True), seed=9), range(4)):
        flipped = torch.zeros(n, dtype=torch.bool)
        flipped[y] = is_flipped(x)
        by_epoch.append(flipped)
    assert torch.equal(by_epoch[1], ~by_epoch[0]) and torch.equal(by_epoch[2], by_epoch[0]) and torch.equal(by_epoch[3], ~by_epoch[0])
    # Epoch 0's orientation is a fair coin per image, as RandomHorizontalFlip(0.5)'s is.
    assert chi_square(torch.bincount(by_epoch[0].long(), minlength=2)) < CHI2_CRITICAL[1]
    # Every DDP rank, and any batch size, agrees on it: it belongs to the image, not the batch.
    for rank in (0, 1):
        dl = loader(column_images(n), Augment(alternating_flip=True), seed=9, rank=rank, world_size=2, batch_size=7)
        (x, y), = epochs_of(dl, range(1))
        assert torch.equal(is_flipped(x), by_epoch[0][y])


def cut_square(centre_y: int, centre_x: int, size: int, h: int = 32, w: int = 32) -> torch.Tensor:
    """The (H, W) mask of cutout's square around one pixel, clipped at the border, by slicing."""
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[max(0, centre_y - size // 2) : centre_y - size // 2 + size, max(0, centre_x - size // 2) : centre_x - size // 2 + size] = True
    return mask


def test_cutout_cuts_one_clipped_square_around_a_uniform_pixel() -> None:
    n, size = 2000, 8
    white = torch.full((n, 3, 32, 32), 255, dtype=torch.uint8)
    centres = []
    for x, _ in epochs_of(loader(white, Augment(cutout=size), seed=4), range(2)):
        for img in x:
            cut = img[0] == 0
            assert torch.equal(img == 0, cut.expand(3, 32, 32)) and ((img == 0) | (img == 1)).all()
            rows, cols = cut.any(1).nonzero().flatten(), cut.any(0).nonzero().flatten()
            # The centre, recovered from the square's edge that the border did not clip.
            cy = int(rows[-1]) + 1 - size // 2 if rows[-1] < 31 or rows[0] == 0 else int(rows[0]) + size // 2
            cx = int(cols[-1]) + 1 - size // 2 if cols[-1] < 31 or cols[0] == 0 else int(cols[0]) + size // 2
            assert torch.equal(cut, cut_square(cy, cx, size)), (cy, cx)
            centres.append((cy, cx))
    c = torch.tensor(centres)
    for axis in (0, 1):
        counts = torch.bincount(c[:, axis], minlength=32)
        assert len(counts) == 32 and chi_square(counts) < CHI2_CRITICAL[31], counts


def test_steps_combine_and_a_resumed_epoch_continues_the_same_draws() -> None:
    augment = Augment(PAD, "reflect", alternating_flip=True, cutout=6)
    images = random_images(120, seed=3)
    whole = list(loader(images, augment, seed=2, batch_size=16, epoch=lambda: 3))
    resumed = loader(images, augment, seed=2, batch_size=16, epoch=lambda: 3)
    resumed.load_state_dict({"seed": 2, "epoch": 3, "batches": 4})
    tail = list(resumed)
    assert len(tail) == len(whole) - 4
    for (a, ya), (b, yb) in zip(whole[4:], tail):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(whole[0][0], list(loader(images, augment, seed=2, batch_size=16, epoch=lambda: 4))[0][0])


@pytest.mark.parametrize(
    "steps, expected",
    [
        ({"crop_padding": 4}, "data.augment.crop_padding is not an augmentation step"),
        ({"crop": {"pad": 4}}, "data.augment.crop has no option pad"),
        ({"crop": {"padding": 2, "mode": "edge"}}, "use zeros or reflect"),
        ({"flip": {"p": 0.5}, "alternating_flip": {}}, "both flip and alternating_flip"),
        ({"flip": 0.5}, "give its options as a mapping"),
        ({"cutout": {"size": -1}}, "must be >= 0"),
    ],
)
def test_bad_steps_are_named(steps: dict, expected: str) -> None:
    with pytest.raises(UserError, match=expected):
        Augment.from_steps(steps)


def test_datamodule_steps(image_folder: Path, tmp_path: Path) -> None:
    def dm(augment: dict | None, **kw) -> ImageFolderDataModule:
        return ImageFolderDataModule(root=str(image_folder), cache_dir=str(tmp_path), val_size=0, augment=augment, **kw)

    assert dm(None).augment == Augment(4, "zeros", flip_p=0.5)  # the tutorial's by default
    assert dm({"crop": {}, "cutout": {}}).augment == Augment(4, cutout=16)  # options left out: the documented values
    assert dm({"crop": {"padding": 2, "mode": "reflect"}, "flip": None, "alternating_flip": {}}).augment == Augment(2, "reflect", alternating_flip=True)
    plain = dm({})
    plain.setup()
    x, _ = plain.splits["train"]
    batches = list(plain.train_dataloader())
    assert sorted(torch.cat([b[0] for b in batches]).sum(dim=(1, 2, 3)).tolist()) == pytest.approx(
        sorted(((x / 255 - torch.tensor(plain.mean)[:, None, None]) / torch.tensor(plain.std)[:, None, None]).sum(dim=(1, 2, 3)).tolist()), rel=1e-5
    )  # no step: every training image once, unchanged but normalized
    with pytest.raises(UserError, match="below the image size"):
        dm({"crop": {"padding": 32, "mode": "reflect"}})
    with pytest.raises(UserError, match="device pipeline only"):
        dm({"cutout": {"size": 8}}, pipeline="torchvision").pil_transform(train=True)
