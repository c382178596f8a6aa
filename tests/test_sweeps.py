"""Multirun summaries (grid and Optuna), a resumable Optuna study, and the SLURM launcher preset."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from conftest import FAST, compose, folder_overrides

# Fewer batches than FAST alone: a sweep runs several of these.
TINY = FAST + ["+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1"]


def summarize(tmp_path: Path, sweep: Path) -> None:
    """What Hydra does after a multirun: the configured SweepSummary callback's end hook."""
    summary = instantiate(compose(tmp_path, [], with_hydra=True).hydra.callbacks.sweep_summary)
    summary.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))


def read_jobs(sweep_dir: Path, name: str = "jobs.csv") -> list[dict]:
    with open(sweep_dir / name) as f:
        return list(csv.DictReader(f))


def assert_rows_match_jobs(sweep_dir: Path, rows: list[dict]) -> None:
    """Each jobs.csv row says what its job's own files say: its overrides, status and metrics."""
    for row in rows:
        job = sweep_dir / row["job"]
        assert row["overrides"] == " ".join(OmegaConf.load(job / ".hydra" / "overrides.yaml"))
        done = job / "metrics.json"
        metrics = json.loads(done.read_text()) if done.exists() else {"status": "failed"}  # killed: no file
        assert row["status"] == metrics["status"], row
        for key in ("val/acc_best", "test/acc", "epochs"):
            assert (float(row[key]) == metrics[key]) if key in metrics else row[key] == "", (key, row)


def assert_plot(path: Path) -> None:
    """summary.png is a drawn figure, not an empty or blank file."""
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= 300, im.size
        pixels = np.asarray(im.convert("RGB")).astype(np.int32)
    assert len(np.unique(pixels @ np.array([1 << 16, 1 << 8, 1]))) > 50  # axes, text, coloured lines


def sweep_dirs(log_dir: Path) -> list[Path]:
    return sorted(p for p in (log_dir / "train" / "multiruns").glob("*") if p.is_dir())


def fake_job(sweep: Path, job: str, lr: str, metrics: dict | None, seed: int | None = None) -> None:
    d = sweep / job
    (d / ".hydra").mkdir(parents=True)
    seeded = f"- seed={seed}\n" if seed is not None else ""
    (d / ".hydra" / "overrides.yaml").write_text(f"- trainer=cpu\n- model.optimizer.lr={lr}\n{seeded}")
    (d / ".hydra" / "config.yaml").write_text(f"model:\n  optimizer:\n    lr: {lr}\n")
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))


def test_summary_lists_every_job_and_marks_failures(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = tmp_path / "sweep"
    fake_job(sweep, "0", "0.01", {"status": "completed", "val/acc_best": 0.5, "test/acc": 0.4, "epochs": 3})
    fake_job(sweep, "1", "0.001", {"status": "failed", "error": "boom"})
    fake_job(sweep, "2", "0.0001", None)  # killed before writing metrics.json
    fake_job(sweep, "10", "0.1", {"status": "completed", "val/acc_best": 0.25, "test/acc": 0.2, "epochs": 3})
    summarize(tmp_path, sweep)

    rows = read_jobs(sweep)
    assert list(rows[0]) == ["job", "status", "model.optimizer.lr", "val/acc_best", "test/acc", "epochs", "overrides"]
    assert [r["job"] for r in rows] == ["0", "1", "2", "10"]
    assert [r["status"] for r in rows] == ["completed", "failed", "failed", "completed"]
    assert [r["model.optimizer.lr"] for r in rows] == ["0.01", "0.001", "0.0001", "0.1"]
    assert rows[0]["val/acc_best"] == "0.5" and rows[0]["test/acc"] == "0.4" and rows[0]["epochs"] == "3"
    assert rows[1]["val/acc_best"] == "" and "trainer=cpu" in rows[1]["overrides"]
    assert "trainer=cpu" not in rows[0]  # the same in every job: not a column of its own
    assert_rows_match_jobs(sweep, rows)
    assert_plot(sweep / "summary.png")
    assert "2/4 completed" in capsys.readouterr().out


def test_jobs_differing_only_in_seed_are_summarized_with_mean_std_and_n(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sweep = tmp_path / "sweep"
    accs = {"0.01": [0.50, 0.54, 0.58], "0.001": [0.60, 0.70]}
    job = 0
    for lr, values in accs.items():
        for seed, acc in enumerate(values):
            fake_job(
                sweep,
                str(job),
                lr,
                {"status": "completed", "val/acc_best": acc, "test/acc": acc - 0.1, "epochs": 2},
                seed,
            )
            job += 1
    fake_job(sweep, str(job), "0.001", {"status": "failed", "error": "NaN"}, seed=2)  # not counted in n
    summarize(tmp_path, sweep)

    assert len(read_jobs(sweep)) == 6
    configs = read_jobs(sweep, "summary.csv")
    assert list(configs[0]) == [
        "model.optimizer.lr",
        "status",
        "n",
        "failed",
        "val/acc_best",
        "val/acc_best_std",
        "test/acc",
        "test/acc_std",
        "jobs",
    ]
    first, second = configs
    assert (first["model.optimizer.lr"], first["n"], first["failed"], first["jobs"]) == ("0.01", "3", "0", "0 1 2")
    assert float(first["val/acc_best"]) == pytest.approx(0.54) and float(first["val/acc_best_std"]) == pytest.approx(
        0.04
    )
    assert float(first["test/acc"]) == pytest.approx(0.44) and float(first["test/acc_std"]) == pytest.approx(0.04)
    assert (second["n"], second["failed"], second["status"]) == ("2", "1", "partly failed")
    assert float(second["val/acc_best"]) == pytest.approx(0.65) and float(second["val/acc_best_std"]) == pytest.approx(
        0.0707107
    )
    assert_plot(sweep / "summary.png")
    out = capsys.readouterr().out
    assert "mean ± std over seeds" in out and "0.5400" in out


def test_one_configuration_over_seeds_still_gets_a_plot(tmp_path: Path) -> None:
    """``-m experiment=... seed=0,1,2``: nothing but the seed varies, so one bar group, one row."""
    sweep = tmp_path / "sweep"
    for seed, acc in enumerate([0.9, 0.92, 0.94]):
        fake_job(
            sweep, str(seed), "0.001", {"status": "completed", "val/acc_best": acc, "test/acc": acc, "epochs": 10}, seed
        )
    summarize(tmp_path, sweep)
    (config,) = read_jobs(sweep, "summary.csv")
    assert (
        config["n"] == "3"
        and float(config["test/acc"]) == pytest.approx(0.92)
        and float(config["test/acc_std"]) == pytest.approx(0.02)
    )
    assert_plot(sweep / "summary.png")


@pytest.mark.slow  # a sweep of several jobs through the command line
def test_grid_sweep_summary_with_a_failed_job(image_folder: Path, tmp_path: Path, main) -> None:
    logs = tmp_path / "logs"
    lrs = "model.optimizer.lr=1e-2,1e-3,-1"  # Adam rejects -1: that job fails
    r = main("train.py", ["-m", *TINY, *folder_overrides(image_folder, tmp_path), f"paths.log_dir={logs}", lrs])
    assert r.code == 0, r.err[-3000:]  # the failed job does not end the sweep
    (sweep,) = sweep_dirs(logs)
    rows = read_jobs(sweep)
    assert [(r["job"], r["model.optimizer.lr"], r["status"]) for r in rows] == [
        ("0", "0.01", "completed"),
        ("1", "0.001", "completed"),
        ("2", "-1", "failed"),
    ]
    assert list(rows[0]) == ["job", "status", "model.optimizer.lr", "val/acc_best", "test/acc", "epochs", "overrides"]
    assert all(
        0 <= float(r["val/acc_best"]) <= 1 and 0 <= float(r["test/acc"]) <= 1 and r["epochs"] == "1" for r in rows[:2]
    )
    assert_rows_match_jobs(sweep, rows)
    assert rows[2]["val/acc_best"] == rows[2]["test/acc"] == ""
    assert "Invalid learning rate" in json.loads((sweep / "2" / "metrics.json").read_text())["error"]
    configs = read_jobs(sweep, "summary.csv")  # no seeds: one configuration per job
    assert [(c["model.optimizer.lr"], c["n"], c["status"]) for c in configs] == [
        ("0.01", "1", "completed"),
        ("0.001", "1", "completed"),
        ("-1", "0", "failed"),
    ]
    assert [float(c["test/acc"]) for c in configs[:2]] == [float(r["test/acc"]) for r in rows[:2]]
    assert_plot(sweep / "summary.png")
    assert "2/3 completed" in r.out


def test_local_sweep_with_ddp_script_launcher_is_refused(image_folder: Path, tmp_path: Path, main) -> None:
    """Plain ddp starts rank 1 by re-running the command line, which inside -m would re-run the sweep."""
    logs = tmp_path / "logs"
    args = [
        "-m",
        *TINY,
        *folder_overrides(image_folder, tmp_path),
        f"paths.log_dir={logs}",
        "trainer=ddp_sim",
        "model.optimizer.lr=1e-3,1e-4",
    ]
    r = main("train.py", args)
    assert r.code == 0, r.err[-3000:]
    (sweep,) = sweep_dirs(logs)
    rows = read_jobs(sweep)
    assert [r["status"] for r in rows] == ["failed", "failed"]
    for job in ("0", "1"):
        error = json.loads((sweep / job / "metrics.json").read_text())["error"]
        assert "cannot run inside a local sweep" in error and "+trainer.strategy.start_method=spawn" in error


@pytest.mark.slow  # two sweeps through the command line
def test_optuna_study_resumes_across_commands(image_folder: Path, tmp_path: Path, main) -> None:
    import optuna

    logs = tmp_path / "logs"
    base = [
        "hparams_search=lr_optuna",
        "hydra.sweeper.n_trials=2",
        *TINY,
        *folder_overrides(image_folder, tmp_path),
        f"paths.log_dir={logs}",
        "test=false",
    ]
    first = main("train.py", base)
    assert first.code == 0, first.err[-3000:]
    # Run again, as after an interruption; these two trials fail (bad input) and the search goes on.
    again = main("train.py", [*base, "data.val_size=100000"])
    assert again.code == 0, again.err[-3000:]

    study = optuna.load_study(study_name="lr_optuna", storage=f"sqlite:///{logs}/optuna/lr_optuna.db")
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"]
    lrs = [t.params["model.optimizer.lr"] for t in study.trials]
    assert len(set(lrs)) == 4 and all(1e-5 <= lr <= 1e-1 for lr in lrs)  # continued, not replayed
    assert study.best_value == max(t.value for t in study.trials[:2])

    one, two = sweep_dirs(logs)
    first_rows, second_rows = read_jobs(one), read_jobs(two)
    assert [r["status"] for r in first_rows] == ["completed", "completed"]
    # The second sweep's summary is the whole study's, from the storage: the first sweep's jobs by their full path.
    assert [r["status"] for r in second_rows] == ["completed", "completed", "failed", "failed"]
    assert [r["job"] for r in second_rows] == [str((one / "0").resolve()), str((one / "1").resolve()), "2", "3"]
    assert [float(r["model.optimizer.lr"]) for r in first_rows] == pytest.approx(lrs[:2])
    assert [float(r["model.optimizer.lr"]) for r in second_rows] == pytest.approx(lrs)
    # The table and the study agree: each completed trial's value is its row's val/acc_best.
    assert [float(r["val/acc_best"]) for r in first_rows] == pytest.approx([t.value for t in study.trials[:2]])
    assert_rows_match_jobs(one, first_rows)
    assert_rows_match_jobs(two, second_rows)


def test_sweep_and_slurm_presets_compose(tmp_path: Path) -> None:
    cfg = compose(
        tmp_path,
        [
            "hparams_search=lr_optuna",
            "hydra/launcher=slurm",
            "trainer=ddp",
            "hydra.launcher.gpus_per_node=4",
            "hydra.launcher.partition=gpu",
        ],
        with_hydra=True,
    )
    sweeper, launcher = cfg.hydra.sweeper, cfg.hydra.launcher
    assert sweeper.direction == "maximize" and sweeper.n_trials == 20 and cfg.optimized_metric == "val/acc_best"
    assert sweeper.params["model.optimizer.lr"] == "tag(log, interval(1e-5, 1e-1))"
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.tasks_per_node == 4 and launcher.timeout_min > 0
    assert cfg.hydra.callbacks.sweep_summary._target_ == "cifarkit.run.sweep.SweepSummary"
