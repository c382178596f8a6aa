"""What a multirun leaves behind besides its jobs: a summary table and plot, and a resumable study.

* ``SweepSummary`` (a Hydra callback, registered in configs/hydra/default.yaml): after any
  multirun (grid or Optuna) it reads each job's ``.hydra/overrides.yaml`` and ``metrics.json``
  from disk, so it works whatever launcher ran the jobs, and writes ``summary.csv`` and
  ``summary.png`` (metric against learning rate) in the sweep directory, and prints the table.
  A job without a ``metrics.json`` (killed, or crashed before writing one) is listed as failed.
* ``study_seed`` (the ``${study_seed:...}`` resolver): the Optuna sampler's seed plus the
  study's trial count, so that rerunning an interrupted search continues it instead of
  replaying its first (random start-up) trials, and a search stays repeatable.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
Row = dict[str, Any]


def _job_key(job: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in Path(job).parts)


def _number(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def collect(sweep_dir: Path, metrics: list[str], x_key: str) -> tuple[list[Row], list[str]]:
    """One row per job directory under ``sweep_dir``, and the override keys that vary across jobs."""
    jobs = []
    for ov_file in sweep_dir.rglob(".hydra/overrides.yaml"):
        job_dir = ov_file.parent.parent
        overrides = [str(o) for o in OmegaConf.load(ov_file)]
        given = dict(o.partition("=")[::2] for o in overrides)
        metrics_file = job_dir / "metrics.json"
        result = json.loads(metrics_file.read_text()) if metrics_file.exists() else {"status": "failed"}
        x = given.get(x_key)
        if x is None:  # not overridden: the job's own config says
            job_cfg = OmegaConf.load(job_dir / ".hydra" / "config.yaml")
            x = OmegaConf.select(job_cfg, x_key, default="", throw_on_resolution_failure=False)
        jobs.append((str(job_dir.relative_to(sweep_dir)), overrides, given, result, x))
    jobs.sort(key=lambda j: _job_key(j[0]))

    keys = dict.fromkeys(k for j in jobs for k in j[2])
    varying = [k for k in keys if len({j[2].get(k) for j in jobs}) > 1]
    rows = []
    for job, overrides, given, result, x in jobs:
        row: Row = {"job": job, "status": result.get("status", "unknown")}
        row |= {k: given.get(k, "") for k in varying}
        row[x_key] = x
        row |= {m: result.get(m, "") for m in metrics}
        row["epochs"] = result.get("epochs", "")
        row["overrides"] = " ".join(overrides)
        rows.append(row)
    return rows, varying


def write_csv(rows: list[Row], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _positive(value: Any) -> float | None:
    x = _number(value)
    return x if x is not None and x > 0 else None


def plot(rows: list[Row], metrics: list[str], x_key: str, path: Path) -> bool:
    """Each metric against ``x_key`` (log axis), failed jobs as red crosses at 0; False if x does not vary."""
    if len({_positive(r[x_key]) for r in rows} - {None}) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    done = sorted((r for r in rows if r["status"] == "completed" and _positive(r[x_key])), key=lambda r: _positive(r[x_key]))
    for m in metrics:
        pts = [(_positive(r[x_key]), _number(r[m])) for r in done if _number(r[m]) is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", label=m)
    failed = [_positive(r[x_key]) for r in rows if r["status"] != "completed" and _positive(r[x_key])]
    if failed:
        ax.plot(failed, [0.0] * len(failed), "rx", markersize=9, label="failed")
    ax.set_xscale("log")
    ax.set(xlabel=x_key, ylabel="metric", title=f"sweep {path.parent.name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def print_table(rows: list[Row], columns: list[str], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, overflow="fold")
    for r in rows:
        cells = [f"{_number(r[c]):.4g}" if _number(r[c]) is not None and c != "job" else str(r[c]) for c in columns]
        table.add_row(*cells, style="red" if r["status"] != "completed" else None)
    Console().print(table)


class SweepSummary(Callback):
    """Write ``summary.csv`` / ``summary.png`` in the sweep directory and print the table."""

    def __init__(self, metrics: list[str] | None = None, x: str = "model.optimizer.lr") -> None:
        self.metrics = list(metrics or ["val/acc_best", "test/acc"])
        self.x = x

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Optuna's SQLite storage creates its file but not the folder it lives in.
        storage = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
        if isinstance(storage, str) and storage.startswith("sqlite:///"):
            Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows, varying = collect(sweep_dir, self.metrics, self.x)
        if not rows:
            log.warning("no jobs found in %s; no summary written", sweep_dir)
            return
        write_csv(rows, sweep_dir / "summary.csv")
        plotted = plot(rows, self.metrics, self.x, sweep_dir / "summary.png")
        columns = ["job", "status", *dict.fromkeys([*varying, self.x]), *self.metrics, "epochs"]
        completed = sum(r["status"] == "completed" for r in rows)
        print_table(rows, columns, f"sweep {sweep_dir.name}: {completed}/{len(rows)} completed")
        log.info("summary: %s%s", sweep_dir / "summary.csv", " and summary.png" if plotted else "")


def study_seed(seed: int, storage: str | None, study_name: str | None) -> int:
    """``seed`` plus the number of trials the stored study already has (0 for a new study)."""
    if not storage or not study_name:
        return int(seed)
    import optuna

    try:
        return int(seed) + len(optuna.load_study(study_name=study_name, storage=storage).trials)
    except KeyError:  # no such study yet: this run creates it
        return int(seed)


def register_resolvers() -> None:
    """``${study_seed:SEED,STORAGE,STUDY}`` for the sweeper's sampler seed (configs/hparams_search)."""
    OmegaConf.register_new_resolver("study_seed", study_seed, replace=True)
