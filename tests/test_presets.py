"""The experiment presets: what they set, and that one trains end to end with its averaged weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, folder_overrides

from cifarkit.augment import Augment
from cifarkit.train import evaluate, train


def test_airbench94_preset(compose_cfg) -> None:
    cfg = compose_cfg(["experiment=airbench94"])
    assert cfg.model.net._target_ == "cifarkit.model.AirbenchNet" and cfg.data.batch_size == 1024 and cfg.data.val_size == 0
    assert Augment.from_steps(cfg.data.augment) == Augment(2, "reflect", alternating_flip=True)
    assert cfg.callbacks.lookahead._target_ == "cifarkit.callbacks.Lookahead" and cfg.model.scheduler.warmup == 0.23
    assert list(cfg.callbacks.freeze_whitening_bias.names) == ["net.whiten.bias"]
    assert cfg.model.param_groups.norm_bias_lr_scale == 64 and cfg.model.tta == "flip_translate" and cfg.trainer.max_epochs == 10
    assert cfg.callbacks.model_checkpoint is not None  # the default callbacks stay


@pytest.mark.parametrize("preset", ["cpu10", "resnet18"])
def test_other_presets(preset: str, compose_cfg) -> None:
    cfg = compose_cfg([f"experiment={preset}"])
    if preset == "cpu10":  # airbench94's recipe on a narrower net, for a fixed step count and 10 minutes at most
        assert list(cfg.model.net.widths) == [32, 64, 128] and cfg.model.optimizer.lr == 0.75 and cfg.data.batch_size == 512
        assert cfg.trainer.max_steps > 0 and cfg.trainer.max_time == "00:00:10:00" and "lookahead" in cfg.callbacks
    else:
        assert cfg.model.net._target_ == "cifarkit.model.ResNet18" and cfg.model.scheduler.max_lr == 0.1
        assert "lookahead" not in cfg.callbacks


def test_cpu10_trains_and_tests_its_averaged_weights(image_folder: Path, compose_cfg, tmp_path: Path) -> None:
    """The preset as users run it, on tiny data and 6 steps (batch 8, no time limit): the
    checkpoint holds the moving average, which is what the test scored and eval.py scores."""
    data = [o for o in folder_overrides(image_folder, tmp_path) if not o.startswith("data.val_size")]
    cfg = compose_cfg(FAST + data + ["experiment=cpu10", "trainer.max_steps=6", "trainer.max_time=null", "data.batch_size=8"])
    optimized = train(cfg)
    ckpt = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", weights_only=True)
    average, current = ckpt["state_dict"], ckpt["current_model_state"]
    assert ckpt["global_step"] == 6
    trained = [k for k in current if k.endswith("weight") and current[k].dtype.is_floating_point]
    assert any(not torch.equal(average[k], current[k]) for k in trained)  # averaging changed the weights
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["test/acc"] == pytest.approx(optimized) and saved["steps"] == 6  # no validation: test/acc is returned
    assert saved["train/images_per_s"] * saved["train/seconds"] == pytest.approx(6 * 8)
    again = evaluate(compose_cfg(["trainer=cpu", f"ckpt_path={tmp_path / 'out' / 'checkpoints' / 'last.ckpt'}", *data], "eval"))
    assert again["test/loss"] == pytest.approx(saved["test/loss"], rel=1e-5)
