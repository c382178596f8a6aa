"""Doors the first trust boundary did not list: weights files, checkpoints scanned by ``ckpt_path=auto``, the
data cache and its statistics, metrics.json, a run folder's YAML, and the length of an error line. Each test
hands the project the crafted file and asserts the one line, the bound or the unchanged answer."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from cifarkit.core import rundir
from cifarkit.core.errors import UserError, one_line
from cifarkit.core.untrusted.plain import read_yaml
from cifarkit.core.untrusted.tensors import read_weights_file
from cifarkit.run.sweep import collect
from conftest import FAST, datamodule, error_line, folder_overrides, inflating, run_measured
from test_checkpoints import basic_cnn_weights

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is an optional extra")


def peak_of(call: str, *args: str) -> list[str]:
    """The lines a fresh interpreter prints running ``call`` (after torch and the project are imported), the last
    its peak memory growth in MB."""
    setup = "import sys\nfrom pathlib import Path\nimport torch\nfrom cifarkit.core import rundir\n"
    setup += "from cifarkit.core.untrusted import tensors\nbefore = peak_mb()\n"
    r = run_measured(setup + call + '\nprint(peak_mb() - before, "MB")\n', *args)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()


def test_a_weights_file_that_inflates_is_refused_without_the_memory(tmp_path: Path) -> None:
    """A 0.3 MB weights file whose record inflates to 300 MB: one line, the process grows by far less."""
    crafted = inflating(tmp_path / "weights.pth", 300_000_000)
    assert crafted.stat().st_size * 500 < 300_000_000
    call = (
        "try:\n    tensors.read_weights_file(Path(sys.argv[1]), 'model.net.weights=w.pth', 'pass another')\n"
        "except Exception as e:\n    print(type(e).__name__, e)"
    )
    message, grown = peak_of(call, str(crafted))
    assert message.startswith("UserError model.net.weights=w.pth holds compressed records (300.0 MB"), message
    assert int(grown.split()[0]) < 100, grown


def test_auto_resume_scans_an_inflating_checkpoint_without_the_memory(tmp_path: Path) -> None:
    """``ckpt_path=auto`` reads each checkpoint's step: a 0.3 MB ``last.ckpt`` that would inflate to 300 MB counts
    as unreadable, and costs no memory."""
    crafted = inflating(tmp_path / "last.ckpt", 300_000_000)
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"net.x": torch.zeros(3)}, "global_step": 7}, good)
    step, grown = peak_of("print(rundir.checkpoint_step(Path(sys.argv[1])))", str(crafted))
    assert step == "None" and int(grown.split()[0]) < 100, (step, grown)
    assert rundir.checkpoint_step(good) == 7


@pytest.mark.parametrize(
    ("entry", "phrase"),
    [
        ({"w": torch.zeros(4, 4).to_sparse()}, "entry w that is not a plain dense tensor"),
        ({"w": torch.zeros(1).expand(1000)}, "entry w that is not a plain dense tensor"),
        ({"w": [1, 2, 3]}, "entry w that is not a plain dense tensor"),
        ({}, "holds no state dict of tensors"),
    ],
    ids=["sparse", "stretched_view", "not_a_tensor", "empty"],
)
def test_a_weights_file_holds_plain_dense_tensors_only(entry: dict, phrase: str, tmp_path: Path) -> None:
    torch.save(entry, tmp_path / "w.pth")
    with pytest.raises(UserError, match=phrase):
        read_weights_file(tmp_path / "w.pth", "model.net.weights=w.pth", "pass another")


def test_a_sparse_weight_in_a_checkpoint_is_one_line_for_predict_and_export(main, tmp_path: Path) -> None:
    """A checkpoint whose net weights hold a sparse tensor: predict.py and export.py stop in one line."""
    from conftest import craft_checkpoint

    weights = basic_cnn_weights() | {"fc3.bias": torch.zeros(3).to_sparse()}
    ckpt = craft_checkpoint(tmp_path / "sparse.ckpt", {"_target_": "cifarkit.nets.models.BasicCNN"}, weights)
    image = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (10, 20, 30)).save(image)
    for script, args in [
        ("predict.py", [f"inputs={image}"]),
        ("export.py", [f"output={tmp_path / 'net.onnx'}"]),
    ]:
        r = main(script, [f"ckpt_path={ckpt}", f"paths.log_dir={tmp_path / 'logs'}", *args])
        line = error_line(r.err)
        assert r.code == 1 and "weight net.fc3.bias that is not a plain stored tensor" in line, (script, line)


@needs_timm
def test_a_weights_file_is_read_once_and_timm_gets_its_tensors(tmp_path: Path, monkeypatch) -> None:
    """timm is handed the tensors the trust layer read, never the file (its own reader would read it again,
    unchecked): the built net holds exactly the file's weights."""
    import timm
    from timm.models import _builder

    from cifarkit.nets.models import TimmNet
    from cifarkit.nets.start import TimmWeights, timm_start

    source = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pth")

    def no_second_read(*args, **kwargs):
        raise AssertionError("timm read the weights file itself")

    monkeypatch.setattr(_builder, "load_state_dict", no_second_read)
    net = TimmNet("resnet10t", num_classes=3, image_size=32, cifar_stem=False, input_size=176)
    cfg = timm.models.get_pretrained_cfg("resnet10t")
    start = timm_start(TimmWeights("resnet10t", str(tmp_path / "w.pth"), 3, list(cfg.mean), list(cfg.std)), net, 3)
    for key, value in source.state_dict().items():  # the head starts new: timm's config is for 1,000 classes
        assert key.startswith("fc.") or torch.equal(start.weights[f"model.{key}"], value), key


def test_a_data_cache_with_labels_outside_the_classes_is_decoded_again(image_folder: Path, tmp_path: Path) -> None:
    """A cache whose labels name a class the source does not have (or whose bytes are garbage) is not trained on:
    it is decoded again, and the split's labels are the folder's."""
    overrides = folder_overrides(image_folder, tmp_path)
    dm = datamodule(tmp_path, overrides)
    dm.setup("fit")
    labels = dm.splits["train"][1].clone()
    cached = torch.load(dm.cache_file, weights_only=True)
    for crafted in (
        {**cached, "train_y": torch.full_like(cached["train_y"], 10**6)},
        {**cached, "test_x": cached["test_x"].float()},
        b"garbage",
    ):
        if isinstance(crafted, bytes):
            dm.cache_file.write_bytes(crafted)
        else:
            torch.save(crafted, dm.cache_file)
        again = datamodule(tmp_path, overrides)
        again.setup("fit")
        assert torch.equal(again.splits["train"][1], labels)
        assert torch.equal(torch.load(dm.cache_file, weights_only=True)["train_y"], cached["train_y"])


@pytest.mark.parametrize(
    "stats", [{"mean": [1e9, 0, 0], "std": [1, 1, 1]}, {"mean": [0.5] * 3, "std": [0.0] * 3}, {"mean": "x"}, []]
)
def test_cached_statistics_out_of_bounds_are_computed_again(stats, image_folder: Path, tmp_path: Path) -> None:
    overrides = folder_overrides(image_folder, tmp_path)
    dm = datamodule(tmp_path, overrides)
    dm.setup("fit")
    (stats_file,) = dm.cache_file.parent.glob("*.stats-*.json")
    stats_file.write_text(json.dumps(stats))
    again = datamodule(tmp_path, overrides)
    again.setup("fit")
    assert (again.mean, again.std) == (dm.mean, dm.std)


@pytest.mark.parametrize(
    "record",
    [
        {"status": "completed", "test/acc": "0.9"},
        {"status": "completed", "test/acc": None},
        {"status": "done"},
        {"status": "completed", "steps": -1},
        {"status": "completed", "error": "x" * 10_000},
        {"status": "completed", "test/acc_class": {"a": "NaN"}},
    ],
    ids=["metric_a_string", "metric_null", "unknown_status", "negative_steps", "huge_error", "per_class_a_string"],
)
def test_a_metrics_file_out_of_its_schema_is_not_believed(record: dict, tmp_path: Path) -> None:
    """metrics.json that train.py could not have written: the run counts as not completed (``ckpt_path=auto``
    continues it) and a sweep's summary says failed, with no traceback."""
    job = tmp_path / "sweep" / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- model.optimizer.lr=0.1\n")
    rundir.metrics_file(job).write_text(json.dumps(record))
    assert rundir.read_metrics(job) is None and not rundir.completed(job)
    rows, _ = collect(tmp_path / "sweep", ["test/acc"], "model.optimizer.lr")
    assert rows[0]["status"] == "failed" and rows[0]["test/acc"] == ""
    written = {"status": "completed", "test/acc": 0.5, "steps": 3, "test/acc_class": {"a": 0.5, "b": 0.5}}
    rundir.metrics_file(job).write_text(json.dumps(written | {"test/confusion_matrix": [[1, 1], [1, 1]]}))
    assert rundir.completed(job) and collect(tmp_path / "sweep", ["test/acc"], "x")[0][0]["test/acc"] == 0.5


def test_a_run_folders_yaml_with_aliases_or_over_its_size_is_not_read(tmp_path: Path) -> None:
    """An alias of an alias doubles at each level once OmegaConf copies it: such a config.yaml (or one of 20 MB)
    makes its run not match, at once."""
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    (tmp_path / "bomb.yaml").write_text("\n".join(levels) + "\n")
    assert read_yaml(tmp_path / "bomb.yaml") is None
    (tmp_path / "big.yaml").write_text("a: " + "x" * 20_000_000 + "\n")
    assert read_yaml(tmp_path / "big.yaml") is None
    (tmp_path / "ok.yaml").write_text("- a=1\n")
    assert list(read_yaml(tmp_path / "ok.yaml")) == ["a=1"]


def test_an_error_line_is_bounded_and_keeps_its_fix() -> None:
    line = one_line(UserError("the checkpoint's net names " + "x" * 1_000_000 + "; pass a .ckpt written by train.py"))
    assert len(line) <= 600 and line.startswith("the checkpoint's net names xxx")
    assert line.endswith("; pass a .ckpt written by train.py") and "characters left out" in line


def test_init_from_a_crafted_checkpoint_is_one_bounded_line_naming_init_from(main, image_folder, tmp_path) -> None:
    """A checkpoint whose ``_target_`` is a million characters, given as ``model.init_from``: one line of a few
    hundred characters naming model.init_from (the option the user set), not ckpt_path."""
    from conftest import craft_checkpoint

    ckpt = craft_checkpoint(
        tmp_path / "crafted.ckpt", {"_target_": "cifarkit.nets.models." + "B" * 1_000_000}, basic_cnn_weights()
    )
    r = main(
        "train.py",
        [*FAST, *folder_overrides(image_folder, tmp_path), f"paths.log_dir={tmp_path / 'logs'}"]
        + [f"model.init_from={ckpt}", "+trainer.limit_train_batches=1"],
    )
    line = error_line(r.err)
    assert r.code == 1 and len(line) < 600 and f"model.init_from={ckpt}" in line and "ckpt_path" not in line, line
