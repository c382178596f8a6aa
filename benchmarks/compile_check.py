"""Eager against ``torch.compile`` for the default net: seconds to compile, ms per step after.

    python benchmarks/compile_check.py [--device auto|cpu|cuda] [--batches 32,512] [--steps 30] [--model basic_cnn]

Each mode trains the default path's net in benchmarks/loops.py's raw loop (its optimizer,
precision, memory format and DeviceLoader batches) on full-size synthetic images: eager, then
``model.compile`` true (inductor's default mode) and, on a CUDA GPU, ``reduce-overhead`` (CUDA
graphs) and ``max-autotune``. The first steps (compilation included) are timed apart from the
steady ones. The last line is one JSON object; ``headline_100_epochs_s`` projects the tutorial's
100 epochs at batch 32 (45,000 training images an epoch) from each mode's steady step.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from bench import SYNTHETIC, compose_cfg
from cifarkit.core.devices import resolve_accelerator, resolve_precision
from loops import raw_loop, sync, timed
from results import add_argument, machine, save

WARM = 3  # steps timed as the first ones: compilation, allocation, kernel selection
HEADLINE_STEPS = math.ceil(45_000 / 32) * 100


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--batches", default="32,512")
    p.add_argument("--steps", type=int, default=30, help="steady steps timed per mode and batch")
    p.add_argument("--model", default="basic_cnn", help="a configs/model option")
    p.add_argument("--images", type=int, default=50_000, help="synthetic training images")
    add_argument(p)
    args = p.parse_args()
    device = torch.device(
        resolve_accelerator("auto" if args.device == "auto" else {"cpu": "cpu", "cuda": "gpu"}[args.device])
    )
    modes = ["eager", "default"] + (["reduce-overhead", "max-autotune"] if device.type == "cuda" else [])
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (int(b) for b in args.batches.split(",")):
            cfg = compose_cfg(
                [
                    *SYNTHETIC,
                    f"+data.train_images={args.images}",
                    "data.val_size=0",
                    f"model={args.model}",
                    f"data.batch_size={batch}",
                    f"paths.data_dir={tmp}",
                ],
                Path(tmp),
            )
            dm = instantiate(cfg.data)
            dm.setup()
            precision = resolve_precision(cfg.trainer.precision, device.type)
            for mode in modes:
                with open_dict(cfg):
                    cfg.model.compile = False if mode == "eager" else True if mode == "default" else mode
                torch.manual_seed(0)
                steps = raw_loop(cfg, dm, device, precision)
                sync(device)
                t0 = time.perf_counter()
                for _ in range(WARM):
                    next(steps)
                sync(device)
                first = time.perf_counter() - t0
                steady = timed(steps, device, 0, args.steps)
                results.setdefault(str(batch), {})[mode] = {
                    "first_steps_s": round(first, 2),
                    "ms_per_step": round(steady * 1e3, 3),
                    "images_per_s": round(batch / steady, 1),
                    **({"headline_100_epochs_s": round(HEADLINE_STEPS * steady, 1)} if batch == 32 else {}),
                }
                if device.type == "cuda":
                    torch._dynamo.reset()
    for batch, by_mode in results.items():
        eager = by_mode["eager"]["ms_per_step"]
        for mode, r in by_mode.items():
            r["speedup"] = round(eager / r["ms_per_step"], 3)
            print(
                f"batch {batch:>4} {mode:>16}: {r['ms_per_step']:9.3f} ms/step ({r['speedup']:.2f}x eager), first "
                f"{WARM} steps {r['first_steps_s']:.1f} s"
            )
    report = {
        "model": args.model,
        "precision": str(precision),
        "warm_steps": WARM,
        "by_batch": results,
        "machine": machine(device),
    }
    save(args.results, f"compile-{args.model}", report, device)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
