"""What a multirun leaves behind besides its jobs: a summary table and plot, and a resumable study.

* ``SweepSummary`` (a Hydra callback, registered in configs/hydra/default.yaml): after any
  multirun (grid or Optuna) it reads each job's ``.hydra/overrides.yaml`` and ``metrics.json``
  from disk, so it works whatever launcher ran the jobs, and writes in the sweep directory
  ``jobs.csv`` (one row per job), ``summary.csv`` (one row per configuration: jobs that differ
  only in ``seed`` are grouped, with each metric's mean, standard deviation and n, as airbench
  reports its records) and ``summary.png``, and prints the table. A job without a
  ``metrics.json`` (killed, or crashed before writing one) is listed as failed.
* ``study_seed`` (the ``${study_seed:...}`` resolver): the Optuna sampler's seed plus the
  study's trial count, so that rerunning an interrupted search continues it instead of
  replaying its first (random start-up) trials, and a search stays repeatable.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import math
import statistics
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from cifarkit.core import rundir
from cifarkit.core.errors import UserError
from cifarkit.core.untrusted.plain import read_yaml

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
        saved = read_yaml(ov_file)
        overrides = [str(o) for o in saved] if isinstance(saved, ListConfig) else []
        given = dict(o.partition("=")[::2] for o in overrides)
        result = rundir.read_metrics(job_dir) or {"status": "failed"}
        x = given.get(x_key)
        if x is None:  # not overridden: the job's own config says
            job_cfg = read_yaml(job_dir / ".hydra" / "config.yaml")
            x = OmegaConf.select(job_cfg, x_key, default="", throw_on_resolution_failure=False) if job_cfg else ""
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


def by_config(rows: list[Row], varying: list[str], metrics: list[str], x_key: str) -> list[Row]:
    """One row per configuration (the varying overrides but ``seed``, and ``x_key``): how many
    jobs completed (n), failed, were pruned (a column only when some were), and each metric's
    mean and sample standard deviation over the completed ones."""
    keys = list(dict.fromkeys([*(k for k in varying if k != "seed"), x_key]))
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(str(row.get(k, "")) for k in keys), []).append(row)
    out = []
    any_pruned = any(r["status"] == "pruned" for r in rows)  # an Optuna search with a pruner: counted apart
    for key, members in groups.items():
        done = [r for r in members if r["status"] == "completed"]
        pruned = sum(r["status"] == "pruned" for r in members)
        rest = "pruned" if pruned == len(members) - len(done) and pruned else "failed"
        status = "completed" if len(done) == len(members) else f"partly {rest}" if done else rest
        row: Row = dict(zip(keys, key)) | {
            "status": status,
            "n": len(done),
            "failed": len(members) - len(done) - pruned,
        }
        if any_pruned:
            row["pruned"] = pruned
        for m in metrics:
            values = [v for v in (_number(r[m]) for r in done) if v is not None]
            row[m] = statistics.fmean(values) if values else ""
            row[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else ""
        row["jobs"] = " ".join(r["job"] for r in members)
        out.append(row)
    return out


def write_csv(rows: list[Row], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _positive(value: Any) -> float | None:
    x = _number(value)
    return x if x is not None and x > 0 else None


def plot(configs: list[Row], metrics: list[str], x_key: str, path: Path) -> None:
    """Each metric's mean (error bars: standard deviation over seeds) against ``x_key`` on a log
    axis when it varies, else one group of bars per configuration; failed ones as red crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    along_x = len({_positive(c[x_key]) for c in configs} - {None}) >= 2
    done = [c for c in configs if c["n"]]
    if along_x:
        done = sorted((c for c in done if _positive(c[x_key])), key=lambda c: _positive(c[x_key]))
        where = [_positive(c[x_key]) for c in done]
        failed = [_positive(c[x_key]) for c in configs if not c["n"] and not c.get("pruned") and _positive(c[x_key])]
        pruned = [_positive(c[x_key]) for c in configs if not c["n"] and c.get("pruned") and _positive(c[x_key])]
        ax.set_xscale("log")
        ax.set_xlabel(x_key)
    else:
        where = list(range(len(done)))
        failed, pruned = [], []
        ax.set_xticks(where, [_config_label(c, x_key) for c in done], rotation=20, ha="right", fontsize=7)
    for i, m in enumerate(metrics):
        pts = [
            (x, _number(c[m]), _number(c[f"{m}_std"]) or 0.0) for x, c in zip(where, done) if _number(c[m]) is not None
        ]
        if not pts:
            continue
        xs, ys, errs = zip(*pts)
        if not along_x:
            xs = [x + (i - (len(metrics) - 1) / 2) * 0.15 for x in xs]
        ax.errorbar(xs, ys, yerr=errs, fmt="o-" if along_x else "o", capsize=3, label=m)
    if failed:
        ax.plot(failed, [0.0] * len(failed), "rx", markersize=9, label="failed")
    if pruned:
        ax.plot(pruned, [0.0] * len(pruned), "x", color="grey", markersize=9, label="pruned")
    n = sorted({c["n"] for c in done})
    ax.set(
        ylabel="metric (mean, bars: std)",
        title=f"sweep {path.parent.name} (n = {'/'.join(map(str, n)) or 0} per point)",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _config_label(config: Row, x_key: str) -> str:
    keys = [
        k
        for k in config
        if k not in ("status", "n", "failed", "pruned", "jobs") and not k.endswith("_std") and "/" not in k
    ]
    return " ".join(f"{k}={config[k]}" for k in keys if config[k] != "") or "all jobs"


def _mean_std(config: Row, metric: str) -> str:
    mean, std = _number(config[metric]), _number(config[f"{metric}_std"])
    if mean is None:
        return ""
    return f"{mean:.4f} ± {std:.4f} (n={config['n']})" if std is not None else f"{mean:.4f} (n={config['n']})"


def print_table(rows: list[Row], columns: list[str], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, overflow="fold")
    for r in rows:
        cells = [f"{_number(r[c]):.4g}" if _number(r[c]) is not None and c != "job" else str(r[c]) for c in columns]
        table.add_row(*cells, style=None if r["status"] == "completed" else "dim" if r["status"] == "pruned" else "red")
    Console().print(table)


class SweepSummary(Callback):
    """Write ``summary.csv`` / ``summary.png`` in the sweep directory and print the table."""

    def __init__(self, metrics: list[str], x: str) -> None:
        """``metrics``: the columns summarized; ``x``: the override plotted along the x axis
        (configs/hydra/default.yaml sets both)."""
        self.metrics = list(metrics)
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
        write_csv(rows, sweep_dir / "jobs.csv")
        configs = by_config(rows, varying, self.metrics, self.x)
        write_csv(configs, sweep_dir / "summary.csv")
        plot(configs, self.metrics, self.x, sweep_dir / "summary.png")
        columns = ["job", "status", *dict.fromkeys([*varying, self.x]), *self.metrics, "epochs"]
        completed = sum(r["status"] == "completed" for r in rows)
        pruned = sum(r["status"] == "pruned" for r in rows)
        print_table(
            rows,
            columns,
            f"sweep {sweep_dir.name}: {completed}/{len(rows)} completed" + (f", {pruned} pruned" if pruned else ""),
        )
        if len(configs) < len(rows):  # seeds grouped: the statistics per configuration too
            stats = [c | {m: _mean_std(c, m) for m in self.metrics} for c in configs]
            columns = [k for k in configs[0] if k not in self.metrics and not k.endswith("_std") and k != "jobs"]
            print_table(stats, [*columns, *self.metrics], f"sweep {sweep_dir.name}: mean ± std over seeds")
        log.info("summary: %s, %s and summary.png", sweep_dir / "summary.csv", sweep_dir / "jobs.csv")


def study_seed(seed: int, storage: str | None, study_name: str | None) -> int:
    """``seed`` plus the number of trials the stored study already has (0 for a new study)."""
    from hydra_plugins.cifarkit_optuna_sweeper._study import study_trial_count

    return int(seed) + study_trial_count(storage, study_name)


def check_sweeper() -> None:
    """Before a search starts: the Optuna sweeper Hydra finds is this project's (pip leaves the old
    hydra-optuna-sweeper installed, and its config of the same name would shadow ours)."""
    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None:
        raise UserError(
            "hydra-optuna-sweeper (Optuna 2 only) is still installed and shadows cifarkit's Optuna sweeper: "
            "pip uninstall hydra-optuna-sweeper"
        )
