"""predict.py: top-k classes for your own image files, from the checkpoint alone, running no code from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import CLASSES3, FAST, folder_overrides, run_cli
from PIL import Image

from cifarkit.errors import UserError
from cifarkit.model import BasicCNN
from cifarkit.checkpoints import check_net_config, rebuild_net
from cifarkit.data import load_image, normalize
from cifarkit.predict import predict
from cifarkit.train import train


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def crafted_checkpoint(path: Path, net: dict, weights: dict | None = None) -> Path:
    """A checkpoint in train.py's layout (plain dicts only) whose net config is ``net``."""
    info = {"classes": CLASSES3, "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 32}
    state = {f"net.{k}": v for k, v in (weights or {}).items()}
    torch.save({"state_dict": state, "hyper_parameters": {"net": net, "classes": CLASSES3}, "data_info": info}, path)
    return path


class Payload:
    """Unpickling this object would create ``marker``: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_predicts_a_folder(image_folder: Path, tmp_path: Path, compose_cfg) -> None:
    train(compose_cfg(FAST + folder_overrides(image_folder, tmp_path)))
    ckpt = tmp_path / "out" / "checkpoints" / "last.ckpt"
    inputs = tmp_path / "mine"
    (inputs / "nested").mkdir(parents=True)
    Image.open(next((image_folder / "test" / "dog").glob("*"))).save(inputs / "a.png")  # a JPEG, saved as PNG
    Image.new("RGB", (57, 41), (200, 30, 30)).save(inputs / "nested" / "b.jpeg", quality=90)  # another size
    (inputs / "notes.txt").write_text("not an image\n")

    r = run_cli("predict.py", [f"ckpt_path={ckpt}", f"inputs={inputs}", "format=json"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [Path(row["path"]).relative_to(inputs).as_posix() for row in rows] == ["a.png", "nested/b.jpeg"]
    for row in rows:
        names, probs = zip(*row["top"])
        assert len(names) == 3 and set(names) == set(CLASSES3)  # top-3 of the checkpoint's 3 classes
        assert list(probs) == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
        assert 0.99 < sum(probs) <= 1 + 1e-5
    assert "notes.txt" in r.stderr and "Traceback" not in r.stderr

    # the probabilities are the net's own, on images prepared as the checkpoint says
    net, info = rebuild_net(ckpt, ["cifarkit."])
    for row in rows:
        x = torch.from_numpy(load_image(Path(row["path"]), info["image_size"])).permute(2, 0, 1)[None]
        with torch.no_grad():
            probs = net(normalize(x, torch.tensor(info["mean"]), torch.tensor(info["std"]))).softmax(1)[0]
        expected = sorted(zip(probs.tolist(), info["classes"]), reverse=True)
        assert [name for name, _ in row["top"]] == [name for _, name in expected]
        assert [p for _, p in row["top"]] == pytest.approx([p for p, _ in expected], abs=1e-5)

    r = run_cli("predict.py", [f"ckpt_path={ckpt}", f"inputs={inputs / 'a.png'}", "top_k=2"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    path, *top = r.stdout.strip().split("\t")
    assert path == str(inputs / "a.png") and len(top) == 2 and top[0].split()[0] in CLASSES3


def test_pickle_payload_is_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Payload(marker)}, ckpt)
    (tmp_path / "img.png").write_bytes(b"")
    r = run_cli("predict.py", [f"ckpt_path={ckpt}", f"inputs={tmp_path / 'img.png'}"], cwd=tmp_path)
    assert r.returncode == 1
    assert "is not a readable checkpoint" in one_error_line(r.stderr)
    assert not marker.exists()


def test_nested_targets_are_checked() -> None:
    check_net_config({"_target_": "cifarkit.model.BasicCNN", "image_size": 32}, ["cifarkit."])
    with pytest.raises(UserError, match=r"net.block .*subprocess.run"):
        check_net_config({"_target_": "cifarkit.model.BasicCNN", "block": {"_target_": "subprocess.run"}}, ["cifarkit."])
    with pytest.raises(UserError, match=r"net.layers\[0\] .*builtins.eval"):
        check_net_config({"_target_": "cifarkit.model.BasicCNN", "layers": [{"_target_": "builtins.eval"}]}, ["cifarkit."])
    # a resolver would build this target only at instantiation time
    smuggled = {"_target_": "cifarkit.model.BasicCNN", "block": "${oc.create:{_target_: os.system, _args_: [ls]}}"}
    with pytest.raises(UserError, match="interpolation"):
        check_net_config(smuggled, ["cifarkit."])
    # judged on the resolved object: numpy and torch reached through a trusted module's attributes
    for target in ("cifarkit.data.np.savetxt", "cifarkit.model.nn.Linear", "cifarkit.model.torch.nn.Linear"):
        with pytest.raises(UserError, match="only nn.Module classes defined under"):
            check_net_config({"_target_": target}, ["cifarkit."])
    for key in ("_partial_", "_args_", "_recursive_", "_convert_"):
        with pytest.raises(UserError, match=key):
            check_net_config({"_target_": "cifarkit.model.BasicCNN", key: True}, ["cifarkit."])


def test_cifarkit_target_that_is_not_a_net_is_refused(tmp_path: Path, compose_cfg) -> None:
    ckpt = crafted_checkpoint(tmp_path / "odd.ckpt", {"_target_": "cifarkit.cli.fail", "message": "x"})
    Image.new("RGB", (32, 32)).save(tmp_path / "img.png")
    cfg = compose_cfg([f"ckpt_path={ckpt}", f"inputs={tmp_path / 'img.png'}"], config_name="predict")
    with pytest.raises(UserError, match="not an nn.Module class"):
        predict(cfg)


def test_bad_inputs_and_options(tmp_path: Path, compose_cfg) -> None:
    net = {"_target_": "cifarkit.model.BasicCNN"}
    ckpt = crafted_checkpoint(tmp_path / "c.ckpt", net, BasicCNN(num_classes=3).state_dict())
    crafted_checkpoint(tmp_path / "empty.ckpt", net)
    for overrides, message in (
        ([f"inputs={ckpt}", f"ckpt_path={tmp_path / 'empty.ckpt'}"], "weights do not fit"),
        ([f"inputs={ckpt}", f"ckpt_path={ckpt}", "format=xml"], "format=xml"),
        ([f"inputs={ckpt}", f"ckpt_path={ckpt}", "top_k=0"], "top_k=0"),
        ([f"inputs={tmp_path / 'missing'}", f"ckpt_path={ckpt}"], "does not exist"),
        ([f"inputs={ckpt}", f"ckpt_path={ckpt}"], "no PNG or JPEG image"),  # the only file is not an image
    ):
        cfg = compose_cfg(overrides, config_name="predict")
        with pytest.raises(UserError, match=message):
            predict(cfg)
