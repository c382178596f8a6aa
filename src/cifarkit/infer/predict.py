"""Classify your own image files with a trained checkpoint: ``python predict.py ckpt_path=... inputs=...``.

The checkpoint carries everything needed (the net's config, class names, mean/std, image
size), so no dataset is needed. Nothing in it runs as code: cifarkit/nets/saved.py loads it
with ``weights_only=True`` and rebuilds only trusted ``nn.Module`` classes.

``ckpt_path=model.onnx`` (written by export.py) runs the model with ONNX Runtime on the CPU
instead, reading the classes and image size from the model's metadata; the output is the same.
Neither path imports Lightning, so predict.py also runs where Lightning is not installed
(torch, Pillow and Hydra suffice; onnxruntime, of the export extra, for a .onnx model).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from cifarkit.core.devices import resolve_accelerator
from cifarkit.core.errors import UserError
from cifarkit.core.extras import require
from cifarkit.core.untrusted import shown, to_json
from cifarkit.data.images import DataInfo, image_files, load_image, normalize
from cifarkit.nets.saved import SavedNet

BATCH = 256
# uint8 images (B, size, size, 3) -> class probabilities (B, C)
Scorer = Callable[[np.ndarray], torch.Tensor]


def decoded(files: list[Path], size: int, max_megapixels: float) -> Iterator[tuple[list[Path], np.ndarray]]:
    """Batches of (paths, uint8 images (B, size, size, 3)); unreadable files are reported and skipped."""
    paths, images = [], []
    for f in files:
        try:
            images.append(load_image(f, size, max_megapixels))
            paths.append(f)
        except UserError as e:
            print(f"skipped: {shown(e)}", file=sys.stderr)
        if len(paths) == BATCH:
            yield paths, np.stack(images)
            paths, images = [], []
    if paths:
        yield paths, np.stack(images)


def checkpoint_scorer(cfg: DictConfig) -> tuple[Scorer, list[str], int]:
    """The checkpoint's net on ``cfg.device``, fed as in training; its classes and image size."""
    device = resolve_accelerator(cfg.device)
    saved = SavedNet.read(str(cfg.ckpt_path))
    net = saved.rebuild(list(cfg.trusted_targets)).to(device)
    mean, std = torch.tensor(saved.data.mean, device=device), torch.tensor(saved.data.std, device=device)

    def score(images: np.ndarray) -> torch.Tensor:
        x = normalize(torch.from_numpy(images).to(device).permute(0, 3, 1, 2), mean, std)
        return net(x).float().softmax(dim=1)

    return score, saved.data.classes, saved.data.image_size


def onnx_scorer(path: str, threads: int | None) -> tuple[Scorer, list[str], int]:
    """An export.py ONNX model in ONNX Runtime (CPU provider, ``threads`` or one per core), whose
    graph does the preprocessing and softmax itself; the classes and image size come from its metadata."""
    ort = require("ckpt_path=*.onnx", "export", "onnxruntime")
    if not Path(path).is_file():
        raise UserError(f"ckpt_path={path} does not exist; pass a .ckpt, or a .onnx written by export.py")
    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's choice
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
        inputs = session.get_inputs()
    except Exception as e:  # not ONNX, or ONNX without export.py's metadata
        raise UserError(
            f"ckpt_path={path} is not an ONNX model written by export.py ({e.__class__.__name__}); export one with "
            "export.py"
        ) from e
    info = DataInfo.check(meta, f"ckpt_path={path}")
    size = info.image_size
    if not (len(inputs) == 1 and inputs[0].type == "tensor(uint8)" and inputs[0].shape[1:] == [3, size, size]):
        raise UserError(f"ckpt_path={path} lacks export.py's uint8 (N, 3, H, W) input; export it again with export.py")
    name = inputs[0].name

    def score(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: np.ascontiguousarray(images.transpose(0, 3, 1, 2))})[0])

    try:  # one blank batch at its own size before any door says it is ready
        probs = score(np.zeros((2, size, size, 3), np.uint8))
    except Exception as e:
        raise UserError(
            f"ckpt_path={path} cannot classify a {size}x{size} image ({_first_line(e)}); export it again with export.py"
        ) from e
    if tuple(probs.shape) != (2, len(info.classes)) or not bool(torch.isfinite(probs).all()):
        raise UserError(
            f"ckpt_path={path} gives {tuple(probs.shape)} outputs, or not finite ones, for 2 blank images of its "
            f"{len(info.classes)} classes; export it again with export.py"
        )
    return score, info.classes, size


def _first_line(e: Exception) -> str:
    return shown(" ".join(str(e).split())[:200]) or e.__class__.__name__


def model_scorer(cfg: DictConfig) -> tuple[Scorer, list[str], int]:
    """``cfg.ckpt_path``'s scorer, classes and image size: ONNX Runtime for a ``.onnx`` (with
    serve.yaml's ``threads``), else the checkpoint's net on ``cfg.device``. predict.py and
    serve.py load a model only this way."""
    if Path(str(cfg.ckpt_path)).suffix.lower() == ".onnx":
        return onnx_scorer(str(cfg.ckpt_path), cfg.get("threads"))
    return checkpoint_scorer(cfg)


def top_classes(probs: torch.Tensor, classes: list[str], k: int) -> list[list[list] | None]:
    """Each row's ``k`` most likely ``[class, probability]``, the probability rounded to 6 places;
    None for a row that is not all finite (a net can overflow on one image): no NaN is ever reported."""
    p, idx = probs.topk(min(k, len(classes)), dim=1)
    ok = torch.isfinite(probs).all(dim=1).tolist()
    return [
        [[classes[i], round(v, 6)] for v, i in zip(p_row, i_row)] if good else None
        for p_row, i_row, good in zip(p.tolist(), idx.tolist(), ok)
    ]


@torch.inference_mode()
def predict(cfg: DictConfig) -> int:
    """Print the top-k classes of every image under ``cfg.inputs``; return how many were classified."""
    if cfg.format not in ("text", "json"):
        raise UserError(f"format={cfg.format} is not known; use format=text or format=json")
    if int(cfg.top_k) < 1:
        raise UserError(f"top_k={cfg.top_k} must be at least 1")
    if not float(cfg.max_megapixels) > 0:
        raise UserError(f"max_megapixels={cfg.max_megapixels} must be over 0")
    files = image_files(str(cfg.inputs))
    score, classes, size = model_scorer(cfg)
    done = 0
    for paths, images in decoded(files, size, float(cfg.max_megapixels)):
        for path, top in zip(paths, top_classes(score(images), classes, int(cfg.top_k))):
            if top is None:
                print(f"skipped: the model's output for {shown(path)} is not a number (NaN/inf)", file=sys.stderr)
                continue
            if cfg.format == "json":  # ASCII JSON: a name's control characters are escaped, NaN cannot occur
                print(to_json({"path": str(path), "top": top}))
            else:  # a name from a file never moves the cursor or forges a column or a line
                print(f"{shown(path)}\t" + "\t".join(f"{shown(c)} {p:.4f}" for c, p in top))
            done += 1
    if not done:
        raise UserError(f"no PNG or JPEG image could be read under inputs={cfg.inputs}; pass image files")
    return done
