"""A time budget instead of a step count: the probe's arithmetic on a fake clock, the sized run
reproduced by its recorded step count, and what a budget cannot do."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import pytest
import torch

from cifarkit.core.errors import UserError
from cifarkit.fit.optim import FreezeParameters, Lookahead
from cifarkit.run import budget
from cifarkit.run.jobs import train_job
from cifarkit.run.schema import check
from conftest import FAST, add_callback, folder_overrides

STEP_S = 0.25  # the fake clock's seconds per reading


def test_steps_end_at_the_target_share_of_the_budget() -> None:
    step = 0.25 * budget.RUN_OVER_PROBE  # a run's step, from the probe's
    assert budget.steps_for(600, 0.25, 0.0) == int(budget.TARGET * 600 / step)
    assert budget.steps_for(600, 0.25, 10.0) == int(
        (budget.TARGET * 600 - 10) / step
    )  # the warm-up's extra is paid again
    assert budget.steps_for(1, 10.0, 0.0) == 1  # a budget below one step still trains one


def cpu10(image_folder: Path, tmp_path: Path, name: str, *extra: str) -> list[str]:
    """experiment=cpu10 on tiny data: airbench's schedule, lookahead and freeze, all sized from the steps."""
    data = [o for o in folder_overrides(image_folder, tmp_path) if not o.startswith("data.val_size")]
    return FAST + data + ["experiment=cpu10", "data.batch_size=8", f"paths.log_dir={tmp_path / name}", *extra]


class Sized(L.Callback):
    """What the run's step-sized callbacks were sized to, read as training starts (the run comes
    after the probe, so its values are the last ones)."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        for c in trainer.callbacks:
            if isinstance(c, Lookahead):
                self.seen["lookahead"] = c.total_steps
            if isinstance(c, FreezeParameters):
                self.seen["freeze"] = c.from_step


class WidthClock(L.Callback):
    """A fake clock whose every reading is a step later, a step taking ``STEP_S`` per 16 channels of
    the net's last width: a wider candidate is slower, as on any machine."""

    def __init__(self) -> None:
        self.now, self.tick = 0.0, STEP_S

    def __call__(self) -> float:
        self.now += self.tick
        return self.now

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.tick = STEP_S * pl_module.net.head.in_features / 16


# 72 training images at batch 8: 9 steps an epoch. budget_s=5 buys 18 steps (2 epochs) of the
# narrowest, 9 (1 epoch) of the next: fewer than the rule asks for, so the narrowest trains.
LADDER = "budget_nets=[{widths:[16,16]},{widths:[16,32]},{widths:[16,64]}]"


def test_a_budget_chooses_the_net_and_sizes_every_step_sized_piece_and_its_replay_reproduces_the_run(
    image_folder: Path, tmp_path: Path, compose_cfg, monkeypatch, caplog
) -> None:
    clock, sized = WidthClock(), Sized()
    monkeypatch.setattr(budget, "perf_counter", clock)
    add_callback(monkeypatch, clock)
    add_callback(monkeypatch, sized)
    with caplog.at_level(logging.INFO, logger="cifarkit.run.budget"):
        train_job(compose_cfg(cpu10(image_folder, tmp_path, "sized", "budget_s=5", LADDER)))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    expected = budget.steps_for(5, STEP_S, 0.0)
    narrow = {"seconds_per_step": STEP_S, "warmup_extra_s": 0.0, "steps_per_epoch": 9, "steps": expected}
    wider = {
        "seconds_per_step": 2 * STEP_S,
        "warmup_extra_s": 0.0,
        "steps_per_epoch": 9,
        "steps": budget.steps_for(5, 2 * STEP_S, 0),
    }
    chosen = {"net": {"widths": [16, 16]}, **narrow, "epochs": round(expected / 9, 2)}
    assert metrics["budget"] == {
        "seconds": 5.0,
        **chosen,
        "required_epochs": budget.required_epochs([chosen]),
        "candidates": [chosen, {"net": {"widths": [16, 32]}, **wider, "epochs": round(wider["steps"] / 9, 2)}],
    }  # the widest was not probed: the one before it fell short
    replay = f"model.net.widths=[16,16] trainer.max_steps={expected} trainer.max_epochs=-1"
    assert f"{replay} reproduces this run" in caplog.text
    assert f"(asked for {budget.required_epochs([chosen]):g} epochs; " in caplog.text
    assert metrics["steps"] == expected and sized.seen == {"lookahead": expected, "freeze": round(0.3 * expected)}
    ckpt = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"]["net.head.weight"].shape == (3, 16)  # the chosen net was trained
    assert ckpt["lr_schedulers"][0]["last_epoch"] == expected  # warmup-then-decay stepped through the whole sized run
    assert json.loads((tmp_path / "out" / "budget.json").read_text()) == metrics["budget"]  # what a resume of it reads

    monkeypatch.undo()
    again = compose_cfg(cpu10(image_folder, tmp_path, "again", "budget_s=5", LADDER, *replay.split()))
    again.paths.output_dir = str(tmp_path / "again")
    train_job(again)  # the replay: no probe, the same run
    reproduced = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert "budget" not in reproduced
    for key in ("test/acc", "test/loss", "train/loss", "steps", "test/confusion_matrix"):
        assert reproduced[key] == metrics[key], key

    last = tmp_path / "out" / "checkpoints" / "last.ckpt"
    resumed = compose_cfg(cpu10(image_folder, tmp_path, "resumed", "budget_s=5", LADDER, f"ckpt_path={last}"))
    resumed.paths.output_dir = str(tmp_path / "resumed")
    train_job(resumed)  # budget.json's net and count: the checkpoint fits the net, and no step is left
    continued = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert continued["budget"] == metrics["budget"] and continued["steps"] == expected


def test_the_rule_takes_the_widest_net_that_trains_the_epochs_the_budget_asks_for() -> None:
    def measured(*epochs: float) -> list[dict]:
        return [{"net": {"widths": [i]}, "epochs": e} for i, e in enumerate(epochs)]

    need = 4  # the square root of the narrowest net's epochs
    assert budget.required_epochs(measured(16, 1)) == need
    assert budget.choose(measured(16, need + 0.01, need - 0.01))["net"] == {"widths": [1]}
    assert budget.choose(measured(16, need - 0.01))["net"] == {"widths": [0]}  # none does: the narrowest
    # Four times the budget (or a machine four times as fast): every net trains four times the epochs and
    # the rule asks for twice as many, so the net that fell short is chosen.
    assert budget.choose(measured(64, 4 * (need + 0.01), 4 * (need - 0.01)))["net"] == {"widths": [2]}


def test_a_net_on_the_command_line_turns_the_choice_off(image_folder: Path, tmp_path: Path, main, monkeypatch) -> None:
    clock = WidthClock()
    monkeypatch.setattr(budget, "perf_counter", clock)
    add_callback(monkeypatch, clock)
    out = tmp_path / "given"
    r = main(
        "train.py",
        cpu10(image_folder, tmp_path, "given", "budget_s=5", f"hydra.run.dir={out}", "model.net.widths=[16,32]"),
    )
    assert r.code == 0, r.err
    decided = json.loads((out / "metrics.json").read_text())["budget"]
    assert decided["seconds_per_step"] == 2 * STEP_S  # the given net, sized alone
    assert "net" not in decided and "candidates" not in decided


def test_what_a_budget_cannot_do(image_folder: Path, tmp_path: Path, compose_cfg) -> None:
    with pytest.raises(UserError, match="budget_s=0: must be seconds of training above 0"):
        check(compose_cfg(cpu10(image_folder, tmp_path, "zero", "budget_s=0")))
    ckpt = tmp_path / "run" / "checkpoints" / "some.ckpt"  # of a run that recorded no decision
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    with pytest.raises(
        UserError,
        match=(
            r"budget_s is set but .*budget.json does not say the step count the run "
            r"was sized to; add its replay overrides from its log"
        ),
    ):
        train_job(compose_cfg(cpu10(image_folder, tmp_path, "resumed", "budget_s=10", f"ckpt_path={ckpt}")))


def test_a_resume_takes_only_a_net_the_ladder_offers(image_folder: Path, tmp_path: Path, compose_cfg) -> None:
    """budget.json sits in a run folder, which may come from anyone: its net must be one of the
    config's own candidates, or the resume stops before anything is built."""
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    canary = tmp_path / "canary"
    crafted = {"_target_": "pathlib.Path.touch", "self": str(canary)}
    for net in ({"widths": [8, 8]}, crafted):
        (tmp_path / "run" / "budget.json").write_text(json.dumps({"seconds": 10, "steps": 5, "net": net}))
        with pytest.raises(UserError, match=r"budget.json names a net that budget_nets does not offer"):
            train_job(compose_cfg(cpu10(image_folder, tmp_path, "resumed", "budget_s=10", LADDER, f"ckpt_path={ckpt}")))
    assert not canary.exists()
