"""The DataModule every data source shares: decode once and cache, split, mean/std, loaders.

A batch's path: a source (cifarkit/data/sources.py) decodes its files once into uint8 tensors
(N, 3, H, W), cached on disk (``prepare_data``); ``setup`` holds out the validation split
with a fixed seed and computes the per-channel mean/std of the training split; the loaders
(cifarkit/data/loader.py) then augment and normalize batches of it. ``classes`` keeps some of the
source's classes (labels renumbered in that order) and ``train_per_class`` a seeded, stratified
number of training images per class: transfer to little data, taken from the same cache. Every
option comes from configs/data/ (``common/pipeline.yaml`` holds their defaults and says what each does),
held to its type and bounds by cifarkit/run/schema.py before this module sees it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from cifarkit.core.errors import UserError
from cifarkit.core.files import atomic_write
from cifarkit.core.untrusted import read_json_object
from cifarkit.core.untrusted.tensors import read_image_cache
from cifarkit.data.augment import Augment
from cifarkit.data.images import DataInfo, normalize
from cifarkit.data.loader import DeviceLoader, PILDataset, pil_transform

log = logging.getLogger(__name__)


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


def _stats_ok(values: object, low: float) -> bool:
    """Whether a cached mean or std is three finite numbers in [``low``, 1], as images in [0, 1] give."""
    return (
        isinstance(values, list)
        and len(values) == 3
        and all(isinstance(v, (int, float)) and math.isfinite(v) and low <= v <= 1 for v in values)
    )


class ImageDataModule(L.LightningDataModule):
    """The shared pipeline; a source subclass says what its classes are and how to decode its files."""

    def __init__(
        self,
        *,
        cache_dir: str,
        classes: Sequence[str] | None,
        train_per_class: int | None,
        image_size: int,
        val_size: int | float,
        split_seed: int,
        folds: int | None,
        fold: int,
        batch_size: int,
        eval_batch_size: int,
        pipeline: str,
        augment: dict,
        normalize: bool,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        num_workers: int,
        pin_memory: bool,
    ) -> None:
        super().__init__()
        self.augment = Augment.from_steps(augment)
        mean, std = (list(mean), list(std)) if mean is not None else (None, None)
        # Plain values: TensorBoard's HPARAMS tab and the checkpoint show them. Not ``classes``: the
        # classifier's hparams hold the classes learnt, and Lightning refuses one key with two values.
        self.save_hyperparameters(ignore=["classes"])
        self.cache_dir = Path(cache_dir)
        self.class_subset = list(classes) if classes is not None else None
        self.train_per_class = train_per_class
        self.image_size, self.val_size, self.split_seed = image_size, val_size, split_seed
        self.folds, self.fold = folds, fold
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
    def source_classes(self) -> list[str]:
        """Every class of the source, in its label order."""
        raise NotImplementedError

    def _source_key(self) -> str:
        """A string that changes whenever the decoded tensors would."""
        raise NotImplementedError

    def _decode(self) -> dict[str, torch.Tensor]:
        """Read the source into {'train_x', 'train_y', 'test_x', 'test_y'} (uint8 NCHW, int64)."""
        raise NotImplementedError

    @property
    def classes(self) -> list[str]:
        """The classes this run learns, in label order: the source's, or ``data.classes`` of them."""
        if self.class_subset is None:
            return self.source_classes
        unknown = [c for c in self.class_subset if c not in self.source_classes]
        if unknown:
            raise UserError(
                f"data.classes names {', '.join(map(repr, unknown))}, not a class of this data; "
                f"pick from {', '.join(self.source_classes)}"
            )
        return self.class_subset

    # -- caching -----------------------------------------------------------------------------

    @cached_property
    def cache_file(self) -> Path:
        key = hashlib.sha1(self._source_key().encode()).hexdigest()[:12]
        return self.cache_dir / f"{type(self).__name__.lower()}-{key}.pt"

    def prepare_data(self) -> None:
        """Decode once and cache the uint8 tensors (rank 0 only; the others wait)."""
        if not self.cache_file.exists():
            self._write_cache()

    def _write_cache(self) -> dict[str, torch.Tensor]:
        data = self._decode()
        atomic_write(self.cache_file, lambda f: torch.save(data, f))
        return data

    def _load_cache(self) -> dict[str, torch.Tensor]:
        """The cache as the trust layer reads it; one that is cut short, foreign or out of its bounds (labels
        outside the classes...) is decoded again rather than trained on."""
        try:
            return read_image_cache(self.cache_file, len(self.source_classes))
        except UserError as e:
            log.warning("%s", e)
            return self._write_cache()

    # -- split, statistics -------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.prepare_data()  # no-op when cached; covers direct use outside a Trainer
        data = self._load_cache()
        x, y = self._keep_classes(data["train_x"], data["train_y"])
        if self.folds is not None:
            tr, va = self._fold(y)
        else:
            n_val = int(round(self.val_size * len(y))) if isinstance(self.val_size, float) else int(self.val_size)
            if not 0 <= n_val < len(y):
                raise UserError(f"data.val_size={self.val_size} leaves no training images out of {len(y)}; lower it")
            perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.split_seed))
            tr, va = perm[n_val:], perm[:n_val]
        if self.train_per_class is not None:
            tr = self._per_class(tr, y)
        self.splits = {
            "train": (x[tr], y[tr]),
            "val": (x[va], y[va]),
            "test": self._keep_classes(data["test_x"], data["test_y"]),
        }
        self.mean, self.std = self._stats(self.splits["train"][0])
        # Every rank seeds the same way (Lightning's seed_everything), so they share one permutation.
        self.seed = torch.initial_seed() % (2**31)

    def folds_of(self, y: torch.Tensor) -> torch.Tensor:
        """Each training image's fold (``data.folds`` of them): stratified (every class dealt out in turn, so
        each fold holds each class's share within one image) and drawn with the split's seed, so the folds
        of one seed are the same in every run and partition the training set."""
        if not 2 <= self.folds <= len(y):
            raise UserError(f"data.folds={self.folds} needs 2 to {len(y)} folds for {len(y)} training images")
        generator = torch.Generator().manual_seed(self.split_seed)
        fold_of = torch.empty(len(y), dtype=torch.int64)
        dealt = 0  # the next class starts where the last stopped: fold sizes differ by one image at most
        for label in y.unique(sorted=True):
            members = (y == label).nonzero().flatten()
            members = members[torch.randperm(len(members), generator=generator)]
            fold_of[members] = (torch.arange(len(members)) + dealt) % self.folds
            dealt += len(members)
        return fold_of

    def _fold(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(training, validation) indices of ``data.fold``: it validates, the other folds train."""
        fold_of = self.folds_of(y)
        return (fold_of != self.fold).nonzero().flatten(), (fold_of == self.fold).nonzero().flatten()

    def _keep_classes(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The images of ``data.classes`` only, their labels renumbered in its order (all when null)."""
        if self.class_subset is None:
            return x, y
        source = self.source_classes
        new_label = torch.full((len(source),), -1, dtype=torch.int64)
        new_label[[source.index(c) for c in self.classes]] = torch.arange(len(self.classes))
        keep = new_label[y] >= 0
        return x[keep], new_label[y[keep]]

    def _per_class(self, train: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``train_per_class`` of the training indices ``train`` per class, drawn with the split's seed."""
        n = self.train_per_class
        drawn = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(self.split_seed + 1))]
        kept = []
        for label, name in enumerate(self.classes):
            of_class = drawn[y[drawn] == label]
            if len(of_class) < n:
                raise UserError(
                    f"data.train_per_class={n}, but class {name!r} has {len(of_class)} training images "
                    "after the validation split; lower it (or data.val_size)"
                )
            kept.append(of_class[:n])
        return torch.cat(kept).sort().values

    def _stats(self, train_x: torch.Tensor) -> tuple[list[float], list[float]]:
        if not self.do_normalize:
            return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
        if self._fixed_stats:
            return self._fixed_stats
        subset = ""  # another training split: its own statistics
        if self.class_subset is not None or self.train_per_class is not None or self.folds is not None:
            which = [self.class_subset, self.train_per_class] + ([self.folds, self.fold] if self.folds else [])
            subset = "-" + hashlib.sha1(json.dumps(which).encode()).hexdigest()[:8]
        stats_file = self.cache_file.with_suffix(f".stats-{self.split_seed}-{self.val_size}{subset}.json")
        stats = read_json_object(stats_file)
        if stats is not None and _stats_ok(stats.get("mean"), 0.0) and _stats_ok(stats.get("std"), 1e-6):
            return stats["mean"], stats["std"]
        mean, std = channel_stats(train_x)
        atomic_write(stats_file, lambda f: f.write(json.dumps({"mean": mean, "std": std}).encode()))
        return mean, std

    def normalize_as(self, mean: list[float], std: list[float]) -> bool:
        """Normalize with a start's ``mean``/``std`` (a pretrained net's, another run's) instead of
        the training split's own; not when data.mean/std are given or data.normalize is false."""
        if self._fixed_stats or not self.do_normalize:
            return False
        self.mean, self.std = list(mean), list(std)
        return True

    def data_info(self) -> DataInfo:
        """How this data's images are prepared: what a checkpoint needs to classify new images."""
        return DataInfo(self.classes, self.mean, self.std, self.image_size)

    def sample_train_images(self, n: int) -> torch.Tensor:
        """``n`` normalized training images drawn with a fixed seed, for a net that starts from
        statistics of its data (AirbenchNet's whitening)."""
        images, _ = self.splits["train"]
        sample = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:n]]
        return normalize(sample, torch.tensor(self.mean), torch.tensor(self.std))

    # -- loaders -----------------------------------------------------------------------------

    def _loader(self, split: str) -> DeviceLoader | DataLoader:
        x, y = self.splits[split]
        train = split == "train"
        batch = self.batch_size if train else self.eval_batch_size
        mean, std = torch.tensor(self.mean), torch.tensor(self.std)
        if self.pipeline == "torchvision":
            return DataLoader(
                PILDataset(x, y, pil_transform(self.augment, self.image_size, self.mean, self.std, train)),
                batch_size=batch,
                shuffle=train,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                persistent_workers=self.num_workers > 0,
            )
        trainer = self.trainer
        if trainer is None:  # used outside a Trainer
            return DeviceLoader(x, y, mean, std, batch, train=train, seed=self.seed, augment=self.augment)
        return DeviceLoader(
            x,
            y,
            mean,
            std,
            batch,
            train=train,
            seed=self.seed,
            augment=self.augment,
            epoch=lambda: trainer.current_epoch,
            position=lambda: trainer.fit_loop.epoch_loop.batch_progress.current.processed,
            fixed_order=bool(trainer.overfit_batches),
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            device=trainer.strategy.root_device,
        )

    def train_dataloader(self) -> DeviceLoader | DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DeviceLoader | DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DeviceLoader | DataLoader:
        return self._loader("test")
