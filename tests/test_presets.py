"""A preset as users run it: cpu10 trains end to end and tests its averaged weights (every preset's
run is built in test_config.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, folder_overrides

from cifarkit.train import evaluate, train


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
