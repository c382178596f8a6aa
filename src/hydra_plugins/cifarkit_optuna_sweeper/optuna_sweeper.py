"""The sweeper Hydra instantiates for ``hydra/sweeper=optuna``; the work is study.Search (beside it)."""

from __future__ import annotations

from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    """Ask the study for trials, launch them as jobs (any Hydra launcher), tell it how each went."""

    def __init__(
        self,
        sampler: Any,
        direction: Any,
        storage: Any,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        params: DictConfig | None,
        custom_search_space: str | None = None,
        pruner: Any = None,
        heartbeat_interval: float = 30.0,
        grace_period: float = 180.0,
    ) -> None:
        if not 0.0 <= max_failure_rate <= 1.0:
            raise ValueError(f"hydra.sweeper.max_failure_rate={max_failure_rate}: a rate from 0.0 to 1.0")
        if not 0 < heartbeat_interval < grace_period:
            raise ValueError(
                f"hydra.sweeper.heartbeat_interval={heartbeat_interval}, grace_period={grace_period}: "
                "an interval above 0 and shorter than the grace period"
            )
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
        self.sampler, self.pruner, self.direction = sampler, pruner, direction
        self.storage, self.study_name = storage, study_name
        self.n_trials, self.n_jobs, self.max_failure_rate = n_trials, n_jobs, max_failure_rate
        self.params, self.custom_search_space = params, custom_search_space
        self.config: DictConfig | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def sweep(self, arguments: list[str]) -> None:
        from hydra_plugins.cifarkit_optuna_sweeper._study import Search

        assert self.config is not None
        Search(self, self.launcher, self.config, arguments).run()
