"""Which device and precision a run uses: the policy behind ``trainer.accelerator`` and ``precision: auto``.

Lightning-free, so that predict.py picks a device without loading the training stack.
"""

from __future__ import annotations

from typing import Any

import torch

from cifarkit.core.errors import UserError


def resolve_accelerator(accelerator: str) -> str:
    """The device type a run will use; a requested accelerator that is absent is a user error."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    absent = None  # what is missing, and what to use instead
    if accelerator in ("gpu", "cuda") and not cuda:
        absent = "no CUDA GPU is", "trainer.accelerator=mps" if mps else "trainer=cpu"
    elif accelerator == "mps" and not mps:
        absent = "Apple's MPS backend is not", "trainer=cpu"
    if absent:
        raise UserError(
            f"trainer.accelerator={accelerator} but {absent[0]} available here; use {absent[1]} or "
            "trainer.accelerator=auto"
        )
    if accelerator == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    return "cuda" if accelerator == "gpu" else accelerator


def resolve_precision(precision: Any, device: str) -> Any:
    """``auto``: bf16 autocast where the hardware computes in bf16 (emulated bf16 is far slower
    than fp32), else fp16 autocast on CUDA, else fp32 (README, Speed, has the figures)."""
    if precision != "auto":
        return precision
    if device == "cuda":  # emulated bf16 (pre-Ampere) is slower than fp16 autocast
        return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"
    if device == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bf16-mixed"
    return "32-true"
