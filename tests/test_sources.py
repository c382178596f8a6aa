"""CIFAR-100 and SVHN: the official formats decoded exactly, their splits and mean/std, corrupt and
missing files in one line, and a CIFAR-100 run whose checkpoint eval.py, predict.py and export.py use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hydra.errors import InstantiationException
from PIL import Image

from cifarkit.core.errors import UserError
from cifarkit.data.sources import CIFAR100_COARSE, CIFAR100_FINE, SVHN_CLASSES
from cifarkit.run.schema import check
from conftest import FAST, compose, datamodule, error_line, run_dirs
from tiny_files import CIFAR100_SPLITS, SVHN_SPLITS, cifar100_split, svhn_split


def source(tmp_path: Path, name: str, *overrides: str):
    """The ``data=name`` source under tmp_path/data (20 validation images unless told)."""
    return datamodule(tmp_path, [f"data={name}", f"paths.data_dir={tmp_path / 'data'}", "data.val_size=20", *overrides])


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def assert_stats_of_training_split(dm) -> None:
    """mean/std are the training split's (not validation's, not test's), per channel."""
    x = dm.splits["train"][0].numpy().astype(np.float64) / 255
    assert np.allclose(dm.mean, x.mean(axis=(0, 2, 3)), atol=1e-9)
    assert np.allclose(dm.std, x.transpose(1, 0, 2, 3).reshape(3, -1).std(axis=1, ddof=1), atol=1e-9)


def test_cifar100_decodes_fine_and_coarse_labels_exactly(tiny_cifar100: dict, tmp_path: Path) -> None:
    fine = source(tmp_path, "cifar100")
    assert fine.classes == CIFAR100_FINE and len(fine.classes) == 100
    fine.setup()
    folder = tmp_path / "data" / "cifar-100-python"
    assert (tmp_path / "data" / "cifar-100-python.tar.gz").exists() and (folder / "meta").exists()
    train_x, train_fine, train_coarse = cifar100_split("train")
    test_x, test_fine, test_coarse = cifar100_split("test")
    cached = torch.load(fine.cache_file, weights_only=True)
    assert torch.equal(cached["train_x"], nchw(train_x)) and torch.equal(cached["test_x"], nchw(test_x))
    assert cached["train_y"].tolist() == train_fine.tolist() and cached["test_y"].tolist() == test_fine.tolist()
    n_train = CIFAR100_SPLITS["train"][0]
    assert [len(fine.splits[s][1]) for s in ("train", "val", "test")] == [n_train - 20, 20, CIFAR100_SPLITS["test"][0]]
    assert_stats_of_training_split(fine)

    # The 20 superclasses, from the same files (already here: no download needed), cached apart.
    coarse = source(tmp_path, "cifar100", "data.labels=coarse", "data.download=false")
    assert coarse.classes == CIFAR100_COARSE and coarse.cache_file != fine.cache_file
    coarse.setup()
    cached = torch.load(coarse.cache_file, weights_only=True)
    assert torch.equal(cached["train_x"], nchw(train_x)) and torch.equal(cached["test_x"], nchw(test_x))
    assert cached["train_y"].tolist() == train_coarse.tolist() and cached["test_y"].tolist() == test_coarse.tolist()
    assert torch.equal(coarse.splits["val"][0], fine.splits["val"][0])  # the same images held out
    assert coarse.mean == pytest.approx(fine.mean)


def test_cifar100_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="data.labels=medium: must be one of fine, coarse"):
        check(compose(tmp_path, ["data=cifar100", "data.labels=medium"]))
    with pytest.raises(InstantiationException, match="CIFAR-100 images are 32x32, not data.image_size=64"):
        source(tmp_path, "cifar100", "data.image_size=64")


@pytest.mark.parametrize("broken", ["train", "meta"])
def test_corrupt_cifar100_is_detected(broken: str, tiny_cifar100: dict, tmp_path: Path) -> None:
    source(tmp_path, "cifar100").prepare_data()
    path = tmp_path / "data" / "cifar-100-python" / broken
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    fresh = source(tmp_path, "cifar100", "data.download=false", f"data.cache_dir={tmp_path / 'fresh'}")
    with pytest.raises(
        UserError,
        match=(
            r"CIFAR-100 in data.data_dir=.* is missing or corrupt .*put the "
            r"extracted 'cifar-100-python' folder there"
        ),
    ):
        fresh.prepare_data()


def test_svhn_decodes_pixels_and_digits_exactly(tiny_svhn: dict, tmp_path: Path) -> None:
    dm = source(tmp_path, "svhn")
    assert dm.classes == SVHN_CLASSES == [str(d) for d in range(10)]
    assert dm.augment.flip_p == 0  # a mirrored digit is no digit: crops only
    dm.setup()
    folder = tmp_path / "data" / "svhn"
    assert sorted(p.name for p in folder.glob("*.mat")) == [
        "test_32x32.mat",
        "train_32x32.mat",
    ]  # no extra unless asked
    cached = torch.load(dm.cache_file, weights_only=True)
    for split in ("train", "test"):
        x, digits = svhn_split(split)
        assert 0 in digits.tolist()  # stored as 10 in the file
        assert torch.equal(cached[f"{split}_x"], nchw(x)) and cached[f"{split}_y"].tolist() == digits.tolist(), split
    assert [len(dm.splits[s][1]) for s in ("train", "val", "test")] == [
        SVHN_SPLITS["train"][0] - 20,
        20,
        SVHN_SPLITS["test"][0],
    ]
    assert_stats_of_training_split(dm)

    # extra=true downloads extra_32x32.mat and trains on train + extra, in that order.
    more = source(tmp_path, "svhn", "data.extra=true")
    assert more.cache_file != dm.cache_file
    more.setup()
    assert (folder / "extra_32x32.mat").exists()
    (x, digits), (ex, edigits) = svhn_split("train"), svhn_split("extra")
    cached = torch.load(more.cache_file, weights_only=True)
    assert torch.equal(cached["train_x"], nchw(np.concatenate([x, ex])))
    assert cached["train_y"].tolist() == digits.tolist() + edigits.tolist()
    assert len(more.splits["train"][1]) == SVHN_SPLITS["train"][0] + SVHN_SPLITS["extra"][0] - 20
    assert_stats_of_training_split(more)


def test_corrupt_svhn_is_detected(tiny_svhn: dict, tmp_path: Path) -> None:
    source(tmp_path, "svhn").prepare_data()
    path = tmp_path / "data" / "svhn" / "test_32x32.mat"
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    fresh = source(tmp_path, "svhn", "data.download=false", f"data.cache_dir={tmp_path / 'fresh'}")
    with pytest.raises(
        UserError, match=r"SVHN in data.data_dir=.*svhn is missing or corrupt .*put train_32x32.mat and test_32x32.mat"
    ):
        fresh.prepare_data()


def go_offline(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every URL of the source's files points where nothing listens."""
    from torchvision.datasets import CIFAR100, SVHN

    nowhere = "http://127.0.0.1:9"
    if name == "cifar100":
        monkeypatch.setattr(CIFAR100, "url", f"{nowhere}/cifar-100-python.tar.gz")
    else:
        monkeypatch.setattr(
            SVHN, "split_list", {s: [f"{nowhere}/{f}", f, md5] for s, (_, f, md5) in SVHN.split_list.items()}
        )


WHERE = {
    "cifar100": ("data", "the extracted 'cifar-100-python' folder"),
    "svhn": ("data/svhn", "train_32x32.mat and test_32x32.mat"),
}


@pytest.mark.parametrize("name", ["cifar100", "svhn"])
def test_offline_without_the_files_says_where_to_put_them(name: str, tmp_path: Path, main, monkeypatch) -> None:
    """Offline: one line naming the folder and the files to put there; without downloading: the same."""
    go_offline(name, monkeypatch)
    folder, files = WHERE[name]
    args = FAST + [f"data={name}", f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}"]
    r = main("train.py", args)
    assert r.code == 1
    last = error_line(r.err)
    assert last.startswith(
        f"error: could not download {'CIFAR-100' if name == 'cifar100' else 'SVHN'} into "
        f"data.data_dir={tmp_path / folder} ("
    )
    assert last.endswith(f"put {files} there and run with data.download=false"), last
    with pytest.raises(UserError, match=f"put {files} .*there, or run with data.download=true") as e:
        source(tmp_path, name, "data.download=false").prepare_data()
    assert str(tmp_path / folder) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow  # every door on a second source; cifar10's are in the default suite
def test_cifar100_trains_and_its_checkpoint_evaluates_predicts_and_exports(
    tiny_cifar100: dict, tmp_path: Path, main
) -> None:
    """``python train.py data=cifar100``, then eval.py, predict.py and export.py on its checkpoint, as users do."""
    data = [
        "data=cifar100",
        f"paths.data_dir={tmp_path / 'data'}",
        "data.val_size=20",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    r = main("train.py", FAST + data + ["+trainer.limit_train_batches=2"])  # the whole test split is tested
    assert r.code == 0, r.err[-3000:]
    (run,) = run_dirs(tmp_path / "logs")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and sorted(metrics["test/acc_class"]) == sorted(CIFAR100_FINE)
    assert np.array(metrics["test/confusion_matrix"]).sum() == CIFAR100_SPLITS["test"][0]
    assert (run / "confusion_matrix.png").exists()
    ckpt = run / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["data_info"]["classes"] == CIFAR100_FINE

    r = main("eval.py", ["trainer=cpu", f"ckpt_path={ckpt}", *data])
    assert r.code == 0, r.err[-3000:]
    (evaluated,) = run_dirs(tmp_path / "logs", "eval")
    assert json.loads((evaluated / "metrics.json").read_text())["test/acc"] == pytest.approx(metrics["test/acc"])

    image = tmp_path / "apple.png"
    Image.fromarray(cifar100_split("test")[0][0]).save(image)
    r = main(
        "predict.py",
        [f"ckpt_path={ckpt}", f"inputs={image}", "format=json", "top_k=5", f"paths.log_dir={tmp_path / 'logs'}"],
    )
    assert r.code == 0, r.err[-3000:]
    (row,) = [json.loads(line) for line in r.out.splitlines()]
    assert len(row["top"]) == 5 and {name for name, _ in row["top"]} <= set(CIFAR100_FINE)

    r = main(
        "export.py", [f"ckpt_path={ckpt}", f"output={tmp_path / 'model.onnx'}", f"paths.log_dir={tmp_path / 'logs'}"]
    )
    assert r.code == 0, r.err[-3000:]
    meta = (
        ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
        .get_modelmeta()
        .custom_metadata_map
    )
    assert json.loads(meta["classes"]) == CIFAR100_FINE
