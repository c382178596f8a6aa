"""Speed of cifarkit's default path against the tutorial's plain PyTorch loop, on the same data.

    python benchmarks/bench.py [--root /tmp/cifar10-full] [--quick] [--override key=value ...]

Reads an image-folder tree (root/train/<class>/*, root/test/<class>/*), decodes it once into
the project's uint8 cache (not timed), then times, in alternating rounds so that a change in
machine load hits every contender alike:

* the data pipelines alone: the device pipeline vs torchvision's per-sample PIL transforms;
* training at batch 32: the tutorial loop (fp32, per-sample PIL transforms in a DataLoader),
  a raw PyTorch loop with the default path's model, precision, memory format, optimizer and
  DeviceLoader batches, and train.py's default path (the composed config, ``build()``,
  ``ImageClassifier`` under ``Trainer``, its callbacks and logger);
* the default path at batch 128 and 512, and the peak memory of a real ``train.py`` run.

Warm-up steps are excluded and every figure is the median of the rounds. It prints a table,
then one JSON object as its last line. ``--override`` takes Hydra overrides of train.yaml
(e.g. ``trainer.precision=32-true``), which is how the defaults were chosen.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from torch import nn
from torch.utils.data import DataLoader

from cifarkit.data import DeviceLoader, ImageDataModule, PILDataset
from cifarkit.model import BasicCNN
from cifarkit.train import build, resolve_accelerator

ROOT = Path(__file__).resolve().parents[1]
QUICK = dict(rounds=3, steps=6, pipe_tv=30, big={128: 3, 512: 2}, rss_steps=5)
FULL = dict(rounds=7, steps=20, pipe_tv=100, big={128: 8, 512: 4}, rss_steps=100)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=os.environ.get("CIFARKIT_DATA_ROOT", "/tmp/cifar10-full"), help="image-folder tree")
    p.add_argument("--data-dir", default="/tmp/cifarkit-bench", help="paths.data_dir: where the uint8 cache is kept")
    p.add_argument("--quick", action="store_true", help="fewer rounds and steps (about 2 minutes on 2 CPU cores)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice); also for the train.py run")
    p.add_argument("--override", nargs="*", default=[], help="Hydra overrides of train.yaml for the default path")
    return p.parse_args()


def machine() -> dict[str, Any]:
    """What the numbers were measured on; the load average says how busy the machine was."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "device": dev,
            "threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2)}


def compose_cfg(root: str, data_dir: str, out: Path, overrides: list[str]) -> DictConfig:
    """train.yaml as train.py composes it, with outputs under ``out`` and validation off."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["data=image_folder", f"data.root={root}", f"paths.data_dir={data_dir}", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.log_dir = str(out), str(out / "logs")
    return cfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(steps: Iterator[Any], device: torch.device, warm: int, n: int) -> float:
    """Seconds per item of ``steps`` after ``warm`` untimed ones."""
    for _ in range(warm):
        next(steps)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        next(steps)
    sync(device)
    return (time.perf_counter() - t0) / n


def epoch_images_per_s(loader: DeviceLoader, device: torch.device) -> float:
    """A whole epoch of the device pipeline: permutation, draws and every batch."""
    sync(device)
    t0 = time.perf_counter()
    n = sum(len(y) for _, y in loader)
    sync(device)
    return n / (time.perf_counter() - t0)


def forever(make: Callable[[], Any]) -> Iterator[Any]:
    while True:
        yield from make()


# -- the contenders ---------------------------------------------------------------------------


def tutorial_loop(dm: ImageDataModule, device: torch.device) -> Iterator[None]:
    """The tutorial's loop (seed_baseline.py): fp32, Adam(1e-3), per-sample PIL transforms, batch 32."""
    x, y = dm.splits["train"]
    loader = DataLoader(PILDataset(x, y, dm.pil_transform(train=True)), batch_size=32, shuffle=True, num_workers=0)
    model = BasicCNN(len(dm.classes)).to(device)
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for xb, yb in forever(lambda: loader):
        xb, yb = xb.to(device), yb.to(device)
        optim.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        optim.step()
        yield


def train_loader(dm: ImageDataModule, device: torch.device, batch_size: int) -> DeviceLoader:
    """The device pipeline's training batches, as the datamodule makes them for one process."""
    x, y = dm.splits["train"]
    return DeviceLoader(x, y, torch.tensor(dm.mean), torch.tensor(dm.std), batch_size, train=True, seed=dm.seed,
                        padding=dm.padding, flip_p=dm.flip_p, device=device)


def raw_loop(cfg: DictConfig, dm: ImageDataModule, device: torch.device, precision: str) -> Iterator[None]:
    """Plain PyTorch with everything the default path uses: net, optimizer, precision, memory format, batches."""
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    net = instantiate(cfg.model.net, num_classes=len(dm.classes)).to(device, memory_format=fmt)
    forward = torch.compile(net) if cfg.model.compile else net
    optim = instantiate(cfg.model.optimizer)(params=net.parameters())
    half = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=half is torch.float16)
    loss_fn = nn.CrossEntropyLoss()
    loader = train_loader(dm, device, cfg.data.batch_size)
    for xb, yb in forever(lambda: loader):
        with torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None):
            loss = loss_fn(forward(xb.contiguous(memory_format=fmt)), yb)
        optim.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optim)
        scaler.update()
        yield


class StepTimes(L.Callback):
    """The time at the end of every training step, for per-step timing inside Trainer.fit."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        sync(pl_module.device)
        self.ends.append(time.perf_counter())


def lightning_window(cfg: DictConfig, dm: ImageDataModule, model: L.LightningModule, warm: int, n: int) -> float:
    """Seconds per step of train.py's default path (fresh Trainer from build(), same model and data)."""
    with open_dict(cfg):
        cfg.trainer.limit_train_batches = warm + n
    _, trainer = build(cfg)
    timer = StepTimes()
    trainer.callbacks.append(timer)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer.fit(model, datamodule=dm)
    return (timer.ends[-1] - timer.ends[warm - 1]) / n


def peak_rss_mb(args: argparse.Namespace, steps: int, out: Path) -> float:
    """Peak resident memory of a real CPU ``train.py`` run on the full set (a child process)."""
    cmd = [sys.executable, str(ROOT / "train.py"), "data=image_folder", f"data.root={args.root}", f"paths.data_dir={args.data_dir}",
           f"paths.log_dir={out / 'rss-logs'}", "trainer=cpu", "trainer.max_epochs=1", f"trainer.limit_train_batches={steps}",
           "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "callbacks.progress_bar=null"]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    done = subprocess.run(cmd, cwd=out, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"bench: the train.py memory run failed ({done.stderr.strip().splitlines()[-1:]}); run it by hand: {' '.join(cmd)}")
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


# -- the run ----------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    if not (Path(args.root) / "train").is_dir():
        sys.exit(f"bench: no image folder at {args.root} (expected train/<class>/ and test/<class>/); pass --root DIR or set CIFARKIT_DATA_ROOT")
    p = QUICK if args.quick else FULL
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    L.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory(prefix="cifarkit-bench-") as tmp:
        out = Path(tmp)
        rss = peak_rss_mb(args, p["rss_steps"], out)  # first, so RUSAGE_CHILDREN is this run's alone
        overrides = ["trainer.max_epochs=1", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
                     "trainer.enable_model_summary=false", "trainer.enable_checkpointing=false", "callbacks.model_checkpoint=null",
                     *args.override]
        cfg = compose_cfg(args.root, args.data_dir, out, overrides)
        device = torch.device(resolve_accelerator(cfg.trainer.accelerator))
        dm: ImageDataModule = instantiate(cfg.data)
        dm.prepare_data()  # decodes once into the cache; everything below reads uint8 tensors
        dm.setup()
        model = instantiate(cfg.model, classes=dm.classes)
        precision = str(build(cfg, with_loggers=False)[1].precision)

        x, y = dm.splits["train"]
        tv = DataLoader(PILDataset(x, y, dm.pil_transform(train=True)), batch_size=32, shuffle=True)
        pipe_tv = (xb.to(device) for xb, _ in forever(lambda: tv))
        tut, raw = tutorial_loop(dm, device), raw_loop(cfg, dm, device, precision)
        r: dict[str, list[float]] = {k: [] for k in ("pipe_dev", "pipe_dev512", "pipe_tv", "tutorial", "raw", "lightning")}
        for _ in range(p["rounds"]):
            r["pipe_dev"].append(epoch_images_per_s(train_loader(dm, device, 32), device))
            r["pipe_dev512"].append(epoch_images_per_s(train_loader(dm, device, 512), device))
            r["pipe_tv"].append(32 / timed(pipe_tv, device, 1, p["pipe_tv"]))
            r["tutorial"].append(timed(tut, device, 1, p["steps"]))
            before = timed(raw, device, 1, p["steps"])  # the raw loop brackets Lightning: load drifts
            r["lightning"].append(lightning_window(cfg, dm, model, 2, p["steps"]))
            r["raw"].append((before + timed(raw, device, 1, p["steps"])) / 2)
        big = {}
        for bs, n in p["big"].items():
            dm.batch_size = bs
            big[bs] = bs / lightning_window(cfg, dm, model, 1, n)
        dm.batch_size = cfg.data.batch_size

    med = {k: statistics.median(v) for k, v in r.items()}

    def ratio(a: str, b: str) -> float:
        """Median over rounds of a/b, each pair measured back to back."""
        return statistics.median(x / y for x, y in zip(r[a], r[b]))

    result = {
        "pipeline_speedup": round(ratio("pipe_dev", "pipe_tv"), 2),
        "train_speedup": round(ratio("tutorial", "lightning"), 3),
        "lightning_overhead": round(ratio("lightning", "raw") - 1, 4),
        "images_per_s": {"32": round(32 / med["lightning"], 1), **{str(b): round(v, 1) for b, v in big.items()}},
        "tutorial_images_per_s": round(32 / med["tutorial"], 1),
        "raw_loop_images_per_s": round(32 / med["raw"], 1),
        "pipeline_images_per_s": {"device_b32": round(med["pipe_dev"]), "device_b512": round(med["pipe_dev512"]),
                                  "torchvision_b32": round(med["pipe_tv"])},
        "peak_rss_mb": round(rss),
        "precision": precision,
        "channels_last": bool(cfg.model.channels_last),
        "fused_adam": bool(cfg.model.optimizer.get("fused")),
        "compile": bool(cfg.model.compile),
        "overrides": args.override,
        "quick": args.quick,
        "rounds": p["rounds"],
        "train_images": len(y),
        "machine": machine(),
        "per_round": {k: [round(v, 4) for v in vals] for k, vals in r.items()},  # img/s for pipe_*, else s/step
    }
    print_table(result)
    print(json.dumps(result))


def print_table(res: dict[str, Any]) -> None:
    m, ips, pipe = res["machine"], res["images_per_s"], res["pipeline_images_per_s"]
    setup = f"{res['precision']}, channels_last={res['channels_last']}, fused Adam={res['fused_adam']}, compile={res['compile']}"
    rows = [
        ("machine", f"{m['cpu']}, {m['cores']} cores ({m['threads']} torch threads), {m['device']}, torch {m['torch']}, load {m['load_avg_1m']}"),
        ("default path", setup + (f"; overrides {' '.join(res['overrides'])}" if res["overrides"] else "")),
        ("pipeline, torchvision per-sample (b32)", f"{pipe['torchvision_b32']:>10,} img/s"),
        ("pipeline, device (b32)", f"{pipe['device_b32']:>10,} img/s"),
        ("pipeline, device (b512)", f"{pipe['device_b512']:>10,} img/s"),
        ("train, tutorial loop fp32 (b32)", f"{res['tutorial_images_per_s']:>10,.1f} img/s"),
        ("train, raw PyTorch loop, default settings (b32)", f"{res['raw_loop_images_per_s']:>10,.1f} img/s"),
        *((f"train, default path train.py (b{b})", f"{v:>10,.1f} img/s") for b, v in ips.items()),
        ("pipeline_speedup", f"{res['pipeline_speedup']:>10.2f} x   (target >= 10)"),
        ("train_speedup (b32)", f"{res['train_speedup']:>10.2f} x   (target >= 2)"),
        ("lightning_overhead (b32)", f"{res['lightning_overhead']:>+10.3f}     (target <= 0.05)"),
        ("peak RSS, train.py on the full set", f"{res['peak_rss_mb']:>10,} MB  (limit 3000)"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"cifarkit benchmark ({'quick' if res['quick'] else 'full'}, medians of {res['rounds']} rounds)")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


if __name__ == "__main__":
    main()
