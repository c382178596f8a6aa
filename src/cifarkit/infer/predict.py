"""Classify your own image files with a trained checkpoint: ``python predict.py ckpt_path=... inputs=...``.

The checkpoint carries everything needed (the net's config, class names, mean/std, image
size), so no dataset is needed. Nothing in it runs as code: cifarkit/nets/saved.py loads it
with ``weights_only=True`` and rebuilds only trusted ``nn.Module`` classes.

``ckpt_path=model.onnx`` (written by export.py) runs the model with ONNX Runtime on the CPU
instead, reading the classes and image size from the model's metadata; the output is the same.
Neither path imports Lightning (predict.py starts without loading it); it uses torch,
torchvision, Hydra, pydantic, NumPy and Pillow of the base install, and onnxruntime (the export
extra) for a .onnx model.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from cifarkit.core.errors import UserError, bounded
from cifarkit.core.untrusted import shown, to_json
from cifarkit.data.images import image_files, load_image
from cifarkit.infer.model import load_model

BATCH = 256


def decoded(files: list[Path], size: int, max_megapixels: float) -> Iterator[tuple[list[Path], np.ndarray]]:
    """Batches of (paths, uint8 images (B, size, size, 3)); unreadable files are reported and skipped."""
    paths, images = [], []
    for f in files:
        try:
            images.append(load_image(f, size, max_megapixels))
            paths.append(f)
        except UserError as e:
            print(f"skipped: {bounded(shown(e))}", file=sys.stderr)
        if len(paths) == BATCH:
            yield paths, np.stack(images)
            paths, images = [], []
    if paths:
        yield paths, np.stack(images)


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
    files = image_files(str(cfg.inputs))
    model = load_model(cfg)
    score, classes, size = model.score, model.classes, model.image_size
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
