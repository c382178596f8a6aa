"""Hydra's own flags on the real entry points, as Hydra's users type them: each prints and exits 0,
and no run directory is made. One runs in its own process as typed; the others through the same
``cifarkit.run.cli.run`` in this process (the ``main`` fixture), which is what the flags reach."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli

FLAGS = [
    # every interpolation resolved; the run directory's own paths are null before Hydra makes one
    ("train.py", ["--cfg", "job", "--resolve"], ["task_name: train\n", "  checkpoint_dir: null\n"]),
    ("train.py", ["--cfg", "hydra"], ["hydra:\n", "dir: ${paths.log_dir}/${task_name}/runs/"]),
    ("train.py", ["--info"], ["Installed Hydra Plugins", "OptunaSweeper"]),
    ("train.py", ["--help"], ["train.py is powered by Hydra.", "hparams_search: lr_optuna"]),
    ("serve.py", ["--help"], ["serve.py is powered by Hydra.", "ckpt_path: ???"]),
    ("predict.py", ["--cfg", "job"], ["task_name: predict\n", "ckpt_path: ???\n"]),
]
IDS = ["cfg-job-resolve", "cfg-hydra", "info", "help", "serve-help", "predict-cfg-job"]


def test_a_flag_as_typed(tmp_path: Path) -> None:
    entry, flags, shows = FLAGS[0]
    r = run_cli(entry, flags, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(s in r.stdout for s in shows) and "${" not in r.stdout, r.stdout[-3000:]
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("entry", "flags", "shows"), FLAGS, ids=IDS)
def test_hydra_flags(entry: str, flags: list[str], shows: list[str], tmp_path: Path, main, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # where a run directory would appear
    if entry == "serve.py":
        pytest.importorskip("litserve")  # serve.py's own first check; the extras tests cover its absence
    r = main(entry, flags)
    assert r.code == 0, r.err[-3000:]
    assert all(s in r.out for s in shows), r.out[-3000:]
    assert "Traceback" not in r.err
    if "--resolve" in flags:
        assert "${" not in r.out
    assert list(tmp_path.iterdir()) == []
