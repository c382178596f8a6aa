"""The command line: a run as a user starts it, and bad input that ends in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cifarkit.nets.saved import SavedNet
from conftest import FAST, error_line, folder_overrides, run_cli, run_dirs
from tiny_files import write_image_folder


def test_train_then_eval_as_a_user_runs_them(image_folder: Path, tmp_path: Path, main) -> None:
    """``python train.py`` in its own process with the default callbacks (progress bar on), then
    ``python eval.py`` on its best checkpoint: the run directory holds what the README lists,
    and eval.py scores the checkpoint exactly as train.py's test did."""
    logs = tmp_path / "logs"
    args = [a for a in FAST if not a.startswith("callbacks.progress_bar")] + folder_overrides(image_folder, tmp_path)
    done = run_cli("train.py", args + [f"paths.log_dir={logs}", "trainer.max_epochs=2", "logger=many"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = run_dirs(logs)
    assert {
        "metrics.json",
        "train.log",
        ".hydra",
        "checkpoints",
        "tensorboard",
        "csv",
        "samples.png",
        "confusion_matrix.png",
    } <= {p.name for p in run.iterdir()}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        Path(json.loads((run / "metrics.json").read_text())["best_ckpt"]).name,
        "last.ckpt",
    ]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 2 and metrics["train/images_per_s"] > 0
    assert 0 <= metrics["val/acc_best"] <= 1 and 0 <= metrics["test/acc"] <= 1 and metrics["test/loss"] > 0

    saved = SavedNet.read(metrics["best_ckpt"])  # weights_only, checked: what predict/eval need is in it
    assert saved.data.classes == ["cat", "dog", "frog"] and saved.data.image_size == 32 and len(saved.data.mean) == 3

    r = main(
        "eval.py",
        [
            f"ckpt_path={metrics['best_ckpt']}",
            "trainer=cpu",
            *folder_overrides(image_folder, tmp_path),
            f"paths.log_dir={logs}",
        ],
    )
    assert r.code == 0, r.err[-3000:]
    (eval_run,) = run_dirs(logs, "eval")
    evaluated = json.loads((eval_run / "metrics.json").read_text())
    assert evaluated["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert evaluated["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-4)
    assert evaluated["test/acc_class"] == pytest.approx(metrics["test/acc_class"], abs=1e-6)
    assert evaluated["test/calibration_error"] == pytest.approx(metrics["test/calibration_error"], abs=1e-6)
    assert evaluated["test/confusion_matrix"] == metrics["test/confusion_matrix"]


@pytest.mark.parametrize(
    "args,expected",
    [
        (["trainer.no_such_key=1"], "Could not override 'trainer.no_such_key'"),
        (["trainer=tpu9"], "Could not find 'trainer/tpu9'"),
        (["model.optimizer.lr=0.1", "optimized_metric=val/acc_best", "+data.colour=1"], "colour"),
        pytest.param(
            ["trainer.accelerator=gpu"],
            "no CUDA GPU is available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU"),
        ),
        (["data.download=false"], "data.download=true"),
        (["+data.augment.blur={}"], "data.augment.blur is not an option; data.augment takes crop, flip,"),
        (["data.augment.crop.padding=-2"], "data.augment.crop.padding=-2: must be an integer of at least 0"),
        pytest.param(
            ["model=airbench", "+trainer.sync_batchnorm=true"],
            "SyncBatchNorm does not run on cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU"),
        ),
    ],
)
def test_bad_command_lines_fail_in_one_line(tmp_path: Path, args: list[str], expected: str, main) -> None:
    r = main("train.py", FAST + [f"paths.data_dir={tmp_path / 'empty'}", f"paths.log_dir={tmp_path / 'logs'}"] + args)
    assert r.code == 1
    line = error_line(r.err)
    assert expected in line and "UserError(" not in line, line  # a UserError speaks for itself, unwrapped


def test_bad_image_folders_from_the_command_line(tmp_path: Path, main) -> None:
    def bad(root: Path) -> str:
        r = main("train.py", FAST + folder_overrides(root, tmp_path) + [f"paths.log_dir={tmp_path / 'logs'}"])
        assert r.code == 1
        return error_line(r.err)

    root = write_image_folder(tmp_path / "imgs", n_train=2, n_test=2)
    shutil.rmtree(root / "test" / "dog")
    line = bad(root)
    assert "train and test classes differ" in line and "dog" in line
    empty = tmp_path / "empty_imgs"
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (empty / split / name).mkdir(parents=True)
    assert "no PNG or JPEG images" in bad(empty)


def test_val_size_0_trains_on_everything_tests_and_exits_0(image_folder: Path, tmp_path: Path, main, recwarn) -> None:
    """The tutorial trains on all training images: no validation split, so no val/acc_best,
    and the final weights are tested; a sweep's optimized metric falls back to test/acc. Lightning's
    warnings about the empty validation loader and the missing val/acc are not shown."""
    logs = tmp_path / "logs"
    r = main(
        "train.py",
        FAST
        + folder_overrides(image_folder, tmp_path)
        + ["data.val_size=0", "trainer.max_epochs=2", f"paths.log_dir={logs}"],
    )
    assert r.code == 0, r.err[-3000:]
    (run,) = run_dirs(logs)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 2
    assert metrics["steps"] == 2 * 9  # all 72 training images, batch 8
    assert "val/acc_best" not in metrics and 0 <= metrics["test/acc"] <= 1
    assert sum(map(sum, metrics["test/confusion_matrix"])) == 36
    assert "returning test/acc instead" in r.out + r.err
    assert not [
        w for w in recwarn if "DeviceLoader" in str(w.message) or "could not find the monitored key" in str(w.message)
    ]


def test_a_run_composes_its_command_line_once_and_leaves_argv_alone(
    image_folder: Path, tmp_path: Path, main, monkeypatch
) -> None:
    """One composition per process (Hydra's config loader asked once), ``ckpt_path=auto`` resolved into the
    plan rather than the command line."""
    import lightning as L
    from hydra._internal.config_loader_impl import ConfigLoaderImpl  # the loader every composition goes through

    from conftest import add_callback

    composed, seen = [], {}
    real = ConfigLoaderImpl.load_configuration

    def load_configuration(self, *args, **kwargs):
        composed.append(kwargs.get("overrides", args[1] if len(args) > 1 else None))
        return real(self, *args, **kwargs)

    class Look(L.Callback):
        def on_train_start(self, trainer, pl_module):
            import sys

            seen["argv"] = list(sys.argv)

    monkeypatch.setattr(ConfigLoaderImpl, "load_configuration", load_configuration)
    add_callback(monkeypatch, Look())
    args = FAST + folder_overrides(image_folder, tmp_path) + [f"paths.log_dir={tmp_path / 'logs'}", "ckpt_path=auto"]
    r = main("train.py", args)
    assert r.code == 0, r.err[-3000:]
    assert len(composed) == 1, composed
    assert seen["argv"] == ["train.py", *args]
    (run,) = run_dirs(tmp_path / "logs")
    assert json.loads((run / "metrics.json").read_text())["status"] == "completed"
