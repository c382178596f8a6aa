"""Optuna studies for ``hparams_search=...``: which storage a ``storage`` string means, the search
space from Hydra's override syntax, and the ask/tell loop of the project's sweeper
(hydra_plugins/cifarkit_optuna_sweeper, ``hydra/sweeper=optuna``).

* Storage: ``sqlite:///...`` or any SQLAlchemy URL is Optuna's RDB storage; a plain path (no
  ``://``) is Optuna's journal file, which many processes on a shared disk can append to; null
  is a study in this process's memory. A database written by Optuna 2 (the old
  hydra-optuna-sweeper) is refused in one line that gives the ``optuna storage upgrade`` command.
* Trials: each job gets its trial's number as ``optuna_trial=<n>``; its ``callbacks.optuna_pruning``
  (_pruning.py beside this) reports to that trial after every validation and stops the job when the
  study's pruner says so. Such a job's metrics.json says ``status: pruned``, and the sweeper tells it as PRUNED.
* Many workers: ``n_trials`` is the number of trials a round of the study runs. A sweep that
  finds the study's last round done starts a new one (``n_trials`` more trials); one that finds
  it unfinished (another worker still at it, or an interrupted search) joins it. So two
  processes started on one storage share ``n_trials``, and a rerun after an interruption finishes
  the search. A trial number is never run twice: the storage hands them out.

Lightning-free; Optuna is imported when a sweep or a trial needs it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from cifarkit.core import rundir
from cifarkit.core.errors import UserError

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)
ROUND = "cifarkit:round_end"  # the study's user attribute: the trial number the current round stops before
TRIAL_KEY = "optuna_trial"  # the config key a job reads its trial number from
# storage: null: this process's studies, each with its in-memory storage, for its in-process jobs
_COUNTED: dict[tuple[str, str | None], int] = {}  # the trial count each study's sampler seed was read at
_IN_MEMORY: dict[str, tuple[optuna.Study, optuna.storages.BaseStorage]] = {}


def is_journal(storage: str) -> bool:
    return "://" not in storage


def open_storage(storage: Any) -> Any:
    """An Optuna storage for a ``storage`` string (see the module's doc), or the value itself
    when it is already a storage object or None."""
    if not isinstance(storage, str):
        return storage
    import optuna
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend
    from sqlalchemy.exc import IntegrityError

    if is_journal(storage):
        path = Path(storage).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if storage.startswith("sqlite:///"):  # SQLite creates its file but not the folder it lives in
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else None
    try:
        try:
            return RDBStorage(storage, engine_kwargs=engine)
        except IntegrityError:  # another process created the schema at the same moment: it is there now
            return RDBStorage(storage, engine_kwargs=engine)
    except RuntimeError as e:  # an older Optuna's schema
        if "optuna storage upgrade" not in str(e):
            raise
        old = str(e).split("(set up by optuna ", 1)[-1].split(")", 1)[0]
        raise UserError(
            f"the Optuna study storage {storage} was written by Optuna {old} and this is Optuna {optuna.__version__}: "
            f"upgrade it once with `optuna storage upgrade --storage {storage}` (back the file up first), then run "
            "again"
        ) from None


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
        study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner)
    study_id = storage.get_study_id_from_name(study.study_name)
    return optuna.trial.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, number))


def study_trial_count(storage: Any, study_name: str | None) -> int:
    """How many trials the stored study has (0 when there is no such study yet)."""
    if not storage or not study_name:
        return 0
    import optuna

    try:
        count = len(optuna.load_study(study_name=study_name, storage=open_storage(storage)).get_trials(deepcopy=False))
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
        storage = open_storage(self.s.storage)
        if storage is None and (self.s.study_name or "") in _IN_MEMORY:
            study = _IN_MEMORY[self.s.study_name or ""][0]
            study.sampler, study.pruner = sampler or study.sampler, pruner
        else:
            memory = optuna.storages.InMemoryStorage() if storage is None else None
            study = optuna.create_study(
                study_name=self.s.study_name,
                storage=storage if memory is None else memory,
                sampler=sampler,
                pruner=pruner,
                directions=self.directions,
                load_if_exists=True,
            )
            if memory is not None:
                _IN_MEMORY[self.s.study_name or ""] = (study, memory)
        self.n_trials = n_trials
        return study

    def run(self) -> None:
        from optuna.trial import TrialState

        study = self.study()
        trials = study.get_trials(deepcopy=False)
        end = study.user_attrs.get(ROUND)
        if end is None or len(trials) >= end:
            end = len(trials) + self.n_trials
            study.set_user_attr(ROUND, end)
            log.info("study %s (%s): trials %d to %d", study.study_name, self.s.storage, len(trials), end - 1)
        else:
            log.info(
                "study %s (%s): joining its unfinished round, trials up to %d (%d started)",
                study.study_name,
                self.s.storage,
                end - 1,
                len(trials),
            )
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
        while True:
            batch = []
            for _ in range(max(1, self.s.n_jobs)):
                if len(study.get_trials(deepcopy=False)) >= end:
                    break
                trial = study.ask()
                if trial.number >= end:  # another worker asked for the round's last trials at the same moment
                    trial.set_user_attr("cifarkit", "not run: its round already had n_trials")
                    study.tell(trial, state=TrialState.FAIL)
                    break
                if trial.number != next_number and not reseeded:
                    # Another worker asked in between: started together with this one from the same
                    # study, it has the same seed, and would sample the same values.
                    study.sampler.reseed_rng()
                    reseeded = True
                next_number = trial.number + 1
                batch.append(trial)
            if not batch:
                break
            try:
                returns = []
                for run in consecutive(batch):  # job <n> is trial <n>: workers sharing a sweep folder never clash
                    returns += self.launcher.launch([self.overrides(t) for t in run], initial_job_idx=run[0].number)
            except BaseException:  # Ctrl-C, SIGTERM, a launcher error: these trials end FAIL, not RUNNING forever
                for t in batch:
                    with contextlib.suppress(Exception):
                        study.tell(t, state=TrialState.FAIL)
                raise
            failures = [self.tell(study, t, r) for t, r in zip(batch, returns)]
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
        self.report(study)

    def overrides(self, trial: optuna.trial.Trial) -> list[str]:
        """The job's overrides: the trial's suggested values, the fixed ones, and its number."""
        for name, dist in self.space.items():
            suggest(trial, name, dist)
        for name, value in self.fixed.items():
            trial.set_user_attr(name, value)
        if self.extend is not None:
            self.extend(self.config, trial)
        overlap = trial.params.keys() & self.fixed.keys()
        if overlap:
            raise UserError(f"both searched and fixed: {sorted(overlap)}")
        params = {**trial.params, **self.fixed}
        return [*(f"{k}={v}" for k, v in params.items()), f"{self.trial_key}={trial.number}"]

    def tell(self, study: optuna.Study, trial: optuna.trial.Trial, ret: Any) -> BaseException | None:
        """Tell the study how the job went: COMPLETE, PRUNED, or FAIL (returned)."""
        from optuna.trial import TrialState

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
