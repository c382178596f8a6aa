"""On the CPU in bf16-mixed, Adam keeps the bf16 copy of the weights that the forward pass needs,
instead of autocast casting every weight every step.

Under autocast a step casts each fp32 weight of a convolution or linear layer to bf16 for the
forward pass (4 bytes read and 2 written a parameter), backward casts its bf16 gradient to fp32
(2 and 4), and fused Adam reads that fp32 gradient (4) beside the weight and both moments: 40
bytes a parameter, where the tutorial's net holds 9.46M parameters and computes little at batch 32
(docs/speed.md). With the copy the forward pass runs on bf16 tensors (``torch.func.functional_call``),
their gradients stay bf16, and one fused pass per tensor (``adam_steps_``, a kernel inductor
compiles once per machine and caches; its cache must be this user's alone) reads the fp32 weight,
the bf16 gradient and both moments and writes the weight, the moments and the next step's copy:
28 bytes a parameter. A weight written between steps (a checkpoint loaded, a callback's in-place
write) is copied again before the next forward pass.

What is learnt stays the same: the copy is the weight rounded to bf16 as autocast's cast rounds
it, the gradient reaches Adam as the same bf16 values, and Adam's arithmetic is torch's fused CPU
kernel's, bit for bit on that kernel's vectorized body (in its scalar tail, the last elements of a
tensor, and with Adam's L2 decay, a weight can differ in its last bit). The optimizer's state dict
is Adam's: a checkpoint resumes with the copy or without it.

It applies to a CPU fit in bf16-mixed on one device, with torch's Adam or AdamW (no amsgrad,
maximize or tensor hyperparameters), the net not compiled, one batch a step, no gradient clipping
and no callback that averages, freezes or drops weights between steps; ``why_not`` names what
stops it, and the fit then runs as Lightning runs it. While it applies, the gradients of the
copied weights are on their copies (``Bf16CopyAdam.copies``), not on the weights' ``.grad``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cache
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import Tensor, nn

from cifarkit.core.untrusted.compiled_cache import inductor_cache_fault
from cifarkit.fit.optim import FreezeParameters, HeadFirst

log = logging.getLogger(__name__)
COPIED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # whose weights and biases autocast casts to bf16
TOUCHES_WEIGHTS = (WeightAveraging, FreezeParameters, HeadFirst)  # callbacks that rewrite weights or drop gradients


def _adam_math(p: Tensor, g: Tensor, m: Tensor, v: Tensor, c: Tensor) -> Tensor:
    """One Adam step in place on flat tensors as torch's fused CPU kernel computes it; the new weights.
    ``c``: 1 - beta1, beta2, 1 - beta2, -lr / bias_correction1, sqrt(bias_correction2), eps, the L2
    weight decay (Adam's; AdamW's decay is applied before). Compiled with contraction on and the sum
    for ``v_new`` in this order, the multiply-adds fuse as in torch's kernel, so that the results
    match it bit for bit on its vectorized body (tests/test_bf16_copy.py)."""
    g = g.float() + p * c[6]
    m_new = torch.lerp(m, g, c[0])
    v_new = c[2] * g * g + v * c[1]
    p_new = p + c[3] * m_new / (v_new.sqrt() / c[4] + c[5])
    m.copy_(m_new)
    v.copy_(v_new)
    p.copy_(p_new)
    return p_new


def _adam_steps(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    copies: list[Tensor],
    coefs: Tensor,
) -> None:
    for i, p in enumerate(params):
        p_new = _adam_math(p, grads[i], exp_avgs[i], exp_avg_sqs[i], coefs[i])
        if copies:
            copies[i].copy_(p_new)


@cache
def _kernel() -> Callable[..., Any]:
    # One graph for all the tensors of a step, each of any size (dynamic: a net, a checkpoint's state
    # or a frozen layer changes no more than the tensors' count), its loops split over torch's threads
    # at run time; the multiply-adds contracted as in torch's own kernel.
    return torch.compile(
        _adam_steps,
        dynamic=True,
        fullgraph=True,
        options={"cpp.dynamic_threads": True, "cpp.enable_floating_point_contract_flag": "fast"},
    )


def _flat(t: Tensor) -> Tensor:
    """The elements of a dense tensor (contiguous or channels_last) in memory order, as a tensor of
    its own on the same memory rather than a view: the compiled graph then depends on the tensors'
    count alone, not on the shapes of the tensors they would be views of."""
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))


@torch.library.custom_op("cifarkit::adam_steps_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "copies"))
def adam_steps_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    copies: list[Tensor],
    coefs: Tensor,
) -> None:
    """Adam's step on fp32 tensors from their gradients (all bf16 or all fp32) and, where ``copies``
    is not empty, each one's bf16 copy written in the same pass; ``coefs``: a row of
    ``_adam_math``'s constants per tensor. One operator, so that a step's byte count
    (benchmarks/roofline.py) sees one read and one write of each tensor, as the kernel does."""
    grads = [
        g if g.stride() == p.stride() else torch.empty_like(p, dtype=g.dtype).copy_(g) for p, g in zip(params, grads)
    ]
    flat = [[_flat(t) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs, copies)]
    _kernel()(*flat, coefs)


def _coefficients(group: dict[str, Any], step: float) -> list[float]:
    """``_adam_math``'s constants for a parameter group at a step, in double as torch's kernel
    computes them (fp32 where it applies them)."""
    beta1, beta2 = group["betas"]
    lr, decay = group["lr"], group["weight_decay"]
    decoupled = group.get("decoupled_weight_decay", False)
    return [
        1 - beta1,
        beta2,
        1 - beta2,
        -lr / (1 - beta1**step),
        (1 - beta2**step) ** 0.5,
        group["eps"],
        0.0 if decoupled else decay,
    ]


class Bf16CopyAdam(torch.optim.Adam):
    """Adam (or AdamW, with ``decoupled_weight_decay``) whose step reads the gradients of the
    ``copied`` weights (by their names in the net) from their bf16 copies and writes the copies
    with the weights; ``synced()`` hands the forward pass the copies by name."""

    def __init__(self, params: Any, copied: dict[str, Tensor], **options: Any) -> None:
        super().__init__(params, **options)
        trained = {id(p) for group in self.param_groups for p in group["params"]}
        self.copies: dict[Tensor, Tensor] = {
            p: torch.empty_like(p, dtype=torch.bfloat16).requires_grad_() for p in copied.values() if id(p) in trained
        }
        self.by_name = {name: self.copies[p] for name, p in copied.items() if p in self.copies}
        self._versions: dict[Tensor, int] = {}  # each weight's version counter when its copy was written

    @torch.no_grad()
    def synced(self) -> dict[str, Tensor]:
        """The copies by name, each written again first where its weight changed since (a checkpoint
        loaded, a callback's in-place write): autograd's version counter says so; a write through
        ``.data`` is not counted."""
        for p, low in self.copies.items():
            if self._versions.get(p) != p._version:
                low.copy_(p)
                self._versions[p] = p._version
        return self.by_name

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for low in self.copies.values():
            if set_to_none:
                low.grad = None
            elif low.grad is not None:
                low.grad.zero_()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Two calls of the kernel: the copied weights (bf16 gradients, copies written), the others.
        calls: dict[bool, tuple[list[Any], ...]] = {True: ([], [], [], [], [], []), False: ([], [], [], [], [], [])}
        for group in self.param_groups:
            for p in group["params"]:
                low = self.copies.get(p)
                grad = p.grad if low is None else low.grad
                if grad is None:
                    continue
                state = self.state[p]
                if not state:  # as Adam starts a parameter's state
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                # AdamW's decay on its own, rounded before the update as torch's kernel rounds it
                if group.get("decoupled_weight_decay") and group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                params, grads, exp_avgs, exp_avg_sqs, copies, coefs = calls[low is not None]
                params.append(p)
                grads.append(grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                if low is not None:
                    copies.append(low)
                coefs.append(_coefficients(group, float(state["step"])))
        for params, grads, exp_avgs, exp_avg_sqs, copies, coefs in calls.values():
            if params:
                adam_steps_(params, grads, exp_avgs, exp_avg_sqs, copies, torch.tensor(coefs, dtype=torch.float32))
        self._versions.update((p, p._version) for p in calls[True][0])
        return loss


@cache
def kernel_fault(copied: int, plain: int) -> str | None:
    """Why inductor cannot build the step's kernel here (its cache not this user's alone, no C++
    compiler), or None once it ran:
    a step on small tensors of distinct sizes, as many of each kind as the fit's, which builds the
    graphs every later step of that many tensors reuses, whatever their sizes."""
    if why := inductor_cache_fault():
        return why
    try:
        params = [nn.Parameter(torch.zeros(64 + i)) for i in range(copied + plain)]
        optimizer = Bf16CopyAdam(params, {str(i): p for i, p in enumerate(params[:copied])})
        for p in params:
            low = optimizer.copies.get(p)
            (p if low is None else low).grad = torch.zeros_like(p if low is None else low)
        optimizer.step()
    except Exception as e:  # any failure of the compiler means the plain path, said in one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"inductor could not build its kernel ({first[:200]})"
    return None


def why_not(trainer: L.Trainer, net: nn.Module, optimizer: torch.optim.Optimizer, compiled: bool) -> str | None:
    """What keeps a bf16-mixed CPU fit from the copy, or None where it applies."""
    if not isinstance(trainer.strategy, SingleDeviceStrategy):
        return f"the fit runs on {trainer.num_devices} devices ({type(trainer.strategy).__name__})"
    if trainer.accumulate_grad_batches != 1:
        return "trainer.accumulate_grad_batches is not 1 (the copies' gradients would add up in bf16)"
    if trainer.gradient_clip_val:
        return "trainer.gradient_clip_val is set"
    touching = sorted({type(c).__name__ for c in trainer.callbacks if isinstance(c, TOUCHES_WEIGHTS)})
    if touching:
        return f"a callback rewrites weights or drops gradients between steps ({', '.join(touching)})"
    return unsupported(net, optimizer, compiled)


def unsupported(net: nn.Module, optimizer: torch.optim.Optimizer, compiled: bool) -> str | None:
    """What in the net or the optimizer keeps a step from the copy, or None."""
    if compiled:
        return "model.compile is set"
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return f"the optimizer is {type(optimizer).__name__}, not torch's Adam or AdamW"
    for group in optimizer.param_groups:
        unusual = [k for k in ("amsgrad", "maximize", "capturable", "differentiable") if group.get(k)]
        if unusual:
            return f"Adam's {', '.join(unusual)} is set"
        if isinstance(group["lr"], Tensor) or any(isinstance(b, Tensor) for b in group["betas"]):
            return "Adam's lr or betas is a tensor"
        for p in group["params"]:
            dense = p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last)
            if p.dtype != torch.float32 or not dense:
                return "a parameter is not a dense fp32 tensor"
    copied = {id(p) for p in copied_weights(net).values()}
    if not copied:
        return "the net has no convolution or linear layer"
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    n_copied = sum(id(p) in copied for p in trained)
    return kernel_fault(n_copied, len(trained) - n_copied)


def copied_weights(net: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable weights and biases of the net's convolution and linear layers, by their names in ``net``."""
    return {
        f"{name}.{key}" if name else key: p
        for name, m in net.named_modules()
        if isinstance(m, COPIED_LAYERS)
        for key, p in m.named_parameters(recurse=False)
        if p.requires_grad
    }


def adopt(
    trainer: L.Trainer, net: nn.Module, optimizer: torch.optim.Optimizer, compiled: bool
) -> torch.optim.Optimizer:
    """``optimizer`` as a ``Bf16CopyAdam`` where the copy applies to a bf16-mixed CPU fit (one log line
    either way), else itself."""
    if trainer.precision != "bf16-mixed" or trainer.strategy.root_device.type != "cpu":
        return optimizer
    reason = why_not(trainer, net, optimizer, compiled)
    if reason is not None:
        log.info("model.bf16_weight_copy: off for this fit, %s", reason)
        return optimizer
    log.info("model.bf16_weight_copy: Adam keeps a bf16 copy of the conv and linear weights (docs/speed.md)")
    return keeping(net, optimizer)


def keeping(net: nn.Module, optimizer: torch.optim.Optimizer) -> Bf16CopyAdam:
    """A ``Bf16CopyAdam`` with ``optimizer``'s groups and settings, copying ``net``'s conv and linear weights."""
    return Bf16CopyAdam(optimizer.param_groups, copied_weights(net), **optimizer.defaults)
