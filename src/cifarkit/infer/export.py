"""Export a checkpoint to a self-contained model file: ``python export.py ckpt_path=... format=onnx|pt2``.

The exported graph takes what a camera or ``PIL`` gives you, raw RGB ``uint8`` images
(N, 3, H, W) at the checkpoint's image size with any batch size N, and returns class
probabilities (N, num_classes) as float32: the /255 scaling, the mean/std normalization and the
softmax are inside it, so a consumer needs neither this package nor the training statistics.
Class names, mean/std and image size (the checkpoint's ``DataInfo``) travel with it as metadata
(ONNX ``metadata_props``, one JSON string per field; pt2 the ``cifarkit.json`` extra file).

The net is rebuilt by ``SavedNet.rebuild`` (cifarkit/nets/saved.py): nothing in the checkpoint
runs as code and only trusted ``nn.Module`` classes are built.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import torch
from omegaconf import DictConfig
from torch import nn

from cifarkit.core.errors import UserError
from cifarkit.core.extras import require
from cifarkit.core.files import atomic_write
from cifarkit.data.images import DataInfo
from cifarkit.nets.saved import SavedNet

log = logging.getLogger(__name__)
FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}
PT2_EXTRA_FILE = "cifarkit.json"
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"


class ImagesToProbabilities(nn.Module):
    """uint8 images (N, 3, H, W) -> class probabilities (N, C), float32.

    The preprocessing is ``cifarkit.data.images.normalize``'s, op for op (float, /255, -mean, /std), so
    the exported model's probabilities match the checkpoint's as run by predict.py.
    """

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32)[:, None, None])
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32)[:, None, None])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32).div(255).sub(self.mean).div(self.std)
        return self.net(x).float().softmax(dim=1)


def output_path(ckpt_path: str, fmt: str, output: str | None) -> Path:
    """``output``, or the checkpoint's path with the format's suffix (the schema holds a given
    ``output`` to it, as predict.py tells the formats apart by it)."""
    suffix = FORMATS[fmt]
    path = Path(output) if output else Path(ckpt_path).with_suffix(suffix)
    if path.is_dir():
        raise UserError(f"output={output} is a folder; pass a file path ending in {suffix}")
    return path


def _onnx_bytes(model: nn.Module, example: torch.Tensor, dynamic: Any, metadata: dict[str, str]) -> bytes:
    import onnx  # export_model checked the export extra before reading the checkpoint

    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        dynamic_shapes=dynamic,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        verbose=False,
    )
    proto = program.model_proto
    onnx.helper.set_model_props(proto, metadata)
    return proto.SerializeToString()


def export_model(ckpt_path: str, fmt: str, output: str | None, trusted: list[str]) -> tuple[Path, DataInfo]:
    """Write the checkpoint's net, preprocessing and softmax included, as ``fmt``; return the
    path written and the checkpoint's ``DataInfo``."""
    path = output_path(ckpt_path, fmt, output)
    if fmt == "onnx":  # torch's ONNX exporter imports onnxscript itself
        require("export.py format=onnx", "export", "onnx", "onnxscript")
    saved = SavedNet.read(ckpt_path)
    info = saved.data
    model = ImagesToProbabilities(saved.rebuild(trusted), info.mean, info.std).eval()
    size = info.image_size
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)  # 2: a batch of 1 would be specialized
    dynamic = ({0: torch.export.Dim("batch", min=1)},)
    with torch.no_grad():
        if fmt == "onnx":
            data = _onnx_bytes(model, example, dynamic, info.as_metadata())
            atomic_write(path, lambda f: f.write(data))
        else:
            program = torch.export.export(model, (example,), dynamic_shapes=dynamic)

            def save(f: IO[bytes]) -> None:
                torch.export.save(program, f, extra_files={PT2_EXTRA_FILE: json.dumps(asdict(info))})

            atomic_write(path, save)
    return path, info


def export(cfg: DictConfig) -> Path:
    """export.py's task: write the model file, print its path and what it takes and returns."""
    fmt = str(cfg.format)
    output = None if cfg.output is None else str(cfg.output)
    path, info = export_model(str(cfg.ckpt_path), fmt, output, list(cfg.trusted_targets))
    size, n = info.image_size, len(info.classes)
    print(path)
    print(
        f"{fmt}: uint8 {INPUT_NAME} (N, 3, {size}, {size}) -> float32 {OUTPUT_NAME} (N, {n}) over "
        f"{info.classes}; {path.stat().st_size / 1e6:.1f} MB"
    )
    log.info("exported %s to %s", cfg.ckpt_path, path)
    return path
