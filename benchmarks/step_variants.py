"""Where the default path's CPU step goes, and what each candidate change does to it, one at a time.

    python benchmarks/step_variants.py [--batch 32] [--steps 20] [--rounds 2] [--profile [--shapes]]

The raw step of the default recipe (BasicCNN, Adam, bf16 autocast, channels_last; benchmarks/loops.py
``raw_step``) on a random batch, in alternating rounds, three ways: as it was (fused Adam, autocast
casting every weight to bf16 and each gradient back every step); with a bf16 copy of the conv and
linear weights refreshed by a pass of its own after each optimizer step (autocast then finds bf16
weights and casts none; the gradient still reaches the fp32 weights in fp32); and with Adam keeping
the copy (``model.bf16_weight_copy``, cifarkit/fit/bf16_copy.py: its step reads the bf16 gradient
and writes the copy); each with and without malloc keeping the step's freed blocks
(``model.reuse_memory``, cifarkit/fit/allocator.py). All three compute the same values. Milliseconds
a step (best round) and page faults a step; with ``--profile``, the operators' self time of the
step as it was and as it is by default (``--shapes``: each operator by its input shapes, which tells
one layer's product from another's). It prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from cifarkit.fit.allocator import keep_freed_memory
from loops import raw_step

CFG = {
    "channels_last": True,
    "compile": False,
    "net": {"_target_": "cifarkit.nets.models.BasicCNN"},
    "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3, "fused": True},
}


class Cached(torch.autograd.Function):
    """The bf16 copy in the forward pass; the gradient back to the fp32 weight, as autocast's cast does."""

    @staticmethod
    def forward(ctx: Any, master: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        return low

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.to(torch.float32), None


def with_bf16_copy(net: nn.Module) -> tuple[Callable[[], Any], Callable[[], None]]:
    """A context that puts the bf16 copies in the net's place, and the refresh after a step."""
    slots = [
        (m, k, getattr(m, k))
        for m in net.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
        for k in ("weight", "bias")
        if getattr(m, k) is not None
    ]
    lows = [torch.empty_like(p, dtype=torch.bfloat16) for _, _, p in slots]

    def refresh() -> None:
        with torch.no_grad():
            torch._foreach_copy_(lows, [p for _, _, p in slots])

    @contextmanager
    def swapped() -> Iterator[None]:
        for (m, k, p), low in zip(slots, lows):
            del m._parameters[k]
            setattr(m, k, Cached.apply(p, low))
        try:
            yield
        finally:
            for m, k, p in slots:
                delattr(m, k)
                m._parameters[k] = p

    refresh()
    return swapped, refresh


def variant(copy: str, batch: int) -> Callable[[], None]:
    """One training step of the raw default path: ``copy`` none, refreshed (a pass of its own) or kept (by Adam)."""
    torch.manual_seed(0)
    cfg = OmegaConf.create({"model": {**CFG, "bf16_weight_copy": copy == "kept"}})
    net = instantiate(cfg.model.net, num_classes=10)
    step = raw_step(cfg, torch.device("cpu"), "bf16-mixed", 10, net)
    x, y = torch.randn(batch, 3, 32, 32), torch.arange(batch) % 10
    swapped, refresh = with_bf16_copy(net) if copy == "refreshed" else (None, None)

    def one() -> None:
        for name, phase in step(x, y):
            if swapped is not None and name == "forward":
                with swapped():
                    phase()
            else:
                phase()
        if refresh is not None:
            refresh()

    return one


def timed(step: Callable[[], None], n: int) -> tuple[float, float]:
    """Milliseconds and minor page faults per step over ``n`` steps, after 3."""
    for _ in range(3):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    ms = (time.perf_counter() - t0) / n * 1e3
    return ms, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--shapes", action="store_true", help="with --profile: each operator by its input shapes")
    args = p.parse_args()
    steps = {
        "autocast": variant("none", args.batch),
        "refreshed_copy": variant("refreshed", args.batch),
        "kept_copy": variant("kept", args.batch),
    }
    best: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for keep in (False, True):
            keep_freed_memory(keep)
            for name, step in steps.items():
                ms, faults = timed(step, args.steps)
                key = name + ("+reuse_memory" if keep else "")
                best[key] = min(best.get(key, [ms, faults]), [ms, faults])
    for key, (ms, faults) in best.items():
        print(f"{key:<28} {ms:7.2f} ms/step  {faults:8,.0f} page faults/step")
    result: dict[str, Any] = {
        "batch": args.batch,
        "ms_per_step": {k: round(v[0], 2) for k, v in best.items()},
        "faults_per_step": {k: round(v[1]) for k, v in best.items()},
    }
    if args.profile:
        result["profile_self_share"] = {}
        for name, keep in (("autocast", False), ("kept_copy", True)):
            keep_freed_memory(keep)
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=args.shapes
            ) as prof:
                for _ in range(10):
                    steps[name]()
            averages = prof.key_averages(group_by_input_shape=args.shapes)
            events = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
            total = sum(e.self_cpu_time_total for e in events)
            key = name + ("+reuse_memory" if keep else "")
            result["profile_self_share"][key] = {
                f"{e.key} {e.input_shapes}" if args.shapes else e.key: round(e.self_cpu_time_total / total, 3)
                for e in events[:8]
            }
        print(json.dumps(result["profile_self_share"], indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
