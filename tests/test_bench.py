"""The benchmark runs on a fresh clone (no data: synthetic images) and the GPU check's script runs
its steps on the CPU (--dry-run). Only that the figures exist and are sane is checked: speed on a
shared machine is no test."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench.py"


def basic_cnn_train_flops(num_classes: int = 10, size: int = 32) -> int:
    """BasicCNN's training FLOPs per image by hand: multiply-adds of its convolutions (3x3, same
    padding; each block halves the size) and linear layers, x2 FLOPs per multiply-add, x3 for the
    forward, the input gradient and the weight gradient."""
    convs = [
        (3, 16, size),
        (16, 32, size),
        (32, 64, size // 2),
        (64, 128, size // 2),
        (128, 128, size // 4),
        (128, 256, size // 4),
    ]
    macs = sum(c_in * c_out * 9 * s * s for c_in, c_out, s in convs)
    macs += 256 * (size // 8) ** 2 * 2048 + 2048 * 256 + 256 * num_classes
    return 2 * 3 * macs


def no_data_env() -> dict[str, str]:
    """The environment of a fresh clone: no image folder named."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("CIFARKIT_DATA_ROOT", None)
    return env


def bench(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH), *args], cwd=cwd, env=no_data_env(), capture_output=True, text=True, timeout=timeout
    )


def last_json(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_figures(res: dict[str, Any]) -> None:
    assert res["data"] == "synthetic"
    assert res["machine"]["cpu_capability"] and res["machine"]["device"]
    assert res["pipeline_speedup"] > 0 and res["train_speedup"] > 0
    assert all(
        v > 0
        for v in [*res["images_per_s"].values(), *res["pipeline_images_per_s"].values(), res["tutorial_images_per_s"]]
    )
    flops = res["flops_per_image"]["tutorial"]
    assert abs(flops / basic_cnn_train_flops() - 1) < 0.1, flops
    assert res["matmul_peak_gflops"]["fp32"] > 0
    assert {"tutorial_b32", "raw_loop_b32", "default_b32", "before_b32"} <= set(res["training"])
    assert res["bandwidth"]["triad_gbs"] > 0 and res["bandwidth"]["copy_gbs"] > 0 and res["bandwidth"]["runs"] >= 10
    assert res["speedup_over_before_b32"] > 0 and res["before"] == [
        "model.reuse_memory=false",
        "model.bf16_weight_copy=false",
    ]
    for name, fig in res["training"].items():
        assert fig["images_per_s"] > 0 and fig["gflops"] > 0, name
        assert 0 < fig["peak_fraction"] < 1.5, (name, fig, res["matmul_peak_gflops"])
        # the roofline: the lower of the peak and intensity x bandwidth, the figure set against it
        assert fig["intensity"] == pytest.approx(fig["flops_per_step"] / fig["bytes_per_step"], abs=0.01)
        assert fig["attainable_gflops"] <= res["matmul_peak_gflops"][fig["dtype"]] + 0.1
        assert fig["roofline_fraction"] == pytest.approx(fig["gflops"] / fig["attainable_gflops"], rel=0.02, abs=0.002)
        assert fig["bound"] in ("compute", "memory")
    host = res["host_us_per_step"]
    assert (
        host["raw_loop"] > 0
        and host["default_path"] > 0
        and set(host["breakdown"])
        == {"loader", "loop_and_hooks", "training_metrics", "project_callbacks", "lightning_callbacks_and_logger"}
    )


@pytest.mark.slow  # the benchmark script end to end
def test_bench_without_data_uses_synthetic_images(tmp_path: Path) -> None:
    """--tiny: one round of each contender; run where no ./data is, with no --root."""
    res = last_json(bench(["--tiny", "--data-dir", str(tmp_path / "cache")], tmp_path, timeout=300))
    check_figures(res)
    assert res["mode"] == "tiny" and res["accelerator"] == "cpu"


def test_bench_missing_root_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["bench.py", "--tiny", "--root", str(tmp_path / "missing")])
    monkeypatch.syspath_prepend(str(BENCH.parent))
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(BENCH), run_name="__main__")
    assert str(e.value.code).startswith("bench: no image folder at") and "\n" not in str(e.value.code)


@pytest.mark.slow
def test_bench_quick_without_data(tmp_path: Path) -> None:
    """The issue's command as it stands: --quick on a fresh clone, with the train.py memory run and
    batch 512; the figures and the roofline chart go to the results folder."""
    out = tmp_path / "results"
    res = last_json(
        bench(["--quick", "--data-dir", str(tmp_path / "cache"), "--results", str(out)], tmp_path, timeout=1200)
    )
    check_figures(res)
    (saved,) = out.glob("bench-quick-*.json")
    assert json.loads(saved.read_text())["figures"]["training"] == res["training"]
    (chart,) = out.glob("roofline-quick-*.png")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 20_000
    assert res["train_images"] == 45_000 and res["peak_rss_mb"] > 0
    assert {"tutorial_b512", "default_b512"} <= set(res["training"]) and "512" in res["train_speedup_by_batch"]


@pytest.mark.parametrize("copy", [False, True])
def test_step_counts_by_hand(monkeypatch: pytest.MonkeyPatch, copy: bool) -> None:
    """The default path's step, counted: its FLOPs are BasicCNN's by hand, and its optimizer step
    moves 28 bytes a parameter either way. Under autocast alone, fused Adam reads the parameters,
    gradients and both moments and writes all but the gradients (7 x 4 bytes), and autocast casts
    each weight to bf16 and its gradient back (6 bytes each way) besides the input batch. With Adam
    keeping the bf16 weights (``model.bf16_weight_copy``) its step reads the bf16 gradient and writes
    the bf16 copy (4 + 2 + 4 + 4 read, 4 + 4 + 4 + 2 written) and only the batch's input and logits are cast."""
    from omegaconf import OmegaConf

    monkeypatch.syspath_prepend(str(BENCH.parent))
    from bench import step_counts
    from loops import raw_step

    cfg = OmegaConf.create(
        {
            "model": {
                "channels_last": True,
                "compile": False,
                "bf16_weight_copy": copy,
                "net": {"_target_": "cifarkit.nets.models.BasicCNN"},
                "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3, "fused": True},
            }
        }
    )
    cpu, batch = torch.device("cpu"), 4
    counts = step_counts(raw_step(cfg, cpu, "bf16-mixed", 10), batch, 32, 10, cpu)
    params = 9_457_962
    assert counts["flops"] == pytest.approx(batch * basic_cnn_train_flops(), rel=0.1)
    assert counts["bytes_by_phase"]["optimizer"] == pytest.approx(28 * params, rel=0.001)
    batch_casts = 6 * batch * 3 * 32 * 32 + 2 * 6 * batch * 10  # the input to bf16; the logits to fp32 and back
    assert counts["bytes_of_casts"] == (batch_casts if copy else 2 * 6 * params + batch_casts)
    assert counts["bytes"] == counts["bytes_read"] + counts["bytes_written"] == sum(counts["bytes_by_phase"].values())


def test_stream_and_chart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """STREAM credits copy 2 and triad 3 arrays a run, best of 10; the chart is a PNG with each point."""
    monkeypatch.syspath_prepend(str(BENCH.parent))
    from roofline import draw, stream_bandwidth

    bw = stream_bandwidth(8 << 20)
    assert bw["array_mib"] == 8 and bw["runs"] == 10 and bw["copy_gbs"] > 0 and bw["triad_gbs"] > 0
    points = {"a b32": {"intensity": 20.0, "gflops": 300.0}, "b b512": {"intensity": 90.0, "gflops": 900.0}}
    chart = draw(tmp_path / "r.png", {"fp32": 170.0, "bf16": 1270.0}, bw["triad_gbs"], points, "test")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 10_000


@pytest.mark.slow  # a training run and a benchmark through the script: CI runs it with -m slow
def test_gpu_check_dry_run(tmp_path: Path, image_folder: Path) -> None:
    """The GPU machine's script, on the CPU: both steps run and one JSON holds their results."""
    out = tmp_path / "out"
    env = {**no_data_env(), "DRY_RUN": "1", "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--root", str(image_folder)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + (out / "train.log").read_text()[-2000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert set(res) == {
        "dry_run",
        "gpu",
        "train",
        "bench",
        "bench_rc",
        "bench_error",
        "compile",
        "compile_rc",
        "compile_error",
        "headline_100_epochs_s",
        "total_wall_s",
    }
    assert res["dry_run"] is True and res["bench_rc"] == 0 and res["bench_error"] is None and res["compile_rc"] == 0
    modes = res["compile"]["by_batch"]["32"]
    assert set(modes) == {"eager", "default"} and all(
        m["ms_per_step"] > 0 and m["first_steps_s"] > 0 for m in modes.values()
    )
    assert res["headline_100_epochs_s"] == pytest.approx(100 * 45_000 / res["bench"]["images_per_s"]["32"], rel=1e-3)
    train = res["train"]
    assert train["rc"] == 0 and train["wall_s"] > 0 and train["max_time"] == "00:00:00:20"
    assert f"data.root={image_folder}" in train["command"] and "trainer.accelerator=cpu" in train["command"]
    assert train["metrics"]["status"] == "completed" and 0 <= train["metrics"]["test/acc"] <= 1
    assert {
        "pipeline_speedup",
        "train_speedup",
        "lightning_overhead",
        "training",
        "matmul_peak_gflops",
        "host_us_per_step",
    } <= set(res["bench"])
    assert res["bench"]["data"] == "synthetic"
    assert (out / "train.log").is_file() and (out / "bench.log").is_file() and (out / "compile.log").is_file()
