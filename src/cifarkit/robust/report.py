"""The corruption benchmark of a trained net: accuracy and calibration on the clean test images and on each
corruption x severity, summarised as RobustBench and Hendrycks & Dietterich do, written as metrics, a CSV
and two pictures (also to the run's loggers)."""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torchmetrics.classification import MulticlassCalibrationError

from cifarkit.core.errors import UserError
from cifarkit.core.files import atomic_write
from cifarkit.data.images import normalize
from cifarkit.fit.pictures import render
from cifarkit.robust.cache import cached_set, digest
from cifarkit.robust.corruptions import CORRUPTIONS, GENERATOR, SEVERITIES

log = logging.getLogger(__name__)
PREFIX = "robustness"
CSV_NAME, HEATMAP, EXAMPLES = "robustness.csv", "robustness_heatmap", "robustness_examples"


@dataclass(frozen=True)
class Options:
    """``robustness.*`` (configs/robustness/cifar10c.yaml): which sets, how many test images, the seed."""

    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    images: int | None
    seed: int
    batch_size: int

    @classmethod
    def of(cls, cfg: Any) -> Options:
        """The options of a config, each corruption and severity checked (one line naming the choices)."""
        names = tuple(cfg.corruptions)
        for name in names:
            if name not in CORRUPTIONS:
                raise UserError(
                    f"robustness.corruptions holds {name!r}, not a corruption of CIFAR-10-C; choose among "
                    f"{', '.join(CORRUPTIONS)}"
                )
        severities = tuple(int(s) for s in cfg.severities)
        for s in severities:
            if s not in SEVERITIES:
                raise UserError(f"robustness.severities holds {s}; choose among 1, 2, 3, 4, 5")
        if not names or not severities:
            raise UserError("robustness.corruptions and robustness.severities need at least one each; list some")
        return cls(names, severities, cfg.images, int(cfg.seed), int(cfg.batch_size))


def pick_images(n_total: int, n: int | None, seed: int) -> torch.Tensor:
    """The test images evaluated: all, or ``n`` drawn with ``seed`` (kept in split order)."""
    if n is None or n >= n_total:
        return torch.arange(n_total)
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def score(
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch: int,
    context: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[float, float]:
    """Accuracy and expected calibration error (torchmetrics, 15 bins, L1) of ``forward`` on uint8 images."""
    m, s = torch.tensor(mean, device=device), torch.tensor(std, device=device)
    n_classes, correct = None, 0
    probs = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = normalize(images[i : i + batch].to(device), m, s)
            with context():
                logits = forward(x)
            p = logits.float().softmax(1).cpu()
            n_classes = p.shape[1]
            correct += int((p.argmax(1) == labels[i : i + batch]).sum())
            probs.append(p)
    ece = MulticlassCalibrationError(n_classes, n_bins=15, norm="l1")
    return correct / len(images), float(ece(torch.cat(probs), labels))


def summarise(clean: tuple[float, float], grid: dict[tuple[str, int], tuple[float, float]]) -> dict[str, float]:
    """metrics.json's robustness figures from the clean (accuracy, ECE) and each set's: per set, per
    corruption (mean over its severities), the mean corrupted accuracy (RobustBench's: over every set),
    the unnormalized mean corruption error (the mean over corruptions of each one's mean error over its
    severities) and relative robustness (mean corrupted accuracy over clean accuracy)."""
    out = {f"{PREFIX}/clean/acc": clean[0], f"{PREFIX}/clean/ece": clean[1]}
    names = list(dict.fromkeys(name for name, _ in grid))
    errors = []
    for name in names:
        cells = [v for (n, _), v in grid.items() if n == name]
        for (n, s), (acc, ece) in grid.items():
            if n == name:
                out[f"{PREFIX}/{name}/{s}/acc"], out[f"{PREFIX}/{name}/{s}/ece"] = acc, ece
        out[f"{PREFIX}/{name}/acc"] = float(np.mean([a for a, _ in cells]))
        out[f"{PREFIX}/{name}/ece"] = float(np.mean([e for _, e in cells]))
        errors.append(1 - out[f"{PREFIX}/{name}/acc"])
    mca = float(np.mean([a for a, _ in grid.values()]))
    out[f"{PREFIX}/mean_corrupted_acc"] = mca
    out[f"{PREFIX}/mean_corrupted_ece"] = float(np.mean([e for _, e in grid.values()]))
    out[f"{PREFIX}/mce_unnormalized"] = float(np.mean(errors))
    out[f"{PREFIX}/relative"] = mca / clean[0] if clean[0] > 0 else 0.0
    return out


def write_csv(path: Path, clean: tuple[float, float], grid: dict[tuple[str, int], tuple[float, float]]) -> None:
    """One row per set (and the clean one at severity 0): accuracy, ECE, accuracy relative to clean."""
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(["corruption", "severity", "acc", "ece", "relative"])
    w.writerow(["clean", 0, f"{clean[0]:.6f}", f"{clean[1]:.6f}", "1.000000"])
    for (name, s), (acc, ece) in grid.items():
        w.writerow([name, s, f"{acc:.6f}", f"{ece:.6f}", f"{acc / clean[0] if clean[0] else 0:.6f}"])
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def heatmap_figure(clean_acc: float, grid: dict[tuple[str, int], tuple[float, float]]) -> Figure:
    """Accuracy (%) of every corruption (rows) x severity (columns), each cell written in."""
    names = list(dict.fromkeys(n for n, _ in grid))
    sevs = sorted({s for _, s in grid})
    acc = np.full((len(names), len(sevs)), np.nan)
    for (n, s), (a, _) in grid.items():
        acc[names.index(n), sevs.index(s)] = 100 * a
    fig = Figure(figsize=(1.0 + 0.9 * len(sevs) + 1.4, 0.8 + 0.32 * len(names)), dpi=110)
    ax = fig.add_axes((0.33, 0.08, 0.55, 0.82))
    im = ax.imshow(acc, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i in range(len(names)):
        for j in range(len(sevs)):
            if not np.isnan(acc[i, j]):
                ax.text(j, i, f"{acc[i, j]:.1f}", ha="center", va="center", fontsize=7,
                        color="white" if acc[i, j] < 60 else "black")  # fmt: skip
    ax.set_xticks(range(len(sevs)), [str(s) for s in sevs], fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("severity", fontsize=8)
    ax.set_title(f"accuracy (%) under corruption; clean {100 * clean_acc:.1f}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.08)
    return fig


def examples_figure(clean: torch.Tensor, examples: dict[tuple[str, int], torch.Tensor]) -> Figure:
    """One test image (uint8 3 x H x W) clean and under every corruption (rows) at every severity (columns)."""
    names = list(dict.fromkeys(n for n, _ in examples))
    sevs = sorted({s for _, s in examples})
    fig = Figure(figsize=(1.3 + 0.9 * (len(sevs) + 1), 0.4 + 0.9 * len(names)), dpi=110)
    cols = len(sevs) + 1
    for i, name in enumerate(names):
        for j in range(cols):
            ax = fig.add_subplot(len(names), cols, i * cols + j + 1)
            img = clean if j == 0 else examples.get((name, sevs[j - 1]))
            if img is not None:
                ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("clean" if j == 0 else f"severity {sevs[j - 1]}", fontsize=7)
            if j == 0:
                ax.set_ylabel(name, fontsize=6, rotation=0, ha="right", va="center")
    fig.subplots_adjust(left=0.2, right=0.98, top=0.97, bottom=0.01, wspace=0.05, hspace=0.05)
    return fig


def publish(output_dir: Path, name: str, fig: Figure, loggers: Sequence[Any]) -> Path:
    """The figure as ``<name>.png`` in the run directory and in each logger (TensorBoard, MLflow, W&B)."""
    image = render(fig)
    path = output_dir / f"{name}.png"
    atomic_write(path, lambda f: Image.fromarray(image).save(f, format="PNG"))
    kinds = L.pytorch.loggers
    for logger in loggers:
        if isinstance(logger, kinds.TensorBoardLogger):
            logger.experiment.add_image(name, image, 0, dataformats="HWC")
        elif isinstance(logger, kinds.MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(path))
        elif isinstance(logger, kinds.WandbLogger):
            logger.log_image(name, [str(path)])
    return path


def benchmark(
    forward: Callable[[torch.Tensor], torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    info: Any,
    options: Options,
    cache_dir: Path,
    output_dir: Path,
    device: torch.device,
    context: Callable[[], AbstractContextManager] = nullcontext,
    loggers: Sequence[Any] = (),
) -> dict[str, Any]:
    """Evaluate ``forward`` on the clean test images and each chosen corruption x severity (each set
    cached under ``cache_dir``); write the CSV and the pictures; return metrics.json's figures."""
    x_all, y_all = test
    index = pick_images(len(y_all), options.images, options.seed)
    images, labels = x_all[index].contiguous(), y_all[index].contiguous()
    source = digest(images)
    folder = cache_dir / f"{GENERATOR}-{source[:16]}"
    run = lambda imgs: score(forward, imgs, labels, info.mean, info.std, device, options.batch_size, context)  # noqa: E731
    started = time.perf_counter()
    clean = run(images)
    grid: dict[tuple[str, int], tuple[float, float]] = {}
    examples: dict[tuple[str, int], torch.Tensor] = {}
    timings = {"made": 0, "cached": 0, "forward_s": 0.0}
    for name in options.corruptions:
        for s in options.severities:
            data, was_cached = cached_set(
                images, index, name, s, options.seed, folder, device, options.batch_size, source
            )
            timings["cached" if was_cached else "made"] += 1
            t = time.perf_counter()
            grid[name, s] = run(data)
            timings["forward_s"] += time.perf_counter() - t
            examples[name, s] = data[0]
            log.info("%s severity %d: accuracy %.4f%s", name, s, grid[name, s][0], " (cached)" if was_cached else "")
    metrics: dict[str, Any] = summarise(clean, grid)
    write_csv(output_dir / CSV_NAME, clean, grid)
    publish(output_dir, HEATMAP, heatmap_figure(clean[0], grid), loggers)
    publish(output_dir, EXAMPLES, examples_figure(images[0], examples), loggers)
    for logger in loggers:
        logger.log_metrics({k: v for k, v in metrics.items() if k.count("/") <= 2}, step=0)
    return metrics | {
        f"{PREFIX}/images": len(labels),
        f"{PREFIX}/sets_made": timings["made"],
        f"{PREFIX}/sets_cached": timings["cached"],
        f"{PREFIX}/forward_s": round(timings["forward_s"], 2),
        f"{PREFIX}/total_s": round(time.perf_counter() - started, 2),
        f"{PREFIX}/generator": GENERATOR,
    }
