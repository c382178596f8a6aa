"""export.py: an ONNX or pt2 file that takes uint8 images and gives the checkpoint's own
probabilities and carries its classes and statistics; predict.py runs it, with Lightning or without.

One short training run is shared by the module: its checkpoint is exported to both formats,
and both are compared with the checkpoint, run as predict.py runs it, on 120 images. (A crafted
checkpoint is refused by export.py as by the other entry points: test_checkpoints.py.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from cifarkit.core.errors import UserError
from cifarkit.core.untrusted.onnx_graph import OPERATORS, read_onnx
from cifarkit.data.images import load_image, normalize
from cifarkit.infer.export import PT2_EXTRA_FILE, export, export_model
from cifarkit.nets.saved import SavedNet
from cifarkit.run.jobs import train_job
from cifarkit.run.schema import check
from conftest import FAST, ROOT, compose, craft_checkpoint, folder_overrides, run_dirs
from tiny_files import CLASSES3, class_images

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
    train_job(compose(root, FAST + folder_overrides(image_folder, root) + ["test=false"], "train"))
    ckpt = root / "out" / "checkpoints" / "last.ckpt"
    images = root / "images"
    images.mkdir()
    for i, img in enumerate(class_images(N_IMAGES, len(CLASSES3), 32, seed=7)[0]):
        Image.fromarray(img).save(images / f"{i:03d}.png")
    onnx_path, _ = export_model(str(ckpt), "onnx", None, TRUSTED)
    pt2_path, _ = export_model(str(ckpt), "pt2", None, TRUSTED)
    return Exported(ckpt, onnx_path, pt2_path, images, root)


def test_both_formats_match_the_checkpoint(exported: Exported) -> None:
    assert exported.onnx == exported.ckpt.with_suffix(".onnx") and exported.pt2 == exported.ckpt.with_suffix(".pt2")
    saved = SavedNet.read(exported.ckpt)
    net, info = saved.rebuild(TRUSTED), asdict(saved.data)
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


def predict_json(main, model: Path, exported: Exported) -> list[dict]:
    r = main(
        "predict.py",
        [
            f"ckpt_path={model}",
            f"inputs={exported.images}",
            "format=json",
            "top_k=2",
            f"paths.log_dir={exported.root / 'logs'}",
        ],
    )
    assert r.code == 0, r.err
    return [json.loads(line) for line in r.out.splitlines()]


def test_predict_runs_the_onnx_model(exported: Exported, main) -> None:
    """predict.py on the .onnx (ONNX Runtime) names the same classes as on the .ckpt."""
    from_onnx, from_ckpt = predict_json(main, exported.onnx, exported), predict_json(main, exported.ckpt, exported)
    assert len(from_onnx) == len(from_ckpt) == N_IMAGES
    for a, b in zip(from_onnx, from_ckpt):
        assert a["path"] == b["path"] and len(a["top"]) == 2
        assert a["top"][0][0] == b["top"][0][0]
        assert [p for _, p in a["top"]] == pytest.approx([p for _, p in b["top"]], abs=1e-4)


# One Python where ``import lightning`` fails (a None in ``sys.modules`` makes any import of it raise
# ImportError), as on a box without Lightning, runs predict.py once per command line given as a
# JSON argument; it prints each run's exit code after a marker line.
WITHOUT_LIGHTNING = """
import json, runpy, sys
sys.modules['lightning'] = sys.modules['pytorch_lightning'] = None
for args in json.loads(sys.argv[1]):
    sys.argv = ['predict.py', *args]
    try:
        runpy.run_path({script!r}, run_name='__main__')
        code = 0
    except SystemExit as e:
        code = e.code
    print('@@exit', code, flush=True)
"""


@pytest.mark.slow  # a fresh interpreter importing predict.py alone
def test_predict_runs_without_lightning(exported: Exported, tmp_path: Path, main) -> None:
    """Both model files need torch, onnxruntime and Hydra only: the same output as with Lightning,
    and the same one-line errors."""
    empty = tmp_path / "empty"
    empty.mkdir()
    runs = [
        [
            f"ckpt_path={model}",
            f"inputs={exported.images}",
            "format=json",
            "top_k=2",
            f"paths.log_dir={tmp_path / 'logs'}",
        ]
        for model in (exported.onnx, exported.ckpt)
    ]
    runs.append([f"ckpt_path={exported.onnx}", f"inputs={empty}", f"paths.log_dir={tmp_path / 'failed'}"])
    code = WITHOUT_LIGHTNING.format(script=str(ROOT / "predict.py"))
    r = subprocess.run(
        [sys.executable, "-c", code, json.dumps(runs)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    printed, codes = [[]], []
    for line in r.stdout.splitlines():
        if line.startswith("@@exit "):
            codes.append(line.split()[1])
            printed.append([])
        else:
            printed[-1].append(line)
    assert codes == ["0", "0", "1"], r.stderr[-3000:]
    for rows, model in zip(printed, (exported.onnx, exported.ckpt)):
        assert rows == [json.dumps(row) for row in predict_json(main, model, exported)] and len(rows) == N_IMAGES
    assert (
        "no PNG or JPEG image could be read"
        in [line for line in r.stderr.splitlines() if line.startswith("error: ")][-1]
    )
    (run,) = run_dirs(tmp_path / "failed", "predict")
    assert json.loads((run / "metrics.json").read_text())["status"] == "failed"


def test_bad_options_are_one_line(exported: Exported, tmp_path: Path) -> None:
    for overrides, message in (
        ([f"ckpt_path={exported.ckpt}", "format=tflite"], "format=tflite: must be one of onnx, pt2"),
        ([f"ckpt_path={exported.ckpt}", f"output={tmp_path / 'model.pt2'}"], r"does not end in \.onnx"),
        ([f"ckpt_path={tmp_path / 'missing.ckpt'}"], "does not exist"),
    ):
        cfg = compose(tmp_path, overrides, "export")
        with pytest.raises(UserError, match=message) as e:
            check(cfg)  # as export.py's command line checks it first
            export(cfg)
        assert "\n" not in str(e.value)
    assert not list(tmp_path.glob("*.*"))  # nothing written


def test_the_graph_check_admits_what_export_writes(exported: Exported, tmp_path: Path) -> None:
    """What export.py writes for the project's nets (the trained BasicCNN, cpu10's AirbenchNet, ResNet18, timm's
    resnet18 and vit_tiny when the timm extra is installed) uses only ``OPERATORS`` and passes the graph check
    predict.py and serve.py apply."""
    import onnx

    nets = {
        "airbench": {"_target_": "cifarkit.nets.models.AirbenchNet", "widths": [64, 128, 256]},
        "resnet18": {"_target_": "cifarkit.nets.models.ResNet18"},
    }
    if importlib.util.find_spec("timm"):
        timm = {"_target_": "cifarkit.nets.models.TimmNet", "cifar_stem": True, "image_size": 32}
        nets["timm_resnet18"] = {**timm, "name": "resnet18"}
        nets["timm_vit"] = {**timm, "name": "vit_tiny_patch16_224"}
    models = [exported.onnx]
    for name, net in nets.items():
        weights = instantiate({**net, "num_classes": 3}).state_dict()
        ckpt = craft_checkpoint(tmp_path / f"{name}.ckpt", net, weights)
        models.append(export_model(str(ckpt), "onnx", None, TRUSTED)[0])
    for model in models:
        used = {node.op_type for node in onnx.load(model).graph.node}
        assert used <= OPERATORS, (model.name, used - OPERATORS)
        graph = read_onnx(model, f"ckpt_path={model}", "x")
        assert (graph.image_size, graph.num_classes, graph.metadata["classes"]) == (32, 3, CLASSES3)
        assert graph.max_batch >= 32, model.name
