"""The sweep's storage as a door (core/untrusted/storage.py) and as a meeting point of workers: what a stored
or enqueued study holds is checked before a job launches; a bad storage is one line naming it (no password);
workers that race, die or run on a PostgreSQL server still end a round with n_trials finished trials.
The sweeper runs with a launcher that trains nothing (sweep_workers.py), so most of these take seconds."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import optuna
import pytest
from optuna.trial import TrialState

from cifarkit.core.errors import UserError
from cifarkit.core.untrusted.storage import ROUND_END, ROUND_START, load_study, open_storage
from conftest import error_line, free_port
from postgres import PASSWORD, binaries, new_database, server
from sweep_workers import FakeLauncher, search

TESTS = Path(__file__).parent
optuna.logging.set_verbosity(optuna.logging.WARNING)


def storage_of(kind: str, tmp_path: Path, pg: str | None = None) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/study.db"
    if kind == "journal":
        return str(tmp_path / "study.log")
    assert pg is not None
    return new_database(pg, f"t{time.monotonic_ns()}")


@pytest.fixture(scope="module")
def pg() -> str:
    if binaries() is None:
        pytest.fail("PostgreSQL is not installed: apt-get install postgresql (.ci/run does)")
    with server(free_port()) as url:
        yield url


def lrs(jobs: list[list[str]]) -> list[float]:
    return [float(dict(o.split("=", 1) for o in job)["model.optimizer.lr"]) for job in jobs]


# ---------------------------------------------------------------------------------------------
# What the storage holds, checked before a job launches (issue 35).


@pytest.mark.parametrize("end", [10**9, math.nan, "9"])
def test_a_stored_round_end_out_of_bounds_launches_nothing(end, tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path}/study.db"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    study.set_user_attr(ROUND_END, end)
    launcher = FakeLauncher(hang_after=3)  # a sweeper that believed the round would launch for ever
    with pytest.raises(UserError) as e:
        search(storage, "s", 2, launcher, tmp_path / "sweep")
    assert launcher.jobs == []
    line = str(e.value)
    assert f"the Optuna study s in {storage} holds a round of trials" in line and "\n" not in line
    assert "n_trials=2" in line and "hydra.sweeper.study_name=<new name>" in line


def test_a_round_within_bounds_is_joined_and_ends_at_its_size(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path}/study.db"
    search(storage, "s", 3, FakeLauncher(), tmp_path / "sweep")
    study = optuna.load_study(study_name="s", storage=storage)
    assert (study.user_attrs[ROUND_START], study.user_attrs[ROUND_END]) == (0, 3)
    launcher = FakeLauncher()
    search(storage, "s", 3, launcher, tmp_path / "sweep")  # a finished round: the next one, 3 more
    assert len(launcher.jobs) == 3 and len(study.trials) == 6
    search(storage, "s", 1, launcher, tmp_path / "sweep")  # after it, a smaller round is fine
    assert len(launcher.jobs) == 4 and len(study.trials) == 7


@pytest.mark.parametrize(
    ("params", "said"),
    [
        ({"model.optimizer.lr": 1e6}, "model.optimizer.lr=1000000.0, outside the search space"),
        ({"model.optimizer.lr": 1e-3, "trainer.max_epochs": 10**9}, "trainer.max_epochs=1000000000, not a parameter"),
    ],
)
def test_an_enqueued_trial_outside_the_space_is_refused_before_its_job(params, said, tmp_path: Path) -> None:
    storage = str(tmp_path / "study.log")  # a journal file: anyone with the shared disk can append to it
    study = optuna.create_study(study_name="s", storage=open_storage(storage), direction="maximize")
    study.enqueue_trial(params)
    launcher = FakeLauncher()
    with pytest.raises(UserError) as e:
        search(storage, "s", 2, launcher, tmp_path / "sweep")
    assert launcher.jobs == []
    line = str(e.value)
    assert line.startswith(f"trial 0 of the Optuna study s in {storage} would run {said}") and "\n" not in line


def test_an_enqueued_trial_inside_the_space_runs_with_its_values(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path}/study.db"
    optuna.create_study(study_name="s", storage=storage, direction="maximize").enqueue_trial(
        {"model.optimizer.lr": 3e-3}
    )
    launcher = FakeLauncher()
    search(storage, "s", 2, launcher, tmp_path / "sweep")
    assert lrs(launcher.jobs)[0] == 3e-3 and len(launcher.jobs) == 2


def test_a_garbled_journal_line_is_one_line(tmp_path: Path) -> None:
    storage = str(tmp_path / "study.log")
    search(storage, "s", 2, FakeLauncher(), tmp_path / "sweep")
    lines = Path(storage).read_text().splitlines()
    lines[3] = lines[3][: len(lines[3]) // 2]
    Path(storage).write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as e:
        search(storage, "s", 2, FakeLauncher(), tmp_path / "sweep")
    assert str(e.value).startswith(f"the Optuna journal file {storage} has a line that is not one of Optuna's")


def test_a_file_that_is_not_a_database_is_one_line(tmp_path: Path, main) -> None:
    db = tmp_path / "study.db"
    db.write_bytes(b"not an SQLite database, whatever its name says\n" * 100)
    storage = f"sqlite:///{db}"
    r = main(
        "train.py", ["hparams_search=lr_optuna", f"hydra.sweeper.storage='{storage}'", f"paths.log_dir={tmp_path}"]
    )
    assert r.code == 1
    assert error_line(r.err) == (
        f"error: cannot open the Optuna study storage {storage}: the file is not an SQLite database; point "
        "hydra.sweeper.storage at the study's database"
    )
    assert not (tmp_path / "train").exists()  # no job started


def test_a_changed_search_space_says_how_to_start_a_new_study(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path}/study.db"
    search(storage, "s", 1, FakeLauncher(), tmp_path / "sweep", params={"model.optimizer.lr": "choice(0.1, 0.01)"})
    launcher = FakeLauncher()
    with pytest.raises(UserError) as e:
        search(storage, "s", 1, launcher, tmp_path / "sweep", params={"model.optimizer.lr": "choice(0.1, 0.5)"})
    assert launcher.jobs == []
    line = str(e.value)
    assert line.startswith(f"the search space changed since the Optuna study s in {storage} began: model.optimizer.lr")
    assert "start a new study for it (hydra.sweeper.study_name=<new name>)" in line


# ---------------------------------------------------------------------------------------------
# Bad storage URLs, before any job (issue 37).


def test_bad_storage_urls_are_one_line_without_the_password(tmp_path: Path, main) -> None:
    port = free_port()  # nothing listens there
    cases = {
        f"postgresql://me:hunter2@127.0.0.1:{port}/optuna": "cannot reach the server",
        "nosuchdb://me:hunter2@host/x": "is not a storage URL this can open",
    }
    for storage, said in cases.items():
        r = main(
            "train.py", ["hparams_search=lr_optuna", f"hydra.sweeper.storage='{storage}'", f"paths.log_dir={tmp_path}"]
        )
        assert r.code == 1, r.err[-2000:]
        line = error_line(r.err)
        assert said in line and "hunter2" not in r.err and "me:***@" in line, line
    assert not (tmp_path / "train").exists()


def test_wrong_credentials_and_an_older_schema_on_postgresql(pg: str, tmp_path: Path, main) -> None:
    wrong = pg.replace(PASSWORD, "not-the-password")
    r = main("train.py", ["hparams_search=lr_optuna", f"hydra.sweeper.storage='{wrong}'", f"paths.log_dir={tmp_path}"])
    assert r.code == 1
    line = error_line(r.err)
    assert "password authentication failed" in line and "check the user and password" in line
    assert "not-the-password" not in r.err and PASSWORD not in r.err
    old = new_database(pg, "old_schema")
    import psycopg

    with psycopg.connect(old) as conn:  # the version tables of a database Optuna 2.10 set up
        conn.execute(
            "CREATE TABLE version_info (version_info_id INTEGER PRIMARY KEY, schema_version INTEGER, "
            "library_version VARCHAR(256))"
        )
        conn.execute("INSERT INTO version_info VALUES (1, 12, '2.10.1')")
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        conn.execute("INSERT INTO alembic_version VALUES ('v2.6.0.a')")
    r = main("train.py", ["hparams_search=lr_optuna", f"hydra.sweeper.storage='{old}'", f"paths.log_dir={tmp_path}"])
    assert r.code == 1
    line = error_line(r.err)
    assert "was written by Optuna 2.10.1" in line and "optuna storage upgrade --storage" in line, line
    assert PASSWORD not in r.err
    assert not (tmp_path / "train").exists()


# ---------------------------------------------------------------------------------------------
# Many workers: races, a worker killed mid-trial, PostgreSQL (issue 37).


def worker(
    storage: str,
    log: Path,
    n_trials: int,
    seconds: float = 0.0,
    grace: float = 180.0,
    hang: int | None = None,
    go: Path | None = None,
) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    if go is not None:
        env["SWEEP_WORKERS_GO"] = str(go)
    args = [str(TESTS / "sweep_workers.py"), storage, "s", str(n_trials), str(log), str(seconds), str(grace)]
    return subprocess.Popen(
        [sys.executable, *args, *([str(hang)] if hang is not None else [])],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(storage: str) -> list[optuna.trial.FrozenTrial]:
    return load_study(storage, "s").trials


@pytest.mark.slow  # ten races of two worker processes for each storage
@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgresql"])
def test_two_workers_for_the_last_trial_leave_no_fail(kind: str, tmp_path: Path, request) -> None:
    """Ten times: a round of 3 trials, 2 done; two workers started together for the last one."""
    pg = request.getfixturevalue("pg") if kind == "postgresql" else None
    for attempt in range(10):
        folder = tmp_path / str(attempt)
        folder.mkdir()
        storage = storage_of(kind, folder, pg)
        search(storage, "s", 3, FakeLauncher(hang_after=None), folder / "sweep")  # the round's 3 trials, done
        study = load_study(storage, "s")
        study.set_user_attr(ROUND_START, 3)
        study.set_user_attr(ROUND_END, 4)  # a round of one trial, which both want
        go = folder / "go"
        # A job of 3 s: a worker that reached the study after the round's one trial had ended would open the next
        # round (a finished round is followed by a new one), which is not the race tested here.
        procs = [worker(storage, folder / "jobs.log", 1, seconds=3.0, go=go) for _ in range(2)]
        while len(list(folder.glob("go.*"))) < 2:  # both imported and ready
            assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
            time.sleep(0.01)
        go.touch()
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-3000:]
        trials = finished(storage)
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 4, (attempt, [t.state for t in trials])
        assert len((folder / "jobs.log").read_text().splitlines()) == 1


SLOW_WORKERS = pytest.mark.slow  # three worker processes and a grace period: the SQLite case stands in by default


@pytest.mark.parametrize(
    "kind", ["sqlite", pytest.param("journal", marks=SLOW_WORKERS), pytest.param("postgresql", marks=SLOW_WORKERS)]
)
def test_a_killed_workers_trial_is_failed_requeued_and_the_round_ends_full(kind: str, tmp_path: Path, request) -> None:
    """Three workers on 6 trials; one is SIGKILLed in its second trial. The others notice its heartbeat stopped
    (grace 3 s), fail that trial, run it again with the same learning rate: 6 finished, numbers unique."""
    pg = request.getfixturevalue("pg") if kind == "postgresql" else None
    storage = storage_of(kind, tmp_path, pg)
    log = tmp_path / "jobs.log"
    doomed = worker(storage, tmp_path / "doomed.log", 6, seconds=0.3, grace=3.0, hang=1)
    deadline = time.monotonic() + 60
    while not (tmp_path / "doomed.log").exists() or len((tmp_path / "doomed.log").read_text().splitlines()) < 2:
        assert doomed.poll() is None and time.monotonic() < deadline, doomed.communicate()[1][-3000:]
        time.sleep(0.05)
    others = [worker(storage, log, 6, seconds=0.3, grace=3.0) for _ in range(2)]
    time.sleep(0.5)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    for p in others:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
    trials = finished(storage)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    stale = [t for t in trials if t.state == TrialState.FAIL]
    assert len(done) == 6 and len(trials) == 7, [(t.number, t.state, t.user_attrs) for t in trials]
    (dead,) = stale
    assert "cifarkit:stale" in dead.user_attrs
    (retry,) = [t for t in done if t.user_attrs.get("cifarkit:retry_of") == dead.number]
    assert retry.params == dead.params  # the same parameters, run again
    assert len({t.number for t in trials}) == len(trials)
    ran = [json.loads(line) for line in (tmp_path / "doomed.log").read_text().splitlines()] + [
        json.loads(line) for line in log.read_text().splitlines()
    ]
    assert len(ran) == 7  # 6 trials and the killed one's first try
    (rerun,) = [job for job in ran if f"optuna_trial={retry.number}" in job]
    first_ckpt = Path(dead.user_attrs["cifarkit:job_dir"]) / "checkpoints" / "last.ckpt"
    assert f"ckpt_path={first_ckpt}" in rerun  # it continues from the checkpoint the killed job left


class LrProbe(L.Callback):
    """Writes ``<out>/rank<r>.json`` when fitting starts on a rank: the learning rate its optimizer was built
    with (a module-level class: DDP's spawn start method pickles callbacks)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        Path(self.out).mkdir(parents=True, exist_ok=True)
        lr = trainer.optimizers[0].defaults["lr"]
        (Path(self.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps({"lr": lr}))


@pytest.mark.slow  # two DDP trials of a search, each two processes
def test_every_rank_of_a_ddp_trial_trains_with_its_sampled_parameters(image_folder: Path, tmp_path: Path) -> None:
    from conftest import FAST, folder_overrides, run_cli

    storage = f"sqlite:///{tmp_path}/study.db"
    args = [
        "hparams_search=lr_optuna",
        *FAST,
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1",
        "trainer=ddp_sim",
        "+trainer.strategy.start_method=spawn",
        *folder_overrides(image_folder, tmp_path),
        f"paths.log_dir={tmp_path / 'logs'}",
        "test=false",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage='{storage}'",
        "hydra/sweeper/pruner=none",
        "+callbacks.lr_probe._target_=test_storage.LrProbe",
        "+callbacks.lr_probe.out=${hydra:runtime.output_dir}/probe",
    ]
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    r = run_cli("train.py", args, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    study = optuna.load_study(study_name="lr_optuna", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    for t in study.trials:
        job = Path(t.user_attrs["cifarkit:job_dir"])
        ranks = [json.loads((job / "probe" / f"rank{i}.json").read_text())["lr"] for i in (0, 1)]
        assert ranks == [pytest.approx(t.params["model.optimizer.lr"])] * 2  # both ranks: the trial's value
        assert t.value == pytest.approx(json.loads((job / "metrics.json").read_text())["val/acc_best"])


@pytest.mark.slow  # a search whose trials run as submitit jobs (the SLURM launcher's path, on this machine)
def test_a_search_through_submitits_local_executor(image_folder: Path, tmp_path: Path) -> None:
    """hydra/launcher=submitit_local: the sweeper hands each batch of trials to hydra-submitit-launcher, as
    with hydra/launcher=slurm; each job runs in its own process and reports to its trial in the storage."""
    from conftest import FAST, folder_overrides, run_cli

    storage = str(tmp_path / "shared" / "study.log")
    args = [
        "hparams_search=lr_optuna",
        *FAST,
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1",
        "trainer.max_epochs=2",
        *folder_overrides(image_folder, tmp_path),
        f"paths.log_dir={tmp_path / 'logs'}",
        "test=false",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        f"hydra.sweeper.storage='{storage}'",
        "hydra/sweeper/pruner=none",
    ]
    r = run_cli("train.py", args, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    study = load_study(storage, "lr_optuna")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert all(sorted(t.intermediate_values) == [1, 2] for t in study.trials)  # each job reported its epochs
    for t in study.trials:
        metrics = json.loads((Path(t.user_attrs["cifarkit:job_dir"]) / "metrics.json").read_text())
        assert t.value == pytest.approx(metrics["val/acc_best"])
