"""Full-size CIFAR-10-shaped data with random pixels, held in memory: the benchmark's data when none is prepared.

Speed does not depend on the pixel values (dense convolutions, no data-dependent work; JPEG
decoding happens once, before any timing), so random 3x32x32 uint8 images and 10 classes time
the same code as the real set. The class is a ``CIFAR10DataModule`` that never reads, downloads
or caches anything, so both bench.py and a ``train.py`` child can use it through the config:

    python train.py data=cifar10 data._target_=synthetic_data.SyntheticCIFAR10  # benchmarks/ on PYTHONPATH
"""

from __future__ import annotations

from typing import Any

import torch

from cifarkit.data.datamodule import channel_stats
from cifarkit.data.sources import CIFAR10_CLASSES, CIFAR10DataModule


class SyntheticCIFAR10(CIFAR10DataModule):
    """CIFAR-10's shape, split sizes and classes; random uint8 pixels and labels from a fixed seed."""

    def __init__(
        self, data_dir: str, train_images: int = 50_000, test_images: int = 10_000, pixel_seed: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(data_dir=data_dir, **kwargs)
        self.train_images, self.test_images, self.pixel_seed = train_images, test_images, pixel_seed

    def prepare_data(self) -> None:
        """Nothing to download or decode: the images are drawn in ``setup``."""

    def _load_cache(self) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.pixel_seed)
        out = {}
        for split, n in (("train", self.train_images), ("test", self.test_images)):
            out[f"{split}_x"] = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
            out[f"{split}_y"] = torch.randint(0, len(CIFAR10_CLASSES), (n,), generator=g)
        return out

    def _stats(self, train_x: torch.Tensor) -> tuple[list[float], list[float]]:
        if self.do_normalize and not self._fixed_stats:
            return channel_stats(train_x)  # computed, not cached: there is no file to key a cache on
        return super()._stats(train_x)
