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

STEP_S = 0.25  # the fake clock's seconds per training step of the narrowest net


def test_the_comparison_credits_a_candidate_with_its_share_of_the_budget() -> None:
    step = 0.25 * budget.RUN_OVER_PROBE  # a run's step, from the comparison's
    assert budget.steps_for(600, 0.25, 0.0) == int(budget.COMPARED_SHARE * 600 / step)
    assert budget.steps_for(600, 0.25, 10.0) == int(
        (budget.COMPARED_SHARE * 600 - 10) / step
    )  # the warm-up's extra is paid again
    assert budget.steps_for(1, 10.0, 0.0) == 1  # a budget below one step still trains one


def cpu10(image_folder: Path, tmp_path: Path, name: str, *extra: str) -> list[str]:
    """experiment=cpu10 on tiny data: airbench's schedule, lookahead and freeze, all sized from the steps."""
    data = [o for o in folder_overrides(image_folder, tmp_path) if not o.startswith("data.val_size")]
    return FAST + data + ["experiment=cpu10", "data.batch_size=8", f"paths.log_dir={tmp_path / name}", *extra]


class Sized(L.Callback):
    """What the run's step-sized callbacks were sized to, read as training ends (the run comes after
    the comparison, so its values are the last ones)."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def on_train_end(self, trainer: L.Trainer, *args) -> None:
        for c in trainer.callbacks:
            if isinstance(c, Lookahead):
                self.seen["lookahead"] = c.total_steps
            if isinstance(c, FreezeParameters):
                self.seen["freeze"] = c.from_step


class StepClock(L.Callback):
    """A fake clock that moves only when a training step starts: by ``STEP_S`` per 16 channels of the
    net's last width (a wider candidate is slower, as on any machine), times ``slower`` from step
    ``slower_from`` of the run on (a noisy neighbour arriving after the decision)."""

    def __init__(self, slower: float = 1.0, slower_from: int = 10**9) -> None:
        self.now, self.tick, self.slower, self.slower_from = 0.0, STEP_S, slower, slower_from

    def __call__(self) -> float:
        return self.now

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.tick = STEP_S * pl_module.net.head.in_features / 16

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        self.now += self.tick * (self.slower if trainer.global_step >= self.slower_from else 1.0)


@pytest.fixture
def few_fixed_steps(monkeypatch) -> None:
    """Tiny data trains 9 steps an epoch: the run's first 6 steps are fixed, timed from step 2."""
    monkeypatch.setattr(budget, "FIXED_STEPS", 6)
    monkeypatch.setattr(budget, "TIMED_FROM", 2)


# 72 training images at batch 8: 9 steps an epoch. budget_s=5 buys 18 steps (2 epochs) of the
# narrowest, 9 (1 epoch) of the next: fewer than the rule asks for, so the narrowest trains.
LADDER = "budget_nets=[{widths:[16,16]},{widths:[16,32]},{widths:[16,64]}]"
RUN = ("trained_steps", "trained_seconds", "run_seconds_per_step", "stopped_at_budget")  # metrics.json's only


def test_a_budget_chooses_the_net_times_its_first_steps_sizes_every_step_sized_piece_and_its_replay_reproduces_it(
    image_folder: Path, tmp_path: Path, compose_cfg, monkeypatch, caplog, few_fixed_steps
) -> None:
    clock, sized = StepClock(), Sized()
    monkeypatch.setattr(budget, "perf_counter", clock)
    add_callback(monkeypatch, clock)
    add_callback(monkeypatch, sized)
    with caplog.at_level(logging.INFO, logger="cifarkit.run.budget"):
        train_job(compose_cfg(cpu10(image_folder, tmp_path, "sized", "budget_s=5", LADDER)))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    compared = budget.steps_for(5, STEP_S, 0.0)
    narrow = {"seconds_per_step": STEP_S, "warmup_extra_s": 0.0, "steps_per_epoch": 9, "steps": compared}
    wider = {
        "seconds_per_step": 2 * STEP_S,
        "warmup_extra_s": 0.0,
        "steps_per_epoch": 9,
        "steps": budget.steps_for(5, 2 * STEP_S, 0),
    }
    chosen = {"net": {"widths": [16, 16]}, **narrow, "epochs": round(compared / 9, 2)}
    # The run's own steps: 5 done at the decision (1.25 s), 0.25 s a step from step 2, so the rest of
    # 97.5% of the budget buys 14 more: 19 steps, 4.75 s.
    steps = 5 + int((budget.TARGET * 5 - 5 * STEP_S) / STEP_S)
    assert steps == 19
    decided = {
        "seconds": 5.0,
        "net": chosen["net"],
        "required_epochs": budget.required_epochs([chosen]),
        "candidates": [chosen, {"net": {"widths": [16, 32]}, **wider, "epochs": round(wider["steps"] / 9, 2)}],
        "compare_s": 7 * STEP_S + 7 * 2 * STEP_S,  # 2 + 5 steps of each compared net, the widest not compared
        "fixed_steps": 6,
        "steps": steps,
        "seconds_per_step": STEP_S,
        "decided_at_s": 5 * STEP_S,
    }
    assert metrics["budget"] == {
        **decided,
        "trained_steps": steps,
        "trained_seconds": steps * STEP_S,  # 95% of the budget
        "run_seconds_per_step": STEP_S,
        "stopped_at_budget": False,
    }
    replay = f"model.net.widths=[16,16] trainer.max_steps={steps} trainer.max_epochs=-1"
    assert f"{replay} reproduces this run" in caplog.text
    assert "compared in 5.2 s (not counted in the budget)" in caplog.text
    # Sized from the steps after the fixed ones: the freeze at 30% of the 13 after the first 6.
    assert metrics["steps"] == steps and sized.seen == {"lookahead": steps, "freeze": 6 + round(0.3 * 13)}
    ckpt = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"]["net.head.weight"].shape == (3, 16)  # the chosen net was trained
    assert ckpt["lr_schedulers"][0]["last_epoch"] == steps  # warmup-then-decay stepped through the whole run
    assert json.loads((tmp_path / "out" / "budget.json").read_text()) == decided  # what a resume of it reads

    monkeypatch.undo()
    monkeypatch.setattr(budget, "FIXED_STEPS", 6)  # the code's own fixed steps, which the fixture changed
    again = compose_cfg(cpu10(image_folder, tmp_path, "again", "budget_s=5", LADDER, *replay.split()))
    again.paths.output_dir = str(tmp_path / "again")
    train_job(again)  # the replay on the real clock: no comparison, no timing, the same run
    reproduced = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert "budget" not in reproduced
    for key in ("test/acc", "test/loss", "train/loss", "steps", "test/confusion_matrix"):
        assert reproduced[key] == metrics[key], key

    last = tmp_path / "out" / "checkpoints" / "last.ckpt"
    resumed = compose_cfg(cpu10(image_folder, tmp_path, "resumed", "budget_s=5", LADDER, f"ckpt_path={last}"))
    resumed.paths.output_dir = str(tmp_path / "resumed")
    train_job(resumed)  # budget.json's net and count: the checkpoint fits the net, and no step is left
    continued = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert continued["budget"] == decided and continued["steps"] == steps


def test_a_run_whose_steps_slow_down_after_the_decision_stops_at_the_budget_and_its_replay_reproduces_it(
    image_folder: Path, tmp_path: Path, compose_cfg, monkeypatch, caplog, few_fixed_steps
) -> None:
    clock = StepClock(slower=2.0, slower_from=8)  # 0.25 s a step, 0.5 s from step 9 on
    monkeypatch.setattr(budget, "perf_counter", clock)
    add_callback(monkeypatch, clock)
    with caplog.at_level(logging.INFO, logger="cifarkit.run.budget"):
        train_job(
            compose_cfg(
                cpu10(image_folder, tmp_path, "slowed", "budget_s=5", "budget_nets=null", "model.net.widths=[16,16]")
            )
        )
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    # Planned at 0.25 s a step: 19 steps. 8 steps took 2 s, then each 0.5 s: after step 14 (5 s) the next
    # would end past the budget.
    assert metrics["budget"] == {
        "seconds": 5.0,
        "fixed_steps": 6,
        "steps": 19,
        "seconds_per_step": STEP_S,
        "decided_at_s": 1.25,
        "trained_steps": 14,
        "trained_seconds": 5.0,
        "run_seconds_per_step": round((5.0 - 1.25) / (14 - 5), 4),  # the rate after the decision
        "stopped_at_budget": True,
    }
    assert metrics["steps"] == 14 and metrics["status"] == "completed" and "test/acc" in metrics
    kept = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", weights_only=True)
    assert kept["global_step"] == 14  # the run's checkpoint of where it stopped
    replay = "trainer.max_steps=19 trainer.max_epochs=-1 budget_stopped_at=14"
    assert f"stopped by the budget after 14 of 19 steps (5.0 s; 0.4167 s a step after the decision); {replay}" in (
        caplog.text
    )

    monkeypatch.undo()
    monkeypatch.setattr(budget, "FIXED_STEPS", 6)
    again = compose_cfg(
        cpu10(
            image_folder,
            tmp_path,
            "again",
            "budget_s=5",
            "budget_nets=null",
            "model.net.widths=[16,16]",
            *replay.split(),
        )
    )
    again.paths.output_dir = str(tmp_path / "again")
    train_job(again)
    reproduced = json.loads((tmp_path / "again" / "metrics.json").read_text())
    for key in ("test/acc", "test/loss", "train/loss", "steps", "test/confusion_matrix"):
        assert reproduced[key] == metrics[key], key


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


def test_a_net_on_the_command_line_turns_the_choice_off(
    image_folder: Path, tmp_path: Path, main, monkeypatch, few_fixed_steps
) -> None:
    clock = StepClock()
    monkeypatch.setattr(budget, "perf_counter", clock)
    add_callback(monkeypatch, clock)
    out = tmp_path / "given"
    r = main(
        "train.py",
        cpu10(image_folder, tmp_path, "given", "budget_s=5", f"hydra.run.dir={out}", "model.net.widths=[16,32]"),
    )
    assert r.code == 0, r.err
    decided = json.loads((out / "metrics.json").read_text())["budget"]
    assert decided["seconds_per_step"] == 2 * STEP_S  # the given net, timed by its own first steps
    assert "net" not in decided and "candidates" not in decided and "compare_s" not in decided


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
            r"was sized to \(it is missing or not a JSON object\); add its replay overrides from its log"
        ),
    ):
        train_job(compose_cfg(cpu10(image_folder, tmp_path, "resumed", "budget_s=10", f"ckpt_path={ckpt}")))
    with pytest.raises(UserError, match=r"budget_stopped_at=3 replays a budget run its clock stopped: give it with"):
        train_job(compose_cfg(cpu10(image_folder, tmp_path, "stopped", "budget_s=10", "budget_stopped_at=3")))


@pytest.mark.parametrize(
    ("recorded", "ladder", "says"),
    [
        ({"steps": 5}, LADDER, r"is not a budget this project wrote \(seconds: Field required\)"),
        (
            {"seconds": 5, "steps": 5, "net": None},
            "budget_nets=null",
            r"\(net: Value error, null \(a budget without a ladder",
        ),
        (
            {"seconds": 5, "steps": 10**12},
            "budget_nets=null",
            r"says steps=1000000000000, more than budget_s=5 could buy \(at most 50000 steps, 10000 a second\)",
        ),
        ({"seconds": 5, "steps": 5, "fixed_steps": 6}, "budget_nets=null", r"fixed_steps=6, more than its steps=5"),
        ({"seconds": 5, "steps": "5"}, "budget_nets=null", r"\(steps: Input should be a valid integer"),
    ],
    ids=["no-seconds", "null-net", "steps-beyond-the-budget", "fixed-beyond-steps", "steps-as-text"],
)
def test_a_resume_reads_budget_json_through_its_schema_and_the_budget_s_bound(
    image_folder: Path, tmp_path: Path, compose_cfg, recorded: dict, ladder: str, says: str
) -> None:
    """budget.json is a run folder's file: without seconds or with a null net it was a traceback, with
    10^12 steps a budget_s=5 resume trained on for ever; each is one line naming the file and the fix."""
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    (tmp_path / "run" / "budget.json").write_text(json.dumps(recorded))
    with pytest.raises(UserError, match=rf"^{tmp_path}/run/budget.json .*{says}.*; delete it to start a new run") as e:
        train_job(compose_cfg(cpu10(image_folder, tmp_path, "resumed", "budget_s=5", ladder, f"ckpt_path={ckpt}")))
    assert "\n" not in str(e.value)


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
