"""Batches for the model: the device pipeline (``DeviceLoader``) and the tutorial's per-sample one.

* ``DeviceLoader`` (``data.pipeline=device``, the default): the whole uint8 split sits on the
  training device; each batch is gathered from a seeded permutation, augmented
  (cifarkit/data/augment.py) and normalized there with a handful of batched tensor ops. No worker
  processes, no PIL.
* ``PILDataset`` + ``pil_transform`` (``data.pipeline=torchvision``): the tutorial's per-sample
  PIL transforms in a ``DataLoader``, for comparison and for custom PIL transforms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from cifarkit.data.augment import Augment, mixed_seed
from cifarkit.data.images import normalize

Batch = tuple[torch.Tensor, torch.Tensor]
CHUNK_IMAGES = 4096  # DeviceLoader prepares this many images at a time (50 MB as float32)


class DeviceLoader:
    """Iterates batches of a uint8 dataset held on the training device.

    For training, each epoch draws a permutation and the augmentation's choices from generators
    seeded by (seed, epoch), so every DDP rank draws the same permutation and takes its own
    strided, equal-sized share. Everything random is drawn once per epoch on the CPU and
    moved in one copy, so the loop itself never syncs the host with the device.

    Its state (``state_dict``, saved by Lightning in every checkpoint) is the seed, the epoch
    and how many of the epoch's batches the trainer has consumed (``position``), which is all
    it takes to redraw the epoch and continue after them: a run resumed mid-epoch sees exactly
    the batches of one that was never stopped. With ``fixed_order`` (Lightning's
    ``overfit_batches``) every epoch repeats epoch 0's batches.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        batch_size: int,
        train: bool,
        seed: int = 0,
        augment: Augment = Augment(),  # noqa: B008  a frozen dataclass: one shared default is safe
        epoch: Callable[[], int] = lambda: 0,
        position: Callable[[], int] = lambda: 0,
        fixed_order: bool = False,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.mean, self.std = mean.to(self.device), std.to(self.device)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.augment = augment
        self.epoch, self.position, self.fixed_order = epoch, position, fixed_order
        self.rank, self.world_size = rank, world_size
        self.resume_at: tuple[int, int] = (-1, 0)  # (epoch, batches already consumed) from a checkpoint

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch(), "batches": self.position()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])
        self.resume_at = (int(state["epoch"]), int(state["batches"]))

    def _per_rank(self) -> int:
        n = len(self.labels)
        return n // self.world_size if self.train else len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        return -(-self._per_rank() // self.batch_size)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for ``epoch``, in order (on the CPU)."""
        n = len(self.labels)
        if not self.train:  # every sample once over all ranks: synced metrics equal one process's
            return torch.arange(self.rank, n, self.world_size)
        g = torch.Generator().manual_seed(mixed_seed(self.seed, epoch))
        perm = torch.randperm(n, generator=g)
        usable = (n // self.world_size) * self.world_size  # equal shares; the remainder rotates
        return perm[self.rank : usable : self.world_size]

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch()
        draw = 0 if self.fixed_order else epoch
        idx = self.epoch_indices(draw)
        if self.train:
            g = torch.Generator().manual_seed(mixed_seed(self.seed, draw) * 1_009 + self.rank + 1)
            draws = self.augment.draw(idx, len(self.labels), tuple(self.images.shape[-2:]), draw, self.seed, g)
            if self.resume_at[0] == epoch:  # the same draws, minus the batches trained before the stop
                skip = self.resume_at[1] * self.batch_size
                idx, draws = idx[skip:], {k: v[skip:] for k, v in draws.items()}
            draws = {k: v.to(self.device, non_blocking=True) for k, v in draws.items()}
        idx = idx.to(self.device, non_blocking=True)
        # Whole chunks of batches are gathered, augmented and normalized at once, then sliced:
        # a handful of large tensor ops per few thousand images instead of six tiny ones per step.
        per_chunk = max(1, CHUNK_IMAGES // self.batch_size) * self.batch_size
        for c0 in range(0, len(idx), per_chunk):
            sl = slice(c0, c0 + per_chunk)
            x, y = self.images[idx[sl]], self.labels[idx[sl]]
            if self.train and self.augment:
                chunk = {k: v[sl] for k, v in draws.items()}
                x = self.augment.apply(x, chunk)
                if self.augment.augmix[0]:  # floats in [0, 1], maybe with views (B, V, C, H, W): the clean one first
                    x = (self.augment.views(x, chunk) - self.mean[:, None, None]) / self.std[:, None, None]
                    self.augment.erase(x if x.dim() == 4 else x[:, 0], chunk)
                else:
                    x = self.augment.erase(normalize(x, self.mean, self.std), chunk)
            else:
                x = normalize(x, self.mean, self.std)
            for b0 in range(0, len(y), self.batch_size):
                yield x[b0 : b0 + self.batch_size], y[b0 : b0 + self.batch_size]


class PILDataset(Dataset):
    """The tutorial's per-sample path: each item becomes a PIL image and runs ``transform``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = Image.fromarray(self.images[i].permute(1, 2, 0).numpy())
        return self.transform(img), int(self.labels[i])


def pil_transform(
    augment: Augment, image_size: int, mean: Sequence[float], std: Sequence[float], train: bool
) -> T.Compose:
    """The per-sample torchvision transforms of the same augmentation steps (training) and normalization."""
    steps = augment.pil_steps(image_size) if train else []
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])
