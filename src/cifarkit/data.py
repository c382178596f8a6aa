"""The data pipeline: from files on disk to normalized, augmented batches.

A batch's path: the images are decoded once into a uint8 tensor (N, 3, H, W) and cached on
disk (``prepare_data``); ``setup`` splits train/val with a fixed seed and computes the
per-channel mean/std of the training split. Then one of two pipelines feeds the model:

* ``device`` (default): the whole uint8 tensor is moved to the training device and each batch
  is gathered from a seeded permutation, augmented (``cifarkit/augment.py``) and normalized
  there with a handful of batched tensor ops. No worker processes, no PIL.
* ``torchvision``: the tutorial's per-sample PIL transforms in a ``DataLoader``, for comparison
  and for custom PIL transforms.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from cifarkit.augment import TUTORIAL_STEPS, Augment
from cifarkit.files import atomic_write
from cifarkit.errors import UserError
from cifarkit.images import load_image, normalize

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
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
        augment: Augment = Augment(),
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
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=g)
        usable = (n // self.world_size) * self.world_size  # equal shares; the remainder rotates
        return perm[self.rank : usable : self.world_size]

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch()
        draw = 0 if self.fixed_order else epoch
        idx = self.epoch_indices(draw)
        if self.train:
            g = torch.Generator().manual_seed((self.seed * 100_003 + draw) * 1_009 + self.rank + 1)
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
                x = self.augment.erase(normalize(self.augment.apply(x, chunk), self.mean, self.std), chunk)
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


# ---------------------------------------------------------------------------------------------
# The DataModules.


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1], in float64 chunks."""
    s = torch.zeros(3, dtype=torch.float64)
    s2 = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].to(torch.float64).div_(255)
        s += x.sum(dim=(0, 2, 3))
        s2 += x.square().sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = s / n
    std = ((s2 - n * mean.square()) / (n - 1)).sqrt()
    return mean.tolist(), std.tolist()


class ImageDataModule(L.LightningDataModule):
    """Shared pipeline of every data source; a subclass only says how to decode its files."""

    def __init__(
        self,
        cache_dir: str,
        image_size: int = 32,
        val_size: int | float = 5000,
        split_seed: int = 42,
        batch_size: int = 32,
        eval_batch_size: int = 500,
        pipeline: str = "device",
        augment: dict | None = None,
        normalize: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if pipeline not in ("device", "torchvision"):
            raise UserError(f"unknown data.pipeline={pipeline!r}; use data.pipeline=device or data.pipeline=torchvision")
        if (mean is None) != (std is None):
            raise UserError("set both data.mean and data.std, or neither (then they are computed)")
        augment = dict(TUTORIAL_STEPS if augment is None else augment)  # the tutorial's steps unless told
        self.augment = Augment.from_steps(augment)
        if self.augment.padding_mode == "reflect" and self.augment.padding >= image_size:
            raise UserError(f"data.augment.crop.padding={self.augment.padding} must be below the image size ({image_size}) to reflect")
        mean, std = (list(mean), list(std)) if mean is not None else (None, None)
        self.save_hyperparameters()  # plain values: TensorBoard's HPARAMS tab and the checkpoint show them
        self.cache_dir = Path(cache_dir)
        self.image_size, self.val_size, self.split_seed = image_size, val_size, split_seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.pipeline, self.num_workers, self.pin_memory = pipeline, num_workers, pin_memory
        self.do_normalize = normalize
        self._fixed_stats = (mean, std) if mean is not None else None
        self.mean: list[float] = [0.0, 0.0, 0.0]
        self.std: list[float] = [1.0, 1.0, 1.0]
        self.seed = 0
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- what a source provides --------------------------------------------------------------

    @property
    def classes(self) -> list[str]:
        raise NotImplementedError

    def _source_key(self) -> str:
        """A string that changes whenever the decoded tensors would."""
        raise NotImplementedError

    def _decode(self) -> dict[str, torch.Tensor]:
        """Read the source into {'train_x', 'train_y', 'test_x', 'test_y'} (uint8 NCHW, int64)."""
        raise NotImplementedError

    # -- caching -----------------------------------------------------------------------------

    @cached_property
    def cache_file(self) -> Path:
        key = hashlib.sha1(self._source_key().encode()).hexdigest()[:12]
        return self.cache_dir / f"{type(self).__name__.lower()}-{key}.pt"

    def prepare_data(self) -> None:
        """Decode once and cache the uint8 tensors (rank 0 only; the others wait)."""
        if not self.cache_file.exists():
            data = self._decode()
            atomic_write(self.cache_file, lambda f: torch.save(data, f))

    def _load_cache(self) -> dict[str, torch.Tensor]:
        try:
            return torch.load(self.cache_file, weights_only=True)
        except Exception as e:  # a truncated or foreign file: rebuild rather than fail later
            raise UserError(f"the dataset cache {self.cache_file} is unreadable ({e.__class__.__name__}); delete it and run again") from e

    # -- split, statistics, loaders ----------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.prepare_data()  # no-op when cached; covers direct use outside a Trainer
        data = self._load_cache()
        x, y = data["train_x"], data["train_y"]
        n_val = int(round(self.val_size * len(y))) if isinstance(self.val_size, float) else int(self.val_size)
        if not 0 <= n_val < len(y):
            raise UserError(f"data.val_size={self.val_size} leaves no training images out of {len(y)}; lower it")
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.split_seed))
        tr, va = perm[n_val:], perm[:n_val]
        self.splits = {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": (data["test_x"], data["test_y"])}
        self.mean, self.std = self._stats(self.splits["train"][0])
        # Every rank seeds the same way (Lightning's seed_everything), so they share one permutation.
        self.seed = torch.initial_seed() % (2**31)

    def _stats(self, train_x: torch.Tensor) -> tuple[list[float], list[float]]:
        if not self.do_normalize:
            return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
        if self._fixed_stats:
            return self._fixed_stats
        stats_file = self.cache_file.with_suffix(f".stats-{self.split_seed}-{self.val_size}.json")
        if stats_file.exists():
            stats = json.loads(stats_file.read_text())
            return stats["mean"], stats["std"]
        mean, std = channel_stats(train_x)
        atomic_write(stats_file, lambda f: f.write(json.dumps({"mean": mean, "std": std}).encode()))
        return mean, std

    def describe(self) -> dict[str, Any]:
        """What a checkpoint needs to preprocess new images without the dataset."""
        return {"classes": self.classes, "mean": self.mean, "std": self.std, "image_size": self.image_size}

    def _loader(self, split: str) -> DeviceLoader | DataLoader:
        x, y = self.splits[split]
        train = split == "train"
        batch = self.batch_size if train else self.eval_batch_size
        if self.pipeline == "device":
            trainer = self.trainer
            if trainer is None:  # used outside a Trainer
                return DeviceLoader(x, y, torch.tensor(self.mean), torch.tensor(self.std), batch, train=train,
                                    seed=self.seed, augment=self.augment)
            return DeviceLoader(
                x, y, torch.tensor(self.mean), torch.tensor(self.std), batch, train=train, seed=self.seed,
                augment=self.augment, epoch=lambda: trainer.current_epoch, position=lambda: trainer.fit_loop.epoch_loop.batch_progress.current.processed,
                fixed_order=bool(trainer.overfit_batches), rank=trainer.global_rank, world_size=trainer.world_size,
                device=trainer.strategy.root_device,
            )
        return DataLoader(
            PILDataset(x, y, self.pil_transform(train)), batch_size=batch, shuffle=train,
            num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
        )

    def pil_transform(self, train: bool) -> T.Compose:
        """The per-sample torchvision transforms, built from the same options as the device path."""
        steps = self.augment.pil_steps(self.image_size) if train else []
        return T.Compose([*steps, T.ToTensor(), T.Normalize(self.mean, self.std)])

    def train_dataloader(self) -> DeviceLoader | DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DeviceLoader | DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DeviceLoader | DataLoader:
        return self._loader("test")


class CIFAR10DataModule(ImageDataModule):
    """The official CIFAR-10 files, downloaded and MD5-checked by torchvision."""

    def __init__(
        self, data_dir: str, download: bool = True, cache_dir: str | None = None, image_size: int = 32, **kwargs: Any
    ) -> None:
        if image_size != 32:
            raise UserError(f"CIFAR-10 images are 32x32, not data.image_size={image_size}; use data=image_folder to resize")
        super().__init__(cache_dir=cache_dir or str(Path(data_dir) / "cache"), image_size=32, **kwargs)
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
    """Your own images: ``root/train/<class>/*`` and ``root/test/<class>/*`` (PNG or JPEG)."""

    def __init__(self, root: str, cache_dir: str, image_size: int = 32, **kwargs: Any) -> None:
        super().__init__(cache_dir=cache_dir, image_size=image_size, **kwargs)
        self.root = Path(root)

    def _class_dirs(self, split: str) -> list[str]:
        d = self.root / split
        if not d.is_dir():
            raise UserError(f"image folder {d} does not exist; set data.root to a folder with train/<class>/ and test/<class>/")
        return sorted(p.name for p in d.iterdir() if p.is_dir())

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
        """Each split's (image, label) pairs, class by class, in sorted path order.

        Hidden files and folders are skipped: macOS writes an AppleDouble ``._name.jpg`` beside
        every file it copies to a foreign disk, and those (like ``.git``) are not images.
        """
        files: dict[str, list[tuple[Path, int]]] = {}
        for split in ("train", "test"):
            files[split] = []
            for label, name in enumerate(self.classes):
                class_dir = self.root / split / name
                files[split] += [
                    (p, label)
                    for p in sorted(class_dir.rglob("*"))
                    if p.suffix.lower() in IMAGE_SUFFIXES
                    and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
                ]
            if not files[split]:
                raise UserError(f"no PNG or JPEG images under {self.root / split}; add images to its class folders")
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
