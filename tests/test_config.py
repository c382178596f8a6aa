"""Every config group option composes, and the documented overrides land where they should."""

from __future__ import annotations

import pytest
from conftest import CONFIG_DIR
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

GROUPS = ["data", "model", "trainer", "logger", "callbacks", "experiment", "debug", "hparams_search"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose_train(overrides: list[str], name: str = "train"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group: str, option: str) -> None:
    extra = ["data.root=/x"] if option == "image_folder" else []
    cfg = compose_train([f"{group}={option}", "paths.output_dir=/tmp/out", *extra])
    assert cfg.hydra.runtime.choices[group] == option
    # every interpolation outside Hydra's own run-time node resolves
    for key in ("data", "model", "trainer", "logger", "callbacks", "paths"):
        OmegaConf.to_container(cfg[key], resolve=True)


def test_groups_have_options() -> None:
    for group in GROUPS + ["paths", "hydra"]:
        assert options(group), f"configs/{group}/ has no options"


def test_defaults_are_the_tutorial_recipe() -> None:
    cfg = compose_train([])
    assert cfg.data._target_ == "cifarkit.data.CIFAR10DataModule"
    assert cfg.data.batch_size == 32 and cfg.data.val_size == 5000 and cfg.data.download is True
    assert cfg.data.augment.crop.padding == 4 and cfg.data.augment.flip.p == 0.5 and cfg.data.normalize
    assert cfg.model.optimizer._target_ == "torch.optim.Adam" and cfg.model.optimizer.lr == 1e-3
    assert cfg.model.optimizer._partial_ is True and cfg.model.scheduler is None and cfg.model.label_smoothing == 0
    assert cfg.trainer.accelerator == "auto" and cfg.trainer.max_epochs == 100
    assert list(cfg.logger) == ["tensorboard"] and cfg.test is True and cfg.optimized_metric == "val/acc_best"
    assert {"model_checkpoint", "progress_bar", "lr_monitor"} <= set(cfg.callbacks)
    assert cfg.callbacks.model_checkpoint.monitor == "val/acc" and cfg.callbacks.last_checkpoint.filename == "last"
    assert cfg.callbacks.last_checkpoint.monitor is None  # written every epoch, not only with a new best
    assert cfg.hydra.run.dir.startswith("logs/train/runs/20")
    assert cfg.hydra.sweep.dir.startswith("logs/train/multiruns/20") 
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}"


def test_plain_overrides_land() -> None:
    cfg = compose_train(["trainer.accelerator=gpu", "trainer.max_epochs=7", "model.optimizer.lr=0.05",
                         "data.augment.flip=null", "data.augment.crop.padding=2", "logger=many",
                         "model.optimizer._target_=torch.optim.SGD", "model.optimizer.fused=null"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.max_epochs == 7
    assert cfg.model.optimizer.lr == 0.05 and cfg.model.optimizer._target_ == "torch.optim.SGD"
    assert cfg.data.augment.flip is None and cfg.data.augment.crop.padding == 2
    assert set(cfg.logger) == {"tensorboard", "csv"}


def test_tutorial_experiment_is_the_tutorial() -> None:
    cfg = compose_train(["experiment=tutorial"])
    assert cfg.data.batch_size == 32 and cfg.model.optimizer.lr == 1e-3 and cfg.trainer.max_epochs == 100
    assert cfg.data.pipeline == "torchvision" and cfg.trainer.precision == "32-true"


def test_image_folder_shares_the_pipeline_options() -> None:
    cfg = compose_train(["data=image_folder", "data.root=/imgs"])
    assert cfg.data._target_ == "cifarkit.data.ImageFolderDataModule"
    assert cfg.data.root == "/imgs" and cfg.data.image_size == 32 and cfg.data.augment.crop.padding == 4
    assert "download" not in cfg.data and cfg.model.net.image_size == 32


def test_eval_config_composes() -> None:
    cfg = compose_train(["ckpt_path=/x.ckpt", "data=image_folder", "data.root=/imgs"], name="eval")
    assert cfg.task_name == "eval" and cfg.ckpt_path == "/x.ckpt"
