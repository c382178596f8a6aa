"""The project's Optuna sweeper (hydra/sweeper=optuna, the plugin's _study.py): pruned trials, several
sweep processes on one study, an interrupted search, a DDP trial stopped by its pruner, a study
written by Optuna 2, and the search space read from Hydra's override syntax."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.pruners import BasePruner
from optuna.trial import TrialState

from conftest import ROOT, error_line, folder_overrides, run_cli
from hydra_plugins.cifarkit_optuna_sweeper._study import search_space
from test_sweeps import TINY, assert_rows_match_jobs, read_jobs, sweep_dirs

TESTS = Path(__file__).parent
PYTHONPATH = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


class PruneTrialOne(BasePruner):
    """Prunes trial 1 at its first report and no other: a pruner whose verdict a test knows (it
    takes the median pruner's options it replaces, and ignores them)."""

    def __init__(self, **options: object) -> None:
        pass

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number == 1


def search(image_folder: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "hparams_search=lr_optuna",
        *TINY,
        *folder_overrides(image_folder, tmp_path),
        f"paths.log_dir={tmp_path / 'logs'}",
        "test=false",
        *extra,
    ]


def load(tmp_path: Path, storage: str | None = None, name: str = "lr_optuna") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage or f"sqlite:///{tmp_path}/logs/optuna/lr_optuna.db")


@pytest.mark.slow  # a whole search through the command line
def test_a_pruned_trial_ends_cleanly_and_the_search_goes_on(image_folder: Path, tmp_path: Path, main) -> None:
    r = main(
        "train.py",
        search(
            image_folder,
            tmp_path,
            "hydra.sweeper.n_trials=3",
            "trainer.max_epochs=3",
            "hydra.sweeper.pruner._target_=test_search.PruneTrialOne",
        ),
    )
    assert r.code == 0, r.err[-3000:]
    study = load(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    assert [sorted(t.intermediate_values) for t in study.trials] == [[1, 2, 3], [1], [1, 2, 3]]  # epochs trained
    pruned = study.trials[1]
    assert pruned.value == pruned.intermediate_values[1]  # Optuna keeps its last report as its value

    (sweep,) = sweep_dirs(tmp_path / "logs")
    rows = read_jobs(sweep)
    assert [(r["job"], r["optuna_trial"], r["status"], r["epochs"]) for r in rows] == [
        ("0", "0", "completed", "3"),
        ("1", "1", "pruned", "1"),
        ("2", "2", "completed", "3"),
    ]
    assert_rows_match_jobs(sweep, rows)
    metrics = json.loads((sweep / "1" / "metrics.json").read_text())
    assert metrics["status"] == "pruned" and metrics["steps"] == 2 and "test/acc" not in metrics
    assert metrics["val/acc_best"] == pytest.approx(pruned.value)
    for name in ("last.ckpt", Path(metrics["best_ckpt"]).name):  # the checkpoints of its last epoch, whole
        ckpt = torch.load(sweep / "1" / "checkpoints" / name, weights_only=True)
        assert ckpt["epoch"] == 0 and ckpt["global_step"] == 2
    configs = read_jobs(sweep, "summary.csv")
    assert [(c["status"], c["n"], c["failed"], c["pruned"]) for c in configs] == [
        ("completed", "1", "0", "0"),
        ("pruned", "0", "0", "1"),
        ("completed", "1", "0", "0"),
    ]
    assert "2/3 completed, 1 pruned" in r.out


def test_a_study_in_memory_prunes_too(image_folder: Path, tmp_path: Path, main) -> None:
    """storage: null (the study lives in the sweep's process): the in-process jobs reach it."""
    r = main(
        "train.py",
        search(
            image_folder,
            tmp_path,
            "hydra.sweeper.n_trials=2",
            "trainer.max_epochs=2",
            "hydra.sweeper.storage=null",
            "hydra.sweeper.pruner._target_=test_search.PruneTrialOne",
        ),
    )
    assert r.code == 0, r.err[-3000:]
    (sweep,) = sweep_dirs(tmp_path / "logs")
    assert [(r["status"], r["epochs"]) for r in read_jobs(sweep)] == [("completed", "2"), ("pruned", "1")]
    assert not (tmp_path / "logs" / "optuna").exists()


def job_trials(log_dir: Path) -> dict[Path, int]:
    """Every job directory of every sweep under ``log_dir``, with the trial number it was given."""
    found = {}
    for overrides in sorted((log_dir / "train" / "multiruns").glob("*/*/.hydra/overrides.yaml")):
        given = dict(line.removeprefix("- ").split("=", 1) for line in overrides.read_text().splitlines())
        found[overrides.parent.parent] = int(given["optuna_trial"])
    return found


@pytest.mark.slow  # two sweep processes at once, for each storage
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_two_sweep_processes_share_one_study(kind: str, image_folder: Path, tmp_path: Path) -> None:
    """Two terminals, one storage: together they run n_trials, each trial number once."""
    storage = (
        f"sqlite:///{tmp_path}/studies/shared.db" if kind == "sqlite" else str(tmp_path / "studies" / "shared.log")
    )
    args = search(
        image_folder,
        tmp_path,
        "hydra.sweeper.n_trials=4",
        f"hydra.sweeper.storage='{storage}'",
        "hydra.sweeper.study_name=shared",
        "callbacks.progress_bar=null",
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args],
            cwd=tmp_path,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]

    from hydra_plugins.cifarkit_optuna_sweeper._study import open_storage

    study = optuna.load_study(study_name="shared", storage=open_storage(storage))
    ran = [t for t in study.trials if "cifarkit" not in t.user_attrs]  # not the rare one asked for after the last
    assert [t.number for t in ran] == [0, 1, 2, 3] and all(t.state == TrialState.COMPLETE for t in ran)
    assert all(t.state == TrialState.FAIL for t in study.trials if t not in ran)
    assert len({t.params["model.optimizer.lr"] for t in ran}) == 4  # the same seed, yet not the same values
    jobs = job_trials(tmp_path / "logs")
    assert sorted(jobs.values()) == [0, 1, 2, 3]  # four jobs in all, each trial once
    for job, number in jobs.items():
        assert job.name == str(number)  # job <n> runs trial <n>: two sweeps in one folder never clash
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["val/acc_best"] == pytest.approx(study.trials[number].value)


@pytest.mark.slow  # a search killed and started again: several sweep processes
def test_an_interrupted_search_is_finished_by_running_it_again(image_folder: Path, tmp_path: Path, main) -> None:
    args = search(
        image_folder,
        tmp_path,
        "hydra.sweeper.n_trials=3",
        "trainer.max_epochs=10",
        "callbacks.progress_bar=null",
        "hydra/sweeper/pruner=none",
    )  # trial 1 trains on until the signal
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        p = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args],
            cwd=tmp_path,
            stdout=out,
            stderr=out,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    deadline = time.monotonic() + 600
    while not list((tmp_path / "logs").glob("train/multiruns/*/1/checkpoints/last.ckpt")):  # trial 1 is training
        assert p.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=300)
    assert p.returncode == 128 + signal.SIGTERM, log.read_text()[-3000:]
    study = load(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL]  # not left RUNNING

    again = main("train.py", args)
    assert again.code == 0, again.err[-3000:]
    study = load(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert len({t.params["model.optimizer.lr"] for t in study.trials}) == 3  # continued, not replayed
    first, second = sweep_dirs(tmp_path / "logs")
    assert json.loads((first / "1" / "metrics.json").read_text())["status"] == "interrupted"
    rows = read_jobs(second)  # the whole study's summary, from the storage: the first sweep's jobs by full path
    assert [r["job"] for r in rows] == [str((first / "0").resolve()), str((first / "1").resolve()), "2"]
    assert [r["status"] for r in rows] == ["completed", "failed", "completed"]  # the interrupted one: not told
    # A finished search run once more adds n_trials new trials.
    assert main("train.py", [*args, "trainer.max_epochs=1"]).code == 0
    assert len(load(tmp_path).trials) == 6


class EndProbe:
    """Writes ``<out>/rank<r>.json`` when fitting ends on a rank: where that rank stopped."""

    def __new__(cls, out: str):
        import lightning as L

        class Probe(L.Callback):
            def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
                Path(out).mkdir(parents=True, exist_ok=True)
                state = {
                    "epoch": trainer.current_epoch,
                    "step": trainer.global_step,
                    "should_stop": trainer.should_stop,
                }
                (Path(out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(state))

        return Probe()


@pytest.mark.slow  # DDP trials inside a sweep process
def test_a_pruned_ddp_trial_stops_on_every_rank(image_folder: Path, tmp_path: Path) -> None:
    """trainer=ddp_sim as a trial (as a SLURM job of a sweep runs it): rank 0 reports once per epoch,
    and every rank stops after the epoch its pruner pruned it at."""
    storage = f"sqlite:///{tmp_path}/study.db"
    study = optuna.create_study(study_name="ddp", storage=storage, direction="maximize")
    trial = study.ask()
    probe, logs = tmp_path / "probe", tmp_path / "logs"
    cb = "+callbacks.optuna_pruning"
    args = [
        "trainer=ddp_sim",
        "trainer.max_epochs=4",
        "data.batch_size=8",
        "data.eval_batch_size=16",
        *folder_overrides(image_folder, tmp_path),
        f"paths.log_dir={logs}",
        "test=false",
        f"{cb}._target_=hydra_plugins.cifarkit_optuna_sweeper._pruning.OptunaPruning",
        f"{cb}.trial={trial.number}",
        f"{cb}.storage='{storage}'",
        f"{cb}.study_name=ddp",
        f"{cb}.pruner={{_target_:optuna.pruners.ThresholdPruner,lower:2.0,n_warmup_steps:2}}",
        "+callbacks.end_probe._target_=test_search.EndProbe",
        f"+callbacks.end_probe.out={probe}",
    ]
    r = run_cli("train.py", args, cwd=tmp_path, env=PYTHONPATH, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ends = [json.loads((probe / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert (
        ends[0] == ends[1] == {"epoch": 2, "step": ends[0]["step"], "should_stop": True}
    )  # pruned after epoch 2, on both
    (run,) = (logs / "train" / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "pruned" and metrics["epochs"] == 2
    assert sorted(study.trials[0].intermediate_values) == [1, 2]  # one report per epoch: rank 0's alone
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1


@pytest.mark.slow  # a search continued through the command line
def test_a_study_of_optuna_2_says_how_to_upgrade_it_then_continues(image_folder: Path, tmp_path: Path, main) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as con:
        con.executescript((TESTS / "data" / "optuna2_study.sql").read_text())
    storage = f"sqlite:///{db}"
    args = search(image_folder, tmp_path, "hydra.sweeper.n_trials=1", f"hydra.sweeper.storage='{storage}'")
    r = main("train.py", args)
    assert r.code == 1 and not sweep_dirs(tmp_path / "logs")
    (line,) = [x for x in r.err.splitlines() if x.strip()]
    assert line == (
        f"error: the Optuna study storage {storage} was written by Optuna 2.10.1 and this is Optuna "
        f"{optuna.__version__}: "
        f"upgrade it once with `optuna storage upgrade --storage {storage}` (back the file up first), then run again"
    )

    upgrade = subprocess.run(
        [str(Path(sys.executable).parent / "optuna"), "storage", "upgrade", "--storage", storage],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert upgrade.returncode == 0, upgrade.stderr[-2000:]
    again = main("train.py", args)
    assert again.code == 0, again.err[-3000:]
    study = optuna.load_study(study_name="lr_optuna", storage=storage)
    assert [t.value for t in study.trials[:2]] == [0.31, 0.42] and study.trials[2].state == TrialState.COMPLETE


@pytest.mark.slow  # a whole search through the command line
def test_the_readme_search_with_more_dimensions(image_folder: Path, tmp_path: Path, main) -> None:
    """The README's command line, unchanged but for the tiny run: choice() and tag(log, interval())."""
    dims = ["data.batch_size=choice(32,64,128)", "model.optimizer.weight_decay=tag(log,interval(1e-6,1e-2))"]
    r = main("train.py", search(image_folder, tmp_path, "hydra.sweeper.n_trials=2", *dims))
    assert r.code == 0, r.err[-3000:]
    study = load(tmp_path)
    for t in study.trials:
        assert t.state == TrialState.COMPLETE
        assert t.distributions == {
            "model.optimizer.lr": FloatDistribution(1e-5, 1e-1, log=True),
            "data.batch_size": CategoricalDistribution([32, 64, 128]),
            "model.optimizer.weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
        }
    (sweep,) = sweep_dirs(tmp_path / "logs")
    rows = read_jobs(sweep)
    for row, t in zip(rows, study.trials):
        assert f"data.batch_size={t.params['data.batch_size']}" in row["overrides"].split()


def test_the_search_space_reads_hydras_sweep_syntax() -> None:
    space, fixed = search_space(
        [
            "a=tag(log, interval(1e-5, 1e-1))",
            "b=interval(0.0, 1.0)",
            "c=interval(1, 8)",
            "d=choice(sgd, adam)",
            "e=range(1, 5)",
            "f=range(0.5, 2.0, 0.5)",
            "g=7",
            "b=0.5",
        ]
    )
    assert space == {
        "a": FloatDistribution(1e-5, 1e-1, log=True),
        "c": FloatDistribution(1.0, 8.0),  # Hydra: intervals are floats
        "d": CategoricalDistribution(["sgd", "adam"]),
        "e": IntDistribution(1, 5),
        "f": FloatDistribution(0.5, 2.0, step=0.5),
    }
    assert fixed == {"g": "7", "b": "0.5"}  # the last word on a key wins


def test_the_old_plugin_left_installed_is_named_in_one_line(tmp_path: Path, main, monkeypatch) -> None:
    """pip does not remove hydra-optuna-sweeper from an environment that had it; its config would shadow ours."""
    old = tmp_path / "site" / "hydra_plugins" / "hydra_optuna_sweeper"
    old.mkdir(parents=True)
    (old / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))  # hydra_plugins is a namespace package: both folders count
    r = main("train.py", ["-m", "hparams_search=lr_optuna", f"paths.log_dir={tmp_path / 'logs'}"])
    assert r.code == 1, r.err[-2000:]
    assert error_line(r.err).endswith(
        "still installed and shadows cifarkit's Optuna sweeper: pip uninstall hydra-optuna-sweeper"
    )
    assert not (tmp_path / "logs").exists()
