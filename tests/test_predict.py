"""predict.py: top-k classes for your own image files, from the checkpoint alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from cifarkit.core.errors import UserError
from cifarkit.data.images import image_files, load_image, normalize
from cifarkit.infer.predict import predict
from cifarkit.nets.models import BasicCNN
from cifarkit.nets.saved import SavedNet
from cifarkit.run.jobs import train_job
from cifarkit.run.schema import check
from conftest import FAST, craft_checkpoint, folder_overrides
from tiny_files import CLASSES3, hide_metadata_beside


def test_predicts_a_folder(image_folder: Path, tmp_path: Path, compose_cfg, main) -> None:
    train_job(compose_cfg(FAST + folder_overrides(image_folder, tmp_path) + ["test=false"]))
    ckpt = tmp_path / "out" / "checkpoints" / "last.ckpt"
    inputs = tmp_path / "mine"
    (inputs / "nested").mkdir(parents=True)
    Image.open(next((image_folder / "test" / "dog").glob("*"))).save(inputs / "a.png")  # a JPEG, saved as PNG
    Image.new("RGB", (57, 41), (200, 30, 30)).save(inputs / "nested" / "b.jpeg", quality=90)  # another size
    (inputs / "notes.txt").write_text("not an image\n")

    r = main(
        "predict.py", [f"ckpt_path={ckpt}", f"inputs={inputs}", "format=json", f"paths.log_dir={tmp_path / 'logs'}"]
    )
    assert r.code == 0, r.err
    rows = [json.loads(line) for line in r.out.splitlines()]
    assert [Path(row["path"]).relative_to(inputs).as_posix() for row in rows] == ["a.png", "nested/b.jpeg"]
    for row in rows:
        names, probs = zip(*row["top"])
        assert len(names) == 3 and set(names) == set(CLASSES3)  # top-3 of the checkpoint's 3 classes
        assert list(probs) == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
        assert 0.99 < sum(probs) <= 1 + 1e-5
    assert "notes.txt" in r.err and "Traceback" not in r.err

    # the probabilities are the net's own, on images prepared as the checkpoint says
    saved = SavedNet.read(ckpt)
    net, info = saved.rebuild(["cifarkit."]), saved.data
    for row in rows:
        x = torch.from_numpy(load_image(Path(row["path"]), info.image_size).copy()).permute(2, 0, 1)[None]
        with torch.no_grad():
            probs = net(normalize(x, torch.tensor(info.mean), torch.tensor(info.std))).softmax(1)[0]
        expected = sorted(zip(probs.tolist(), info.classes), reverse=True)
        assert [name for name, _ in row["top"]] == [name for _, name in expected]
        assert [p for _, p in row["top"]] == pytest.approx([p for p, _ in expected], abs=1e-5)

    r = main(
        "predict.py",
        [f"ckpt_path={ckpt}", f"inputs={inputs / 'a.png'}", "top_k=2", f"paths.log_dir={tmp_path / 'logs'}"],
    )
    assert r.code == 0, r.err
    path, *top = r.out.strip().split("\t")
    assert path == str(inputs / "a.png") and len(top) == 2 and top[0].split()[0] in CLASSES3


def test_hidden_files_in_a_folder_are_not_read(tmp_path: Path) -> None:
    inputs = tmp_path / ".local" / "mine"  # a hidden parent is fine
    (inputs / "nested").mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(inputs / "a.png")
    Image.new("RGB", (32, 32), "blue").save(inputs / "nested" / "b.jpg")
    hide_metadata_beside(inputs)
    assert image_files(str(inputs)) == [inputs / "a.png", inputs / "nested" / "b.jpg"]
    # named on its own, a hidden file is still what was asked for (and is reported as unreadable)
    assert image_files(str(inputs / "._a.png")) == [inputs / "._a.png"]


def test_bad_inputs_and_options(tmp_path: Path, compose_cfg) -> None:
    net = {"_target_": "cifarkit.nets.models.BasicCNN"}
    ckpt = craft_checkpoint(tmp_path / "c.ckpt", net, BasicCNN(num_classes=3).state_dict())
    craft_checkpoint(tmp_path / "empty.ckpt", net)
    for overrides, message in (
        ([f"inputs={ckpt}", f"ckpt_path={tmp_path / 'empty.ckpt'}"], "weights do not fit"),
        ([f"inputs={ckpt}", f"ckpt_path={ckpt}", "format=xml"], "format=xml"),
        ([f"inputs={ckpt}", f"ckpt_path={ckpt}", "top_k=0"], "top_k=0: must be an integer of at least 1"),
        ([f"inputs={tmp_path / 'missing'}", f"ckpt_path={ckpt}"], "does not exist"),
        ([f"inputs={ckpt}", f"ckpt_path={ckpt}"], "no PNG or JPEG image"),  # the only file is not an image
    ):
        cfg = compose_cfg(overrides, config_name="predict")
        with pytest.raises(UserError, match=message):
            check(cfg)  # as predict.py's command line checks it first
            predict(cfg)
