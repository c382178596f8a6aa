"""Speed of cifarkit's default path against the tutorial's plain PyTorch loop, on the same data.

    python benchmarks/bench.py [--root DIR | --synthetic] [--quick | --tiny] [--device auto|cpu|cuda]
                               [--override key=value ...]

The data: the image-folder tree ``--root`` (root/train/<class>/*, root/test/<class>/*; also
``CIFARKIT_DATA_ROOT``), else a CIFAR-10 that ``train.py`` downloaded into ./data, else (or with
``--synthetic``) 50,000 + 10,000 random 3x32x32 images in memory, which time the same code: speed
does not depend on the pixels. Image files are decoded once into the project's uint8 cache (not
timed); then, in alternating rounds so that a change in machine load hits every contender alike,
it times:

* the data pipelines alone: the device pipeline vs torchvision's per-sample PIL transforms;
* training at batch 32: the tutorial loop (fp32, per-sample PIL transforms in a DataLoader),
  a raw PyTorch loop with the default path's model, precision, memory format, optimizer and
  DeviceLoader batches, and train.py's default path (the composed config, ``build()``,
  ``ImageClassifier`` under ``Trainer``, its callbacks and logger), and today's path beside it
  (``--before``: the default path with ``model.reuse_memory=false model.bf16_weight_copy=false``);
* the tutorial loop and the default path at batch 128 and 512, and the peak memory of a real
  CPU ``train.py`` run;
* the host's cost of one step (``host_us_per_step``): the raw loop and the default path again
  with a net whose compute is negligible, the default path taken apart layer by layer
  (benchmarks/loops.py);
* an n x n matrix product in fp32, and in bf16 and the default path's autocast dtype where the
  hardware computes them natively: the machine's peak, against which each training figure's
  FLOP/s (its step's counted FLOPs times steps/s) is given as a fraction. On a GPU,
  cuDNN runs fp32 convolutions in TF32 by default, while the fp32 peak is plain fp32 matmul;
* the roofline (benchmarks/roofline.py): the memory bandwidth (STREAM copy and triad), each
  measured step's FLOPs and bytes counted, and each figure as a fraction of its attainable rate,
  min(peak, FLOPs/bytes x triad bandwidth); the chart goes beside the results file.

Warm-up steps are excluded and every figure is the median of the rounds (the matmul peak: the
best of them). ``--device`` picks the accelerator (default: the config's, a GPU when there is
one; there every timed window has GPU_STEPS times the steps). It prints a table, then one JSON
object as its last line. ``--override`` takes Hydra overrides of train.yaml (e.g.
``trainer.precision=32-true``), which is how the defaults were chosen.

Longer than the project's other files on purpose: the contenders are timed in one interleaved
schedule, so they share one script; the loops being timed live in benchmarks/loops.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from torch.utils.data import DataLoader

from cifarkit.core.devices import resolve_accelerator
from cifarkit.core.errors import UserError
from cifarkit.data.datamodule import ImageDataModule
from cifarkit.data.loader import PILDataset, pil_transform
from cifarkit.run.resolvers import register_resolvers
from cifarkit.run.train import build
from loops import (
    COMPUTE_DTYPE,
    allocator_as,
    epoch_images_per_s,
    forever,
    host_overhead,
    lightning_window,
    raw_loop,
    raw_step,
    sync,
    timed,
    train_loader,
    tutorial_loop,
    tutorial_step,
)
from results import add_argument, machine, save
from roofline import attainable_gflops, count_step, draw, stream_bandwidth

ROOT = Path(__file__).resolve().parents[1]
# rounds; timed steps per contender and round; torchvision pipeline batches; timed steps at the
# larger batches; steps of the train.py memory run (0: none); seconds of matrix products per dtype and round.
FULL = dict(rounds=7, steps=20, pipe_tv=100, big={128: 8, 512: 4}, rss_steps=100, peak_s=1.0, host_chunks=4, warm=8)
QUICK = dict(rounds=3, steps=6, pipe_tv=30, big={128: 3, 512: 2}, rss_steps=5, peak_s=0.5, host_chunks=2, warm=8)
# For tests: each contender once, on 1,024 + 64 synthetic images, no train.py run; the figures mean little.
TINY = dict(rounds=1, steps=1, pipe_tv=2, big={}, rss_steps=0, peak_s=0.2, host_chunks=1, warm=2)
# warm: untimed steps before each training window at batch 32 (a quarter of them at the larger
# batches): malloc's heap takes a few steps to hold a step's freed blocks after the allocator's
# setting changes between contenders (cifarkit/fit/allocator.py).
TINY_SYNTHETIC = ["+data.train_images=1024", "+data.test_images=64", "data.val_size=64"]
# A GPU step is far shorter than a CPU one: more of them keep each window well above launch and clock noise.
GPU_STEPS = 10
DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
SYNTHETIC = ["data=cifar10", "data._target_=synthetic_data.SyntheticCIFAR10"]  # benchmarks/synthetic_data.py
ACCELERATOR = {"cpu": "cpu", "cuda": "gpu"}
# Today's path: the default path before malloc kept the step's freed memory (cifarkit/fit/allocator.py)
# and Adam the bf16 weights (cifarkit/fit/bf16_copy.py).
BEFORE = ["model.reuse_memory=false", "model.bf16_weight_copy=false"]
STREAM_TINY_BYTES = 16 << 20  # --tiny's STREAM arrays: in cache, a figure that means nothing


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--root", default=os.environ.get("CIFARKIT_DATA_ROOT"), help="image-folder tree (default: $CIFARKIT_DATA_ROOT)"
    )
    src.add_argument(
        "--synthetic", action="store_true", help="random full-size images in memory, whatever data is there"
    )
    p.add_argument("--data-dir", default="/tmp/cifarkit-bench", help="paths.data_dir: where the uint8 cache is kept")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    size.add_argument(
        "--tiny",
        action="store_true",
        help="for tests: one round of one step each, no train.py run, 1,024 synthetic images",
    )
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: the config's trainer.accelerator"
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads (default: torch's choice); also for the train.py run"
    )
    p.add_argument("--override", nargs="*", default=[], help="Hydra overrides of train.yaml for the default path")
    p.add_argument(
        "--before",
        nargs="*",
        default=BEFORE,
        help="overrides that give today's path, timed beside the default path at batch 32 (default: %(default)s)",
    )
    add_argument(p)
    return p.parse_args()


def data_source(args: argparse.Namespace) -> tuple[list[str], str]:
    """The data overrides of train.yaml and what to call the data in the report.

    An image folder that was asked for but is missing is an error; with none asked for, the
    CIFAR-10 that ``train.py`` (``data=cifar10``) downloads into ./data, else synthetic images.
    """
    synthetic = SYNTHETIC + (TINY_SYNTHETIC if args.tiny else []), "synthetic"
    if args.synthetic:
        return synthetic
    if args.root:
        if not (Path(args.root) / "train").is_dir():
            sys.exit(
                f"bench: no image folder at {args.root} (expected train/<class>/ and test/<class>/); "
                "pass --root DIR, or leave it out (and CIFARKIT_DATA_ROOT unset) for synthetic images"
            )
        return ["data=image_folder", f"data.root={Path(args.root).resolve()}"], str(Path(args.root).resolve())
    downloaded = Path("data").resolve()  # paths.data_dir of a train.py run from this directory
    if (downloaded / "cifar-10-batches-py").is_dir():
        return (
            [
                "data=cifar10",
                f"data.data_dir={downloaded}",
                "data.download=false",
                f"data.cache_dir={args.data_dir}/cache",
            ],
            f"cifar10:{downloaded}",
        )
    return synthetic


def native(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the hardware computes in ``dtype`` itself: an emulated dtype's peak is no ceiling to compare with."""
    if dtype == torch.float32:
        return True
    if device.type == "cuda":
        return dtype != torch.bfloat16 or torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return (
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
        if dtype == torch.bfloat16
        else torch.ops.mkldnn._is_mkldnn_fp16_supported()
    )


def compose_cfg(overrides: list[str], out: Path) -> DictConfig:
    """train.yaml as train.py composes it, with outputs under ``out``."""
    GlobalHydra.instance().clear()
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.log_dir = str(out), str(out / "logs")
    return cfg


# -- the machine's peak and the nets' work ----------------------------------------------------


def matmul_gflops(device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    """The best rate of n x n matrix products over ``seconds``: the ceiling the training figures are set against."""
    n, reps = (8192, 10) if device.type == "cuda" else (2048, 1)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty_like(a)
    torch.mm(a, b, out=out)  # library and kernel selection, outside the clock
    sync(device)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best / 1e9


def step_counts(step: Any, batch: int, image_size: int, classes: int, device: torch.device) -> dict[str, Any]:
    """FLOPs and bytes of one training step at ``batch`` (benchmarks/roofline.py), after one step
    that creates the optimizer's state; the pixels do not change either count."""
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    y = torch.arange(batch, device=device) % classes
    for _, phase in step(x, y):
        phase()
    return count_step(step(x, y))


def peak_rss_mb(args: argparse.Namespace, data: list[str], steps: int, out: Path) -> float:
    """Peak resident memory of a real CPU ``train.py`` run on the same data (a child process)."""
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *data,
        f"paths.data_dir={args.data_dir}",
        f"paths.log_dir={out / 'rss-logs'}",
        "trainer=cpu",
        "trainer.max_epochs=1",
        f"+trainer.limit_train_batches={steps}",
        "+trainer.limit_val_batches=2",
        "+trainer.limit_test_batches=2",
        "callbacks.progress_bar=null",
    ]
    path = os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")]))  # synthetic_data
    env = {**os.environ, "PYTHONPATH": path, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    done = subprocess.run(cmd, cwd=out, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(
            f"bench: the train.py memory run failed ({done.stderr.strip().splitlines()[-1:]}); run it by hand: "
            f"{' '.join(cmd)}"
        )
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


# -- the run ----------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    data, source = data_source(args)
    preset = TINY if args.tiny else QUICK if args.quick else FULL
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    L.seed_everything(0, verbose=False)
    try:
        with tempfile.TemporaryDirectory(prefix="cifarkit-bench-") as tmp:
            result = run(args, data, source, preset, Path(tmp))
    except UserError as e:
        sys.exit(f"bench: {e}")
    print_table(result)
    if not args.tiny:  # --tiny is for tests: its figures mean little
        path = save(args.results, f"bench-{result['mode']}", result, torch.device(result["accelerator"]))
        if path is not None:
            chart = draw_roofline(
                result, path.with_name(path.name.replace("bench-", "roofline-", 1)).with_suffix(".png")
            )
            print(f"roofline chart saved to {chart}", file=sys.stderr)
    print(json.dumps(result))


LABELS = {"tutorial": "tutorial loop", "raw_loop": "raw loop", "default": "default path", "before": "today's path"}


def draw_roofline(res: dict[str, Any], path: Path) -> Path:
    """The run's roofline chart: STREAM triad and each matmul peak, each training figure a point."""
    points = {}
    for name, f in res["training"].items():
        kind = name.rsplit("_b", 1)[0]
        points[f"{LABELS[kind]} b{f['batch']}"] = f
    m = res["machine"]
    title = (
        f"{m['cpu']} ({m['cpu_capability']}, {m['cores']} cores, {m['threads']} threads), torch {m['torch']}, "
        f"{res['precision']}\npython benchmarks/bench.py {'--quick' if res['quick'] else ''} ({res['data']})"
    )
    return draw(path, res["matmul_peak_gflops"], res["bandwidth"]["triad_gbs"], points, title)


def run(args: argparse.Namespace, data: list[str], source: str, preset: dict[str, Any], out: Path) -> dict[str, Any]:
    """Every measurement; the report as a dict."""
    accelerator = [f"trainer.accelerator={ACCELERATOR[args.device]}"] if args.device != "auto" else []
    overrides = [
        *data,
        f"paths.data_dir={args.data_dir}",
        "trainer.max_epochs=1",
        "+trainer.limit_val_batches=0",
        "+trainer.num_sanity_val_steps=0",
        "+trainer.enable_model_summary=false",
        "+trainer.enable_checkpointing=false",
        "callbacks.model_checkpoint=null",
        "callbacks.last_checkpoint=null",
        *accelerator,
        *args.override,
    ]
    cfg_before = compose_cfg([*overrides, *args.before], out)
    cfg = compose_cfg(overrides, out)
    device = torch.device(resolve_accelerator(cfg.trainer.accelerator))
    scale = GPU_STEPS if device.type == "cuda" else 1
    p = {**preset, "steps": preset["steps"] * scale, "big": {b: n * scale for b, n in preset["big"].items()}}
    rss = (
        peak_rss_mb(args, data, p["rss_steps"], out) if p["rss_steps"] else None
    )  # the first child: RUSAGE_CHILDREN is its alone
    dm: ImageDataModule = instantiate(cfg.data)
    dm.prepare_data()  # decodes once into the cache; everything below reads uint8 tensors
    dm.setup()
    model = instantiate(cfg.model, classes=dm.classes)
    model_before = instantiate(cfg_before.model, classes=dm.classes)
    precision = str(build(cfg, with_loggers=False)[1].precision)
    n_cls = len(dm.classes)
    default_dtype = COMPUTE_DTYPE.get(precision, torch.float32)
    dtypes = {"tutorial": torch.float32, "default": default_dtype, "before": default_dtype}
    peak_dtypes = [dt for dt in dict.fromkeys([torch.float32, torch.bfloat16, dtypes["default"]]) if native(device, dt)]

    x, y = dm.splits["train"]
    tv = DataLoader(
        PILDataset(x, y, pil_transform(dm.augment, dm.image_size, dm.mean, dm.std, train=True)),
        batch_size=32,
        shuffle=True,
    )
    pipe_tv = (xb.to(device) for xb, _ in forever(lambda: tv))
    tut, raw = tutorial_loop(dm, device), raw_loop(cfg, dm, device, precision)
    names = ("pipe_dev", "pipe_dev512", "pipe_tv", "tutorial", "raw", "lightning", "before")
    r: dict[str, list[float]] = {k: [] for k in names}
    peaks: dict[torch.dtype, list[float]] = {dt: [] for dt in peak_dtypes}
    for _ in range(p["rounds"]):
        r["pipe_dev"].append(epoch_images_per_s(train_loader(dm, device, 32), device))
        r["pipe_dev512"].append(epoch_images_per_s(train_loader(dm, device, 512), device))
        r["pipe_tv"].append(32 / timed(pipe_tv, device, 1, p["pipe_tv"]))
        allocator_as(None, device)
        r["tutorial"].append(timed(tut, device, p["warm"], p["steps"]))
        r["before"].append(lightning_window(cfg_before, dm, model_before, p["warm"], p["steps"]))
        allocator_as(cfg, device)
        before = timed(raw, device, p["warm"], p["steps"])  # the raw loop brackets Lightning: load drifts
        r["lightning"].append(lightning_window(cfg, dm, model, p["warm"], p["steps"]))
        r["raw"].append((before + timed(raw, device, 1, p["steps"])) / 2)
        for dt in peak_dtypes:
            peaks[dt].append(matmul_gflops(device, dt, p["peak_s"]))
    big, tut_big = {}, {}
    for bs, n in p["big"].items():
        allocator_as(None, device)
        tut_big[bs] = bs / timed(tutorial_loop(dm, device, bs), device, max(1, p["warm"] // 4), n)
        dm.batch_size = bs
        # the classifier sets the allocator as cfg says
        big[bs] = bs / lightning_window(cfg, dm, model, max(1, p["warm"] // 4), n)
    dm.batch_size = cfg.data.batch_size

    host = host_overhead(cfg, dm, device, precision, rounds=p["rounds"], chunks=p["host_chunks"])
    bandwidth = stream_bandwidth(STREAM_TINY_BYTES if args.tiny else None, device=device)
    counts = {
        (path, bs): step_counts(step, bs, dm.image_size, n_cls, device)
        for path, step in (
            ("tutorial", tutorial_step(n_cls, device)),
            ("default", raw_step(cfg, device, precision, n_cls)),
        )
        for bs in (32, *big)
    }
    counts["before", 32] = step_counts(raw_step(cfg_before, device, precision, n_cls), 32, dm.image_size, n_cls, device)
    med = {k: statistics.median(v) for k, v in r.items()}
    peak = {dt: max(v) for dt, v in peaks.items()}

    def ratio(a: str, b: str) -> float:
        """Median over rounds of a/b, each pair measured back to back."""
        return statistics.median(x / y for x, y in zip(r[a], r[b]))

    def figure(images_per_s: float, path: str, bs: int) -> dict[str, Any]:
        """One training figure: the FLOP/s it reaches, its share of the matmul peak of the dtype it
        computes in (None where the hardware only emulates that dtype), and its share of its roofline,
        min(that peak, its step's arithmetic intensity x STREAM triad bandwidth)."""
        count = counts[path, bs]
        gflops = count["flops"] / bs * images_per_s / 1e9
        intensity = count["flops"] / count["bytes"]
        dt = dtypes[path]
        roof = attainable_gflops(peak[dt], intensity, bandwidth["triad_gbs"]) if dt in peak else None
        return {
            "images_per_s": round(images_per_s, 1),
            "batch": bs,
            "dtype": DTYPE_NAME[dt],
            "gflops": round(gflops, 1),
            "peak_fraction": round(gflops / peak[dt], 3) if dt in peak else None,
            "flops_per_step": count["flops"],
            "bytes_per_step": count["bytes"],
            "intensity": round(intensity, 2),
            "attainable_gflops": None if roof is None else round(roof, 1),
            "bound": None if roof is None else "compute" if roof == peak[dt] else "memory",
            "roofline_fraction": None if roof is None else round(gflops / roof, 3),
        }

    training = {
        "tutorial_b32": figure(32 / med["tutorial"], "tutorial", 32),
        "raw_loop_b32": figure(32 / med["raw"], "default", 32),
        "default_b32": figure(32 / med["lightning"], "default", 32),
        "before_b32": figure(32 / med["before"], "before", 32),
    }
    for bs in big:
        training[f"tutorial_b{bs}"] = figure(tut_big[bs], "tutorial", bs)
        training[f"default_b{bs}"] = figure(big[bs], "default", bs)
    return {
        "pipeline_speedup": round(ratio("pipe_dev", "pipe_tv"), 2),
        "train_speedup": round(ratio("tutorial", "lightning"), 3),
        "train_speedup_by_batch": {
            "32": round(ratio("tutorial", "lightning"), 3),
            **{str(b): round(big[b] / tut_big[b], 3) for b in big},
        },
        "lightning_overhead": round(ratio("lightning", "raw") - 1, 4),
        "host_us_per_step": host,
        "images_per_s": {"32": round(32 / med["lightning"], 1), **{str(b): round(v, 1) for b, v in big.items()}},
        "tutorial_images_per_s": round(32 / med["tutorial"], 1),
        "raw_loop_images_per_s": round(32 / med["raw"], 1),
        "pipeline_images_per_s": {
            "device_b32": round(med["pipe_dev"]),
            "device_b512": round(med["pipe_dev512"]),
            "torchvision_b32": round(med["pipe_tv"]),
        },
        "flops_per_image": {
            "tutorial": counts["tutorial", 32]["flops"] // 32,
            "default_path": counts["default", 32]["flops"] // 32,
        },
        "step_counts": {f"{path}_b{bs}": c for (path, bs), c in counts.items()},
        "bandwidth": bandwidth,
        "speedup_over_before_b32": round(ratio("before", "lightning"), 3),
        "before": args.before,
        "matmul_peak_gflops": {DTYPE_NAME[dt]: round(v, 1) for dt, v in peak.items()},
        "training": training,
        "peak_rss_mb": None if rss is None else round(rss),
        "precision": precision,
        "channels_last": bool(cfg.model.channels_last),
        "fused_adam": bool(cfg.model.optimizer.get("fused")),
        "compile": bool(cfg.model.compile),
        "overrides": args.override,
        "data": source,
        "quick": args.quick,
        "mode": "tiny" if args.tiny else "quick" if args.quick else "full",
        "rounds": p["rounds"],
        "train_images": len(y),
        "accelerator": device.type,
        "machine": {**machine(device), "bf16_native": native(device, torch.bfloat16)},
        "per_round": {k: [round(v, 4) for v in vals] for k, vals in r.items()},  # img/s for pipe_*, else s/step
    }


def print_table(res: dict[str, Any]) -> None:
    m, ips, pipe, tr = res["machine"], res["images_per_s"], res["pipeline_images_per_s"], res["training"]
    setup = (
        f"{res['precision']}, channels_last={res['channels_last']}, fused Adam={res['fused_adam']}, "
        f"compile={res['compile']}"
    )
    peaks = ", ".join(f"{k} {v:,.1f}" for k, v in res["matmul_peak_gflops"].items())
    flops = res["flops_per_image"]

    def train_row(name: str) -> str:
        f = tr[name]
        share = (
            f"{f['peak_fraction']:.2f} of {f['dtype']} peak, {f['roofline_fraction']:.2f} of its roofline "
            f"({f['attainable_gflops']:,.0f}, {f['bound']}-bound at {f['intensity']:.1f} FLOP/B)"
            if f["peak_fraction"] is not None
            else f"{f['dtype']} emulated: no peak"
        )
        return f"{f['images_per_s']:>10,.1f} img/s  {f['gflops']:>8,.1f} GFLOP/s = {share}"

    bw = res["bandwidth"]
    counts = res["step_counts"]

    rows = [
        (
            "machine",
            f"{m['cpu']} ({m['cpu_capability']}), {m['cores']} cores ({m['threads']} torch threads), {m['device']}, "
            f"bf16 native={m['bf16_native']}, torch {m['torch']}, load {m['load_avg_1m']}",
        ),
        ("data", f"{res['data']}, {res['train_images']:,} training images"),
        ("default path", setup + (f"; overrides {' '.join(res['overrides'])}" if res["overrides"] else "")),
        ("matmul peak", f"{peaks} GFLOP/s"),
        (
            "training FLOPs per image",
            f"tutorial {flops['tutorial'] / 1e6:,.1f} M, default path {flops['default_path'] / 1e6:,.1f} M",
        ),
        (
            "memory bandwidth (STREAM)",
            f"triad {bw['triad_gbs']:,.1f} GB/s, copy {bw['copy_gbs']:,.1f} GB/s ({bw['array_mib']:,} MiB arrays, "
            f"LLC {bw['llc_mib']:,} MiB, best of {bw['runs']}, {bw['threads']} threads)",
        ),
        *(
            (f"step {name}", f"{c['flops'] / 1e9:>8,.2f} GFLOP  {c['bytes'] / 1e6:>8,.1f} MB moved")
            for name, c in counts.items()
        ),
        ("pipeline, torchvision per-sample (b32)", f"{pipe['torchvision_b32']:>10,} img/s"),
        ("pipeline, device (b32)", f"{pipe['device_b32']:>10,} img/s"),
        ("pipeline, device (b512)", f"{pipe['device_b512']:>10,} img/s"),
        ("train, tutorial loop fp32 (b32)", train_row("tutorial_b32")),
        ("train, raw PyTorch loop, default settings (b32)", train_row("raw_loop_b32")),
        *((f"train, default path train.py (b{b})", train_row(f"default_b{b}")) for b in ips),
        ("train, today's path (b32)", train_row("before_b32") + f"  [{' '.join(res['before'])}]"),
        ("default path over today's (b32)", f"{res['speedup_over_before_b32']:>10.2f} x   (target >= 1.3)"),
        *((f"train, tutorial loop fp32 (b{b})", train_row(f"tutorial_b{b}")) for b in ips if b != "32"),
        ("pipeline_speedup", f"{res['pipeline_speedup']:>10.2f} x   (target >= 10)"),
        *(
            (f"train_speedup (b{b})", f"{v:>10.2f} x" + ("   (target >= 2)" if b == "32" else ""))
            for b, v in res["train_speedup_by_batch"].items()
        ),
        ("lightning_overhead (b32)", f"{res['lightning_overhead']:>+10.3f}     (target <= 0.05)"),
        ("host us/step, near-zero net: raw loop", f"{res['host_us_per_step']['raw_loop']:>10,.0f} us"),
        ("host us/step, near-zero net: default path", f"{res['host_us_per_step']['default_path']:>10,.0f} us"),
        *((f"  of which {part}", f"{us:>10,.0f} us") for part, us in res["host_us_per_step"]["breakdown"].items()),
        *(
            [("peak RSS, train.py on the same data", f"{res['peak_rss_mb']:>10,} MB  (limit 3000)")]
            if res["peak_rss_mb"]
            else []
        ),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"cifarkit benchmark ({res['mode']}, {res['accelerator']}, medians of {res['rounds']} rounds)")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


if __name__ == "__main__":
    main()
