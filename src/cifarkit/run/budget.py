"""A time budget instead of a step count: ``budget_s=600`` trains for the steps this machine does in
about 600 seconds.

The run is its own probe. Its first ``FIXED_STEPS`` are timed (``BudgetRun``, a callback of the run,
with its progress bar, loggers and checkpoints: the steps are the run's), and at their end the step
count is fixed from the measured rate so that training (``train/seconds``) ends at ``TARGET`` of the
budget; under DDP every rank takes rank 0's count. Nothing those first steps compute depends on the
count: the schedule holds its start, lookahead does not fold and nothing is frozen during them, and
every piece sized from the run's steps is sized from the steps after them (cifarkit/fit/optim.py),
so ``trainer.max_steps=<count> trainer.max_epochs=-1`` after the run's own command (``budget_s``
included, which fixes the same first steps) reproduces it exactly. Where the rate changes after the
decision (a noisy neighbour, thermal limits), the run still stops by ``budget_s``: before a step that
would end past it, with its checkpoints as any run's; the replay line then adds
``budget_stopped_at=<step>``. The decision and the run's figures (planned and trained steps, seconds,
the rate at the decision and after it) are in metrics.json; the decision also in the run directory
(``budget.json``), so a resumed run continues with the same count. A run that Lightning cuts short by
design (``trainer.fast_dev_run``) has nothing to size: ``skipped`` says so in one line and the budget
steps aside.

A budget may also choose the net (``budget_nets``, a ladder of ``model.net`` options from narrowest
to widest, as ``experiment=cpu10`` sets): before the run a short comparison times the candidates in
that order (a few steps each, on a copy of the model that is thrown away, its wall-clock cost
recorded as ``compare_s``) and keeps the widest that still trains the square root of the narrowest
one's epochs in the budget (the narrowest when none does), so a fast machine or a long budget gets a
wider net and a slow one a narrower net rather than too few epochs. A wider candidate is slower, so
the comparison stops at the first that falls short. Every candidate's rate and the epochs the rule
asked for are recorded, and the replay command names the net beside the step count. A net given on
the command line (``model=...`` or ``model.net...``) turns the choice off.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from time import perf_counter
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig, OmegaConf, open_dict

from cifarkit.core import rundir
from cifarkit.core.errors import UserError
from cifarkit.core.files import write_json
from cifarkit.core.untrusted import budget_file
from cifarkit.run.build import build

log = logging.getLogger(__name__)
TARGET = 0.975  # of the budget: where a run's training should end (the stop at the budget is the other side)
FIXED_STEPS = 24  # the run's first steps, timed before its step count is fixed; nothing in them depends on it
TIMED_FROM = 4  # the steps before them that are not timed: memory allocation, kernel selection, compilation
# The comparison of a ladder's candidates: a few steps of each, enough to rank them and apply the rule.
# A run's step over the comparison's: the run also draws the progress bar and writes the loggers, which
# the comparison leaves out; the median of the ratios measured in docs/accuracy.md, whose spread is larger.
RUN_OVER_PROBE = 1.02
WARMUP_STEPS = 2  # untimed: memory allocation, kernel selection, compilation
MIN_TIMED_STEPS, MIN_TIMED_S, MAX_TIMED_STEPS = 5, 1.0, 50
COMPARED_SHARE = 0.95  # of the budget: the steps a candidate is credited with, as the rule was fitted
# Lightning's callbacks that write the run's files, need a logger or draw the progress: left out of the
# comparison. The project's own callbacks say so themselves (``in_budget_probe = False``).
LIGHTNING_NOT_PROBED = (ModelCheckpoint, LearningRateMonitor, ProgressBar)


def probed(callback: L.Callback) -> bool:
    """Whether the probe keeps ``callback``: those that act on training steps, not those that watch the run."""
    return getattr(callback, "in_budget_probe", not isinstance(callback, LIGHTNING_NOT_PROBED))


class StepClock(L.Callback):
    """Times the probe: the warm-up steps from the start of training, then steps until enough
    of them and enough seconds are measured (the device synced only at those points)."""

    def __init__(self) -> None:
        self.start = self.warm = self.end = 0.0
        self.timed = 0

    def _now(self, pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = self._now(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == WARMUP_STEPS:
            self.warm = self._now(pl_module)
        elif trainer.global_step > WARMUP_STEPS:
            self.end, self.timed = self._now(pl_module), trainer.global_step - WARMUP_STEPS
            if self.timed >= MIN_TIMED_STEPS and self.end - self.warm >= MIN_TIMED_S:
                trainer.should_stop = True

    @property
    def seconds_per_step(self) -> float:
        return (self.end - self.warm) / self.timed

    @property
    def warmup_extra_s(self) -> float:
        """What the warm-up steps took beyond steady steps: paid again by the run's first steps."""
        return max(0.0, self.warm - self.start - WARMUP_STEPS * self.seconds_per_step)


def steps_for(budget_s: float, seconds_per_step: float, warmup_extra_s: float) -> int:
    """The steps a candidate would train in the budget by the comparison's rate: ``COMPARED_SHARE`` of it,
    each step ``RUN_OVER_PROBE`` times the comparison's (what the rule's epochs were fitted to)."""
    return max(1, math.floor((COMPARED_SHARE * budget_s - warmup_extra_s) / (seconds_per_step * RUN_OVER_PROBE)))


def skipped(cfg: DictConfig) -> str | None:
    """Why this run has no steps to size, in one line; None when a budget applies. Lightning cuts a
    ``fast_dev_run`` short by design (N batches of each split, whatever the step count says)."""
    fast = cfg.trainer.get("fast_dev_run")
    if not fast:
        return None
    n = 1 if fast is True else int(fast)
    return (
        f"budget_s={cfg.budget_s} is not used: trainer.fast_dev_run={str(fast).lower()} runs {n} "
        f"batch{'es' if n > 1 else ''} of each split and stops"
    )


def decide(cfg: DictConfig, recorded: tuple[Path, dict[str, Any] | None] | None) -> tuple[dict[str, Any], list[str]]:
    """What a ``budget_s`` run decides before it starts (its net, with a ladder), as budget.json records it,
    and the overrides the run starts with (the net and the most steps the budget could buy, until its first
    steps fix the count); nothing when no budget applies (none set, or a given ``trainer.max_steps``, which
    wins: a replay). A resume keeps the decision its run ``recorded`` (budget.json's path and content, checked)."""
    stopped = cfg.get("budget_stopped_at")
    given = cfg.trainer.max_steps not in (None, -1)
    if stopped is not None and (cfg.get("budget_s") is None or not given or stopped > cfg.trainer.max_steps):
        raise UserError(
            f"budget_stopped_at={stopped} replays a budget run its clock stopped: give it with budget_s and a "
            "trainer.max_steps at least as large, as the run's replay line does"
        )
    if cfg.get("budget_s") is None or given:
        return {}, []
    if why := skipped(cfg):
        log.info(why)
        return {}, []
    decision = _resumed(cfg, *recorded) if recorded else compare(cfg)
    return decision, overrides(decision, cfg.budget_s)


def compare(cfg: DictConfig) -> dict[str, Any]:
    """Choose the net among ``budget_nets`` by a short comparison of their rates (none without a ladder);
    return the decision, which budget.json and metrics.json record; ``cfg`` is not changed."""
    budget = float(cfg.budget_s)
    nets = candidate_nets(cfg)
    if nets == [None]:
        log.info("budget %g s: the run times its first %d steps, then fixes its step count", budget, FIXED_STEPS)
        return {"seconds": budget}
    started = perf_counter()
    datamodule, measured = None, []
    for net in nets:
        datamodule, rate = _probe(cfg, net, datamodule)
        measured.append({"net": net, **rate, **planned(budget, **rate)})
        if measured[-1]["epochs"] < required_epochs(measured):  # every wider candidate is slower still
            break
    chosen = choose(measured)
    decision = {
        "seconds": budget,
        "net": chosen["net"],
        "required_epochs": required_epochs(measured),
        "candidates": measured,
        "compare_s": round(perf_counter() - started, 2),
    }
    log.info(
        "budget %g s: the net %s (asked for %g epochs; %s), compared in %.1f s (not counted in the budget); the run "
        "times its first %d steps, then fixes its step count",
        budget,
        net_options(chosen["net"]),
        decision["required_epochs"],
        _rates(measured),
        decision["compare_s"],
        FIXED_STEPS,
    )
    return decision


def candidate_nets(cfg: DictConfig) -> list[dict[str, Any] | None]:
    """The ``model.net`` options to choose among, narrowest first; ``[None]``: the configured net only
    (no ladder, or a net given on the command line, which the run keeps)."""
    ladder = cfg.get("budget_nets")
    if not ladder or net_given():
        return [None]
    nets = OmegaConf.to_container(ladder, resolve=True)  # a list of non-empty mappings: the schema's
    unknown = {k for n in nets for k in n} - set(cfg.model.net)
    if unknown:
        raise UserError(
            f"budget_nets names {', '.join(sorted(unknown))}, which model.net ({cfg.model.net.get('_target_')}) "
            "does not have; set budget_nets=null to train the configured net"
        )
    return nets


def net_given() -> bool:
    """Whether the command line chose the model or its net (``model=...``, ``model.net...``)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    return any(re.match(r"[+~]*model(=|\.net\b)", o) for o in HydraConfig.get().overrides.task)


def planned(budget_s: float, seconds_per_step: float, warmup_extra_s: float, steps_per_epoch: int) -> dict[str, Any]:
    """The steps a budget buys at a measured rate, and the epochs they make."""
    steps = steps_for(budget_s, seconds_per_step, warmup_extra_s)
    return {"steps": steps, "epochs": round(steps / steps_per_epoch, 2)}


def required_epochs(measured: list[dict[str, Any]]) -> float:
    """The epochs the chosen net must train: the square root of the narrowest net's epochs, which measure
    what the budget buys on this machine. More compute is best spent on a wider net and more steps
    together, so the best net's epochs grow, but more slowly than the compute (docs/accuracy.md: the
    tables this was fitted to)."""
    return round(math.sqrt(measured[0]["epochs"]), 2)


def choose(measured: list[dict[str, Any]]) -> dict[str, Any]:
    """The widest candidate (the last) that trains the ``required_epochs``; the narrowest when none does."""
    need = required_epochs(measured)
    return next((m for m in reversed(measured) if m["epochs"] >= need), measured[0])


def overrides(decision: dict[str, Any], budget_s: float) -> list[str]:
    """The overrides a budget's run starts with: its net and its step count, or until the run has fixed
    it, the most steps ``budget_s`` could buy (a bound the clock stops long before)."""
    net = net_overrides(decision["net"]) if "net" in decision else []
    return [
        *net,
        f"trainer.max_steps={decision.get('steps', budget_file.max_steps(budget_s))}",
        "trainer.max_epochs=-1",
    ]


def replay(decision: dict[str, Any]) -> str:
    """The overrides that repeat a budget's run exactly, after its own command: its net, its step count and
    where the budget stopped it if it did."""
    stopped = [f"budget_stopped_at={decision['trained_steps']}"] if decision.get("stopped_at_budget") else []
    return " ".join([*overrides(decision, decision["seconds"]), *stopped])


def net_overrides(net: dict[str, Any]) -> list[str]:
    """``net`` as command-line overrides of ``model.net``."""

    def value(v: Any) -> str:
        return "[" + ",".join(value(x) for x in v) + "]" if isinstance(v, list) else str(v)

    return [f"model.net.{k}={value(v)}" for k, v in net.items()]


def net_options(net: dict[str, Any]) -> str:
    """``net`` as one stretch of a command line."""
    return " ".join(net_overrides(net))


def _rates(measured: list[dict[str, Any]]) -> str:
    return ", ".join(
        f"{net_options(m['net'])}: {m['seconds_per_step']:.4f} s/step, {m['epochs']:g} epochs" for m in measured
    )


def _probe(cfg: DictConfig, net: dict[str, Any] | None, datamodule: Any) -> tuple[Any, dict[str, Any]]:
    """Time training steps of ``cfg``'s run with ``net``'s options; rank 0's figures on every rank.
    The data is prepared once and shared by the candidates' probes."""
    probe_cfg = cfg.copy()
    with open_dict(probe_cfg):
        probe_cfg.trainer.update(
            max_steps=WARMUP_STEPS + MAX_TIMED_STEPS,
            max_epochs=-1,
            max_time=None,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_model_summary=False,
        )
        if net is not None:
            probe_cfg.model.net = OmegaConf.merge(probe_cfg.model.net, net)
    built, trainer = build(probe_cfg, with_loggers=False)
    datamodule = datamodule or built
    clock = StepClock()
    trainer.callbacks = [c for c in trainer.callbacks if probed(c)] + [clock]
    trainer.fit(instantiate(probe_cfg.model, classes=datamodule.classes), datamodule=datamodule)
    if clock.timed == 0:
        raise UserError(
            "the budget probe could not time a step (fewer training batches than its warm-up); set trainer.max_steps "
            "instead"
        )
    per_epoch = max(1, trainer.num_training_batches // trainer.accumulate_grad_batches)
    seconds_per_step, warmup_extra_s = trainer.strategy.broadcast((clock.seconds_per_step, clock.warmup_extra_s), src=0)
    return datamodule, {
        "seconds_per_step": seconds_per_step,
        "warmup_extra_s": warmup_extra_s,
        "steps_per_epoch": per_epoch,
    }


def _resumed(cfg: DictConfig, recorded: Path, decision: dict[str, Any] | None) -> dict[str, Any]:
    """The decision a checkpoint's run recorded beside its checkpoints (``budget.json``, checked by its
    reader), if there is one; without its step count (stopped in its first steps) the run fixes it as a new one."""
    if decision is None:
        unusable = "does not say the step count the run was sized to (it is missing or not a JSON object)"
    elif net_given():  # the command line's net, as for a new run
        decision.pop("net", None)
        unusable = None
    elif "net" in decision and decision["net"] not in candidate_nets(cfg):  # only the config's own options
        unusable = "names a net that budget_nets does not offer"
    else:
        unusable = None
    if unusable:  # what the run's log line names instead: its replay overrides
        raise UserError(
            f"budget_s is set but {recorded} {unusable}; add its replay overrides from its log "
            "(model.net options, trainer.max_steps=<its steps> trainer.max_epochs=-1) to resume it"
        )
    if "steps" in decision:
        log.info("budget %g s: resuming the run sized to %s (%s)", decision["seconds"], replay(decision), recorded)
    else:
        log.info(
            "budget %g s: resuming a run stopped before it fixed its step count (%s)", decision["seconds"], recorded
        )
    return decision


class BudgetRun(L.Callback):
    """A budget's run as it trains: its ``fixed_steps`` (which cifarkit/fit/optim.py's pieces size around),
    and in a new run the clock that fixes the step count after them and stops the run at the budget.

    The clock counts what ``train/seconds`` counts (cifarkit/fit/metrics.py's ``Throughput``): training
    epochs without validation. ``record`` is the decision with what the run did, for metrics.json."""

    in_budget_probe = False

    def __init__(self, decision: dict[str, Any], deciding: bool, record_to: Path | None, stop_at: int | None) -> None:
        self.record = dict(decision)
        self.fixed_steps = int(decision.get("fixed_steps", FIXED_STEPS))
        self.deciding, self.record_to, self.stop_at = deciding, record_to, stop_at
        self.seconds, self._t0, self._last = 0.0, None, 0.0
        self._start_step = 0
        self._timed: tuple[int, float] | None = None  # (step, seconds) where the timed steps start
        self._decided: tuple[int, float] | None = None  # (step, seconds) of the decision

    def _now(self, pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return perf_counter()

    def _elapsed(self, now: float) -> float:
        return self.seconds + (now - self._t0 if self._t0 is not None else 0.0)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.deciding and trainer.global_step >= self.fixed_steps - 1:
            raise UserError(
                f"budget_s is set but budget.json does not say the step count of a run past its first "
                f"{self.fixed_steps} steps; add its replay overrides from its log "
                "(trainer.max_steps=<its steps> trainer.max_epochs=-1)"
            )
        self._timed, self._start_step = None, trainer.global_step
        self.on_train_epoch_start(trainer, pl_module)  # a run resumed mid-epoch gets no epoch start

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = self._last = self._now(pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and self._t0 is not None:
            self.seconds, self._t0 = self._elapsed(self._now(pl_module)), None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._t0 = self._last = self._now(pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds, self._t0 = self._elapsed(self._now(pl_module)), None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.stop_at is not None and step >= self.stop_at:  # a replay of a run its budget stopped
            trainer.should_stop = True
        if not self.deciding:
            return
        now = self._now(pl_module)
        last_step_s, self._last = now - self._last, now
        elapsed = self._elapsed(now)
        if self._timed is None and step >= TIMED_FROM:
            self._timed = (step, elapsed)
        if self._decided is None and step == self.fixed_steps - 1:
            self._decide(trainer, step, elapsed)
        # Stop before a step that would end past the budget (at the last step's pace), on every rank at once.
        over = elapsed + last_step_s > float(self.record["seconds"]) and step < trainer.max_steps
        if trainer.world_size > 1:
            over = trainer.strategy.reduce_boolean_decision(over, all=False)
        if over:
            trainer.should_stop = True
            self.record["stopped_at_budget"] = True

    def _decide(self, trainer: L.Trainer, step: int, elapsed: float) -> None:
        """Fix the step count from the rate of the timed steps, so that training ends at ``TARGET`` of the budget."""
        start, start_s = self._timed if self._timed and self._timed[0] < step else (self._start_step, 0.0)
        rate = (elapsed - start_s) / max(1, step - start)
        steps = max(self.fixed_steps, step + math.floor((TARGET * float(self.record["seconds"]) - elapsed) / rate))
        steps, rate = trainer.strategy.broadcast((steps, rate), src=0)
        trainer.fit_loop.epoch_loop.max_steps = steps
        self._decided = (step, elapsed)
        self.record.update(fixed_steps=self.fixed_steps, steps=steps, seconds_per_step=round(rate, 4))
        self.record["decided_at_s"] = round(elapsed, 2)
        if trainer.is_global_zero and self.record_to is not None:  # what a resume continues with
            write_json(self.record_to, self.record)
        log.info(
            "budget %g s: %d steps in %.1f s, %.4f s a step from step %d on; %d steps, training for about %.0f s; "
            "%s reproduces this run",
            self.record["seconds"],
            step,
            elapsed,
            rate,
            start,
            steps,
            elapsed + (steps - step) * rate,
            replay(self.record),
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.deciding:
            return
        step, elapsed = trainer.global_step, self.seconds
        self.record.setdefault("steps", step)  # stopped before its count was fixed: what it trained
        self.record.setdefault("fixed_steps", self.fixed_steps)
        self.record.update(trained_steps=step, trained_seconds=round(elapsed, 2))
        if self._decided and step > self._decided[0]:
            self.record["run_seconds_per_step"] = round((elapsed - self._decided[1]) / (step - self._decided[0]), 4)
        self.record.setdefault("stopped_at_budget", False)
        if self.record["stopped_at_budget"]:
            log.info(
                "budget %g s: stopped by the budget after %d of %d steps (%.1f s; %s s a step after the decision); "
                "%s reproduces this run",
                self.record["seconds"],
                step,
                self.record["steps"],
                elapsed,
                self.record.get("run_seconds_per_step", "?"),
                replay(self.record),
            )


def run_callback(decision: dict[str, Any], cfg: DictConfig, run_dir: Path) -> BudgetRun | None:
    """The callback of a run with ``budget_s`` (its decision, or ``{}`` for a replay with a given step count);
    None without a budget or where it steps aside."""
    if cfg.get("budget_s") is None or skipped(cfg):
        return None
    deciding = bool(decision) and "steps" not in decision
    return BudgetRun(decision, deciding, run_dir / rundir.BUDGET, cfg.get("budget_stopped_at"))
