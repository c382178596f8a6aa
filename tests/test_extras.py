"""The extras' doors: with an extra's package missing, each door stops in one line that names the
extra (cifarkit/core/extras.py), and training, the base install's job, imports none of them.

A package is made missing as where it is not installed: a None in ``sys.modules`` makes any
import of it raise ``ModuleNotFoundError``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cifarkit.core.errors import UserError
from cifarkit.core.extras import require
from conftest import FAST, ROOT, error_line, folder_overrides

# The extras' modules that the code imports (pyproject.toml's optional dependencies), but SciPy: torchmetrics
# imports it whenever its metadata says it is installed, which a None in sys.modules does not hide. A real
# install without any extra trains too (checked by hand in a fresh venv: README.md's install line, no extra).
EXTRA_MODULES = [
    "optuna",
    "sqlalchemy",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "litserve",
    "timm",
    "mlflow",
    "wandb",
    "hydra_plugins.hydra_submitit_launcher",
]


def needs(door: str, extra: str) -> str:
    return f'error: {door} needs the {extra} extra: pip install -e ".[{extra}]"'


def without(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """``modules`` cannot be imported for the rest of the test (nor their submodules)."""
    for name in list(sys.modules):
        if any(name.startswith(f"{m}.") for m in modules):
            monkeypatch.delitem(sys.modules, name)
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


def script(entry: str, args: list[str], blocked: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python <entry> <args>`` in a fresh process where the ``blocked`` modules cannot be imported."""
    code = (
        f"import runpy, sys; sys.modules.update(dict.fromkeys({blocked!r})); sys.argv = [{entry!r}, *sys.argv[1:]]; "
        f"runpy.run_path({str(ROOT / entry)!r}, run_name='__main__')"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.parametrize(
    ("args", "missing", "door"),
    [
        (["hparams_search=lr_optuna"], "optuna", "hparams_search=lr_optuna"),
        (["-m", "hydra/sweeper=optuna"], "sqlalchemy", "hydra/sweeper=optuna"),
    ],
)
def test_a_search_without_the_search_extra(args: list[str], missing: str, door: str, tmp_path: Path, main, monkeypatch):
    without(monkeypatch, missing)
    r = main("train.py", [*args, f"paths.log_dir={tmp_path / 'logs'}"])
    assert r.code == 1 and error_line(r.err) == needs(door, "search")
    assert not (tmp_path / "logs").exists()  # stopped before any job or study


@pytest.mark.parametrize("missing", ["onnx", "onnxscript"])
def test_onnx_export_without_the_export_extra(missing: str, tmp_path: Path, main, monkeypatch) -> None:
    without(monkeypatch, missing)
    r = main("export.py", [f"ckpt_path={tmp_path / 'model.ckpt'}", "format=onnx"])  # refused before it is read
    assert r.code == 1 and error_line(r.err) == needs("export.py format=onnx", "export")


@pytest.mark.parametrize("entry", ["predict.py", "serve.py"])
def test_a_onnx_model_without_onnx_runtime(entry: str, tmp_path: Path, main, monkeypatch) -> None:
    without(monkeypatch, "onnxruntime")
    (tmp_path / "cat.png").write_bytes(b"")  # predict.py lists its inputs before it loads the model
    inputs = [f"inputs={tmp_path}"] if entry == "predict.py" else []
    r = main(entry, [f"ckpt_path={tmp_path / 'model.onnx'}", *inputs])
    assert r.code == 1 and error_line(r.err) == needs("ckpt_path=*.onnx", "export")


def test_model_timm_without_the_timm_extra(image_folder: Path, tmp_path: Path, main, monkeypatch) -> None:
    without(monkeypatch, "timm")
    r = main("train.py", FAST + folder_overrides(image_folder, tmp_path) + ["model=timm", f"paths.log_dir={tmp_path}"])
    assert r.code == 1 and error_line(r.err) == needs("model=timm", "timm")


def test_svhn_without_the_svhn_extra(tmp_path: Path, main, monkeypatch) -> None:
    without(monkeypatch, "scipy")
    r = main("train.py", FAST + ["data=svhn", f"paths.data_dir={tmp_path}", f"paths.log_dir={tmp_path}"])
    assert r.code == 1 and error_line(r.err) == needs("data=svhn", "svhn")


@pytest.mark.parametrize("extra", ["mlflow", "wandb"])
def test_a_logger_without_its_extra(extra: str, image_folder: Path, tmp_path: Path, main, monkeypatch) -> None:
    without(monkeypatch, extra)
    r = main(
        "train.py",
        FAST + folder_overrides(image_folder, tmp_path) + [f"logger={extra}", f"paths.log_dir={tmp_path / 'logs'}"],
    )
    assert r.code == 1 and error_line(r.err) == needs(f"logger={extra}", extra)


def test_the_slurm_launcher_without_the_slurm_extra(tmp_path: Path, main, monkeypatch) -> None:
    """Hydra finds no submitit_slurm config without the plugin; the command line is checked first."""
    without(monkeypatch, "hydra_plugins.hydra_submitit_launcher")
    r = main("train.py", ["-m", "hydra/launcher=slurm", f"paths.log_dir={tmp_path / 'logs'}"])
    assert r.code == 1 and error_line(r.err) == needs("hydra/launcher=slurm", "slurm")
    assert not (tmp_path / "logs").exists()


def test_serve_py_without_the_serve_extra(tmp_path: Path) -> None:
    r = script("serve.py", ["ckpt_path=x"], ["litserve"], tmp_path)
    assert r.returncode == 1 and r.stderr == needs("serve.py", "serve") + "\n" and r.stdout == ""


def test_training_needs_no_extra(image_folder: Path, tmp_path: Path) -> None:
    """The base install trains: a run with every extra's package missing completes."""
    args = FAST + folder_overrides(image_folder, tmp_path) + ["trainer.max_steps=2", f"paths.log_dir={tmp_path}"]
    r = script("train.py", args, EXTRA_MODULES, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]


def test_a_broken_install_keeps_its_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An extra's package that is there but cannot import (its own dependency missing) says why."""
    (tmp_path / "halfinstalled").mkdir()
    (tmp_path / "halfinstalled" / "__init__.py").write_text("import not_a_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError) as e:
        require("model=x", "x", "halfinstalled")
    assert str(e.value) == (
        'model=x needs the x extra: pip install -e ".[x]" '
        "(import halfinstalled failed: No module named 'not_a_module_anywhere')"
    )
