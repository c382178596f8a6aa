"""Every run leaves samples.png and confusion_matrix.png (files and TensorBoard) and per-class accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import CLASSES3, FAST, folder_overrides
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hydra.utils import instantiate

from cifarkit import pictures
from cifarkit.pictures import confusion_figure, per_class, render
from cifarkit.train import train


def tensorboard_images(run_dir: Path) -> set[str]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    return set(acc.Tags()["images"])


def test_run_leaves_pictures_and_per_class_accuracy(image_folder: Path, tmp_path: Path, compose_cfg) -> None:
    train(compose_cfg(FAST + folder_overrides(image_folder, tmp_path)))
    out = tmp_path / "out"
    for name in ("samples", "confusion_matrix"):
        with Image.open(out / f"{name}.png") as im:
            assert im.format == "PNG" and min(im.size) > 200
    assert tensorboard_images(out) == {"samples", "confusion_matrix"}

    metrics = json.loads((out / "metrics.json").read_text())
    per = metrics["test/acc_class"]
    assert sorted(per) == CLASSES3
    counts = torch.tensor(metrics["test/confusion_matrix"])
    assert counts.shape == (3, 3) and counts.sum() == 3 * 12  # every test image counted once
    for i, name in enumerate(CLASSES3):
        assert abs(per[name] - counts[i, i].item() / counts[i].sum().item()) < 1e-6
    assert abs(metrics["test/acc"] - counts.diag().sum().item() / counts.sum().item()) < 1e-6
    assert not any(k.startswith("test/acc_class/") for k in metrics)


def test_no_test_no_confusion_matrix(image_folder: Path, tmp_path: Path, compose_cfg) -> None:
    train(compose_cfg(FAST + folder_overrides(image_folder, tmp_path) + ["test=false"]))
    out = tmp_path / "out"
    assert (out / "samples.png").is_file()
    assert not (out / "confusion_matrix.png").exists()
    assert "test/acc_class" not in json.loads((out / "metrics.json").read_text())


def test_fast_dev_run_draws_both(image_folder: Path, tmp_path: Path, compose_cfg) -> None:
    train(compose_cfg(FAST + folder_overrides(image_folder, tmp_path) + ["trainer.fast_dev_run=true"]))
    assert (tmp_path / "out" / "samples.png").is_file()
    assert (tmp_path / "out" / "confusion_matrix.png").is_file()


def test_samples_are_training_images_denormalized(image_folder: Path, tmp_path: Path, compose_cfg, monkeypatch) -> None:
    """Without augmentation each image in the grid is a training image, with its label, back in [0, 1]."""
    cfg = compose_cfg(
        FAST + folder_overrides(image_folder, tmp_path) + ["data.augment.crop_padding=0", "data.augment.hflip_p=0", "test=false"]
    )
    seen = {}
    original = pictures.samples_figure

    def spy(images: torch.Tensor, labels: torch.Tensor, classes: list[str], cols: int = 8):
        seen.update(images=images, labels=labels, classes=classes)
        return original(images, labels, classes, cols)

    monkeypatch.setattr(pictures, "samples_figure", spy)
    train(cfg)
    dm = instantiate(cfg.data)
    dm.setup()
    train_x, train_y = dm.splits["train"]
    assert seen["classes"] == CLASSES3
    assert len(seen["images"]) == min(64, len(train_y))
    flat = train_x.flatten(1).float() / 255
    for img, label in zip(seen["images"], seen["labels"]):
        dist, j = (flat - img.flatten()).abs().amax(dim=1).min(dim=0)
        assert dist < 1e-3 and train_y[j] == label


def test_per_class_folds_scalars() -> None:
    folded = per_class({"test/acc": 0.5, "test/acc_class/cat": 1.0, "test/acc_class/dog": 0.0})
    assert folded == {"test/acc": 0.5, "test/acc_class": {"cat": 1.0, "dog": 0.0}}
    assert per_class({"val/acc": 0.1}) == {"val/acc": 0.1}


def test_confusion_figure_many_classes() -> None:
    """100 classes (CIFAR-100 style) draw without per-cell numbers and without error."""
    counts = torch.randint(0, 5, (100, 100))
    image = render(confusion_figure(counts, [f"c{i}" for i in range(100)]))
    assert image.ndim == 3 and image.shape[2] == 3
