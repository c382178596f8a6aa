"""Hydra's own flags on the real entry points, as Hydra's users type them: each prints and exits 0,
and no run directory is made."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli


@pytest.mark.parametrize(
    ("entry", "flags", "shows"),
    [
        # every interpolation resolved; the run directory's own paths are null before Hydra makes one
        ("train.py", ["--cfg", "job", "--resolve"], ["task_name: train\n", "  checkpoint_dir: null\n"]),
        ("train.py", ["--cfg", "hydra"], ["hydra:\n", "dir: ${paths.log_dir}/${task_name}/runs/"]),
        ("train.py", ["--info"], ["Installed Hydra Plugins", "OptunaSweeper"]),
        ("train.py", ["--help"], ["train.py is powered by Hydra.", "hparams_search: lr_optuna"]),
        ("serve.py", ["--help"], ["serve.py is powered by Hydra.", "ckpt_path: ???"]),
        ("predict.py", ["--cfg", "job"], ["task_name: predict\n", "ckpt_path: ???\n"]),
    ],
    ids=["cfg-job-resolve", "cfg-hydra", "info", "help", "serve-help", "predict-cfg-job"],
)
def test_hydra_flags(entry: str, flags: list[str], shows: list[str], tmp_path: Path) -> None:
    r = run_cli(entry, flags, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(s in r.stdout for s in shows), r.stdout[-3000:]
    assert "Traceback" not in r.stderr
    if "--resolve" in flags:
        assert "${" not in r.stdout
    assert list(tmp_path.iterdir()) == []
