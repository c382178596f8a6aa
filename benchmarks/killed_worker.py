"""3 workers on one Optuna study of 9 short trials, one SIGKILLed in the middle of a trial: does the study
still end with 9 finished trials, and when (docs/sweeps.md, Workers that die)?

    python benchmarks/killed_worker.py --root /tmp/kw --data /tmp/cifar10-mini [--storage postgresql|journal]

Each worker is a separate train.py process with its own log folder (standing in for a machine). PostgreSQL:
a server started for the run (Debian's postgresql package, as the tests start it); journal: a file in a
folder all workers share. Prints one JSON line per storage.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def trial_args(data: Path, root: Path, storage: str, grace: float, worker: int) -> list[str]:
    return [
        "hparams_search=lr_optuna",
        "trainer=cpu",
        "model=airbench",
        "model.net.widths=[16,32,32]",
        "data=image_folder",
        f"data.root={data}",
        f"paths.data_dir={root / 'data'}",
        "data.image_size=16",
        "data.batch_size=256",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=5",
        "+trainer.limit_val_batches=2",
        "test=false",
        "callbacks.progress_bar=null",
        "hydra/sweeper/pruner=none",
        "hydra.sweeper.n_trials=9",
        f"hydra.sweeper.storage='{storage}'",
        "hydra.sweeper.study_name=killed",
        f"hydra.sweeper.grace_period={grace}",
        f"hydra.sweeper.heartbeat_interval={grace / 4}",
        f"paths.log_dir={root / f'worker{worker}'}",
    ]


def measure(kind: str, storage: str, data: Path, root: Path, grace: float) -> dict:
    from cifarkit.core.untrusted.storage import load_study

    # The data cache first (decoding the images is not what is measured).
    warm = trial_args(data, root, storage, grace, 9)
    subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *[a for a in warm if "sweeper" not in a and "optuna" not in a]],
        check=True,
        capture_output=True,
        cwd=root,
    )
    start = time.monotonic()
    procs = []
    for w in range(3):
        log = open(root / f"worker{w}.log", "w")
        procs.append(
            subprocess.Popen(
                [sys.executable, str(ROOT / "train.py"), *trial_args(data, root, storage, grace, w)],
                cwd=root,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        )
    while True:  # worker 0 in its second trial, training: killed there
        jobs = sorted((root / "worker0").glob("train/multiruns/*/*/train.log"))
        if len(jobs) >= 2 and not (jobs[-1].parent / "metrics.json").exists():
            break
        assert procs[0].poll() is None, (root / "worker0.log").read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(1.0)
    procs[0].send_signal(signal.SIGKILL)
    killed_at = time.monotonic() - start
    procs[0].wait()
    for p in procs[1:]:
        assert p.wait(timeout=1800) == 0
    ended = time.monotonic() - start
    trials = load_study(storage, "killed").trials
    ends = sorted(t.datetime_complete.timestamp() for t in trials if t.datetime_complete and t.state.name == "COMPLETE")
    durations = sorted(
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in trials
        if t.state.name == "COMPLETE" and "cifarkit:retry_of" not in t.user_attrs
    )
    retry = [t for t in trials if "cifarkit:retry_of" in t.user_attrs]
    return {
        "storage": kind,
        "finished": sum(t.state.name == "COMPLETE" for t in trials),
        "failed_stale": sum("cifarkit:stale" in t.user_attrs for t in trials),
        "trials": len(trials),
        "retry_of": [t.user_attrs["cifarkit:retry_of"] for t in retry],
        "retry_same_params": all(t.params == trials[t.user_attrs["cifarkit:retry_of"]].params for t in retry),
        "killed_at_s": round(killed_at, 1),
        "ended_s": round(ended, 1),
        "last_regular_trial_to_retry_end_s": round(ends[-1] - ends[-2], 1) if len(ends) > 1 else None,
        "trial_s_median": durations[len(durations) // 2] if durations else None,
        "grace_s": grace,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--storage", choices=["postgresql", "journal"], nargs="*", default=["postgresql", "journal"])
    parser.add_argument("--grace", type=float, default=20.0)
    args = parser.parse_args()
    for kind in args.storage:
        root = args.root / kind
        root.mkdir(parents=True, exist_ok=False)
        if kind == "journal":
            (root / "shared").mkdir()
            print(json.dumps(measure(kind, str(root / "shared" / "study.log"), args.data, root, args.grace)))
            continue
        from postgres import server

        with socket.socket() as s:  # a free port
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with server(port) as url:
            print(json.dumps(measure(kind, url, args.data, root, args.grace)))


if __name__ == "__main__":
    main()
