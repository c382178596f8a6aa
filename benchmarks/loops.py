"""The training loops bench.py times against each other, and the host's cost of one step.

* ``tutorial_loop``: the tutorial's loop (benchmarks/tutorial.py's recipe): fp32, Adam, per-sample PIL transforms.
* ``raw_loop``: plain PyTorch with everything train.py's default path uses (net, optimizer,
  precision, memory format, DeviceLoader batches).
* ``lightning_window``: train.py's default path itself (``build()``, its callbacks and logger).
* ``host_overhead``: the same paths with ``NearZeroNet``, whose compute is a few microseconds,
  so a step's time is what the host does around it: the loader, Lightning's loop and hooks, the
  classifier's training metrics, the project's callbacks, and Lightning's own callbacks and logger.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from cifarkit.data.datamodule import ImageDataModule
from cifarkit.data.loader import CHUNK_IMAGES, DeviceLoader, PILDataset, pil_transform
from cifarkit.fit import bf16_copy
from cifarkit.fit.allocator import keep_freed_memory
from cifarkit.fit.classifier import ImageClassifier, compiled
from cifarkit.nets.models import BasicCNN
from cifarkit.run.train import build

# The dtype the default path's matrix work runs in, per Lightning precision (anything else: fp32).
COMPUTE_DTYPE = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(steps: Iterator[Any], device: torch.device, warm: int, n: int) -> float:
    """Seconds per item of ``steps`` after ``warm`` untimed ones."""
    for _ in range(warm):
        next(steps)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        next(steps)
    sync(device)
    return (time.perf_counter() - t0) / n


def forever(make: Callable[[], Any]) -> Iterator[Any]:
    while True:
        yield from make()


def train_loader(dm: ImageDataModule, device: torch.device, batch_size: int) -> DeviceLoader:
    """The device pipeline's training batches, as the datamodule makes them for one process."""
    x, y = dm.splits["train"]
    return DeviceLoader(
        x,
        y,
        torch.tensor(dm.mean),
        torch.tensor(dm.std),
        batch_size,
        train=True,
        seed=dm.seed,
        augment=dm.augment,
        device=device,
    )


def epoch_images_per_s(loader: DeviceLoader, device: torch.device) -> float:
    """A whole epoch of the device pipeline: permutation, draws and every batch."""
    sync(device)
    t0 = time.perf_counter()
    n = sum(len(y) for _, y in loader)
    sync(device)
    return n / (time.perf_counter() - t0)


def tutorial_loop(dm: ImageDataModule, device: torch.device, batch_size: int = 32) -> Iterator[None]:
    """The tutorial's loop (benchmarks/tutorial.py's recipe): fp32, Adam(1e-3), per-sample PIL transforms,
    batch 32 unless told."""
    x, y = dm.splits["train"]
    transform = pil_transform(dm.augment, dm.image_size, dm.mean, dm.std, train=True)
    loader = DataLoader(PILDataset(x, y, transform), batch_size=batch_size, shuffle=True, num_workers=0)
    step = tutorial_step(len(dm.classes), device)
    for xb, yb in forever(lambda: loader):
        for _, phase in step(xb.to(device), yb.to(device)):
            phase()
        yield


Phases = list[tuple[str, Callable[[], Any]]]


def raw_step(
    cfg: DictConfig, device: torch.device, precision: str, classes: int, net: nn.Module | None = None
) -> Callable[[torch.Tensor, torch.Tensor], Phases]:
    """One step of plain PyTorch with everything the default path uses (net: the config's unless
    given; optimizer, precision, memory format), as named phases on a batch: forward and loss,
    backward, optimizer step (so that a step can be counted phase by phase)."""
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    net = (net or instantiate(cfg.model.net, num_classes=classes)).to(device, memory_format=fmt)
    forward = compiled(net, cfg.model.compile)
    optim = instantiate(cfg.model.optimizer)(params=net.parameters())
    half = COMPUTE_DTYPE.get(precision)
    if (
        cfg.model.get("bf16_weight_copy")
        and half is torch.bfloat16
        and device.type == "cpu"
        and bf16_copy.unsupported(net, optim, bool(cfg.model.compile)) is None
    ):
        keeper = optim = bf16_copy.keeping(net, optim)
        forward = lambda x: functional_call(net, keeper.synced(), (x,))  # noqa: E731 - the copies, as the classifier
    scaler = torch.amp.GradScaler(device.type, enabled=half is torch.float16)
    loss_fn = nn.CrossEntropyLoss()

    def phases(xb: torch.Tensor, yb: torch.Tensor) -> Phases:
        loss: list[torch.Tensor] = []

        def forward_and_loss() -> None:
            with torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None):
                loss.append(loss_fn(forward(xb.contiguous(memory_format=fmt)), yb))

        def backward() -> None:
            optim.zero_grad(set_to_none=True)
            scaler.scale(loss[0]).backward()

        def optimizer_step() -> None:
            scaler.step(optim)
            scaler.update()

        return [("forward", forward_and_loss), ("backward", backward), ("optimizer", optimizer_step)]

    return phases


def tutorial_step(classes: int, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], Phases]:
    """The tutorial loop's step (fp32, Adam(1e-3), BasicCNN) as named phases on a batch."""
    model = BasicCNN(classes).to(device)
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def phases(xb: torch.Tensor, yb: torch.Tensor) -> Phases:
        loss: list[torch.Tensor] = []

        def backward() -> None:
            optim.zero_grad()
            loss[0].backward()

        return [
            ("forward", lambda: loss.append(loss_fn(model(xb), yb))),
            ("backward", backward),
            ("optimizer", optim.step),
        ]

    return phases


def raw_loop(
    cfg: DictConfig, dm: ImageDataModule, device: torch.device, precision: str, net: nn.Module | None = None
) -> Iterator[None]:
    """Plain PyTorch with everything the default path uses (``raw_step``), on DeviceLoader batches."""
    step = raw_step(cfg, device, precision, len(dm.classes), net)
    loader = train_loader(dm, device, cfg.data.batch_size)
    for xb, yb in forever(lambda: loader):
        for _, phase in step(xb, yb):
            phase()
        yield


def allocator_as(cfg: DictConfig | None, device: torch.device) -> None:
    """The CPU allocator's setting a contender runs with: the config's ``model.reuse_memory``, or
    (``cfg`` None: the tutorial's loop, today's path) glibc's thresholds at their ceiling."""
    if device.type == "cpu":
        keep_freed_memory(bool(cfg is not None and cfg.model.get("reuse_memory")))


class StepTimes(L.Callback):
    """The time at the end of two training steps; the device is synced there alone, so the steps
    between queue their work as they do in train.py (a sync per step would stall a GPU)."""

    def __init__(self, first: int, last: int) -> None:
        self.at: dict[int, float] = {first: 0.0, last: 0.0}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx in self.at:
            sync(pl_module.device)
            self.at[batch_idx] = time.perf_counter()


def lightning_window(
    cfg: DictConfig,
    dm: ImageDataModule,
    model: L.LightningModule,
    warm: int,
    n: int,
    keep: Callable[[L.Callback], bool] | None = None,
    with_loggers: bool = True,
) -> float:
    """Seconds per step of train.py's default path (a fresh Trainer from build(), the given model
    and data); ``keep`` filters its callbacks, ``with_loggers`` keeps its logger."""
    with open_dict(cfg):
        cfg.trainer.limit_train_batches = warm + n
    _, trainer = build(cfg, with_loggers=with_loggers)
    if keep is not None:
        trainer.callbacks = [c for c in trainer.callbacks if keep(c)]
    timer = StepTimes(warm - 1, warm + n - 1)
    trainer.callbacks.append(timer)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer.fit(model, datamodule=dm)
    if not all(timer.at.values()):
        raise RuntimeError(
            f"the timed window (steps {warm} to {warm + n}) does not fit in an epoch of "
            f"{trainer.num_training_batches} steps"
        )
    return (timer.at[warm + n - 1] - timer.at[warm - 1]) / n


# -- the host's cost of a step ----------------------------------------------------------------


class NearZeroNet(nn.Module):
    """Each image's mean colour through one linear layer: a few microseconds of compute per batch."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class LossOnly(ImageClassifier):
    """The classifier without its training metrics: what Lightning's loop costs around a bare step."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch)[0]

    def on_train_epoch_end(self) -> None:
        pass


def _project(callback: L.Callback) -> bool:
    return type(callback).__module__.startswith("cifarkit.")


def host_overhead(
    cfg: DictConfig, dm: ImageDataModule, device: torch.device, precision: str, rounds: int, chunks: int
) -> dict[str, Any]:
    """Microseconds per training step with ``NearZeroNet``: the raw loop, the default path, and
    the default path taken apart (each part the difference between two runs, medians of ``rounds``).
    Every window is ``chunks`` whole chunks of the DeviceLoader's batches, after one chunk of
    warm-up, so that each holds its share of the loader's chunk preparation."""
    classes = len(dm.classes)
    warm = max(1, CHUNK_IMAGES // cfg.data.batch_size)
    steps = chunks * warm
    epoch = len(dm.splits["train"][1]) // cfg.data.batch_size
    if warm + steps > epoch:  # a small dataset (bench.py --tiny): what one epoch holds
        warm, steps = min(5, epoch // 2), max(1, epoch - min(5, epoch // 2))

    def model(kind: type[ImageClassifier]) -> ImageClassifier:
        m = instantiate(cfg.model, classes=dm.classes, _target_=f"{kind.__module__}.{kind.__qualname__}")
        m.net = NearZeroNet(classes)
        m.__dict__["_forward"] = m.net  # as ImageClassifier keeps its (maybe compiled) forward
        return m

    runs: dict[str, list[float]] = {}
    for _ in range(rounds):
        loader = forever(lambda: train_loader(dm, device, cfg.data.batch_size))
        runs.setdefault("loader", []).append(timed(loader, device, warm, steps))
        runs.setdefault("raw_loop", []).append(
            timed(raw_loop(cfg, dm, device, precision, NearZeroNet(classes)), device, warm, steps)
        )
        variants = {
            "bare_loop": (model(LossOnly), lambda c: False, False),
            "training_metrics": (model(ImageClassifier), lambda c: False, False),
            "project_callbacks": (model(ImageClassifier), _project, False),
            "default_path": (model(ImageClassifier), None, True),
        }
        for name, (m, keep, with_loggers) in variants.items():
            runs.setdefault(name, []).append(
                lightning_window(cfg, dm, m, warm, steps, keep=keep, with_loggers=with_loggers)
            )
    us = {k: statistics.median(v) * 1e6 for k, v in runs.items()}
    return {
        "raw_loop": round(us["raw_loop"], 1),
        "default_path": round(us["default_path"], 1),
        "breakdown": {  # what each layer adds per step
            "loader": round(us["loader"], 1),
            "loop_and_hooks": round(us["bare_loop"] - us["raw_loop"], 1),
            "training_metrics": round(us["training_metrics"] - us["bare_loop"], 1),
            "project_callbacks": round(us["project_callbacks"] - us["training_metrics"], 1),
            "lightning_callbacks_and_logger": round(us["default_path"] - us["project_callbacks"], 1),
        },
        "steps": steps,
        "rounds": rounds,
    }
