"""What a run reports: samples.png and confusion_matrix.png (files and TensorBoard), per-class
accuracy, TensorBoard's scalars and HPARAMS tab, and its throughput."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from cifarkit.data.sources import CIFAR100_FINE
from cifarkit.fit import pictures
from cifarkit.fit.metrics import per_class
from cifarkit.fit.pictures import confusion_figure, render
from cifarkit.run.jobs import train_job
from conftest import FAST, folder_overrides
from tiny_files import CLASSES3


def tensorboard_images(run_dir: Path) -> dict[str, np.ndarray]:
    """The pixels of each image tag's last TensorBoard event."""
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    return {tag: png_pixels(io.BytesIO(acc.Images(tag)[-1].encoded_image_string)) for tag in acc.Tags()["images"]}


def png_pixels(file: Path | io.BytesIO) -> np.ndarray:
    """A PNG's RGB pixels, checked to be a picture: large enough, and not a blank canvas."""
    with Image.open(file) as im:
        assert im.format == "PNG"
        pixels = np.asarray(im.convert("RGB"))
    assert min(pixels.shape[:2]) > 200, pixels.shape
    assert colours(pixels) > 50  # one colour, or a few, is no figure
    assert (pixels.min(axis=2) < 200).mean() > 0.02  # and more than a thin line on white
    return pixels


def colours(pixels: np.ndarray) -> int:
    """How many distinct RGB colours an (H, W, 3) uint8 picture has."""
    return len(np.unique(pixels.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.int32)))


def test_run_leaves_pictures_and_per_class_accuracy(image_folder: Path, tmp_path: Path, compose_cfg) -> None:
    train_job(compose_cfg(FAST + folder_overrides(image_folder, tmp_path) + ["trainer.max_epochs=2"]))
    out = tmp_path / "out"
    files = {name: png_pixels(out / f"{name}.png") for name in ("samples", "confusion_matrix")}
    logged = tensorboard_images(out)
    assert sorted(logged) == sorted(files)
    assert all(np.array_equal(logged[name], files[name]) for name in files)  # TensorBoard shows the same pixels

    metrics = json.loads((out / "metrics.json").read_text())
    per = metrics["test/acc_class"]
    assert sorted(per) == CLASSES3
    counts = torch.tensor(metrics["test/confusion_matrix"])
    assert counts.shape == (3, 3) and counts.sum() == 3 * 12  # every test image counted once
    for i, name in enumerate(CLASSES3):
        assert abs(per[name] - counts[i, i].item() / counts[i].sum().item()) < 1e-6
    assert abs(metrics["test/acc"] - counts.diag().sum().item() / counts.sum().item()) < 1e-6
    assert not any(k.startswith("test/acc_class/") for k in metrics)
    # The picture is these very counts drawn: pixel for pixel the figure of metrics.json's matrix.
    assert np.array_equal(files["confusion_matrix"], render(confusion_figure(counts, CLASSES3)))

    # TensorBoard: the scalars, and the HPARAMS tab pairing the configuration with the final metrics
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"val/acc_best", "test/acc", "train/loss", "train/images_per_s"} <= scalars
    plugin = {tag: HParamsPluginData.FromString(c) for tag, c in acc.PluginTagToContent("hparams").items()}
    hparams = plugin["_hparams_/session_start_info"].session_start_info.hparams
    assert (
        hparams["model/optimizer/lr"].number_value == pytest.approx(1e-3)
        and hparams["data/batch_size"].number_value == 8
    )
    assert hparams["trainer/max_epochs"].number_value == 2
    shown = {m.name.tag for m in plugin["_hparams_/experiment"].experiment.metric_infos}
    assert shown == {"val/acc_best", "test/acc", "test/loss", "test/calibration_error", "train/images_per_s"}
    for tag in shown:  # each with the value metrics.json holds
        assert acc.Scalars(tag)[-1].value == pytest.approx(metrics[tag], rel=1e-6), tag


@pytest.mark.slow  # a run
def test_no_test_no_confusion_matrix(image_folder: Path, tmp_path: Path, compose_cfg) -> None:
    train_job(compose_cfg(FAST + folder_overrides(image_folder, tmp_path) + ["test=false"]))
    out = tmp_path / "out"
    png_pixels(out / "samples.png")
    assert not (out / "confusion_matrix.png").exists()
    assert "test/acc_class" not in json.loads((out / "metrics.json").read_text())


def test_fast_dev_run_draws_both(image_folder: Path, tmp_path: Path, compose_cfg) -> None:
    train_job(compose_cfg(FAST + folder_overrides(image_folder, tmp_path) + ["+trainer.fast_dev_run=true"]))
    out = tmp_path / "out"
    png_pixels(out / "samples.png")
    counts = torch.tensor(json.loads((out / "metrics.json").read_text())["test/confusion_matrix"])
    assert counts.sum() == 16  # one test batch (data.eval_batch_size=16)
    assert np.array_equal(png_pixels(out / "confusion_matrix.png"), render(confusion_figure(counts, CLASSES3)))


@pytest.mark.slow  # a run; test_run_leaves_pictures stays in the default suite
def test_samples_are_training_images_denormalized(image_folder: Path, tmp_path: Path, compose_cfg, monkeypatch) -> None:
    """Without augmentation each image in the grid is a training image, with its label, back in [0, 1]."""
    cfg = compose_cfg(
        FAST
        + folder_overrides(image_folder, tmp_path)
        + ["data.augment.crop=null", "data.augment.flip=null", "test=false"]
    )
    seen = {}
    original = pictures.samples_figure

    def spy(images: torch.Tensor, labels: torch.Tensor, classes: list[str], cols: int = 8):
        seen.update(images=images, labels=labels, classes=classes, figure=original(images, labels, classes, cols))
        return seen["figure"]

    monkeypatch.setattr(pictures, "samples_figure", spy)
    train_job(cfg)
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup()
    train_x, train_y = dm.splits["train"]
    assert seen["classes"] == CLASSES3
    assert len(seen["images"]) == min(64, len(train_y))
    flat = train_x.flatten(1).float() / 255
    for img, label in zip(seen["images"], seen["labels"]):
        dist, j = (flat - img.flatten()).abs().amax(dim=1).min(dim=0)
        assert dist < 1e-3 and train_y[j] == label
    # samples.png is that figure, pixel for pixel.
    assert np.array_equal(png_pixels(tmp_path / "out" / "samples.png"), render(seen["figure"]))


def test_per_class_folds_scalars() -> None:
    folded = per_class({"test/acc": 0.5, "test/acc_class/cat": 1.0, "test/acc_class/dog": 0.0})
    assert folded == {"test/acc": 0.5, "test/acc_class": {"cat": 1.0, "dog": 0.0}}
    assert per_class({"val/acc": 0.1}) == {"val/acc": 0.1}


def test_confusion_figure_shows_row_shares_and_counts() -> None:
    """Colour is the share of the true class (a row of zeros stays 0), each cell's text its count."""
    counts = torch.tensor([[5, 1, 0], [2, 2, 0], [0, 0, 0]])
    ax = confusion_figure(counts, CLASSES3).axes[0]
    shares = np.array([[5 / 6, 1 / 6, 0], [0.5, 0.5, 0], [0, 0, 0]])
    assert np.allclose(ax.images[0].get_array(), shares, atol=1e-6)
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert cells == {(t, p): str(int(counts[t, p])) for t in range(3) for p in range(3)}
    assert "accuracy 70.0%" in ax.get_title()  # 7 of 10
    assert [t.get_text() for t in ax.get_yticklabels()] == CLASSES3


@pytest.mark.parametrize("n", [100, 300])
def test_confusion_figure_many_classes_stays_readable(n: int) -> None:
    """100 classes (CIFAR-100): no per-cell numbers, every class named on both axes in a 6-pt font,
    one label per cell, no two labels overlapping, all inside a picture under 2,000 pixels a side.
    300 classes: only every k-th class named (the picture capped), under the same rules."""
    classes = CIFAR100_FINE if n == 100 else [f"class_{i}" for i in range(n)]
    counts = torch.randint(0, 5, (n, n), generator=torch.Generator().manual_seed(0))
    fig = confusion_figure(counts, classes)
    ax = fig.axes[0]
    assert not ax.texts
    assert np.allclose(ax.images[0].get_array(), (counts / counts.sum(1, keepdim=True)).numpy(), atol=1e-6)
    image = render(fig)  # drawn: the labels' places are known
    assert colours(image) > 50 and max(image.shape[:2]) <= (2000 if n == 100 else 2400)
    renderer = fig.canvas.get_renderer()
    cell = ax.get_window_extent(renderer).height / n  # pixels per class
    for labels, lo, hi in ((ax.get_yticklabels(), "y0", "y1"), (ax.get_xticklabels(), "x0", "x1")):
        names = [t.get_text() for t in labels]
        step = 1 if n == 100 else 2
        assert names == classes[::step]
        assert all(t.get_fontsize() >= 6 for t in labels)
        boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: getattr(b, lo))
        assert all(getattr(a, hi) <= getattr(b, lo) for a, b in zip(boxes, boxes[1:])), "labels overlap"
        assert all(b.x0 >= 0 and b.y0 >= 0 and b.x1 <= image.shape[1] and b.y1 <= image.shape[0] for b in boxes)
        assert all(getattr(b, hi) - getattr(b, lo) <= step * cell for b in boxes)  # a label fits its row or column
