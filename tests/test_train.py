"""Training and evaluation end to end on CPU: sources, seeds, options, resuming and testing a checkpoint."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from cifarkit.core.devices import resolve_precision
from cifarkit.core.errors import UserError
from cifarkit.fit.metrics import optimized_value
from cifarkit.run.jobs import eval_job, train_job
from cifarkit.run.schema import check
from conftest import FAST, add_callback, folder_overrides, run_dirs
from tiny_files import write_image_folder


@pytest.mark.parametrize("source", ["cifar10", "image_folder"])
def test_fast_dev_run_on_both_sources(source: str, request, compose_cfg, tmp_path: Path) -> None:
    if source == "cifar10":
        request.getfixturevalue("tiny_cifar10")
        data = [f"paths.data_dir={tmp_path / 'data'}", "data.val_size=50"]
    else:
        data = folder_overrides(request.getfixturevalue("image_folder"), tmp_path)
    cfg = compose_cfg(FAST + data + ["debug=fdr"])
    value = train_job(cfg)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 1
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["test/loss"] > 0
    assert value == metrics["val/acc_best"]


@pytest.mark.slow  # two runs to compare; the resume-equality tests also need determinism
def test_same_seed_same_metrics(image_folder: Path, compose_cfg, tmp_path: Path) -> None:
    results = []
    for _ in range(2):
        cfg = compose_cfg(FAST + folder_overrides(image_folder, tmp_path) + ["seed=7", "trainer.max_epochs=2"])
        train_job(cfg)
        results.append(json.loads((tmp_path / "out" / "metrics.json").read_text()))
        shutil.rmtree(tmp_path / "out")
    keys = ["val/acc_best", "test/acc", "test/loss", "train/loss", "val/loss"]
    assert [r[k] for r in results for k in keys][:5] == [results[1][k] for k in keys]
    cfg = compose_cfg(FAST + folder_overrides(image_folder, tmp_path) + ["seed=8", "trainer.max_epochs=2"])
    train_job(cfg)
    other = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert other["train/loss"] != results[0]["train/loss"]


@pytest.mark.slow  # a run for each option
def test_optimizer_scheduler_and_loss_options_train(image_folder: Path, compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg(
        FAST
        + folder_overrides(image_folder, tmp_path)
        + [
            "trainer.max_epochs=2",
            "model.optimizer._target_=torch.optim.SGD",
            "model.optimizer.fused=null",
            "+model.optimizer.momentum=0.9",
            "model.label_smoothing=0.1",
            "test=false",
            "model.scheduler={_target_: torch.optim.lr_scheduler.StepLR, _partial_: true, step_size: 1, gamma: 0.5}",
        ]
    )
    train_job(cfg)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "test/acc" not in metrics and metrics["epochs"] == 2
    ckpt = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", weights_only=True)
    (opt,) = ckpt["optimizer_states"]
    # last.ckpt is written at the end of epoch 2, after that epoch's scheduler step: halved twice
    assert ckpt["epoch"] == 1 and ckpt["lr_schedulers"][0]["last_epoch"] == 2
    assert opt["param_groups"][0]["momentum"] == 0.9 and opt["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.5**2)


def test_data_with_other_classes_is_refused_by_eval_and_by_a_resume(
    image_folder: Path, compose_cfg, tmp_path: Path
) -> None:
    cfg = compose_cfg(
        FAST + folder_overrides(image_folder, tmp_path) + ["+trainer.limit_train_batches=2", "test=false"]
    )
    train_job(cfg)
    ckpt = tmp_path / "out" / "checkpoints" / "last.ckpt"
    for classes in (["a", "b", "c", "d"], ["cat", "dog", "toad"]):  # more classes; as many, one of them another
        other = write_image_folder(tmp_path / "-".join(classes), n_train=3, n_test=2, classes=classes)
        data = ["data=image_folder", f"data.root={other}", f"paths.data_dir={tmp_path / 'data'}", "data.val_size=1"]
        with pytest.raises(UserError, match="the checkpoint's classes .* differ from the data's"):
            eval_job(compose_cfg(["trainer=cpu", f"ckpt_path={ckpt}", *data], config_name="eval"))
        resume = compose_cfg(FAST + data + [f"ckpt_path={ckpt}", "trainer.max_epochs=2"])
        with open_dict(resume):
            resume.paths.output_dir = str(tmp_path / "resumed")
        with pytest.raises(UserError, match="the checkpoint's classes .* differ from the data's"):
            train_job(resume)
        assert not (tmp_path / "resumed" / "checkpoints").exists()  # refused before a step was taken


class BatchDigests(L.Callback):
    """Records, per epoch, a digest of every training batch and the epoch's mean training loss."""

    def __init__(self) -> None:
        self.batches: list[list[float]] = []
        self.losses: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.batches.append([])
        if len(self.batches) > 1:  # the classifier logs an epoch's loss after the callbacks' epoch end
            self.losses.append(float(trainer.callback_metrics["train/loss"]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches[-1].append(float(batch[0].double().sum()) + 1e3 * float(batch[1].sum()))

    def on_train_end(self, trainer, pl_module) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def overfit_run(image_folder: Path, compose_cfg, tmp_path: Path, monkeypatch, epochs: int) -> BatchDigests:
    probe = BatchDigests()
    add_callback(monkeypatch, probe)
    cfg = compose_cfg(
        FAST
        + folder_overrides(image_folder, tmp_path)
        + ["debug=overfit", f"trainer.max_epochs={epochs}", "test=false"]
    )
    train_job(cfg)
    assert len(probe.batches) == epochs and len(probe.batches[0]) == 4  # overfit_batches=4
    assert all(epoch == probe.batches[0] for epoch in probe.batches)  # the same 4 batches every epoch
    return probe


@pytest.mark.slow  # several epochs of debug=overfit
def test_debug_overfit_repeats_the_same_batches(image_folder: Path, compose_cfg, tmp_path: Path, monkeypatch) -> None:
    overfit_run(image_folder, compose_cfg, tmp_path, monkeypatch, epochs=3)


@pytest.mark.slow
def test_debug_overfit_overfits(image_folder: Path, compose_cfg, tmp_path: Path, monkeypatch) -> None:
    probe = overfit_run(image_folder, compose_cfg, tmp_path, monkeypatch, epochs=30)  # debug=overfit's own 30
    assert probe.losses[-1] < 0.2 * probe.losses[0]


def test_precision_auto_never_picks_emulated_bf16(monkeypatch) -> None:
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
    cfg = compose_cfg(
        FAST
        + folder_overrides(image_folder, tmp_path)
        + ["data.image_size=16", "data.normalize=false", "data.val_size=6", "trainer.max_epochs=2"]
    )
    train_job(cfg)
    trained = json.loads((tmp_path / "out" / "metrics.json").read_text())
    ecfg = compose_cfg(
        ["trainer=cpu", f"ckpt_path={trained['best_ckpt']}", *folder_overrides(image_folder, tmp_path)],
        config_name="eval",
    )
    evaluated = eval_job(ecfg)  # whose data options say 32 pixels, normalized
    assert evaluated["test/acc"] == pytest.approx(trained["test/acc"], abs=1e-6)
    assert evaluated["test/loss"] == pytest.approx(trained["test/loss"], rel=1e-4)
    assert evaluated["test/confusion_matrix"] == trained["test/confusion_matrix"]


def test_optimized_value_without_validation() -> None:
    """val_size=0: test/acc stands in; with test=false too, or a run that ended before its first
    validation, the run still ends well (nan); a misspelt metric of a validated run is an error."""
    assert optimized_value("val/acc_best", {"test/acc": 0.5}, has_validation=False) == 0.5
    assert math.isnan(optimized_value("val/acc_best", {"train/loss": 1.0}, has_validation=False))
    assert math.isnan(optimized_value("val/acc_best", {"train/loss": 1.0, "test/acc": 0.5}, has_validation=True))
    with pytest.raises(UserError, match="val/acc_bestt was not logged"):
        optimized_value("val/acc_bestt", {"val/acc_best": 0.5}, has_validation=True)


@pytest.mark.filterwarnings(
    "ignore:`ModelCheckpoint\\(monitor='val/acc'\\)` could not find"
)  # Lightning's note that no validation ran
def test_a_run_that_stops_before_its_first_validation_ends_well(image_folder: Path, main, tmp_path: Path) -> None:
    """The default recipe cut to 3 steps of a 9-step epoch: trained, tested, exit 0, optimized metric nan."""
    logs = tmp_path / "logs"
    r = main(
        "train.py", FAST + folder_overrides(image_folder, tmp_path) + ["trainer.max_steps=3", f"paths.log_dir={logs}"]
    )
    assert r.code == 0, r.err[-3000:]
    assert "the run ended before its first validation, so val/acc_best was not measured; returning nan" in r.out + r.err
    metrics = json.loads((run_dirs(logs)[0] / "metrics.json").read_text())
    assert (
        metrics["status"] == "completed"
        and metrics["steps"] == 3
        and "val/acc_best" not in metrics
        and 0 <= metrics["test/acc"] <= 1
    )


@pytest.mark.slow  # a run and three evaluations
def test_eval_tta_option_changes_the_test_and_is_recorded(image_folder: Path, compose_cfg, tmp_path: Path) -> None:
    train_job(compose_cfg(FAST + folder_overrides(image_folder, tmp_path) + ["test=false"]))
    ckpt = tmp_path / "out" / "checkpoints" / "last.ckpt"
    results = {}
    for tta in ("none", "flip_translate"):
        cfg = compose_cfg(
            ["trainer=cpu", f"ckpt_path={ckpt}", f"tta={tta}", *folder_overrides(image_folder, tmp_path)], "eval"
        )
        results[tta] = eval_job(cfg)
        assert json.loads((tmp_path / "out" / "metrics.json").read_text())["tta"] == tta
    assert results["none"]["test/loss"] != results["flip_translate"]["test/loss"]
    assert 0 <= results["flip_translate"]["test/acc"] <= 1
    with pytest.raises(UserError, match="tta=mirror: must be one of none, flip, flip_translate, or null"):
        check(
            compose_cfg(
                ["trainer=cpu", f"ckpt_path={ckpt}", "tta=mirror", *folder_overrides(image_folder, tmp_path)], "eval"
            )
        )


@pytest.mark.slow  # torch.compile's first compilation on the CPU takes tens of seconds
def test_compiled_training_checkpoints_resumes_and_exports(image_folder: Path, compose_cfg, tmp_path: Path) -> None:
    """model.compile=true on the CPU (inductor): the checkpoint holds the plain net's weights, a
    resume from it continues, export.py writes its ONNX model, and eval.py scores it as the
    compiled run's own test did."""
    base = FAST + folder_overrides(image_folder, tmp_path) + ["model.compile=true", "data.image_size=16", "test=false"]
    first = compose_cfg(base)
    train_job(first)
    ckpt = tmp_path / "out" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not any("_orig_mod" in k for k in state) and any(k.startswith("net.") for k in state)
    resumed = compose_cfg(base + [f"ckpt_path={ckpt}", "trainer.max_epochs=2", "test=true"])
    with open_dict(resumed):
        resumed.paths.output_dir = str(tmp_path / "resumed")
    train_job(resumed)
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 2 and metrics["steps"] == 2 * 8

    from cifarkit.infer.export import export_model

    onnx_path, _ = export_model(metrics["best_ckpt"], "onnx", None, ["cifarkit."])
    evaluated = eval_job(
        compose_cfg(
            ["trainer=cpu", f"ckpt_path={metrics['best_ckpt']}", *folder_overrides(image_folder, tmp_path)], "eval"
        )
    )
    assert onnx_path.is_file() and evaluated["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
