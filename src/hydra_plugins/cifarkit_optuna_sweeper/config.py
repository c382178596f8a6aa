"""``hydra/sweeper=optuna`` and its groups ``hydra/sweeper/sampler`` and ``hydra/sweeper/pruner``.

The keys are those of hydra-optuna-sweeper 1.3 (``storage``, ``study_name``, ``direction``,
``n_trials``, ``n_jobs``, ``max_failure_rate``, ``sampler``, ``params``, ``custom_search_space``),
so a search config written for it needs no edit; ``pruner`` is new. Every sampler and pruner is
Optuna's own class, instantiated from its ``_target_``: any other one (or any argument) can be
given the same way.
"""

# No ``from __future__ import annotations``: Hydra's plugin scanner runs this module before it is in
# sys.modules, where dataclasses cannot resolve string annotations.
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TPESamplerConfig:
    """optuna.samplers.TPESampler (Optuna's default)."""

    _target_: str = "optuna.samplers.TPESampler"
    seed: int | None = None
    n_startup_trials: int = 10
    n_ei_candidates: int = 24
    multivariate: bool = False
    constant_liar: bool = False  # true: parallel workers' running trials count as bad, so they spread out


@dataclass
class RandomSamplerConfig:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: int | None = None


@dataclass
class CmaEsSamplerConfig:
    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: int | None = None
    n_startup_trials: int = 1
    sigma0: float | None = None
    consider_pruned_trials: bool = False


@dataclass
class NSGAIISamplerConfig:
    _target_: str = "optuna.samplers.NSGAIISampler"
    seed: int | None = None
    population_size: int = 50


@dataclass
class GridSamplerConfig:
    """Every combination of the params' values (choice, range, or an interval with a step);
    ``n_trials`` is capped at their number."""

    _target_: str = "optuna.samplers.GridSampler"
    _partial_: bool = True  # the grid comes from hydra.sweeper.params when the sweep starts
    seed: int | None = None


@dataclass
class NopPrunerConfig:
    """No pruning (every trial runs to its end); the jobs still report each validation."""

    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class MedianPrunerConfig:
    """Stop a trial whose best value so far is worse than the median of the earlier trials' at
    the same epoch."""

    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5  # trials that run to their end before any is pruned
    n_warmup_steps: int = 0  # epochs a trial trains before it can be pruned
    interval_steps: int = 1
    n_min_trials: int = 1


@dataclass
class PercentilePrunerConfig(MedianPrunerConfig):
    """Like median, at another percentile: 25.0 keeps only trials in the best quarter."""

    _target_: str = "optuna.pruners.PercentilePruner"
    percentile: float = 25.0


@dataclass
class SuccessiveHalvingPrunerConfig:
    """Asynchronous successive halving: at epochs min_resource * reduction_factor**k a trial goes
    on only if it is in the best 1/reduction_factor of the trials that got there."""

    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = 1  # epochs; "auto": a hundredth of the first finished trial's
    reduction_factor: int = 3
    min_early_stopping_rate: int = 0
    bootstrap_count: int = 0


@dataclass
class HyperbandPrunerConfig:
    """Several successive-halving brackets, from aggressive to none."""

    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"  # epochs; "auto": the first finished trial's
    reduction_factor: int = 3
    bootstrap_count: int = 0


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.cifarkit_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}])

    sampler: Any = MISSING
    # Stops losing trials after a validation (the job's callbacks.optuna_pruning reports to it).
    pruner: Any = MISSING
    # "minimize" or "maximize", or a list of them for several objectives (no pruning then)
    direction: Any = "minimize"
    # sqlite:///path.db, any SQLAlchemy URL (postgresql://..., mysql://...), a path to an Optuna
    # journal file (many processes on a shared disk), or null (in memory, this process only)
    storage: Any | None = None
    study_name: str | None = None
    # trials this command adds to the study; processes started on the same storage share them
    n_trials: int = 20
    # trials asked for, and launched, at a time (a SLURM array of this many jobs with hydra/launcher=slurm)
    n_jobs: int = 2
    # failed trials allowed in a batch of n_jobs before the sweep stops
    max_failure_rate: float = 0.0
    # the search space in Hydra's override syntax: interval(), tag(log, interval()), choice(), range()
    params: dict[str, str] | None = None
    # a function (config, optuna.trial.Trial) -> None that suggests more parameters, as a dotted path
    custom_search_space: str | None = None
    # seconds between a worker's heartbeats for its running trials (kept in the storage)
    heartbeat_interval: float = 30.0
    # seconds without a heartbeat after which another worker fails a running trial and queues it again
    grace_period: float = 180.0


store = ConfigStore.instance()
store.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="cifarkit")
for name, node in [
    ("tpe", TPESamplerConfig),
    ("random", RandomSamplerConfig),
    ("cmaes", CmaEsSamplerConfig),
    ("nsgaii", NSGAIISamplerConfig),
    ("grid", GridSamplerConfig),
]:
    store.store(group="hydra/sweeper/sampler", name=name, node=node, provider="cifarkit")
for name, node in [
    ("none", NopPrunerConfig),
    ("median", MedianPrunerConfig),
    ("percentile", PercentilePrunerConfig),
    ("successive_halving", SuccessiveHalvingPrunerConfig),
    ("hyperband", HyperbandPrunerConfig),
]:
    store.store(group="hydra/sweeper/pruner", name=name, node=node, provider="cifarkit")
