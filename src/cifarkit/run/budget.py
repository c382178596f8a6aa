"""A time budget instead of a step count: ``budget_s=600`` trains for the steps this machine does in
about 600 seconds.

``size_to_budget`` runs a short probe before the run and returns the step count it decides, which
the run's plan (cifarkit/run/plan.py) applies as overrides, the replay line's: the same data, model, trainer and the
callbacks that act on training steps, for a few warm-up steps (the first one compiles with
``model.compile=true``) and then timed ones, in the run's own strategy (under DDP every rank
takes part, so the probe pays the same all-reduce). From the steady time per step and the
warm-up's extra time it sizes the step count so that the run's training (``train/seconds``)
ends at ``TARGET`` of the budget, a run's step taken as ``RUN_OVER_PROBE`` times the probe's; under
DDP every rank takes rank 0's count. The run itself is then an ordinary run with
``trainer.max_steps`` set: the schedule, lookahead's ramp and the freeze point are sized from it
as from any step count, and ``trainer.max_steps=<count> trainer.max_epochs=-1`` reproduces it
exactly on any machine. The probe's steps train a copy of the model that is thrown away; the run
starts from the seed like any other. The decision is kept in the run directory (``budget.json``),
so a resumed run continues with the same count. A run that Lightning cuts short by design
(``trainer.fast_dev_run``) has nothing to size: ``skipped`` says so in one line and the budget
steps aside.

A budget may also choose the net (``budget_nets``, a ladder of ``model.net`` options from narrowest
to widest, as ``experiment=cpu10`` sets): the probe times the candidates in that order and keeps the
widest that still trains the square root of the narrowest one's epochs in the budget (the narrowest
when none does), so a fast machine or a long budget gets a wider net and a slow one a narrower net
rather than too few epochs. A wider candidate is slower, so probing stops at the first that falls
short. Every candidate's rate and the epochs the rule asked for are recorded, and the replay command
names the net beside the step count. A net given on the command line (``model=...`` or
``model.net...``) turns the choice off.
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
from omegaconf import DictConfig, OmegaConf, open_dict

from cifarkit.core.errors import UserError
from cifarkit.run.build import build

log = logging.getLogger(__name__)
TARGET = 0.95  # of the budget: where a run's training should end
# A run's step over the probe's: the run also draws the progress bar and writes the loggers, which
# the probe leaves out; the median of the ratios measured in docs/accuracy.md, whose spread is larger.
RUN_OVER_PROBE = 1.02
WARMUP_STEPS = 3  # untimed: memory allocation, kernel selection, compilation
MIN_TIMED_STEPS, MIN_TIMED_S, MAX_TIMED_STEPS = 10, 2.0, 100
# Lightning's callbacks that write the run's files, need a logger or draw the progress: left out of the
# probe. The project's own callbacks say so themselves (``in_budget_probe = False``).
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
    """The step count whose training ends at ``TARGET`` of the budget, each step ``RUN_OVER_PROBE``
    times the probe's."""
    return max(1, math.floor((TARGET * budget_s - warmup_extra_s) / (seconds_per_step * RUN_OVER_PROBE)))


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
    """What a ``budget_s`` run trains, as its decision (``budget.json``) and as the overrides that replay it;
    nothing when no budget applies (none set, or a given ``trainer.max_steps``, which wins). A resume keeps
    the decision its run ``recorded`` (budget.json's path and content); a new run probes this machine."""
    if cfg.get("budget_s") is None or cfg.trainer.max_steps not in (None, -1):
        return {}, []
    if why := skipped(cfg):
        log.info(why)
        return {}, []
    decision = _resumed(cfg, *recorded) if recorded else size_to_budget(cfg)
    return decision, overrides(decision)


def size_to_budget(cfg: DictConfig) -> dict[str, Any]:
    """Probe this machine's rate and decide the step count that fits ``cfg.budget_s`` (``"steps"``) and,
    with ``budget_nets``, the net (``"net"``, options of ``model.net``); return the decision, which
    budget.json and metrics.json record; ``cfg`` is not changed."""
    budget = float(cfg.budget_s)
    nets = candidate_nets(cfg)
    datamodule, measured = None, []
    for net in nets:
        datamodule, rate = _probe(cfg, net, datamodule)
        measured.append({**({"net": net} if net is not None else {}), **rate, **planned(budget, **rate)})
        if measured[-1]["epochs"] < required_epochs(measured):  # every wider candidate is slower still
            break
    chosen = choose(measured)
    decision = {"seconds": budget, **chosen}
    if nets != [None]:
        decision["required_epochs"] = required_epochs(measured)
        decision["candidates"] = measured
    log.info(
        "budget %g s: %s%d steps of %.4f s (after %d warm-up steps, %.1f s extra), training for about %.0f s; "
        "%s reproduces this run",
        budget,
        f"the net {net_options(chosen['net'])} (asked for {decision['required_epochs']:g} epochs; {_rates(measured)}), "
        if "net" in decision
        else "",
        chosen["steps"],
        chosen["seconds_per_step"],
        WARMUP_STEPS,
        chosen["warmup_extra_s"],
        chosen["steps"] * chosen["seconds_per_step"] * RUN_OVER_PROBE + chosen["warmup_extra_s"],
        replay(decision),
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


def overrides(decision: dict[str, Any]) -> list[str]:
    """The overrides that repeat a budget's run on any machine: its net and its step count."""
    net = net_overrides(decision["net"]) if "net" in decision else []
    return [*net, f"trainer.max_steps={decision['steps']}", "trainer.max_epochs=-1"]


def replay(decision: dict[str, Any]) -> str:
    """``overrides`` as the command line takes them."""
    return " ".join(overrides(decision))


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
    """The decision a checkpoint's run recorded beside its checkpoints (``budget.json``), if it is one."""
    steps = decision.get("steps") if decision else None
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        unusable = "does not say the step count the run was sized to"
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
    log.info("budget %g s: resuming the run sized to %s (%s)", decision["seconds"], replay(decision), recorded)
    return decision
