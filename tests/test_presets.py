"""A preset as users run it: cpu10 trains end to end and tests its averaged weights (every preset's
run is built in test_config.py), and every experiment preset runs with every debug preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cifarkit.run.jobs import eval_job, train_job
from conftest import CONFIG_DIR, FAST, compose, folder_overrides, run_dirs


def test_cpu10_trains_and_tests_its_averaged_weights(image_folder: Path, compose_cfg, tmp_path: Path) -> None:
    """The preset as users run it, on tiny data and 6 steps (batch 8, no time limit): the
    checkpoint holds the moving average, which is what the test scored and eval.py scores."""
    data = [o for o in folder_overrides(image_folder, tmp_path) if not o.startswith("data.val_size")]
    cfg = compose_cfg(
        FAST + data + ["experiment=cpu10", "trainer.max_steps=6", "trainer.max_time=null", "data.batch_size=8"]
    )
    optimized = train_job(cfg)
    ckpt = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", weights_only=True)
    average, current = ckpt["state_dict"], ckpt["current_model_state"]
    assert ckpt["global_step"] == 6
    trained = [k for k in current if k.endswith("weight") and current[k].dtype.is_floating_point]
    assert any(not torch.equal(average[k], current[k]) for k in trained)  # averaging changed the weights
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["test/acc"] == pytest.approx(optimized) and saved["steps"] == 6  # no validation: test/acc is returned
    assert saved["train/images_per_s"] * saved["train/seconds"] == pytest.approx(6 * 8)
    again = eval_job(
        compose_cfg(["trainer=cpu", f"ckpt_path={tmp_path / 'out' / 'checkpoints' / 'last.ckpt'}", *data], "eval")
    )
    assert again["test/loss"] == pytest.approx(saved["test/loss"], rel=1e-5)


def presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


# debug=fdr: one batch of each split, quick with any recipe. The others train the preset's epochs of the recipe's own
# net (tens to hundreds of steps each, resnet18's among them): minutes on a 2-core CPU, so slow.
DEBUG = [d if d == "fdr" else pytest.param(d, marks=pytest.mark.slow) for d in presets("debug")]


@pytest.mark.parametrize("debug", DEBUG)
@pytest.mark.parametrize("experiment", presets("experiment"))
def test_every_experiment_runs_with_every_debug_preset(
    experiment: str, debug: str, image_folder: Path, tmp_path: Path, main
) -> None:
    """``python train.py experiment=<each> debug=<each>`` on tiny data (batch 8: the recipes' batches are larger
    than its 72 images) exits 0; a budget steps aside for fast_dev_run in one line."""
    data = [o for o in folder_overrides(image_folder, tmp_path) if not o.startswith("data.val_size")]  # recipe's split
    fast = [o for o in FAST if not o.startswith("trainer.max_epochs")]  # the debug preset says how long
    r = main(
        "train.py",
        fast
        + data
        + [f"experiment={experiment}", f"debug={debug}", "data.batch_size=8", f"paths.log_dir={tmp_path / 'logs'}"],
    )
    assert r.code == 0, r.err[-3000:]
    assert json.loads((run_dirs(tmp_path / "logs")[0] / "metrics.json").read_text())["status"] == "completed"
    cfg = compose(tmp_path, [f"experiment={experiment}", f"debug={debug}"])  # cpu10 has a budget, fdr is a fast_dev_run
    skipped = f"budget_s={cfg.budget_s} is not used: trainer.fast_dev_run=true runs 1 batch of each split and stops"
    assert (skipped in r.out + r.err) == (cfg.budget_s is not None and cfg.trainer.get("fast_dev_run") is True)
