"""What the recipes beyond the tutorial's constant-lr Adam do to the weights besides the loss.

* ``param_groups``: no weight decay on norm layers and biases, a learning-rate multiplier
  for norm biases (airbench trains its BatchNorm biases faster than its weights), and one for
  everything but the head (fine-tuning moves a pretrained body less than its new head).
* ``warmup_then_decay``: a step-wise schedule, linear warmup then linear or cosine decay, sized
  from the run's own number of optimizer steps (``ImageClassifier`` passes ``total_steps`` to
  any scheduler that takes it, ``torch.optim.lr_scheduler.OneCycleLR`` included).

A time budget (cifarkit/run/budget.py) times a run's first ``fixed_steps`` and only then fixes its
step count, so nothing those steps compute may depend on it: the schedule holds its start, lookahead
does not fold and nothing is frozen during them, and everything sized from the run's steps is sized
from the steps after them, read as the run goes (``fixed_steps(trainer)``: 0 without a budget, where
this is the recipe as it was).
* ``Lookahead``: airbench's weight averaging (Lightning's ``WeightAveraging``, the weights reset
  to the average), a callback.
* ``FreezeParameters``: stop training named parameters after some epochs (airbench's
  whitening bias), a callback.
* ``HeadFirst``: train only the head for the first part of the run (fine-tuning), a callback.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from cifarkit.core.errors import UserError

NORMS = (
    *(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm),
    *(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
    *(nn.LayerNorm, nn.GroupNorm),
)


def param_groups(
    net: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    decay_norm_and_bias: bool = True,
    norm_bias_lr_scale: float = 1.0,
    body_lr_scale: float = 1.0,
    head: Collection[str] = (),
) -> list[dict[str, Any]]:
    """The trainable parameters of ``net`` in up to three groups: weights (decayed), other norm
    parameters and biases (decayed only if ``decay_norm_and_bias``), norm biases (the same, at
    ``lr * norm_bias_lr_scale``). As in airbench the multiplier speeds up the gradient steps
    only: the norm biases' weight decay is divided by it, so each step decays them as before.
    With ``body_lr_scale`` other than 1, each group is split in two: the ``head`` (parameter
    names) at those rates, the rest of the net (its body) at ``body_lr_scale`` times them."""
    norm_params = {id(p) for m in net.modules() if isinstance(m, NORMS) for p in m.parameters(recurse=False)}
    split = body_lr_scale != 1.0
    groups: dict[tuple[str, str], list[nn.Parameter]] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        is_bias = name.rpartition(".")[2] == "bias"
        kind = (
            "norm_bias"
            if id(p) in norm_params and is_bias
            else "norm_and_bias"
            if id(p) in norm_params or is_bias
            else "weights"
        )
        part = "body" if split and name not in head else ""
        groups.setdefault((kind, part), []).append(p)
    other_decay = weight_decay if decay_norm_and_bias else 0.0
    settings = {
        "weights": {"weight_decay": weight_decay, "lr": lr},
        "norm_and_bias": {"weight_decay": other_decay, "lr": lr},
        "norm_bias": {"weight_decay": other_decay / norm_bias_lr_scale, "lr": lr * norm_bias_lr_scale},
    }
    out = []
    for kind, setting in settings.items():
        for part in ("", "body"):
            if (kind, part) in groups:
                scale = body_lr_scale if part else 1.0
                name = f"{kind}/{part}" if part else kind
                out.append({"params": groups[kind, part], "name": name, **setting, "lr": setting["lr"] * scale})
    return out


def run_steps(trainer: Any, sized: str) -> int:
    """The run's optimizer steps, for what is ``sized`` from them (a schedule, lookahead's
    decay ramp); a run bounded by ``trainer.max_time`` alone has none, which stops it in one line."""
    steps = trainer.estimated_stepping_batches
    if not math.isfinite(steps):
        raise UserError(f"{sized} is sized from the run's steps: set trainer.max_steps or trainer.max_epochs")
    return max(1, int(steps))


def fixed_steps(trainer: Any) -> int:
    """The run's first steps that nothing is sized over: those a time budget times before it fixes the
    step count (its callback says how many, ``fixed_steps``); 0 in a run without one."""
    return max((getattr(c, "fixed_steps", 0) for c in trainer.callbacks), default=0)


def sized_point(fraction: float, fixed: int, total: int) -> int:
    """The step at ``fraction`` of the steps after the ``fixed`` ones (of ``total``)."""
    return fixed + round(fraction * max(0, total - fixed))


def warmup_then_decay(
    optimizer: Optimizer,
    total_steps: int | Callable[[], int],
    warmup: float = 0.0,
    decay: str = "linear",
    final_scale: float = 0.0,
    start_scale: float = 0.0,
    fixed_steps: int = 0,
) -> LambdaLR:
    """Each group's lr rises linearly from ``start_scale`` times its peak (airbench: 0.2) to
    the peak over the first ``warmup`` fraction of the steps, then falls to ``final_scale``
    times its peak by the last step, linearly or along a half cosine.

    A ``LambdaLR`` rather than ``SequentialLR`` of ``LinearLR`` and ``CosineAnnealingLR``: the
    cosine's floor ``eta_min`` is one absolute lr for every group, where each group here (the
    norm biases at 64x) decays to its own fraction, and the closed form gives the same lr at a
    step however the run got there (a resumed run included). Its options' bounds are cifarkit/run/schema.py's.

    The first ``fixed_steps`` hold ``start_scale`` and the rest is sized from the steps after them;
    ``total_steps`` may be read as the run goes (a callable: a time budget fixes it after those steps)."""

    def scale(step: int) -> float:
        if step < fixed_steps:
            return start_scale
        total = (total_steps() if callable(total_steps) else total_steps) - fixed_steps
        step -= fixed_steps
        warm = int(round(warmup * total))
        if step < warm:
            return start_scale + (1 - start_scale) * (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        shape = 1 - t if decay == "linear" else 0.5 * (1 + math.cos(math.pi * t))
        return final_scale + (1 - final_scale) * shape

    return LambdaLR(optimizer, scale)


class Lookahead(WeightAveraging):
    """airbench's lookahead: every ``every_n_steps`` optimizer steps the weights (and, with
    ``use_buffers``, the BatchNorm statistics) are folded into a moving average, and training
    continues from that average. The average's decay grows with the run's progress t/T as
    ``decay ** every_n_steps * (t / T) ** power``: near 0 early, so the average follows the
    weights while the lr is high, and ``decay ** every_n_steps`` at the end, where it smooths
    the noise of the last steps. Validation, the saved checkpoints and the model after training
    hold the average, as with Lightning's ``EMAWeightAveraging``; unlike it, the weights being
    trained are pulled back to the average too. T is the run's own step count
    (``trainer.estimated_stepping_batches``), read as the run goes; t and T count the steps after a
    time budget's ``fixed_steps``, during which nothing is folded."""

    def __init__(self, every_n_steps: int, decay: float, power: float, use_buffers: bool) -> None:
        super().__init__(use_buffers=use_buffers, avg_fn=self._fold)
        self.every_n_steps, self.decay, self.power = every_n_steps, decay, power
        self.total_steps, self.fixed_steps_seen = 1, 0
        self.weight = 0.0  # the average's share in the update being made
        self.folded = False  # should_update said yes: WeightAveraging is folding the weights in now

    def _fold(self, average: torch.Tensor, current: torch.Tensor, n_averaged: torch.Tensor) -> torch.Tensor:
        return (
            torch.lerp(average, current.to(average.dtype), 1.0 - self.weight)
            if average.is_floating_point()
            else current
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._size(trainer)

    def _size(self, trainer: L.Trainer) -> None:
        self.total_steps = run_steps(trainer, "callbacks.lookahead's decay ramp")
        self.fixed_steps_seen = fixed_steps(trainer)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if step_idx is None:
            return False
        done = step_idx + 1 - self.fixed_steps_seen
        if done <= 0 or done % self.every_n_steps:
            return False
        progress = min(1.0, done / max(1, self.total_steps - self.fixed_steps_seen))
        self.weight = self.decay**self.every_n_steps * progress**self.power
        self.folded = True
        return True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._size(trainer)  # a budget fixes the run's steps after its fixed ones
        super().on_train_batch_end(trainer, pl_module, *args)
        if self.folded:  # just averaged: go on from the average
            self.folded = False
            self._copy_average_to_current(pl_module)


class FreezeParameters(L.Callback):
    """Stop training the parameters named in ``names`` (as in ``pl_module.named_parameters()``,
    e.g. ``net.whiten.bias``) once the fraction ``after`` of the run's optimizer steps is done
    (airbench94: after 3 of its 10 epochs, 0.3): their gradients are dropped just before each
    optimizer step, so neither the step, its momentum nor weight decay moves them. Sized from
    the run's steps like the schedule, so a longer or shorter run freezes at the same point of
    it (after a time budget's ``fixed_steps``, of the steps after them). Dropping the gradient
    (instead of switching ``requires_grad`` off) keeps the set of parameters that DDP synchronizes fixed."""

    def __init__(self, names: list[str], after: float) -> None:
        self.names, self.after = list(names), after
        self.params: list[torch.nn.Parameter] = []
        self.from_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._size(trainer)

    def _size(self, trainer: L.Trainer) -> None:
        total = run_steps(trainer, "callbacks.freeze_whitening_bias")
        self.from_step = sized_point(self.after, fixed_steps(trainer), total)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        named = dict(pl_module.named_parameters())
        unknown = [n for n in self.names if n not in named]
        if unknown:
            raise UserError(
                f"FreezeParameters: no parameter named {', '.join(unknown)}; names look like {next(iter(named), '?')}"
            )
        self.params = [named[n] for n in self.names]

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._size(trainer)  # read as the run goes: a budget fixes the run's steps after its fixed ones
        if trainer.global_step >= self.from_step:
            for p in self.params:
                p.grad = None


class HeadFirst(L.Callback):
    """Train only the net's head (``pl_module.head_names``: the tensors sized by the class count)
    for the first fraction ``until`` of the run's optimizer steps, the body frozen, then
    everything: a new head learns from the pretrained features before its first, random
    gradients reach them. As in ``FreezeParameters`` the body's gradients are dropped before
    each optimizer step, so neither the step, its momentum nor weight decay moves it; its
    BatchNorm statistics still follow the new data."""

    def __init__(self, until: float) -> None:
        self.until = until
        self.body: list[torch.nn.Parameter] = []
        self.to_step = 0

    def _size(self, trainer: L.Trainer) -> None:
        self.to_step = sized_point(self.until, fixed_steps(trainer), run_steps(trainer, "callbacks.head_first"))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._size(trainer)
        head = pl_module.head_names
        self.body = [p for name, p in pl_module.net.named_parameters() if name not in head]

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._size(trainer)
        if trainer.global_step < self.to_step:
            for p in self.body:
                p.grad = None
