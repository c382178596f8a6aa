"""Test-time augmentation: which views are averaged, and eval.py's option."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, folder_overrides

from cifarkit.module import tta_logits
from cifarkit.train import evaluate, train


def corner(v: torch.Tensor) -> torch.Tensor:
    """A 'net' that reports the top-left pixel of channel 0: every view moves it somewhere else."""
    return v[:, 0, 0, 0:1]


def test_views_and_weights() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)  # x[r, c] = 4r + c
    assert tta_logits(corner, x, "none").item() == 0
    assert tta_logits(corner, x, "flip").item() == pytest.approx(0.5 * (0 + 3))
    # shifted up-left by reflect padding: top-left is x[1, 1] = 5, its mirror x[1, 2] = 6;
    # shifted down-right: top-left x[1, 1] = 5, its mirror x[1, 2] = 6
    expected = 0.5 * 1.5 + 0.5 * (0.5 * (0.5 * (5 + 6)) + 0.5 * (0.5 * (5 + 6)))
    assert tta_logits(corner, x, "flip_translate").item() == pytest.approx(expected)


def test_eval_option_changes_the_test_and_is_recorded(image_folder: Path, compose_cfg, tmp_path: Path) -> None:
    train(compose_cfg(FAST + folder_overrides(image_folder, tmp_path) + ["test=false"]))
    ckpt = tmp_path / "out" / "checkpoints" / "last.ckpt"
    results = {}
    for tta in ("none", "flip_translate"):
        cfg = compose_cfg(["trainer=cpu", f"ckpt_path={ckpt}", f"tta={tta}", *folder_overrides(image_folder, tmp_path)], "eval")
        results[tta] = evaluate(cfg)
        assert json.loads((tmp_path / "out" / "metrics.json").read_text())["tta"] == tta
    assert results["none"]["test/loss"] != results["flip_translate"]["test/loss"]
    assert 0 <= results["flip_translate"]["test/acc"] <= 1
