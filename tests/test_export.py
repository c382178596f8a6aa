"""export.py: an ONNX or pt2 file that takes uint8 images and gives the checkpoint's own
probabilities, carries its classes and statistics, and is built through the checkpoint room.

One short training run is shared by the module: its checkpoint is exported to both formats,
and both are compared with the checkpoint, run as predict.py runs it, on 120 images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import CLASSES3, FAST, ROOT, class_images, compose_in, folder_overrides, run_cli, run_dirs
from PIL import Image

from cifarkit.checkpoints import rebuild_net
from cifarkit.data import load_image, normalize
from cifarkit.errors import UserError
from cifarkit.export import PT2_EXTRA_FILE, export, export_model
from cifarkit.predict import predict
from cifarkit.train import train

TRUSTED = ["cifarkit."]
N_IMAGES = 120


@dataclass
class Exported:
    ckpt: Path
    onnx: Path
    pt2: Path
    images: Path  # a folder of N_IMAGES PNG files
    root: Path


@pytest.fixture(scope="module")
def exported(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    root = tmp_path_factory.mktemp("export")
    train(compose_in(root, FAST + folder_overrides(image_folder, root) + ["test=false"], "train"))
    ckpt = root / "out" / "checkpoints" / "last.ckpt"
    images = root / "images"
    images.mkdir()
    for i, img in enumerate(class_images(N_IMAGES, len(CLASSES3), 32, seed=7)[0]):
        Image.fromarray(img).save(images / f"{i:03d}.png")
    onnx_path, _ = export_model(str(ckpt), "onnx", None, TRUSTED)
    pt2_path, _ = export_model(str(ckpt), "pt2", None, TRUSTED)
    return Exported(ckpt, onnx_path, pt2_path, images, root)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_both_formats_match_the_checkpoint(exported: Exported) -> None:
    assert exported.onnx == exported.ckpt.with_suffix(".onnx") and exported.pt2 == exported.ckpt.with_suffix(".pt2")
    net, info = rebuild_net(exported.ckpt, TRUSTED)
    assert info["classes"] == CLASSES3
    files = sorted(exported.images.glob("*.png"))
    x = torch.from_numpy(np.stack([load_image(f, info["image_size"]) for f in files])).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        expected = net(normalize(x, torch.tensor(info["mean"]), torch.tensor(info["std"]))).softmax(dim=1)
    assert len(files) == N_IMAGES and len(set(expected.argmax(1).tolist())) > 1  # a net that tells images apart

    session = ort.InferenceSession(str(exported.onnx), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.type == "tensor(uint8)" and isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 32, 32]
    meta = session.get_modelmeta().custom_metadata_map
    assert {k: json.loads(meta[k]) for k in ("classes", "mean", "std", "image_size")} == info

    extra = {PT2_EXTRA_FILE: ""}
    program = torch.export.load(exported.pt2, extra_files=extra)
    assert json.loads(extra[PT2_EXTRA_FILE]) == info

    with torch.no_grad():
        outputs = {
            "onnx": torch.from_numpy(session.run(None, {inp.name: x.numpy()})[0]),
            "pt2": program.module()(x),
            "onnx, batch of 1": torch.from_numpy(session.run(None, {inp.name: x[:1].numpy()})[0]),
        }
    for name, probs in outputs.items():
        ref = expected[: len(probs)]
        assert probs.shape == ref.shape and probs.dtype == torch.float32, name
        assert torch.equal(probs.argmax(1), ref.argmax(1)), name
        assert (probs - ref).abs().max().item() < 1e-4, name


def test_predict_runs_the_onnx_model(exported: Exported, capsys: pytest.CaptureFixture) -> None:
    """predict.py on the .onnx (ONNX Runtime, a subprocess) names the same classes as on the .ckpt."""
    args = [f"inputs={exported.images}", "format=json", "top_k=2"]
    r = run_cli("predict.py", [f"ckpt_path={exported.onnx}", *args], cwd=exported.root)
    assert r.returncode == 0, r.stderr
    from_onnx = [json.loads(line) for line in r.stdout.splitlines()]

    capsys.readouterr()
    predict(compose_in(exported.root, [f"ckpt_path={exported.ckpt}", *args], "predict"))
    from_ckpt = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    assert len(from_onnx) == len(from_ckpt) == N_IMAGES
    for a, b in zip(from_onnx, from_ckpt):
        assert a["path"] == b["path"] and len(a["top"]) == 2
        assert a["top"][0][0] == b["top"][0][0]
        assert [p for _, p in a["top"]] == pytest.approx([p for _, p in b["top"]], abs=1e-4)


def predict_without_lightning(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """predict.py as ``run_cli`` runs it, in a Python where ``import lightning`` fails (a None in
    ``sys.modules`` makes any import of it raise ImportError), as on a box without Lightning."""
    code = (
        "import runpy, sys; sys.modules['lightning'] = sys.modules['pytorch_lightning'] = None; "
        f"sys.argv = ['predict.py', *sys.argv[1:]]; runpy.run_path({str(ROOT / 'predict.py')!r}, run_name='__main__')"
    )
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_predict_runs_the_onnx_model_without_lightning(exported: Exported, tmp_path: Path) -> None:
    """The .onnx path needs torch, onnxruntime and Hydra only: same output, same one-line errors."""
    args = [f"ckpt_path={exported.onnx}", f"inputs={exported.images}", "format=json"]
    normal = run_cli("predict.py", args, cwd=exported.root)
    assert normal.returncode == 0, normal.stderr
    r = predict_without_lightning(args, cwd=exported.root)
    assert r.returncode == 0, r.stderr
    assert r.stdout == normal.stdout and len(r.stdout.splitlines()) == N_IMAGES

    empty = tmp_path / "empty"
    empty.mkdir()
    r = predict_without_lightning([f"ckpt_path={exported.onnx}", f"inputs={empty}"], cwd=tmp_path)
    assert r.returncode == 1
    assert "no PNG or JPEG image could be read" in one_error_line(r.stderr)
    (run,) = run_dirs(tmp_path / "logs", "predict")
    assert json.loads((run / "metrics.json").read_text())["status"] == "failed"


def test_untrusted_net_target_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "CANARY"
    info = {"classes": CLASSES3, "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 32}
    net = {"_target_": "os.system", "_args_": [f"touch {marker}"]}
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"net": net, "classes": CLASSES3}, "data_info": info}, ckpt)
    r = run_cli("export.py", [f"ckpt_path={ckpt}"], cwd=tmp_path)
    assert r.returncode == 1
    assert "os.system" in one_error_line(r.stderr)
    assert not marker.exists() and not ckpt.with_suffix(".onnx").exists()


def test_bad_options_are_one_line(exported: Exported, tmp_path: Path) -> None:
    for overrides, message in (
        ([f"ckpt_path={exported.ckpt}", "format=tflite"], "format=tflite is not known"),
        ([f"ckpt_path={exported.ckpt}", f"output={tmp_path / 'model.pt2'}"], r"does not end in \.onnx"),
        ([f"ckpt_path={tmp_path / 'missing.ckpt'}"], "does not exist"),
    ):
        with pytest.raises(UserError, match=message) as e:
            export(compose_in(tmp_path, overrides, "export"))
        assert "\n" not in str(e.value)
    assert not list(tmp_path.glob("*.*"))  # nothing written
