"""The project's sweeper (its Search loop) driven by a launcher that trains nothing: each job records its
overrides, may sleep or never return, and returns a value made from its learning rate. A worker is one
``Search`` on a storage, in this process (``search``) or as a separate process (``python sweep_workers.py
<storage> <study> <n_trials> <log> [seconds a job takes] [grace] [trials after which it hangs]``; with
``SWEEP_WORKERS_GO=<file>`` it waits for that file before it starts), so
several workers, races and a killed worker take seconds, not trainings."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

SPACE = {"model.optimizer.lr": "tag(log, interval(1e-5, 1e-1))"}


class FakeLauncher:
    """Runs no job: returns 1 - lr for each, after ``seconds``; appends each job's overrides to ``log``;
    hangs for ever in the job after ``hang_after`` jobs (a worker then killed mid-trial)."""

    def __init__(self, log: Path | None = None, seconds: float = 0.0, hang_after: int | None = None) -> None:
        self.log, self.seconds, self.hang_after = log, seconds, hang_after
        self.jobs: list[list[str]] = []

    def launch(self, job_overrides: list[list[str]], initial_job_idx: int) -> list[JobReturn]:
        returns = []
        for overrides in job_overrides:
            self.jobs.append(list(overrides))
            given = dict(o.split("=", 1) for o in overrides)
            hang = self.hang_after is not None and len(self.jobs) > self.hang_after
            if hang and self.log is not None:  # a checkpoint its re-run continues from (before the line says so)
                import torch

                ckpt = self.log.parent / "sweep" / given["optuna_trial"] / "checkpoints" / "last.ckpt"
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"global_step": 3, "state_dict": {}}, ckpt)
            if self.log is not None:
                with open(self.log, "a") as f:
                    f.write(json.dumps(overrides) + "\n")
            if hang:
                time.sleep(3600)  # stuck until killed
            time.sleep(self.seconds)
            ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
            ret.return_value = 1.0 - float(given.get("model.optimizer.lr", 0.5))
            returns.append(ret)
        return returns


def sweeper(storage: Any, study: str, n_trials: int, **options: Any) -> SimpleNamespace:
    """What Hydra would instantiate for hydra/sweeper=optuna: its config's defaults, a seeded random sampler."""
    import optuna

    return SimpleNamespace(
        **{
            "sampler": optuna.samplers.RandomSampler(seed=options.pop("seed", 0)),
            "pruner": None,
            "direction": "maximize",
            "storage": storage,
            "study_name": study,
            "n_trials": n_trials,
            "n_jobs": 1,
            "max_failure_rate": 0.0,
            "params": dict(SPACE),
            "custom_search_space": None,
            "heartbeat_interval": 30.0,
            "grace_period": 180.0,
            **options,
        }
    )


def search(storage: Any, study: str, n_trials: int, launcher: FakeLauncher, sweep_dir: Path, **options: Any) -> None:
    from hydra_plugins.cifarkit_optuna_sweeper._study import Search

    sweep_dir.mkdir(parents=True, exist_ok=True)  # Hydra's launcher makes it before the first job
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}, "optuna_trial": None})
    Search(sweeper(storage, study, n_trials, **options), launcher, config, []).run()


if __name__ == "__main__":
    storage, study, n_trials, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    seconds = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    grace = float(sys.argv[6]) if len(sys.argv) > 6 else 180.0
    hang = int(sys.argv[7]) if len(sys.argv) > 7 else None
    launcher = FakeLauncher(log, seconds, hang)
    go = os.environ.get("SWEEP_WORKERS_GO")  # start together: say ready, then wait for the word
    if go:
        Path(f"{go}.{os.getpid()}").touch()
        while not Path(go).exists():
            time.sleep(0.01)
    search(
        storage,
        study,
        n_trials,
        launcher,
        log.parent / "sweep",
        grace_period=grace,
        heartbeat_interval=grace / 4,
        seed=None,
    )
