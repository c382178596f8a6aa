"""The device pipeline against torchvision: same pixels, same distribution, no eval augmentation, DDP shares."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from conftest import CHI2_CRITICAL, chi_square, random_images

from cifarkit import data
from cifarkit.augment import Augment, crop_flip
from cifarkit.data import DeviceLoader, ImageFolderDataModule, normalize

MEAN = torch.tensor([0.49, 0.48, 0.45])
STD = torch.tensor([0.25, 0.24, 0.26])
ZERO, ONE = torch.zeros(3), torch.ones(3)
PAD = 4

def torchvision_reference(
    image: torch.Tensor, dy: int, dx: int, flip: bool, mean: torch.Tensor = MEAN, std: torch.Tensor = STD
) -> torch.Tensor:
    """What RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize do for one draw."""
    img = Image.fromarray(image.permute(1, 2, 0).numpy())
    img = F.crop(F.pad(img, PAD), dy, dx, 32, 32)
    if flip:
        img = F.hflip(img)
    return T.Normalize(mean.tolist(), std.tolist())(T.ToTensor()(img))


@pytest.mark.parametrize("flip", [False, True])
def test_fixed_offsets_match_torchvision_exactly(flip: bool) -> None:
    offsets = [(0, 0), (0, 8), (8, 0), (8, 8), (4, 4), (1, 7), (6, 2), (3, 5)]
    images = random_images(len(offsets))
    dy = torch.tensor([o[0] for o in offsets])
    dx = torch.tensor([o[1] for o in offsets])
    out = normalize(crop_flip(images, PAD, dy, dx, torch.full((len(offsets),), flip)), MEAN, STD)
    for i, (oy, ox) in enumerate(offsets):
        assert torch.equal(out[i], torchvision_reference(images[i], oy, ox, flip)), (oy, ox, flip)


def position_images(n: int) -> torch.Tensor:
    """Channel 0 holds row+1, channel 1 column+1, so a crop tells where it was cut (0 is padding)."""
    ar = torch.arange(1, 33, dtype=torch.uint8)
    img = torch.stack([ar[:, None].expand(32, 32), ar[None, :].expand(32, 32), torch.zeros(32, 32, dtype=torch.uint8)])
    return img.expand(n, 3, 32, 32).contiguous()


def drawn_offsets(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy, dx, flip) of each image of a batch of crops of ``position_images`` (mean 0, std 1)."""
    px = (batch * 255).round().long()
    centre_row, centre_col = px[:, 0, 16, 16] - 1, px[:, 1, 16, 16] - 1
    flip = px[:, 1, 16, 17] < px[:, 1, 16, 16]
    dy = centre_row - 16 + PAD
    dx = torch.where(flip, centre_col - 15 + PAD, centre_col - 16 + PAD)
    return dy, dx, flip


def loader(images: torch.Tensor, labels: torch.Tensor, train: bool = True, **kw) -> DeviceLoader:
    mean, std = kw.pop("mean", MEAN), kw.pop("std", STD)
    return DeviceLoader(images, labels, mean, std, kw.pop("batch_size", 64), train=train, augment=Augment(PAD, flip_p=0.5), **kw)


def test_every_offset_and_flip_occurs_uniformly() -> None:
    n = 1000
    dl = loader(position_images(n), torch.arange(n), mean=ZERO, std=ONE, seed=3)
    draws = []
    for epoch in range(4):
        dl.epoch = lambda e=epoch: e
        for x, _ in dl:
            dy, dx, flip = drawn_offsets(x)
            # The whole crop agrees with torchvision for the inferred draw (checks the inference too).
            ref = torchvision_reference(position_images(1)[0], int(dy[0]), int(dx[0]), bool(flip[0]), ZERO, ONE)
            assert torch.equal(x[0], ref)
            draws.append(torch.stack([dy, dx, flip.long()], 1))
    d = torch.cat(draws)
    assert len(d) == 4 * n
    for axis in (0, 1):
        counts = torch.bincount(d[:, axis], minlength=2 * PAD + 1)
        assert len(counts) == 2 * PAD + 1, counts  # no offset outside 0..8
        assert chi_square(counts) < CHI2_CRITICAL[8], counts
    flips = torch.bincount(d[:, 2], minlength=2)
    assert chi_square(flips) < CHI2_CRITICAL[1], flips
    # dy, dx and flip are drawn independently: the 162 combinations are equally likely too.
    joint = torch.bincount((d[:, 0] * (2 * PAD + 1) + d[:, 1]) * 2 + d[:, 2], minlength=162)
    assert len(joint) == 162 and (joint > 0).all() and chi_square(joint) < CHI2_CRITICAL[161], joint


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(
        root=str(image_folder), cache_dir=str(tmp_path_factory.mktemp("cache")), val_size=12, batch_size=8,
        eval_batch_size=5, augment={"crop": {"padding": PAD}, "flip": {"p": 0.5}},
    )
    dm.setup()
    return dm


@pytest.mark.parametrize("split", ["val", "test"])
def test_validation_and_test_are_never_augmented(datamodule: ImageFolderDataModule, split: str) -> None:
    x, y = datamodule.splits[split]
    mean, std = torch.tensor(datamodule.mean), torch.tensor(datamodule.std)
    expected = normalize(x, mean, std)
    for _ in range(2):  # and not on a second pass either
        batches = list(getattr(datamodule, f"{split}_dataloader")())
        assert torch.equal(torch.cat([b[0] for b in batches]), expected)
        assert torch.equal(torch.cat([b[1] for b in batches]), y)
    eval_tf = datamodule.pil_transform(train=False)
    for i in range(len(x)):
        assert torch.equal(eval_tf(Image.fromarray(x[i].permute(1, 2, 0).numpy())), expected[i])


def test_torchvision_pipeline_loaders_follow_the_same_rules(datamodule: ImageFolderDataModule) -> None:
    datamodule.pipeline = "torchvision"
    try:
        x, y = datamodule.splits["val"]
        val = list(datamodule.val_dataloader())
        assert torch.equal(torch.cat([b[0] for b in val]), normalize(x, torch.tensor(datamodule.mean), torch.tensor(datamodule.std)))
        train_tf = datamodule.pil_transform(train=True)
        kinds = [type(t) for t in train_tf.transforms]
        assert kinds[:2] == [T.RandomCrop, T.RandomHorizontalFlip] and train_tf.transforms[0].padding == PAD
    finally:
        datamodule.pipeline = "device"


def test_train_batches_shapes_dtypes_and_variation(datamodule: ImageFolderDataModule) -> None:
    x, y = datamodule.splits["train"]
    dl = datamodule.train_dataloader()
    batches = list(dl)
    assert len(batches) == len(dl) == -(-len(y) // 8)
    for bx, by in batches:
        assert bx.dtype == torch.float32 and by.dtype == torch.int64
        assert bx.device.type == by.device.type == "cpu"
        assert bx.shape[1:] == (3, 32, 32) and len(bx) == len(by)
    assert [len(b[1]) for b in batches] == [8] * (len(y) // 8) + ([len(y) % 8] if len(y) % 8 else [])
    # Each output, denormalized, is exactly one crop/flip of a training image, with that image's label.
    mean, std = torch.tensor(datamodule.mean)[:, None, None], torch.tensor(datamodule.std)[:, None, None]
    pixels = (torch.cat([b[0] for b in batches]) * std + mean).mul(255).round().to(torch.uint8)
    crops = crops_of(x)
    found = [crops.get(img.numpy().tobytes()) for img in pixels]
    assert None not in found  # no output is anything but a crop/flip of a stored image
    assert sorted(i for i, _ in found) == list(range(len(y)))  # every training image once per epoch
    assert [int(y[i]) for i, _ in found] == torch.cat([b[1] for b in batches]).tolist()
    # ...and augmented: the identity (centre crop, no flip) is 1 draw in 162, the flip one in 2.
    draws = [draw for _, draw in found]
    assert draws.count((PAD, PAD, False)) <= 5 and 10 <= sum(flip for *_, flip in draws) <= len(y) - 10


def crops_of(images: torch.Tensor) -> dict[bytes, tuple[int, tuple[int, int, bool]]]:
    """Every (dy, dx, flip) crop of every zero-padded image, by its bytes: (image index, draw).

    Built with plain slicing, independently of ``crop_flip``.
    """
    padded = torch.nn.functional.pad(images, (PAD,) * 4)
    h, w = images.shape[2:]
    table = {}
    for dy in range(2 * PAD + 1):
        for dx in range(2 * PAD + 1):
            crop = padded[:, :, dy : dy + h, dx : dx + w]
            for flip in (False, True):
                for i, img in enumerate(crop.flip(-1) if flip else crop):
                    table[img.contiguous().numpy().tobytes()] = (i, (dy, dx, flip))
    assert len(table) == len(images) * (2 * PAD + 1) ** 2 * 2  # all distinct, so a match is unambiguous
    return table


def test_crops_and_flips_vary_between_batches_and_epochs() -> None:
    n = 256
    dl = loader(position_images(n), torch.arange(n), mean=ZERO, std=ONE, batch_size=32)
    first_epoch = torch.cat([x for x, _ in dl])
    per_batch = [drawn_offsets(x) for x, _ in dl]
    assert len({tuple(torch.cat([dy, dx, f.long()]).tolist()) for dy, dx, f in per_batch}) == len(per_batch)
    assert all(len(torch.unique(dy)) > 3 and len(torch.unique(dx)) > 3 and 0 < f.sum() < 32 for dy, dx, f in per_batch)
    dl.epoch = lambda: 1
    assert not torch.equal(torch.cat([x for x, _ in dl]), first_epoch)


def test_preparing_batches_in_chunks_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    dl = loader(random_images(100), torch.arange(100), batch_size=8, seed=1)
    whole = list(dl)
    monkeypatch.setattr(data, "CHUNK_IMAGES", 20)  # chunks of 16 images: batches never straddle one
    chunked = list(dl)
    assert [len(b[1]) for b in chunked] == [8] * 12 + [4]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole, chunked, strict=True))


def labels_of(dl: DeviceLoader, epoch: int) -> tuple[list[int], torch.Tensor]:
    """The sample ids one rank sees in ``epoch`` (labels are ids), and all its images."""
    dl.epoch = lambda: epoch
    batches = list(dl)
    return torch.cat([b[1] for b in batches]).tolist(), torch.cat([b[0] for b in batches])


@pytest.mark.parametrize("n", [64, 61])
def test_ddp_ranks_split_each_epoch_disjointly_and_completely(n: int) -> None:
    images = random_images(n)
    ids = torch.arange(n)

    def rank(r: int, world: int = 2, seed: int = 7) -> DeviceLoader:
        return loader(images, ids, batch_size=8, seed=seed, rank=r, world_size=world)

    perms = []
    dropped = set()
    for epoch in range(4):
        (a, xa), (b, xb) = labels_of(rank(0), epoch), labels_of(rank(1), epoch)
        assert len(rank(0)) == len(rank(1))  # same number of steps, or DDP would hang
        assert len(a) == len(b) == n // 2
        assert not set(a) & set(b)
        usable = n // 2 * 2
        single, _ = labels_of(rank(0, world=1), epoch)
        # Interleaved, the two shares are the single-process epoch's permutation (its usable part).
        assert [i for pair in zip(a, b) for i in pair] == single[:usable]
        assert len(set(a) | set(b)) == usable
        dropped |= set(range(n)) - set(a) - set(b)
        perms.append(single)
        # Same (seed, epoch) reproduces the epoch exactly, crops and flips included.
        again, xa2 = labels_of(rank(0), epoch)
        assert again == a and torch.equal(xa, xa2)
        assert not torch.equal(xa, xb[: len(xa)])  # ranks draw their own augmentation
    assert len({tuple(p) for p in perms}) == len(perms)  # every epoch reshuffles
    if n % 2:
        assert len(dropped) > 1  # the left-over sample changes from epoch to epoch
    other_seed, _ = labels_of(rank(0, seed=8), 0)
    assert other_seed != labels_of(rank(0), 0)[0]
