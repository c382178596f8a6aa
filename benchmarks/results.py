"""Where the benchmarks' figures are kept: ``docs/results/<what>-<machine>.json``.

Each file holds the command that made it, the machine it ran on and the figures, so the docs
cite a file rather than a number typed by hand, and the next person re-measures with the same
command. A new run on a machine of the same kind replaces the file; git keeps the history.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def machine(device: torch.device | None = None) -> dict[str, Any]:
    """What the numbers were measured on; the load average says how busy the machine was."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    device = device or torch.device("cpu")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "device": gpu or device.type,
        "threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def machine_name(m: dict[str, Any]) -> str:
    """A file-name-safe name for a kind of machine: the GPU, or the CPU with its vector ISA and cores.

    The ISA is part of it because one CPU model name (a VM's "AMD EPYC") covers kinds whose speed
    differs several-fold (AVX2 only, or AVX512 with bf16)."""
    if m["device"] not in ("cpu", "mps"):
        base = m["device"]
    else:
        words = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*", " ", m["cpu"].lower()).split()[:3]
        base = f"{' '.join(words)} {m['cpu_capability']} {m['cores']}cores"
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")


def add_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--results",
        default=str(RESULTS),
        metavar="DIR",
        help="folder for <what>-<machine>.json (default: docs/results); '' writes none",
    )


def save(folder: str, what: str, figures: dict[str, Any], device: torch.device | None = None) -> Path | None:
    """Write ``figures`` with the command line and the machine to ``folder``; the path, or None for ''."""
    if not folder:
        return None
    m = machine(device)
    path = Path(folder) / f"{what}-{machine_name(m)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    record = {"command": command, "date": time.strftime("%Y-%m-%d"), "machine": m, "figures": figures}
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"figures saved to {path}", file=sys.stderr)
    return path
