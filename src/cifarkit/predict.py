"""Classify your own image files with a trained checkpoint: ``python predict.py ckpt_path=... inputs=...``.

The checkpoint carries everything needed (the net's config, class names, mean/std, image
size), so no dataset is needed. Nothing in it runs as code: cifarkit/checkpoints.py loads it
with ``weights_only=True`` and rebuilds only trusted ``nn.Module`` classes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from cifarkit.checkpoints import rebuild_net
from cifarkit.data import load_image, normalize
from cifarkit.errors import UserError
from cifarkit.train import resolve_accelerator

BATCH = 256


def image_files(inputs: str) -> list[Path]:
    """The file itself, or every file under the folder (recursively, sorted).

    In a folder, hidden files and folders are left out: macOS's AppleDouble ``._name.jpg``
    twins (and ``.git``, ``.DS_Store``) are not images and would only be reported as unreadable.
    """
    p = Path(inputs)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(
            f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
    raise UserError(f"inputs={inputs} does not exist; pass an image file or a folder of images")


def decoded(files: list[Path], size: int) -> Iterator[tuple[list[Path], np.ndarray]]:
    """Batches of (paths, uint8 images (B, size, size, 3)); unreadable files are reported and skipped."""
    paths, images = [], []
    for f in files:
        try:
            images.append(load_image(f, size))
            paths.append(f)
        except UserError as e:
            print(f"skipped: {e}", file=sys.stderr)
        if len(paths) == BATCH:
            yield paths, np.stack(images)
            paths, images = [], []
    if paths:
        yield paths, np.stack(images)


@torch.inference_mode()
def predict(cfg: DictConfig) -> int:
    """Print the top-k classes of every image under ``cfg.inputs``; return how many were classified."""
    if cfg.format not in ("text", "json"):
        raise UserError(f"format={cfg.format} is not known; use format=text or format=json")
    if int(cfg.top_k) < 1:
        raise UserError(f"top_k={cfg.top_k} must be at least 1")
    files = image_files(str(cfg.inputs))
    device = resolve_accelerator(cfg.device)
    net, info = rebuild_net(str(cfg.ckpt_path), list(cfg.trusted_targets))
    net = net.to(device)
    classes = info["classes"]
    mean, std = torch.tensor(info["mean"], device=device), torch.tensor(info["std"], device=device)
    k = min(int(cfg.top_k), len(classes))
    done = 0
    for paths, images in decoded(files, int(info["image_size"])):
        x = normalize(torch.from_numpy(images).to(device).permute(0, 3, 1, 2), mean, std)
        probs, idx = net(x).float().softmax(dim=1).topk(k, dim=1)
        for path, p_row, i_row in zip(paths, probs.tolist(), idx.tolist()):
            top = [[classes[i], round(p, 6)] for p, i in zip(p_row, i_row)]
            if cfg.format == "json":
                print(json.dumps({"path": str(path), "top": top}))
            else:
                print(f"{path}\t" + "\t".join(f"{c} {p:.4f}" for c, p in top))
        done += len(paths)
    if not done:
        raise UserError(f"no PNG or JPEG image could be read under inputs={cfg.inputs}; pass image files")
    return done
