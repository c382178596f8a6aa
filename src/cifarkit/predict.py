"""Classify your own image files with a trained checkpoint: ``python predict.py ckpt_path=... inputs=...``.

The checkpoint carries everything needed (the net's config, class names, mean/std, image
size), so no dataset is needed. Nothing in it runs as code: it is read with
``weights_only=True``, and the net is only built from a ``_target_`` under a trusted package
prefix, since instantiating an arbitrary ``_target_`` (``os.system``...) would run it.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from cifarkit.callbacks import check_checkpoint, check_targets
from cifarkit.data import load_image, normalize
from cifarkit.errors import UserError
from cifarkit.train import resolve_accelerator

BATCH = 256


def is_module_class(target: Any) -> bool:
    """Whether ``target`` ("package.module.Class") names an ``nn.Module`` subclass."""
    module, _, name = str(target).rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(obj, type) and issubclass(obj, nn.Module)


def load_predictor(ckpt_path: str, trusted: Sequence[str], device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The checkpoint's net in eval mode on ``device``, and its data_info (classes, mean, std, image_size)."""
    ckpt = check_checkpoint(ckpt_path)
    info, hparams = ckpt.get("data_info"), ckpt.get("hyper_parameters")
    net_cfg = hparams.get("net") if isinstance(hparams, dict) else None
    if not isinstance(info, dict) or not {"classes", "mean", "std", "image_size"} <= info.keys() or not isinstance(net_cfg, dict):
        raise UserError(f"ckpt_path={ckpt_path} lacks the net config or data_info (classes, mean/std, image size); pass a .ckpt written by train.py")
    check_targets(net_cfg, trusted)
    if not is_module_class(net_cfg.get("_target_")):
        raise UserError(f"the checkpoint's net _target_={net_cfg.get('_target_')!r} is not a torch nn.Module class; pass a .ckpt written by train.py")
    net: nn.Module = instantiate(net_cfg, num_classes=len(info["classes"]))
    try:
        net.load_state_dict({k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")})
    except (RuntimeError, AttributeError, TypeError) as e:  # missing/odd-shaped weights, or no dict at all
        raise UserError(f"ckpt_path={ckpt_path}: its weights do not fit its net config ({str(e).splitlines()[0]}); pass a .ckpt written by train.py") from e
    return net.to(device).eval(), info


def image_files(inputs: str) -> list[Path]:
    """The file itself, or every file under the folder (recursively, sorted)."""
    p = Path(inputs)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file())
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
    net, info = load_predictor(str(cfg.ckpt_path), list(cfg.trusted_targets), device)
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
