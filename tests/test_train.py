"""Training and evaluation end to end on CPU, as a user runs them, and bad input at the command line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import FAST, add_callback, folder_overrides, run_cli, run_dirs, write_image_folder

from cifarkit.errors import UserError
from cifarkit.train import evaluate, optimized_value, train


@pytest.mark.parametrize("source", ["cifar10", "image_folder"])
def test_fast_dev_run_on_both_sources(source: str, request, compose_cfg, tmp_path: Path) -> None:
    if source == "cifar10":
        request.getfixturevalue("tiny_cifar10")
        data = [f"paths.data_dir={tmp_path / 'data'}", "data.val_size=50"]
    else:
        data = folder_overrides(request.getfixturevalue("image_folder"), tmp_path)
    cfg = compose_cfg(FAST + data + ["debug=fdr"])
    value = train(cfg)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 1
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["test/loss"] > 0
    assert value == metrics["val/acc_best"]


def test_same_seed_same_metrics(image_folder: Path, compose_cfg, tmp_path: Path) -> None:
    results = []
    for _ in range(2):
        cfg = compose_cfg(FAST + folder_overrides(image_folder, tmp_path) + ["seed=7", "trainer.max_epochs=2"])
        train(cfg)
        results.append(json.loads((tmp_path / "out" / "metrics.json").read_text()))
        shutil.rmtree(tmp_path / "out")
    keys = ["val/acc_best", "test/acc", "test/loss", "train/loss", "val/loss"]
    assert [r[k] for r in results for k in keys][:5] == [results[1][k] for k in keys]
    cfg = compose_cfg(FAST + folder_overrides(image_folder, tmp_path) + ["seed=8", "trainer.max_epochs=2"])
    train(cfg)
    other = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert other["train/loss"] != results[0]["train/loss"]


def test_cli_train_then_eval(image_folder: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    args = FAST + folder_overrides(image_folder, tmp_path) + [f"paths.log_dir={logs}", "trainer.max_epochs=2", "logger=many"]
    done = run_cli("train.py", args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = run_dirs(logs)
    assert {"metrics.json", "train.log", ".hydra", "checkpoints", "tensorboard", "csv"} <= {p.name for p in run.iterdir()}
    assert (run / "checkpoints" / "last.ckpt").is_file() and len(list((run / "checkpoints").glob("epoch_*.ckpt"))) == 1
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["train/images_per_s"] > 0
    for key in ("val/acc_best", "test/acc", "test/loss"):
        assert key in metrics

    # the checkpoint carries what predict/eval need, and loads without running code
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["classes"] == ["cat", "dog", "frog"]
    assert set(ckpt["data_info"]) == {"classes", "mean", "std", "image_size"}

    # TensorBoard: scalars, and the HPARAMS tab pairs the config with the final metrics
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert {"val/acc_best", "test/acc", "train/loss", "train/images_per_s"} <= set(acc.Tags()["scalars"])
    plugin = {tag: HParamsPluginData.FromString(c) for tag, c in acc.PluginTagToContent("hparams").items()}
    hparams = plugin["_hparams_/session_start_info"].session_start_info.hparams
    assert hparams["model/optimizer/lr"].number_value == pytest.approx(1e-3) and "data/batch_size" in hparams
    shown = {m.name.tag for m in plugin["_hparams_/experiment"].experiment.metric_infos}
    assert {"val/acc_best", "test/acc", "test/loss"} <= shown

    best = metrics["best_ckpt"]
    done = run_cli("eval.py", [f"ckpt_path={best}", "trainer=cpu"] + folder_overrides(image_folder, tmp_path) + [f"paths.log_dir={logs}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (eval_run,) = run_dirs(logs, "eval")
    evaluated = json.loads((eval_run / "metrics.json").read_text())
    assert evaluated["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert evaluated["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-4)
    assert evaluated["test/acc_class"] == pytest.approx(metrics["test/acc_class"], abs=1e-6)
    assert 0 < metrics["test/calibration_error"] < 1
    assert evaluated["test/calibration_error"] == pytest.approx(metrics["test/calibration_error"], abs=1e-6)
    assert set(metrics["test/acc_class"]) == {"cat", "dog", "frog"}
    assert sum(map(sum, evaluated["test/confusion_matrix"])) == 36


def test_optimizer_scheduler_and_loss_options_train(image_folder: Path, compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg(FAST + folder_overrides(image_folder, tmp_path) + [
        "trainer.max_epochs=2", "model.optimizer._target_=torch.optim.SGD", "model.optimizer.fused=null",
        "+model.optimizer.momentum=0.9", "model.label_smoothing=0.1", "test=false",
        "model.scheduler={_target_: torch.optim.lr_scheduler.StepLR, _partial_: true, step_size: 1, gamma: 0.5}",
    ])
    train(cfg)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "test/acc" not in metrics and metrics["epochs"] == 2
    ckpt = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", weights_only=True)
    (opt,) = ckpt["optimizer_states"]
    # last.ckpt is written at the end of epoch 2, after that epoch's scheduler step: halved twice
    assert ckpt["epoch"] == 1 and ckpt["lr_schedulers"][0]["last_epoch"] == 2
    assert opt["param_groups"][0]["momentum"] == 0.9 and opt["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.5**2)


def test_eval_refuses_mismatched_classes(image_folder: Path, compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg(FAST + folder_overrides(image_folder, tmp_path) + ["trainer.limit_train_batches=2", "test=false"])
    train(cfg)
    other = write_image_folder(tmp_path / "other", n_train=3, n_test=2, classes=["a", "b", "c", "d"])
    from cifarkit.errors import UserError

    ecfg = compose_cfg(["trainer=cpu", f"ckpt_path={tmp_path / 'out' / 'checkpoints' / 'last.ckpt'}",
                        "data=image_folder", f"data.root={other}", f"paths.data_dir={tmp_path / 'data'}", "data.val_size=1"],
                       config_name="eval")
    with pytest.raises(UserError, match="classes"):
        evaluate(ecfg)


def _bad(tmp_path: Path, args: list[str], script: str = "train.py") -> str:
    done = run_cli(script, args + [f"paths.log_dir={tmp_path / 'logs'}"], cwd=tmp_path)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize(
    "args,expected",
    [
        (["trainer.no_such_key=1"], "Could not override 'trainer.no_such_key'"),
        (["trainer=tpu9"], "Could not find 'trainer/tpu9'"),
        (["model.optimizer.lr=0.1", "optimized_metric=val/acc_best", "+data.colour=1"], "colour"),
        pytest.param(["trainer.accelerator=gpu"], "no CUDA GPU is available",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")),
        (["data.download=false"], "data.download=true"),
        (["+data.augment.blur={}"], "data.augment.blur is not an augmentation step"),
        pytest.param(["model=airbench", "+trainer.sync_batchnorm=true"], "SyncBatchNorm does not run on cpu",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")),
    ],
)
def test_bad_command_lines_fail_in_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    line = _bad(tmp_path, FAST + [f"paths.data_dir={tmp_path / 'empty'}"] + args)
    assert expected in line


def test_bad_image_folder_from_the_command_line(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "imgs", n_train=2, n_test=2)
    shutil.rmtree(root / "test" / "dog")
    line = _bad(tmp_path, FAST + folder_overrides(root, tmp_path))
    assert "train and test classes differ" in line and "dog" in line
    empty = tmp_path / "empty_imgs"
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (empty / split / name).mkdir(parents=True)
    assert "no PNG or JPEG images" in _bad(tmp_path, FAST + folder_overrides(empty, tmp_path))


def test_val_size_0_trains_on_everything_tests_and_exits_0(image_folder: Path, tmp_path: Path) -> None:
    """The tutorial trains on all training images: no validation split, so no val/acc_best,
    and the final weights are tested; a sweep's optimized metric falls back to test/acc."""
    logs = tmp_path / "logs"
    args = FAST + folder_overrides(image_folder, tmp_path) + ["data.val_size=0", "trainer.max_epochs=2", f"paths.log_dir={logs}"]
    r = run_cli("train.py", args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = run_dirs(logs)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 2
    assert metrics["steps"] == 2 * 9  # all 72 training images, batch 8
    assert "val/acc_best" not in metrics and 0 <= metrics["test/acc"] <= 1
    assert sum(map(sum, metrics["test/confusion_matrix"])) == 36
    assert "returning test/acc instead" in r.stdout + r.stderr


class BatchDigests(L.Callback):
    """Records, per epoch, a digest of every training batch and the epoch's mean training loss."""

    def __init__(self) -> None:
        self.batches: list[list[float]] = []
        self.losses: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.batches.append([])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches[-1].append(float(batch[0].double().sum()) + 1e3 * float(batch[1].sum()))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def overfit_run(image_folder: Path, compose_cfg, tmp_path: Path, monkeypatch, epochs: int) -> BatchDigests:
    probe = BatchDigests()
    add_callback(monkeypatch, probe)
    cfg = compose_cfg(FAST + folder_overrides(image_folder, tmp_path) + ["debug=overfit", f"trainer.max_epochs={epochs}", "test=false"])
    train(cfg)
    assert len(probe.batches) == epochs and len(probe.batches[0]) == 4  # overfit_batches=4
    assert all(epoch == probe.batches[0] for epoch in probe.batches)  # the same 4 batches every epoch
    return probe


def test_debug_overfit_repeats_the_same_batches(image_folder: Path, compose_cfg, tmp_path: Path, monkeypatch) -> None:
    overfit_run(image_folder, compose_cfg, tmp_path, monkeypatch, epochs=3)


@pytest.mark.slow
def test_debug_overfit_overfits(image_folder: Path, compose_cfg, tmp_path: Path, monkeypatch) -> None:
    probe = overfit_run(image_folder, compose_cfg, tmp_path, monkeypatch, epochs=30)  # debug=overfit's own 30
    assert probe.losses[-1] < 0.2 * probe.losses[0]


def test_precision_auto_never_picks_emulated_bf16(monkeypatch) -> None:
    from cifarkit.train import resolve_precision

    asked: list[dict] = []

    def bf16_supported(including_emulation: bool = True) -> bool:  # a pre-Ampere GPU: emulation only
        asked.append({"including_emulation": including_emulation})
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_supported)
    assert resolve_precision("auto", "cuda") == "16-mixed"
    assert asked == [{"including_emulation": False}]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere and later
    assert resolve_precision("auto", "cuda") == "bf16-mixed"
    assert resolve_precision("32-true", "cuda") == "32-true"
    cpu = resolve_precision("auto", "cpu")
    assert cpu == ("bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true")


def test_eval_prepares_images_as_the_checkpoint_says(image_folder: Path, compose_cfg, tmp_path: Path) -> None:
    """A net trained on 16-pixel, unnormalized images with its own validation split is scored on
    images prepared the same way, whatever eval.py's data options say."""
    cfg = compose_cfg(FAST + folder_overrides(image_folder, tmp_path) + [
        "data.image_size=16", "data.normalize=false", "data.val_size=6", "trainer.max_epochs=2"])
    train(cfg)
    trained = json.loads((tmp_path / "out" / "metrics.json").read_text())
    ecfg = compose_cfg(["trainer=cpu", f"ckpt_path={trained['best_ckpt']}", *folder_overrides(image_folder, tmp_path)],
                       config_name="eval")
    assert ecfg.data.image_size == 32 and ecfg.data.normalize and ecfg.data.val_size == 12  # what the options say
    evaluated = evaluate(ecfg)
    assert evaluated["test/acc"] == pytest.approx(trained["test/acc"], abs=1e-6)
    assert evaluated["test/loss"] == pytest.approx(trained["test/loss"], rel=1e-4)
    assert evaluated["test/confusion_matrix"] == trained["test/confusion_matrix"]


def test_optimized_value_without_validation() -> None:
    """val_size=0: test/acc stands in; with test=false too the run still ends well (nan), while a
    misspelt metric with a validation split is still an error."""
    assert optimized_value("val/acc_best", {"test/acc": 0.5}, has_validation=False) == 0.5
    assert math.isnan(optimized_value("val/acc_best", {"train/loss": 1.0}, has_validation=False))
    with pytest.raises(UserError, match="val/acc_bestt was not logged"):
        optimized_value("val/acc_bestt", {"val/acc_best": 0.5}, has_validation=True)
