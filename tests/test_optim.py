"""Parameter groups and step-wise schedules sized from the run's own number of steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FAST, folder_overrides
from torch import nn

from cifarkit.errors import UserError
from cifarkit.model import AirbenchNet
from cifarkit.optim import param_groups, warmup_then_decay
from cifarkit.train import train


def test_param_groups_split_weights_norms_and_biases() -> None:
    net = AirbenchNet(widths=[8, 16, 16])
    groups = {g["name"]: g for g in param_groups(net, lr=0.1, weight_decay=5e-4, decay_norm_and_bias=False, norm_bias_lr_scale=64)}
    norm_biases = [m.bias for m in net.modules() if isinstance(m, nn.BatchNorm2d) and m.bias.requires_grad]
    assert {id(p) for p in groups["norm_bias"]["params"]} == {id(p) for p in norm_biases} and norm_biases
    assert groups["norm_bias"]["lr"] == pytest.approx(6.4) and groups["norm_bias"]["weight_decay"] == 0.0
    assert groups["weights"]["weight_decay"] == 5e-4 and all(p.ndim > 1 for p in groups["weights"]["params"])
    assert all(p.ndim == 1 for p in groups["norm_and_bias"]["params"]) and groups["norm_and_bias"]["weight_decay"] == 0.0
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert sorted(id(p) for g in groups.values() for p in g["params"]) == sorted(id(p) for p in trainable)  # each once
    groups = {g["name"]: g for g in param_groups(net, lr=0.1, weight_decay=5e-4, norm_bias_lr_scale=64)}
    # Every group is decayed, and by the same amount per step (lr * weight_decay), as in airbench.
    assert [g["lr"] * g["weight_decay"] for g in groups.values()] == pytest.approx([0.1 * 5e-4] * 3)


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_warmup_then_decay_shape(decay: str) -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_then_decay(opt, total_steps=100, warmup=0.2, decay=decay, final_scale=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1 / 20) and lrs[19] == pytest.approx(1.0)  # 20 warmup steps up to the peak
    assert all(a < b for a, b in zip(lrs[:19], lrs[1:20])) and all(a >= b for a, b in zip(lrs[19:], lrs[20:]))
    middle = 0.1 + 0.9 * (0.5 if decay == "linear" else 0.5 * (1 + math.cos(math.pi * 40 / 80)))
    assert lrs[60] == pytest.approx(middle)
    assert lrs[99] == pytest.approx(0.1 + 0.9 * (1 - 79 / 80 if decay == "linear" else 0.5 * (1 + math.cos(math.pi * 79 / 80))))


def test_warmup_can_start_above_zero() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_then_decay(opt, total_steps=10, warmup=0.5, start_scale=0.2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([2.0 * (0.2 + 0.8 * k / 5) for k in range(1, 6)])


def test_a_run_sizes_its_schedule_from_its_own_steps(image_folder: Path, compose_cfg, tmp_path: Path) -> None:
    """OneCycleLR gets total_steps from the trainer: 2 epochs of 8 steps, lr back near 0 at the end."""
    cfg = compose_cfg(FAST + folder_overrides(image_folder, tmp_path) + [
        "trainer.max_epochs=2", "test=false", "model.optimizer._target_=torch.optim.SGD", "model.optimizer.fused=null",
        "+model.optimizer.momentum=0.9", "+model.optimizer.nesterov=true",
        "model.scheduler={_target_: torch.optim.lr_scheduler.OneCycleLR, _partial_: true, max_lr: 0.05}",
        "model.param_groups={decay_norm_and_bias: false}",
    ])
    train(cfg)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["steps"] == 16
    ckpt = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", weights_only=True)
    (sched,) = ckpt["lr_schedulers"]
    assert sched["total_steps"] == 16 and sched["last_epoch"] == 16  # stepped every step, sized from the run
    (opt,) = ckpt["optimizer_states"]
    reference = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.05)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(reference, max_lr=0.05, total_steps=16)
    for _ in range(sched["last_epoch"]):
        reference.step()
        one_cycle.step()
    assert [g["name"] for g in opt["param_groups"]] == ["weights", "norm_and_bias"]  # BasicCNN: no norms
    assert opt["param_groups"][0]["nesterov"] and opt["param_groups"][1]["weight_decay"] == 0.0
    assert opt["param_groups"][0]["lr"] == pytest.approx(reference.param_groups[0]["lr"])
    assert opt["param_groups"][0]["lr"] < 0.05 * 0.05  # annealed


def test_a_schedule_needs_a_known_step_count(image_folder: Path, compose_cfg, tmp_path: Path) -> None:
    """Training bounded by time only has no step count to size a schedule from: one line, no step taken."""
    cfg = compose_cfg(FAST + folder_overrides(image_folder, tmp_path) + [
        "experiment=cpu10", "trainer.max_steps=-1", "trainer.max_epochs=-1", "trainer.max_time=00:00:01:00",
    ])
    with pytest.raises(UserError, match="model.scheduler is sized from the run's steps: set trainer.max_steps"):
        train(cfg)
    assert not (tmp_path / "out" / "checkpoints" / "last.ckpt").exists()
