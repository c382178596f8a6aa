"""Optuna studies for ``hparams_search=...``: which storage a ``storage`` string means, the search
space from Hydra's override syntax, and the ask/tell loop of the project's sweeper
(hydra_plugins/cifarkit_optuna_sweeper, ``hydra/sweeper=optuna``).

* Storage: opened and checked by cifarkit/core/untrusted/storage.py (the one door for it): ``sqlite:///...``
  or any SQLAlchemy URL (``postgresql://`` for many machines) is Optuna's RDB storage; a plain path is
  Optuna's journal file; null is a study in this process's memory. A stored round, a trial's parameters
  and the search space are checked there before a job launches.
* Trials: each job gets its trial's number as ``optuna_trial=<n>``; its ``callbacks.optuna_pruning``
  (_pruning.py beside this) reports to that trial after every validation and stops the job when the
  study's pruner says so. Such a job's metrics.json says ``status: pruned``, and the sweeper tells it as PRUNED.
* Many workers: ``n_trials`` is the number of trials a round of the study runs. A sweep that
  finds the study's last round done starts a new one (``n_trials`` more trials); one that finds
  it unfinished (another worker still at it, or an interrupted search) joins it. So two
  processes started on one storage share ``n_trials``, and a rerun after an interruption finishes
  the search. A trial number is never run twice: the storage hands them out, and a worker asks only
  while it holds the study's lock (``study_lock``), so two never take the round's last trial both.
* Workers that die: each worker's running trials beat (``Heartbeat``, in the storage); a worker that
  sees another's trial not beat for ``grace_period`` fails it and queues its parameters again, and
  the re-run continues from the checkpoint its job left. A worker with nothing to ask for waits for
  the round's running trials, so the round ends with ``n_trials`` finished trials.

Lightning-free; Optuna is imported when a sweep or a trial needs it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from cifarkit.core import rundir
from cifarkit.core.errors import UserError
from cifarkit.core.untrusted import shown
from cifarkit.core.untrusted.storage import (
    ROUND_END,
    ROUND_START,
    check_params,
    check_space,
    create_study,
    is_journal,
    load_study,
    named,
    open_storage,
    stored_round,
)

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)
TRIAL_KEY = "optuna_trial"  # the config key a job reads its trial number from
# storage: null: this process's studies, each with its in-memory storage, for its in-process jobs
_COUNTED: dict[tuple[str, str | None], int] = {}  # the trial count each study's sampler seed was read at
_IN_MEMORY: dict[str, tuple[optuna.Study, optuna.storages.BaseStorage]] = {}


def load_trial(storage: Any, study_name: str | None, number: int, pruner: Any = None) -> optuna.trial.Trial:
    """Trial ``number`` of the stored study, to report to (a job's side)."""
    import optuna

    pruner = pruner if pruner is not None else optuna.pruners.NopPruner()  # null: none (Optuna's own default is median)
    if storage is None:
        if (study_name or "") not in _IN_MEMORY:
            raise UserError(
                f"optuna_trial={number}: the study {study_name!r} is in another process's memory; give the sweeper a "
                "storage"
            )
        study, storage = _IN_MEMORY[study_name or ""]
        study.pruner = pruner
    else:
        storage = open_storage(storage)
        study = load_study(storage, study_name, pruner=pruner)
    study_id = storage.get_study_id_from_name(study.study_name)
    return optuna.trial.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, number))


def study_trial_count(storage: Any, study_name: str | None) -> int:
    """How many trials the stored study has (0 when there is no such study yet)."""
    if not storage or not study_name:
        return 0
    try:
        count = len(load_study(storage, study_name).get_trials(deepcopy=False))
    except KeyError:  # no such study yet: this run creates it
        count = 0
    _COUNTED[(str(storage), study_name)] = count
    return count


# ---------------------------------------------------------------------------------------------
# The search space: Hydra's override syntax as Optuna distributions, as hydra-optuna-sweeper read it.


def distribution(override: Any) -> Any:
    """An Optuna distribution for a sweep override (``choice``, ``range``, ``interval``, with
    ``tag(log, ...)``), or the override's value as a string for a fixed one."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep, Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        choices = list(override.sweep_iterator(transformer=Transformer.encode))
        bad = [c for c in choices if not isinstance(c, (str, int, float, bool, type(None)))]
        if not bad:
            return CategoricalDistribution(choices)
        why = f"a choice takes str, int, float, bool or null values, not {bad[0]!r}"
    elif isinstance(value, RangeSweep):  # both ends included, as hydra-optuna-sweeper had it
        if any(isinstance(x, float) for x in (value.start, value.stop, value.step)):
            return FloatDistribution(value.start, value.stop, step=value.step)
        return IntDistribution(int(value.start), int(value.stop), step=int(value.step))
    elif isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(value.start, value.end, log=log_scale)
    else:
        why = "the Optuna sweeper takes choice(), range() or interval(), not this sweep"
    raise UserError(f"{override.input_line}: {why}")


def search_space(arguments: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(distributions, fixed values) of ``hydra.sweeper.params`` and the command line's overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    space, fixed = {}, {}
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        value = distribution(override)
        key = override.get_key_element()
        if isinstance(value, str):
            fixed[key] = value
            space.pop(key, None)
        else:
            space[key] = value
            fixed.pop(key, None)
    return space, fixed


def suggest(trial: optuna.trial.Trial, name: str, dist: Any) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    raise TypeError(dist)


def grid(dist: Any) -> list[Any]:
    """The values of a discrete distribution, for Optuna's GridSampler."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if getattr(dist, "step", None) is None or getattr(dist, "log", False):
        raise UserError("hydra/sweeper/sampler=grid needs choice(), range() or a stepped interval for every param")
    n = int(round((dist.high - dist.low) / dist.step)) + 1
    return [dist.low + i * dist.step for i in range(n)]


# ---------------------------------------------------------------------------------------------
# The sweeper's loop.


class Search:
    """One sweep process's part of a study (what ``OptunaSweeper.sweep`` runs)."""

    def __init__(self, sweeper: Any, launcher: Any, config: Any, arguments: list[str]) -> None:
        self.s, self.launcher, self.config = sweeper, launcher, config
        params = [f"{k!s}={v}" for k, v in (sweeper.params or {}).items()]
        self.space, self.fixed = search_space([*params, *arguments])
        self.extend = None
        if sweeper.custom_search_space:
            from hydra.utils import get_method

            self.extend = get_method(sweeper.custom_search_space)
        self.directions = (
            [sweeper.direction] if isinstance(sweeper.direction, str) else [str(d) for d in sweeper.direction]
        )
        self.trial_key = TRIAL_KEY if _has_key(config, TRIAL_KEY) else f"+{TRIAL_KEY}"
        self.where = named(sweeper.storage)
        self.beats = Heartbeat(float(sweeper.heartbeat_interval))
        self.grace = float(sweeper.grace_period)
        self.seen: dict[int, tuple[Any, float]] = {}  # another worker's running trial: its last beat, when it changed

    def study(self) -> optuna.Study:
        import optuna

        sampler, n_trials = self.s.sampler, self.s.n_trials
        if isinstance(sampler, functools.partial) and sampler.func is optuna.samplers.GridSampler:
            values = {name: grid(dist) for name, dist in self.space.items()}
            sampler = sampler(values)
            n_trials = min(n_trials, math.prod(len(v) for v in values.values()))
        pruner = (
            self.s.pruner if len(self.directions) == 1 and self.s.pruner is not None else optuna.pruners.NopPruner()
        )
        self.storage = open_storage(self.s.storage)
        if self.storage is None and (self.s.study_name or "") in _IN_MEMORY:
            study, self.storage = _IN_MEMORY[self.s.study_name or ""]
            study.sampler, study.pruner = sampler or study.sampler, pruner
        elif self.storage is None:
            self.storage = optuna.storages.InMemoryStorage()
            study = create_study(
                self.storage, self.s.study_name, sampler=sampler, pruner=pruner, directions=self.directions
            )
            _IN_MEMORY[self.s.study_name or ""] = (study, self.storage)
        else:
            study = create_study(
                self.storage, self.s.study_name, sampler=sampler, pruner=pruner, directions=self.directions
            )
        self.n_trials = n_trials
        self.lock = study_lock(self.s.storage, self.storage, study.study_name)
        return study

    def open_round(self, study: optuna.Study, trials: list[Any]) -> range:
        """The study's unfinished round, or a new one of ``n_trials`` trials when the last is done."""
        current = stored_round(
            study.user_attrs,
            len(trials),
            self.n_trials,
            self.s.storage,
            study.study_name,
            lambda r: self.done(trials, r),
        )
        if current is not None and not self.done(trials, current):
            log.info(
                "study %s (%s): joining its unfinished round of %d trials from trial %d",
                study.study_name,
                self.where,
                len(current),
                current.start,
            )
            return current
        from optuna.trial import TrialState

        waiting = [t.number for t in trials if t.state == TrialState.WAITING]  # enqueued ones are run first
        start = min([len(trials), *waiting])
        study.set_user_attr(ROUND_START, start)
        study.set_user_attr(ROUND_END, start + self.n_trials)
        log.info("study %s (%s): a round of %d trials from %d", study.study_name, self.where, self.n_trials, start)
        return range(start, start + self.n_trials)

    def counted(self, trials: list[Any], current: range) -> list[Any]:
        """The round's trials that count toward its size: not a stale one re-queued, nor an old sweeper's spare."""
        return [
            t
            for t in trials
            if t.number >= current.start and STALE not in t.user_attrs and "cifarkit" not in t.user_attrs
        ]

    def done(self, trials: list[Any], current: range) -> bool:
        mine = self.counted(trials, current)
        return len(mine) >= len(current) and all(t.state.is_finished() for t in mine)

    def due(self, trials: list[Any], current: range) -> bool:
        """Whether to ask for a trial now: one is waiting (re-queued, enqueued) or the round lacks one."""
        from optuna.trial import TrialState

        mine = self.counted(trials, current)
        return any(t.state == TrialState.WAITING for t in mine) or len(mine) < len(current)

    def fail_stale(self, study: optuna.Study, trials: list[Any], current: range) -> bool:
        """Fail each running trial of another worker whose heartbeat has not moved for ``grace_period``
        seconds, and queue its parameters again (held under the study's lock, so one worker does it)."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        now, changed = _now(), False
        for t in trials:
            if t.state != TrialState.RUNNING or t.number < current.start or self.beats.holds(t.number):
                continue
            beat = t.user_attrs.get(HEARTBEAT)
            if self.seen.get(t.number, (object(),))[0] != beat:
                self.seen[t.number] = (beat, now)
                continue
            if now - self.seen[t.number][1] < self.grace:
                continue
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(
                self.storage.get_study_id_from_name(study.study_name), t.number
            )
            try:
                self.storage.set_trial_user_attr(trial_id, STALE, f"no heartbeat for {self.grace:g} s: re-queued")
                if not self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    continue
            except UpdateFinishedTrialError:  # it ended after all
                continue
            study.enqueue_trial(t.params, user_attrs={RETRY_OF: t.number, **_job_of(t)})
            log.warning(
                "trial %d: no heartbeat for %g s (its worker stopped); failed and queued again", t.number, self.grace
            )
            changed = True
        return changed

    def run(self) -> None:
        import time

        from optuna.trial import TrialState

        study = self.study()
        check_space(study.get_trials(deepcopy=False), self.space, self.s.storage, study.study_name)
        with self.lock():
            trials = study.get_trials(deepcopy=False)
            current = self.open_round(study, trials)
        log.info(
            "sampler %s, pruner %s, directions %s",
            type(study.sampler).__name__,
            type(study.pruner).__name__,
            self.directions,
        )
        next_number, reseeded = len(trials), False
        if _COUNTED.get((str(self.s.storage), self.s.study_name), len(trials)) != len(trials):
            # Another worker added trials after this one's seed counted them (study_seed): started from the same
            # count, it has the same seed, and would sample the same values.
            study.sampler.reseed_rng()
            reseeded = True
        self.beats.start(self.storage)
        try:
            while True:
                batch = []
                with self.lock():
                    trials = study.get_trials(deepcopy=False)
                    if self.fail_stale(study, trials, current):
                        trials = study.get_trials(deepcopy=False)
                    for _ in range(max(1, self.s.n_jobs)):
                        if not self.due(trials, current):
                            break
                        trial = study.ask()
                        self.beats.add(trial, self.storage)
                        if trial.number != next_number and not reseeded:
                            # Another worker asked in between: started together with this one from the same
                            # study, it has the same seed, and would sample the same values.
                            study.sampler.reseed_rng()
                            reseeded = True
                        next_number = trial.number + 1
                        batch.append(trial)
                        trials = study.get_trials(deepcopy=False)
                if not batch:
                    if any(t.state == TrialState.RUNNING for t in self.counted(trials, current)):
                        time.sleep(min(POLL, self.grace / 4))  # another worker's trial: watch its heartbeat
                        continue
                    break
                self.launch(study, batch)
        finally:
            self.beats.stop()
        self.report(study)

    def launch(self, study: optuna.Study, batch: list[optuna.trial.Trial]) -> None:
        """Run a batch of trials as jobs, and tell the study how each went."""
        from optuna.trial import TrialState

        try:
            returns = []
            for run in consecutive(batch):  # job <n> is trial <n>: workers sharing a sweep folder never clash
                returns += self.launcher.launch([self.overrides(study, t) for t in run], initial_job_idx=run[0].number)
        except BaseException:  # Ctrl-C, SIGTERM, a launcher error: these trials end FAIL, not RUNNING forever
            for t in batch:
                with contextlib.suppress(Exception):
                    study.tell(t, state=TrialState.FAIL)
                self.beats.remove(t)
            raise
        failures = []
        for t, r in zip(batch, returns):
            failures.append(self.tell(study, t, r))
            self.beats.remove(t)
        failures = [f for f in failures if f is not None]
        if len(failures) / len(returns) > self.s.max_failure_rate:
            log.error(
                "%d of %d trials failed, more than max_failure_rate=%s",
                len(failures),
                len(returns),
                self.s.max_failure_rate,
            )
            for r in returns:
                r.return_value  # raises the job's own error  # noqa: B018

    def overrides(self, study: optuna.Study, trial: optuna.trial.Trial) -> list[str]:
        """The job's overrides: the trial's suggested values (checked against the search space), the fixed
        ones, its number, and for a re-queued trial the checkpoint its first job left."""
        for name, dist in self.space.items():
            suggest(trial, name, dist)
        for name, value in self.fixed.items():
            trial.set_user_attr(name, value)
        if self.extend is not None:
            self.extend(self.config, trial)
        overlap = trial.params.keys() & self.fixed.keys()
        if overlap:
            raise UserError(f"both searched and fixed: {sorted(overlap)}")
        frozen = study.get_trials(deepcopy=False)[trial.number]
        space = {**frozen.distributions, **self.space}  # the custom search space's own, and the config's
        enqueued = frozen.system_attrs.get("fixed_params", {})
        check_params(trial.number, trial.params, enqueued, space, self.s.storage, study.study_name)
        job_dir = Path(self.config.hydra.sweep.dir).resolve() / str(trial.number)
        trial.set_user_attr(JOB_DIR, str(job_dir))
        params = {**trial.params, **self.fixed}
        extra = []
        first = frozen.user_attrs.get(RESUME_FROM)  # the storage's word: a plain path to a folder, or nothing
        point = rundir.resume_point(Path(first)) if _plain(first) and Path(first).is_dir() else None
        if point is not None and point.step is not None and _plain(str(point.ckpt)):
            log.info("trial %d continues %s", trial.number, point.continues())
            extra.append(f"ckpt_path={point.ckpt}")
        overrides = [*(f"{k}={v}" for k, v in params.items()), *extra, f"{self.trial_key}={trial.number}"]
        trial.set_user_attr(OVERRIDES, overrides)
        return overrides

    def tell(self, study: optuna.Study, trial: optuna.trial.Trial, ret: Any) -> BaseException | None:
        """Tell the study how the job went: COMPLETE, PRUNED, or FAIL (returned); the job's metrics go with it."""
        from optuna.trial import TrialState

        with contextlib.suppress(Exception):  # the study's summary reads them (cifarkit/run/sweep.py)
            out = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir", default=None) if ret.hydra_cfg else None
            if out is not None:
                trial.set_user_attr(METRICS, rundir_metrics(Path(out)))
        try:
            value = ret.return_value
        except Exception as e:  # the job raised (cifarkit's jobs record their own failures and return None)
            study.tell(trial, state=TrialState.FAIL)
            log.warning("trial %d failed: %s", trial.number, e)
            return e
        if pruned(ret):
            study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d pruned", trial.number)
            return None
        try:
            values = [float(value)] if len(self.directions) == 1 else [float(v) for v in value]
            if len(values) != len(self.directions) or not all(math.isfinite(v) for v in values):
                raise ValueError(value)
        except (TypeError, ValueError):
            study.tell(trial, state=TrialState.FAIL)
            log.warning("trial %d failed (returned %r)", trial.number, value)
            return ValueError(f"trial {trial.number} returned {value!r}")
        study.tell(trial, values if len(values) > 1 else values[0])
        return None

    def report(self, study: optuna.Study) -> None:
        from optuna.trial import TrialState

        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
        log.info("study %s: %s", study.study_name, ", ".join(f"{n} {k}" for k, n in counts.items() if n))
        if not done:
            return
        if len(self.directions) == 1:
            best = study.best_trial
            results = {
                "name": "optuna",
                "best_params": best.params,
                "best_value": best.value,
                "best_trial": best.number,
            }
            log.info("best trial %d: %s = %s", best.number, best.params, best.value)
        else:
            results = {
                "name": "optuna",
                "solutions": [{"params": t.params, "values": t.values} for t in study.best_trials],
            }
        results["trials"] = counts
        OmegaConf.save(OmegaConf.create(results), Path(self.config.hydra.sweep.dir) / "optimization_results.yaml")


POLL = 1.0  # seconds between looks at the study while the round's last trials run elsewhere
HEARTBEAT = "cifarkit:heartbeat"  # a running trial's user attribute: a count its worker moves every interval
STALE = "cifarkit:stale"  # a trial failed because its worker stopped beating (its parameters queued again)
RETRY_OF = "cifarkit:retry_of"  # a re-queued trial: the number of the one whose worker stopped
JOB_DIR = "cifarkit:job_dir"  # where a trial's job runs
RESUME_FROM = "cifarkit:resume_from"  # a re-queued trial: its first job's folder, whose checkpoint it continues
METRICS = "cifarkit:metrics"  # the job's metrics.json numbers, for a summary made from the storage
OVERRIDES = "cifarkit:overrides"  # the job's overrides, ditto


def study_jobs(storage: Any, study_name: str | None, sweep_dir: Path, x_key: str) -> list[tuple[str, list, dict, Any]]:
    """Every trial's job as the study's storage records it (its folder relative to ``sweep_dir`` when it is
    there, else as its worker named it; its overrides; its metrics.json; its ``x_key``): the summary of a
    study that several workers, on several machines, ran. Re-queued trials appear once, as their re-run."""
    from optuna.trial import TrialState

    jobs = []
    for t in load_study(storage, study_name).get_trials(deepcopy=False):
        overrides = t.user_attrs.get(OVERRIDES)
        if STALE in t.user_attrs or not isinstance(overrides, list):  # re-run elsewhere, or never launched
            continue
        overrides = [shown(o)[:500] for o in overrides]  # another worker's words: escaped before a table shows them
        result = t.user_attrs.get(METRICS)
        if isinstance(result, dict):
            result = {
                k: shown(v)[:40] if k == "status" else v
                for k, v in result.items()
                if k == "status" or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
            }
        else:
            result = {"status": "running" if t.state == TrialState.RUNNING else "failed"}
        where = Path(str(t.user_attrs.get(JOB_DIR, t.number)))
        job = str(where.relative_to(sweep_dir.resolve())) if where.is_relative_to(sweep_dir.resolve()) else str(where)
        x = dict(o.partition("=")[::2] for o in overrides).get(x_key, "")
        jobs.append((job, overrides, result, x))
    return jobs


def _now() -> float:
    import time

    return time.monotonic()


def _plain(path: Any) -> bool:
    """A path an override can carry as it is (no quote, comma, '=' or space for Hydra's parser to read)."""
    return isinstance(path, str) and re.fullmatch(r"[\w./@+-]{1,1000}", path) is not None


def _job_of(trial: Any) -> dict[str, Any]:
    return {RESUME_FROM: trial.user_attrs[JOB_DIR]} if isinstance(trial.user_attrs.get(JOB_DIR), str) else {}


def rundir_metrics(run_dir: Path) -> dict[str, float | str]:
    """A job's metrics.json: its status and numbers (what the study's summary shows)."""
    from cifarkit.core.untrusted import read_json_object

    data = read_json_object(rundir.metrics_file(run_dir)) or {"status": "failed"}
    return {
        k: v
        for k, v in data.items()
        if (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)) or k == "status"
    }


class Heartbeat:
    """The running trials of this worker show they are alive: a thread moves each one's ``HEARTBEAT``
    user attribute every ``interval`` seconds in the storage, where other workers watch it (Optuna's own
    heartbeat covers only ``study.optimize``, not ask/tell trials, and not its journal storage)."""

    def __init__(self, interval: float) -> None:
        import threading

        self.interval = interval
        self.trials: dict[int, Any] = {}
        self.count = 0
        self.guard = threading.Lock()
        self.stopped = threading.Event()
        self.thread: Any = None

    def holds(self, number: int) -> bool:
        return number in self.trials

    def add(self, trial: Any, storage: Any) -> None:
        with self.guard:
            self.trials[trial.number] = trial
        self._beat(trial)

    def remove(self, trial: Any) -> None:
        with self.guard:
            self.trials.pop(trial.number, None)

    def _beat(self, trial: Any) -> None:
        with contextlib.suppress(Exception):  # told finished meanwhile, or the storage briefly busy: next time
            trial.set_user_attr(HEARTBEAT, self.count)

    def start(self, storage: Any) -> None:
        import threading

        if isinstance(storage, __import__("optuna").storages.InMemoryStorage):
            return  # one process: nobody else to tell
        self.thread = threading.Thread(target=self._loop, name="cifarkit-heartbeat", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval):
            self.count += 1
            with self.guard:
                trials = list(self.trials.values())
            for t in trials:
                self._beat(t)

    def stop(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(timeout=10)


def study_lock(storage: Any, opened: Any, study_name: str) -> Any:
    """A context manager that holds the study against every other worker while one asks for trials or
    fails a stale one: so two workers never ask for the round's last trial both. A journal file or SQLite
    database: a lock file beside it (Optuna's symlink lock, safe on NFS); PostgreSQL: an advisory lock;
    MySQL: GET_LOCK; in memory: none needed."""
    import hashlib

    if not isinstance(storage, str):
        return contextlib.nullcontext
    key = hashlib.sha1(f"cifarkit:{study_name}".encode()).digest()
    if is_journal(storage) or storage.startswith("sqlite:///"):
        from optuna.storages.journal import JournalFileSymlinkLock

        path = Path(storage.removeprefix("sqlite:///")).expanduser()

        @contextlib.contextmanager
        def file_lock() -> Any:
            lock = JournalFileSymlinkLock(f"{path}.{key.hex()[:8]}", grace_period=30)
            lock.acquire()
            try:
                yield
            finally:
                lock.release()

        return file_lock
    from sqlalchemy import text

    engine, dialect = opened.engine, opened.engine.dialect.name
    number = int.from_bytes(key[:8], "big", signed=True)

    @contextlib.contextmanager
    def server_lock() -> Any:
        with engine.connect() as conn:
            if dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": number})
            elif dialect in ("mysql", "mariadb"):
                conn.execute(text("SELECT GET_LOCK(:k, -1)"), {"k": key.hex()[:60]})
            conn.commit()
            try:
                yield
            finally:
                if dialect == "postgresql":
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": number})
                elif dialect in ("mysql", "mariadb"):
                    conn.execute(text("SELECT RELEASE_LOCK(:k)"), {"k": key.hex()[:60]})
                conn.commit()

    return server_lock


def pruned(ret: Any) -> bool:
    """Whether the job's run says its pruner stopped it (its metrics.json, where every job records how it ended)."""
    out = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir", default=None) if ret.hydra_cfg else None
    return out is not None and rundir.status(Path(out)) == "pruned"


def consecutive(trials: list[Any]) -> list[list[Any]]:
    """``trials`` in runs of consecutive numbers (a launch numbers its jobs from its first)."""
    runs: list[list[Any]] = []
    for t in trials:
        if runs and runs[-1][-1].number + 1 == t.number:
            runs[-1].append(t)
        else:
            runs.append([t])
    return runs


def _has_key(config: Any, key: str) -> bool:
    return OmegaConf.select(config, key, default="<absent>", throw_on_resolution_failure=False) != "<absent>"
