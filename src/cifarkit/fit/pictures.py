"""Pictures every run leaves: what the model is fed, and where it goes wrong.

* ``samples.png``: the first augmented training images of the run, denormalized, with their
  class names (the tutorial's "look at your data" step), drawn once when training starts.
* ``confusion_matrix.png``: the test confusion matrix (row-normalized, with counts), drawn
  after testing.

Both go to the run directory and to the run's loggers: TensorBoard's IMAGES tab, an MLflow
run's artifacts, a W&B run's images.
Figures are built on matplotlib's Agg canvas directly (no pyplot, no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from cifarkit.core.files import atomic_write

# Class names come from folder names: drawn as they are, never read as math text ($...$) or LaTeX (a
# matplotlibrc's text.usetex), whose parsers stop the run on a name such as $\x$.
PLAIN = {"parse_math": False, "usetex": False}


def render(fig: Figure) -> np.ndarray:
    """The figure as an RGB uint8 array (H, W, 3)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def samples_figure(images: torch.Tensor, labels: torch.Tensor, classes: list[str], cols: int = 8) -> Figure:
    """A grid of images in [0, 1] (B, 3, H, W), each titled with its class name. The grid is one
    picture on one axes: an axes per image (and a tight layout over them) took seconds a run."""
    n, _, h, w = images.shape
    rows = math.ceil(n / cols)
    band, gap = max(8, h // 3), max(2, w // 16)  # room for each title above its image, between columns
    cell_h, cell_w = h + band, w + gap
    grid = np.ones((rows * cell_h, cols * cell_w, 3), dtype=np.float32)
    fig = Figure(figsize=(cols * 1.1, rows * 1.25 + 0.3), dpi=100)
    ax = fig.add_axes((0.0, 0.0, 1.0, rows * 1.25 / (rows * 1.25 + 0.3)))
    for i, (img, label) in enumerate(zip(images, labels)):
        top, left = (i // cols) * cell_h + band, (i % cols) * cell_w + gap // 2
        grid[top : top + h, left : left + w] = img.permute(1, 2, 0).numpy()
        ax.text(left + w / 2, top - 1, classes[int(label)], fontsize=7, ha="center", va="bottom", **PLAIN)
    ax.imshow(grid, interpolation="nearest", aspect="auto")
    ax.axis("off")
    fig.suptitle("augmented training images, as the model sees them", fontsize=9, y=0.995, va="top")
    return fig


COUNTS_UP_TO = 20  # classes whose cells still fit their counts
LABEL_PT = 6.0  # the tick labels' font size beyond that
MAX_SIDE_IN = 20.0  # the matrix's largest side: beyond 160 classes only every k-th class is named


def confusion_figure(counts: torch.Tensor, classes: list[str]) -> Figure:
    """Rows: true class, columns: predicted; colour = share of the row, text = count.

    Up to ``COUNTS_UP_TO`` classes each cell shows its count. Beyond, cells shrink to just fit a
    6-pt label per row (CIFAR-100's 100 classes: every class named, about 1,500 pixels a side);
    where even that would pass ``MAX_SIDE_IN``, the cells shrink further and only every k-th
    class is named, so labels never overlap.
    """
    counts = counts.cpu().to(torch.int64)
    rates = counts.float() / counts.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(classes)
    with_counts = n <= COUNTS_UP_TO
    font = 8.0 if with_counts else LABEL_PT
    label_gap = 1.5 * font / 72  # inches between two labels' baselines
    cell = 0.55 if with_counts else min(label_gap, MAX_SIDE_IN / n)
    step = math.ceil(label_gap / cell)
    labels_in = 0 if with_counts else max(map(len, classes)) * 0.6 * font / 72  # room the longest name needs
    size = max(5.0, n * cell + labels_in + 2)
    fig = Figure(figsize=(size, size), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = range(0, n, step)
    names = [classes[i] for i in ticks]
    ax.set_xticks(
        ticks,
        names,
        rotation=45 if with_counts else 90,
        ha="right" if with_counts else "center",
        fontsize=font,
        **PLAIN,
    )
    ax.set_yticks(ticks, names, fontsize=font, **PLAIN)
    ax.set_xlabel("predicted" + (f" (one class in {step} named)" if step > 1 else ""))
    ax.set_ylabel("true")
    if with_counts:
        for t in range(n):
            for p in range(n):
                colour = "white" if rates[t, p] > 0.5 else "black"
                ax.text(p, t, str(int(counts[t, p])), ha="center", va="center", fontsize=7, color=colour)
    acc = counts.diag().sum().item() / max(1, counts.sum().item())
    ax.set_title(f"test confusion matrix (accuracy {acc:.1%})", fontsize=10)
    fig.tight_layout()
    return fig


class RunPictures(L.Callback):
    """Writes ``samples.png`` at the start of training and ``confusion_matrix.png`` after testing."""

    in_budget_probe = False  # it writes the run's files rather than train: cifarkit/run/budget.py's probe leaves it out

    def __init__(self, output_dir: str, num_samples: int) -> None:
        self.output_dir = Path(output_dir)
        self.num_samples = num_samples

    def _publish(self, trainer: L.Trainer, name: str, fig: Figure) -> None:
        image = render(fig)
        path = self.output_dir / f"{name}.png"
        atomic_write(path, lambda f: Image.fromarray(image).save(f, format="PNG"))
        loggers = L.pytorch.loggers
        for logger in trainer.loggers:
            if isinstance(logger, loggers.TensorBoardLogger):
                logger.experiment.add_image(name, image, trainer.global_step, dataformats="HWC")
            elif isinstance(logger, loggers.MLFlowLogger):  # the file itself, as a run artifact
                logger.experiment.log_artifact(logger.run_id, str(path))
            elif isinstance(logger, loggers.WandbLogger):  # an image in the run's media
                logger.log_image(name, [str(path)], step=trainer.global_step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if not trainer.is_global_zero or dm is None or not hasattr(dm, "mean"):
            return
        xs, ys, n = [], [], 0
        for x, y in trainer.train_dataloader:  # the epoch's own first batches: same seed, same crops
            x = x[:, 1] if x.dim() == 5 else x  # AugMix's views: its first mix
            xs.append(x[: self.num_samples - n].detach().float().cpu())
            ys.append(y[: self.num_samples - n].cpu())
            n += len(ys[-1])
            if n >= self.num_samples:
                break
        if not xs:
            return
        mean = torch.tensor(dm.mean)[:, None, None]
        std = torch.tensor(dm.std)[:, None, None]
        images = (torch.cat(xs) * std + mean).clamp(0, 1)
        self._publish(trainer, "samples", samples_figure(images, torch.cat(ys), pl_module.hparams.classes))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metric = getattr(pl_module, "test_confusion", None)
        if metric is None or not metric.update_called:
            return
        counts = metric.compute()  # every rank: the sum over ranks is a collective
        if trainer.is_global_zero:
            self._publish(trainer, "confusion_matrix", confusion_figure(counts, pl_module.hparams.classes))
