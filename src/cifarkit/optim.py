"""What the recipes beyond the tutorial's constant-lr Adam need from the optimizer.

* ``param_groups``: no weight decay on norm layers and biases, and a learning-rate multiplier
  for norm biases (airbench trains its BatchNorm biases faster than its weights).
* ``warmup_then_decay``: a step-wise schedule, linear warmup then linear or cosine decay, sized
  from the run's own number of optimizer steps (``ImageClassifier`` passes ``total_steps`` to
  any scheduler that takes it, ``torch.optim.lr_scheduler.OneCycleLR`` included).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from cifarkit.errors import UserError

NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def param_groups(
    net: nn.Module, lr: float, weight_decay: float = 0.0, decay_norm_and_bias: bool = True, norm_bias_lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    """The trainable parameters of ``net`` in up to three groups: weights (decayed), other norm
    parameters and biases (decayed only if ``decay_norm_and_bias``), norm biases (the same, at
    ``lr * norm_bias_lr_scale``). As in airbench the multiplier speeds up the gradient steps
    only: the norm biases' weight decay is divided by it, so each step decays them as before."""
    norm_params = {id(p) for m in net.modules() if isinstance(m, NORMS) for p in m.parameters(recurse=False)}
    groups: dict[str, list[nn.Parameter]] = {"weights": [], "norm_and_bias": [], "norm_bias": []}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        is_bias = name.rpartition(".")[2] == "bias"
        if id(p) in norm_params and is_bias:
            groups["norm_bias"].append(p)
        elif id(p) in norm_params or is_bias:
            groups["norm_and_bias"].append(p)
        else:
            groups["weights"].append(p)
    other_decay = weight_decay if decay_norm_and_bias else 0.0
    settings = {
        "weights": {"weight_decay": weight_decay, "lr": lr},
        "norm_and_bias": {"weight_decay": other_decay, "lr": lr},
        "norm_bias": {"weight_decay": other_decay / norm_bias_lr_scale, "lr": lr * norm_bias_lr_scale},
    }
    return [{"params": ps, "name": name, **settings[name]} for name, ps in groups.items() if ps]


def run_steps(trainer: Any, sized: str) -> int:
    """The run's optimizer steps, for what is ``sized`` from them (a schedule, lookahead's
    decay ramp); a run bounded by ``trainer.max_time`` alone has none, which stops it in one line."""
    steps = trainer.estimated_stepping_batches
    if not math.isfinite(steps):
        raise UserError(f"{sized} is sized from the run's steps: set trainer.max_steps or trainer.max_epochs")
    return max(1, int(steps))


def warmup_then_decay(
    optimizer: Optimizer,
    total_steps: int,
    warmup: float = 0.0,
    decay: str = "linear",
    final_scale: float = 0.0,
    start_scale: float = 0.0,
) -> LambdaLR:
    """Each group's lr rises linearly from ``start_scale`` times its peak (airbench: 0.2) to
    the peak over the first ``warmup`` fraction of the steps, then falls to ``final_scale``
    times its peak by the last step, linearly or along a half cosine."""
    if decay not in ("linear", "cosine"):
        raise ValueError(f"decay={decay!r}: use linear or cosine")
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup={warmup} must be a fraction of the steps in [0, 1)")
    warm = int(round(warmup * total_steps))

    def scale(step: int) -> float:
        if step < warm:
            return start_scale + (1 - start_scale) * (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total_steps - warm))
        shape = 1 - t if decay == "linear" else 0.5 * (1 + math.cos(math.pi * t))
        return final_scale + (1 - final_scale) * shape

    return LambdaLR(optimizer, scale)
