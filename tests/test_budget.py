"""A time budget instead of a step count: the probe's arithmetic on a fake clock, the sized run
reproduced by its recorded step count, and what a budget cannot do."""

from __future__ import annotations

import json
from itertools import count
from pathlib import Path

import lightning as L
import pytest
import torch

from cifarkit import budget
from cifarkit.errors import UserError
from cifarkit.optim import FreezeParameters, Lookahead
from cifarkit.train import train
from conftest import FAST, add_callback, folder_overrides

STEP_S = 0.25  # the fake clock's seconds per reading


def test_steps_end_at_the_target_share_of_the_budget() -> None:
    assert budget.steps_for(600, 0.25, 0.0) == int(budget.TARGET * 600 / 0.25)
    assert budget.steps_for(600, 0.25, 10.0) == int(
        (budget.TARGET * 600 - 10) / 0.25
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


def test_a_budget_sizes_every_step_sized_piece_and_its_count_reproduces_the_run(
    image_folder: Path, tmp_path: Path, compose_cfg, monkeypatch
) -> None:
    clock, sized = count(), Sized()
    monkeypatch.setattr(budget, "perf_counter", lambda: next(clock) * STEP_S)  # every reading a step later
    add_callback(monkeypatch, sized)
    train(compose_cfg(cpu10(image_folder, tmp_path, "sized", "budget_s=5")))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    expected = budget.steps_for(5, STEP_S, 0.0)
    assert metrics["budget"] == {"seconds": 5.0, "steps": expected, "seconds_per_step": STEP_S, "warmup_extra_s": 0.0}
    assert metrics["steps"] == expected and sized.seen == {"lookahead": expected, "freeze": round(0.3 * expected)}
    ckpt = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["lr_schedulers"][0]["last_epoch"] == expected  # warmup-then-decay stepped through the whole sized run
    assert json.loads((tmp_path / "out" / "budget.json").read_text()) == metrics["budget"]  # what a resume of it reads

    monkeypatch.undo()
    again = compose_cfg(
        cpu10(image_folder, tmp_path, "again", "budget_s=5", f"trainer.max_steps={expected}", "trainer.max_epochs=-1")
    )
    again.paths.output_dir = str(tmp_path / "again")
    train(again)  # a given step count: no probe, the same run
    reproduced = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert "budget" not in reproduced
    for key in ("test/acc", "test/loss", "train/loss", "steps", "test/confusion_matrix"):
        assert reproduced[key] == metrics[key], key


def test_what_a_budget_cannot_do(image_folder: Path, tmp_path: Path, compose_cfg) -> None:
    with pytest.raises(UserError, match="budget_s=0 must be a number of seconds above 0"):
        train(compose_cfg(cpu10(image_folder, tmp_path, "zero", "budget_s=0")))
    ckpt = tmp_path / "run" / "checkpoints" / "some.ckpt"  # of a run that recorded no decision
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    with pytest.raises(
        UserError,
        match=(
            r"budget_s is set but .*budget.json does not say the step count the run "
            r"was sized to; add trainer.max_steps="
        ),
    ):
        train(compose_cfg(cpu10(image_folder, tmp_path, "resumed", "budget_s=10", f"ckpt_path={ckpt}")))
