"""Every config option composes and builds, the defaults build the tutorial's run, and derived
values follow what they derive from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cifarkit.data.augment import Augment
from cifarkit.run.build import build
from conftest import CONFIG_DIR, compose

GROUPS = ["data", "model", "trainer", "logger", "callbacks", "experiment", "debug", "hparams_search"]
CPU_BUILDS = ["trainer=cpu", "data=image_folder", "data.root=/nowhere"]  # no data is read before setup


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group: str, option: str, tmp_path: Path) -> None:
    cfg = compose(
        tmp_path, [f"{group}={option}", *(["data.root=/x"] if option == "image_folder" else [])], with_hydra=True
    )
    assert cfg.hydra.runtime.choices[group] == option
    HydraConfig.instance().set_config(cfg)  # as at run time: ${hydra:...} (the Optuna search's callback) resolves
    for key in (
        "data",
        "model",
        "trainer",
        "logger",
        "callbacks",
        "paths",
    ):  # every interpolation outside Hydra's run-time node resolves
        OmegaConf.to_container(cfg[key], resolve=True)


@pytest.mark.parametrize("preset", options("experiment"))
def test_every_preset_builds_its_run(preset: str, tmp_path: Path) -> None:
    """The preset's trainer, callbacks, data module and model all instantiate (nothing trains)."""
    cfg = compose(tmp_path, [f"experiment={preset}", *CPU_BUILDS])
    datamodule, trainer = build(cfg, with_loggers=False)
    model = instantiate(cfg.model, classes=["a", "b"])
    assert model.net(torch.zeros(2, 3, 32, 32)).shape == (2, 2)
    assert trainer.max_epochs == cfg.trainer.max_epochs and datamodule.batch_size == cfg.data.batch_size


def test_defaults_build_the_tutorial(tmp_path: Path) -> None:
    """train.py with no options: the BasicBlock CNN (9,457,962 parameters) under Adam at lr 1e-3,
    batch 32, RandomCrop(32, padding=4) + RandomHorizontalFlip, 100 epochs, tested after."""
    cfg = compose(tmp_path, [])
    assert cfg.data._target_.endswith("CIFAR10DataModule") and cfg.test is True
    cfg = compose(tmp_path, CPU_BUILDS)
    datamodule, trainer = build(cfg, with_loggers=False)
    model = instantiate(cfg.model, classes=[str(i) for i in range(10)])
    assert sum(p.numel() for p in model.net.parameters()) == 9_457_962
    (optimizer,) = [model.configure_optimizers()]
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == 1e-3
    assert datamodule.batch_size == 32 and datamodule.augment == Augment(4, "zeros", flip_p=0.5)
    assert trainer.max_epochs == 100
    assert {type(c).__name__ for c in trainer.callbacks} >= {
        "ModelCheckpoint",
        "ProgressBar",
        "GracefulStop",
        "NonFiniteGuard",
    }


def test_a_batch_scaled_lr_follows_the_batch_size(tmp_path: Path) -> None:
    """airbench's lr is quoted per 1024 images: a preset's lr follows data.batch_size, and an
    explicit lr still wins."""
    lr = {b: compose(tmp_path, ["model=airbench", f"data.batch_size={b}"]).model.optimizer.lr for b in (32, 512, 1024)}
    assert lr == {32: 0.046875, 512: 0.75, 1024: 1.5}
    assert compose(tmp_path, ["experiment=cpu10"]).model.optimizer.lr == 0.75
    assert compose(tmp_path, ["experiment=cpu10", "model.optimizer.lr=0.1"]).model.optimizer.lr == 0.1
