"""A trained model, loaded once for predict.py and serve.py: a train.py checkpoint or an export.py ONNX model.

Either way the answer is a scorer (uint8 images in, class probabilities out), the class names and the image
size, and the model has classified blank images at that size before any door reports it ready. A
checkpoint is read and rebuilt by cifarkit/nets/saved.py (no code in it runs); an ONNX model's graph is judged by
cifarkit/core/untrusted/onnx_graph.py (export.py's operators, bounded static shapes), then runs in ONNX Runtime on
the CPU, its classes and image size read from export.py's metadata. Nothing here imports
Lightning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from cifarkit.core.devices import resolve_accelerator
from cifarkit.core.errors import UserError, existing
from cifarkit.core.extras import require
from cifarkit.core.untrusted import shown
from cifarkit.core.untrusted.onnx_graph import read_onnx
from cifarkit.data.images import DataInfo, normalize
from cifarkit.nets.saved import SavedNet

# uint8 images (B, size, size, 3) -> class probabilities (B, C)
Scorer = Callable[[np.ndarray], torch.Tensor]
FROM_EXPORT = "export it again with export.py"


@dataclass(frozen=True)
class Model:
    """What predict.py and serve.py need of a trained model."""

    score: Scorer
    classes: list[str]
    image_size: int


def load_model(cfg: DictConfig, device: str | None = None) -> Model:
    """``cfg.ckpt_path``'s model: a checkpoint's net on ``device`` (default: ``cfg.device``), or a ``.onnx`` in
    ONNX Runtime with serve.yaml's ``threads``."""
    path = str(cfg.ckpt_path)
    if Path(path).suffix.lower() == ".onnx":
        return _onnx_model(path, cfg.get("threads"))
    return _checkpoint_model(path, list(cfg.trusted_targets), device or cfg.device)


def _onnx_model(path: str, threads: int | None) -> Model:
    """An export.py ONNX model in ONNX Runtime (CPU provider, ``threads`` or one per core), whose graph does the
    preprocessing and softmax itself; its graph is checked (core/untrusted/onnx_graph.py) before a session is made."""
    require("ckpt_path=*.onnx", "export", "onnxruntime")
    where = f"ckpt_path={path}"
    graph = read_onnx(existing("ckpt_path", path, "a .ckpt, or a .onnx written by export.py"), where, FROM_EXPORT)
    info = DataInfo.check(graph.metadata, where)
    size = info.image_size
    if graph.image_size != size or graph.num_classes != len(info.classes):
        raise not_from_export(
            f"{where} takes {graph.image_size}x{graph.image_size} images and gives {graph.num_classes} scores, where "
            f"its metadata says {size}x{size} and {len(info.classes)} classes"
        )
    try:
        run = graph.session(threads)
    except Exception as e:  # ONNX Runtime refuses what the onnx package accepted
        raise not_from_export(f"{where} cannot be loaded by ONNX Runtime ({_first_line(e)})") from e

    def score(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(run(images.transpose(0, 3, 1, 2)))

    try:  # one blank batch at its own size before any door says it is ready
        probs = score(np.zeros((2, size, size, 3), np.uint8))
    except Exception as e:
        raise not_from_export(f"{where} cannot classify a {size}x{size} image ({_first_line(e)})") from e
    if tuple(probs.shape) != (2, len(info.classes)) or not bool(torch.isfinite(probs).all()):
        raise not_from_export(
            f"{where} gives {tuple(probs.shape)} outputs, or not finite ones, for 2 blank images of its "
            f"{len(info.classes)} classes"
        )
    return Model(score, info.classes, size)


def _checkpoint_model(path: str, trusted: list[str], device: str) -> Model:
    """The checkpoint's net, fed as in training."""
    saved = SavedNet.read(path)
    net = saved.rebuild(trusted)
    on = resolve_accelerator(device)
    net = net.to(on)
    mean, std = torch.tensor(saved.data.mean, device=on), torch.tensor(saved.data.std, device=on)

    def score(images: np.ndarray) -> torch.Tensor:
        x = normalize(torch.from_numpy(images).to(on).permute(0, 3, 1, 2), mean, std)
        return net(x).float().softmax(dim=1)

    return Model(score, saved.data.classes, saved.data.image_size)


def not_from_export(what: str) -> UserError:
    """An ONNX model that export.py did not write as it is: what is wrong, and how to get one that works."""
    return UserError(f"{what}; {FROM_EXPORT}")


def _first_line(e: Exception) -> str:
    return shown(" ".join(str(e).split())[:200]) or e.__class__.__name__
