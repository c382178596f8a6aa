"""The roofline of a training step: the machine's memory bandwidth, the step's FLOPs and bytes, the chart.

The roofline model (Williams, Waterman and Patterson, 2009): a step that does F FLOPs and moves B
bytes can run at most at min(compute peak, F / B x memory bandwidth) FLOP/s. bench.py measures
the peak (a large matmul) and the bandwidth (``stream_bandwidth``), counts each measured step's F
and B (``count_step``), and sets every training figure against that attainable rate.

How the bytes are counted (``ByteCounter``): every ATen operator the step runs (forward, loss,
backward, optimizer step, and the casts autocast inserts) is seen below autograd and autocast by a
``TorchDispatchMode``; an operator reads each tensor it is given (the elements its view covers)
and writes each tensor it returns and each argument its schema marks as mutated (an in-place or
``out=`` argument; ``copy_``, ``zero_`` and ``fill_`` only write their target; a fused optimizer's
gradients are read, written only when it unscales them; the bf16 copy's Adam step,
``cifarkit::adam_steps_``, writes the copies unread). Views and empty tensors move nothing.
So the count is what the step moves if every operator reads its inputs from memory and writes its
outputs back, once: no reuse of data left in a cache by the operator before (an over-count for the
small activations of a small batch), no traffic inside an operator (a matmul re-reading its tiles,
a convolution's scratch buffers: an under-count), and no allocator traffic (page faults).
"""

from __future__ import annotations

import glob
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

# STREAM's rule: each array at least 4 times the last-level caches together.
LLC_MULTIPLE = 4
STREAM_RUNS = 10  # STREAM's NTIMES: the best of these
WRITE_ONLY = {"copy_", "zero_", "fill_", "_foreach_copy_", "_foreach_zero_"}  # ops that write their target unread
FUSED_OPTIMIZERS = {"_fused_adam_", "_fused_adamw_", "_fused_sgd_", "_fused_adagrad_"}
WRITTEN_UNREAD = {"adam_steps_": {"copies"}}  # arguments an op writes without reading (cifarkit/fit/bf16_copy.py)


def llc_bytes() -> int:
    """The last-level caches of the machine together (each shared cache once), from sysfs; 0 if unknown."""
    caches: dict[tuple[int, str], int] = {}
    for index in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cache/index[0-9]*"):
        try:
            kind = Path(index, "type").read_text().strip()
            level = int(Path(index, "level").read_text())
            shared = Path(index, "shared_cpu_list").read_text().strip()
            size = Path(index, "size").read_text().strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction":
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        caches[(level, shared)] = int(size.rstrip("KMG")) * units.get(size[-1], 1)
    if not caches:
        return 0
    top = max(level for level, _ in caches)
    return sum(size for (level, _), size in caches.items() if level == top)


def stream_bandwidth(
    array_bytes: int | None = None, runs: int = STREAM_RUNS, device: torch.device | None = None
) -> dict[str, Any]:
    """STREAM's copy (a = b) and triad (a = b + s*c) on float64 torch tensors on ``device`` (the
    CPU: with the threads torch runs with); each the best of ``runs``, credited as STREAM does (copy
    2, triad 3 array sizes per run: no write-allocate traffic). Arrays of ``array_bytes`` each
    (default: 4x the CPU's last-level caches)."""
    device = device or torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    llc = llc_bytes()
    size = array_bytes or LLC_MULTIPLE * max(llc, 64 << 20)
    n = size // 8
    a, b, c = (torch.full((n,), v, dtype=torch.float64, device=device) for v in (1.0, 2.0, 0.0))  # first touch
    best = {"copy": float("inf"), "triad": float("inf")}
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        a.copy_(b)
        sync()
        t1 = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        sync()
        t2 = time.perf_counter()
        best["copy"], best["triad"] = min(best["copy"], t1 - t0), min(best["triad"], t2 - t1)
    del a, b, c
    return {
        "copy_gbs": round(2 * n * 8 / best["copy"] / 1e9, 2),
        "triad_gbs": round(3 * n * 8 / best["triad"] / 1e9, 2),
        "array_mib": round(n * 8 / (1 << 20)),
        "llc_mib": round(llc / (1 << 20)),
        "runs": runs,
        "threads": torch.get_num_threads(),
    }


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class ByteCounter(TorchDispatchMode):
    """Bytes read and written by every ATen operator run under it (the method: this module's docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.read = self.written = 0
        self.casts = 0  # of which dtype conversions (autocast's weight and gradient casts among them)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view:
            return out
        name = func._schema.name.split("::")[-1]
        read = written = 0
        values = [*args, *(kwargs.get(a.name) for a in func._schema.arguments[len(args) :])]
        for arg, value in zip(func._schema.arguments, values):
            size = sum(_nbytes(t) for t in tree_flatten(value)[0])
            mutated = arg.alias_info is not None and arg.alias_info.is_write
            if name in FUSED_OPTIMIZERS and arg.name == "grads":
                mutated = kwargs.get("grad_scale") is not None
            if mutated:
                written += size
            if not mutated or not (name in WRITE_ONLY or arg.name == "out" or arg.name in WRITTEN_UNREAD.get(name, ())):
                read += size
        if not any(r.alias_info is not None for r in func._schema.returns):
            written += sum(_nbytes(t) for t in tree_flatten(out)[0])
        if name in ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"):
            read = written = 0
        self.read += read
        self.written += written
        if name in ("_to_copy", "copy_", "_foreach_copy_") and _casts(name, args, out):
            self.casts += read + written
        return out


def _casts(name: str, args: tuple, out: Any) -> bool:
    """Whether a copy converts: its result's (or target's) dtype differs from its source's."""
    if name == "_to_copy":
        return out.dtype != args[0].dtype
    target, source = (args[0][0], args[1][0]) if name == "_foreach_copy_" else (args[0], args[1])
    return target.dtype != source.dtype


def count_step(phases: list[tuple[str, Callable[[], Any]]]) -> dict[str, Any]:
    """FLOPs (``FlopCounterMode``: convolutions and matrix products, forward and backward) and bytes
    (``ByteCounter``) of one training step given as named phases run in order (e.g. forward and
    loss, backward, optimizer step); the caller runs a step before, so the optimizer's state exists."""
    by_phase: Counter[str] = Counter()
    with FlopCounterMode(display=False) as flops, ByteCounter() as moved:
        for name, phase in phases:
            before = moved.read + moved.written
            phase()
            by_phase[name] = moved.read + moved.written - before
    return {
        "flops": int(flops.get_total_flops()),
        "bytes": moved.read + moved.written,
        "bytes_read": moved.read,
        "bytes_written": moved.written,
        "bytes_by_phase": dict(by_phase),
        "bytes_of_casts": moved.casts,
    }


def attainable_gflops(peak_gflops: float, intensity: float, bandwidth_gbs: float) -> float:
    """The roofline: min(compute peak, arithmetic intensity x memory bandwidth)."""
    return min(peak_gflops, intensity * bandwidth_gbs)


def draw(
    path: Path, peaks: dict[str, float], bandwidth_gbs: float, points: dict[str, dict[str, Any]], title: str
) -> Path:
    """The roofline chart (log-log): the bandwidth roof, each compute peak, each measured step as a labelled point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ais = [p["intensity"] for p in points.values()]
    lo, hi = min(ais) / 4, max([*ais, max(peaks.values()) / bandwidth_gbs]) * 6
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    for i, (dtype, peak) in enumerate(sorted(peaks.items(), key=lambda kv: kv[1])):
        style = ["--", "-"][min(i, 1)]
        ax.plot(xs, [attainable_gflops(peak, x, bandwidth_gbs) for x in xs], style, color="black", lw=1.2)
        ax.annotate(f"{dtype} matmul peak {peak:,.0f} GFLOP/s", (hi, peak), ha="right", va="bottom", fontsize=8)
    ax.annotate(
        f"STREAM triad {bandwidth_gbs:.1f} GB/s",
        (lo * 1.3, lo * 1.3 * bandwidth_gbs),
        rotation=0,
        fontsize=8,
        va="bottom",
    )
    colors = {"tutorial": "tab:blue", "raw": "tab:gray", "default": "tab:red", "today": "tab:orange"}
    stacked: dict[float, int] = {}  # labels of points at one intensity go one under another
    for label, p in sorted(points.items(), key=lambda kv: -kv[1]["gflops"]):
        color = next((c for k, c in colors.items() if label.startswith(k)), "tab:green")
        k = stacked[round(p["intensity"], 1)] = stacked.get(round(p["intensity"], 1), -1) + 1
        ax.plot(p["intensity"], p["gflops"], "o", color=color)
        ax.annotate(
            label,
            (p["intensity"], p["gflops"]),
            xytext=(6, 6 - 11 * k),
            textcoords="offset points",
            fontsize=7,
            color=color,
        )
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOPs per byte moved)", ylabel="GFLOP/s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
