"""What acts on the weights besides the loss: parameter groups, step-wise schedules sized from the
run's own number of steps, airbench's lookahead averaging and freezing."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cifarkit.core.errors import UserError
from cifarkit.fit.optim import FreezeParameters, Lookahead, param_groups, warmup_then_decay
from cifarkit.nets.models import AirbenchNet
from cifarkit.run.jobs import train_job
from conftest import FAST, folder_overrides


def test_param_groups_split_weights_norms_and_biases() -> None:
    net = AirbenchNet(widths=[8, 16, 16])
    groups = {
        g["name"]: g
        for g in param_groups(net, lr=0.1, weight_decay=5e-4, decay_norm_and_bias=False, norm_bias_lr_scale=64)
    }
    norm_biases = [m.bias for m in net.modules() if isinstance(m, nn.BatchNorm2d) and m.bias.requires_grad]
    assert {id(p) for p in groups["norm_bias"]["params"]} == {id(p) for p in norm_biases} and norm_biases
    assert groups["norm_bias"]["lr"] == pytest.approx(6.4) and groups["norm_bias"]["weight_decay"] == 0.0
    assert groups["weights"]["weight_decay"] == 5e-4 and all(p.ndim > 1 for p in groups["weights"]["params"])
    assert (
        all(p.ndim == 1 for p in groups["norm_and_bias"]["params"]) and groups["norm_and_bias"]["weight_decay"] == 0.0
    )
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
    assert lrs[99] == pytest.approx(
        0.1 + 0.9 * (1 - 79 / 80 if decay == "linear" else 0.5 * (1 + math.cos(math.pi * 79 / 80)))
    )


def test_a_budgets_fixed_steps_hold_the_start_and_the_rest_is_sized_from_the_count_fixed_after_them() -> None:
    """A time budget fixes the step count after its first steps: what they compute cannot depend on it,
    and the schedule after them is the whole schedule of the steps that remain."""

    def lrs(total: int, fixed: int, fixed_after: int | None = None) -> list[float]:
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
        known = {"total": 10**6 if fixed_after else total}  # a bound until the count is fixed
        sched = warmup_then_decay(
            opt, lambda: known["total"], warmup=0.5, start_scale=0.2, final_scale=0.1, fixed_steps=fixed
        )
        out = []
        for step in range(total):
            if step == fixed_after:
                known["total"] = total
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert lrs(30, 6)[:6] == lrs(60, 6)[:6] == [pytest.approx(0.4)] * 6  # the start, whatever the count
    assert lrs(30, 6)[6:] == pytest.approx(lrs(24, 0))  # then the schedule of the 24 steps after them
    assert lrs(30, 6, fixed_after=5) == lrs(30, 6)  # fixed while the last of them runs: the same run


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
    cfg = compose_cfg(
        FAST
        + folder_overrides(image_folder, tmp_path)
        + [
            "trainer.max_epochs=2",
            "test=false",
            "model.optimizer._target_=torch.optim.SGD",
            "model.optimizer.fused=null",
            "+model.optimizer.momentum=0.9",
            "+model.optimizer.nesterov=true",
            "model.scheduler={_target_: torch.optim.lr_scheduler.OneCycleLR, _partial_: true, max_lr: 0.05}",
            "model.param_groups={decay_norm_and_bias: false}",
        ]
    )
    train_job(cfg)
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
    cfg = compose_cfg(
        FAST
        + folder_overrides(image_folder, tmp_path)
        + [
            "experiment=cpu10",
            "budget_s=null",
            "trainer.max_steps=-1",
            "trainer.max_epochs=-1",
            "trainer.max_time=00:00:01:00",
        ]
    )
    with pytest.raises(UserError, match="model.scheduler is sized from the run's steps: set trainer.max_steps"):
        train_job(cfg)
    assert not (tmp_path / "out" / "checkpoints" / "last.ckpt").exists()


# ---------------------------------------------------------------------------------------------
# Lookahead and freezing, against airbench's loop written out.

STEPS, EVERY, DECAY, POWER = 12, 5, 0.9, 1.0
EPOCH = [
    (torch.randn(8, 4, generator=torch.Generator().manual_seed(i)), torch.arange(8) % 3) for i in range(STEPS // 2)
]
BATCHES = EPOCH * 2  # two epochs of 6 steps


class Tiny(L.LightningModule):
    """A linear layer and a BatchNorm (so buffers are averaged too) under momentum SGD."""

    def __init__(self, weight_decay: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        self.weight_decay = weight_decay

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9, weight_decay=self.weight_decay)

    def train_dataloader(self) -> DataLoader:
        x, y = (torch.cat(t) for t in zip(*EPOCH))
        return DataLoader(TensorDataset(x, y), batch_size=8)  # EPOCH, in order


def fit(module: L.LightningModule, callbacks: list, max_steps: int = STEPS, ckpt_path: Path | None = None) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def reference_lookahead(net: nn.Module) -> dict[str, torch.Tensor]:
    """airbench's loop written out: every EVERY steps the average is lerped toward the weights
    and the weights are set to it; the model after training is the last average."""
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    average: dict[str, torch.Tensor] | None = None
    for step, (x, y) in enumerate(BATCHES, start=1):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        if step % EVERY == 0:
            state = net.state_dict()
            if average is None:
                average = {k: v.clone() for k, v in state.items()}
            else:
                rho = DECAY**EVERY * (step / STEPS) ** POWER
                for k, v in state.items():
                    if v.is_floating_point():
                        average[k].lerp_(v, 1 - rho)
            net.load_state_dict(average)
    assert average is not None
    return average


def test_lookahead_matches_airbench_loop() -> None:
    module = Tiny()
    expected = reference_lookahead(copy.deepcopy(module.net))
    fit(module, [Lookahead(every_n_steps=EVERY, decay=DECAY, power=POWER, use_buffers=True)])
    got = module.net.state_dict()
    for k, v in expected.items():
        if v.is_floating_point():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
    # Steps 11 and 12 moved the weights past the last average; those moves are dropped.
    plain = Tiny()
    fit(plain, [])
    assert not torch.allclose(plain.net[0].weight, got["0.weight"], atol=1e-3)


def test_lookahead_checkpoint_restores_both_weights(tmp_path: Path) -> None:
    """A checkpoint taken between two averages (step 6) holds the average as the model's
    weights and the weights being trained beside it; a run resumed from it starts from exactly
    those two. (Compared at the restart rather than at the end: a plain DataLoader resumed from
    an epoch-end checkpoint replays one batch in Lightning, which has nothing to do with this.)"""
    seen: dict[str, dict[str, torch.Tensor]] = {}

    def snapshot(tag: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        averaged = trainer.callbacks[0]._average_model.module  # the Lookahead's copy of the module
        seen[tag + "/current"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
        seen[tag + "/average"] = {k: v.clone() for k, v in averaged.state_dict().items()}

    class SaveAt(L.Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if trainer.global_step == 6:
                snapshot("saved", trainer, pl_module)
                trainer.save_checkpoint(tmp_path / "step6.ckpt")

    class AtStart(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            snapshot("resumed", trainer, pl_module)

    fit(Tiny(), [Lookahead(EVERY, DECAY, POWER, use_buffers=True), SaveAt()])
    ckpt = torch.load(tmp_path / "step6.ckpt", weights_only=True)
    fit(Tiny(), [Lookahead(EVERY, DECAY, POWER, use_buffers=True), AtStart()], ckpt_path=tmp_path / "step6.ckpt")
    assert not torch.equal(
        seen["saved/current"]["net.0.weight"], seen["saved/average"]["net.0.weight"]
    )  # step 6 moved on
    for part in ("current", "average"):
        for k, v in seen[f"saved/{part}"].items():
            assert torch.equal(seen[f"resumed/{part}"][k], v), (part, k)
    assert torch.equal(
        ckpt["state_dict"]["net.0.weight"], seen["saved/average"]["net.0.weight"]
    )  # what eval/predict load


def test_freeze_parameters_stops_their_training_after_some_epochs() -> None:
    module = Tiny(weight_decay=0.1)  # weight decay and momentum would move them without a gradient
    history: list[torch.Tensor] = []

    class Record(L.Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            history.append(pl_module.net[0].bias.detach().clone())

    # Three epochs; the bias trains in the first third of the steps only.
    fit(module, [FreezeParameters(["net.0.bias"], after=1 / 3), Record()], max_steps=3 * len(EPOCH))
    start = Tiny().net[0].bias
    assert not torch.equal(history[0], start)  # trained during epoch 0
    assert torch.equal(history[1], history[0]) and torch.equal(history[2], history[0])
    assert not torch.equal(module.net[0].weight, Tiny().net[0].weight)


def test_freeze_parameters_names_an_unknown_parameter() -> None:
    with pytest.raises(UserError, match="no parameter named net.whiten.bias"):
        fit(Tiny(), [FreezeParameters(["net.whiten.bias"], after=0.3)])


def test_lookahead_needs_a_known_step_count() -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=-1,
        max_time={"minutes": 1},
        callbacks=[Lookahead(5, 0.95, 3.0, use_buffers=True)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = Tiny()
    before = module.net[0].weight.detach().clone()
    with pytest.raises(UserError, match="set trainer.max_steps or trainer.max_epochs"):
        trainer.fit(module)
    assert torch.equal(module.net[0].weight, before)  # stopped before any step
