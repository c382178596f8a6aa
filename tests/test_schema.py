"""The schema of the options (cifarkit/run/schema.py): every group refuses a wrong type and an
out-of-range value from the real command line, in one line that names the key, before anything
starts; every preset passes it; a sweep's job is checked with its own values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest

from cifarkit.core.errors import UserError
from cifarkit.data.augment import PADDING_MODES, TTA
from cifarkit.infer.export import FORMATS
from cifarkit.run import schema
from cifarkit.run.schema import check
from conftest import CONFIG_DIR, compose, run_dirs

CKPT = ["ckpt_path=model.ckpt"]  # never read: the schema stops the run first

# (script, arguments, the line's start): a wrong type and an out-of-range value for each group.
BAD = {
    "data, type": ("train.py", ["data.batch_size=abc"], "data.batch_size=abc: must be an integer of at least 1"),
    "data, range": ("train.py", ["data.batch_size=-3"], "data.batch_size=-3: must be an integer of at least 1"),
    "data, a source's type": ("train.py", ["data=svhn", "data.extra=some"], "data.extra=some: must be true or false"),
    "data, a source's range": ("train.py", ["data=cifar100", "data.labels=medium"], "data.labels=medium: must be one"),
    "data, a key": ("train.py", ["+data.colour=1"], "data.colour is not an option; data takes _target_, cache_dir"),
    "data.augment, type": ("train.py", ["data.augment.flip=0.5"], "data.augment.flip=0.5: must be a mapping with p"),
    "data.augment, range": (
        "train.py",
        ["data.augment.flip.p=2"],
        "data.augment.flip.p=2: must be a number from 0 to 1",
    ),
    "model, type": ("train.py", ["model.channels_last=fast"], "model.channels_last=fast: must be true or false"),
    "model, range": ("train.py", ["model.label_smoothing=1.5"], "model.label_smoothing=1.5: must be a number of at"),
    "model.optimizer, type": ("train.py", ["model.optimizer=null"], "model.optimizer=null: must be a mapping with"),
    "model.scheduler, range": (
        "train.py",
        ["experiment=airbench94", "model.scheduler.decay=exponential"],
        "model.scheduler.decay=exponential: must be one of linear, cosine",
    ),
    "trainer, type": ("train.py", ["trainer.max_epochs=ten"], "trainer.max_epochs=ten: must be an integer of at least"),
    "trainer, range": (
        "train.py",
        ["trainer.max_epochs=-2"],
        "trainer.max_epochs=-2: must be an integer of at least -1",
    ),
    "trainer, an added argument": (
        "train.py",
        ["+trainer.limit_train_batches=1.5"],
        "trainer.limit_train_batches=1.5: must be a count (an integer) or a fraction from 0 to 1",
    ),
    "paths, type": ("train.py", ["paths.checkpoint_dir=[a,b]"], 'paths.checkpoint_dir=["a", "b"]: must be a string'),
    "paths, a key": ("train.py", ["+paths.dataset_dir=x"], "paths.dataset_dir is not an option; paths takes"),
    "callbacks, type": (
        "train.py",
        ["callbacks.lr_monitor=3"],
        "callbacks.lr_monitor=3: must be a mapping with _target_",
    ),
    "callbacks, range": (
        "train.py",
        ["experiment=cpu10", "callbacks.lookahead.decay=2"],
        "callbacks.lookahead.decay=2: must be a number from 0 to 1",
    ),
    "logger, type": ("train.py", ["logger.tensorboard=3"], "logger.tensorboard=3: must be a mapping with _target_"),
    "train, type": ("train.py", ["seed=abc"], "seed=abc: must be an integer"),
    "train, range": ("train.py", ["budget_s=-5"], "budget_s=-5: must be seconds of training above 0, or null"),
    "train, budget_nets": ("train.py", ["budget_nets=[{}]"], "budget_nets[0]={}: must be a non-empty mapping"),
    "train, a key": ("train.py", ["+sed=1"], "sed is not an option; the config takes task_name, tags, seed"),
    "eval, type": ("eval.py", [*CKPT, "tta=3"], "tta=3: must be one of none, flip, flip_translate, or null"),
    "eval, range": ("eval.py", [*CKPT, "tta=mirror"], "tta=mirror: must be one of none, flip, flip_translate"),
    "eval, missing": ("eval.py", [], "ckpt_path is not set; pass ckpt_path=... (a string)"),
    "predict, type": ("predict.py", [*CKPT, "inputs=x", "top_k=many"], "top_k=many: must be an integer of at least 1"),
    "predict, range": ("predict.py", [*CKPT, "inputs=x", "top_k=0"], "top_k=0: must be an integer of at least 1"),
    "predict, format": ("predict.py", [*CKPT, "inputs=x", "format=xml"], "format=xml: must be one of text, json"),
    "export, type": ("export.py", [*CKPT, "output=[a]"], 'output=["a"]: must be a string, or null'),
    "export, range": ("export.py", [*CKPT, "format=tflite"], "format=tflite: must be one of onnx, pt2"),
    "export, output": ("export.py", [*CKPT, "output=m.pt2"], "output=m.pt2 does not end in .onnx"),
    "serve, type": ("serve.py", [*CKPT, "port=http"], "port=http: must be an integer from 1024 to 65535"),
    "serve, range": ("serve.py", [*CKPT, "port=80"], "port=80: must be an integer from 1024 to 65535"),
    "serve, threads": ("serve.py", [*CKPT, "threads=0"], "threads=0: must be an integer of at least 1, or null"),
    "serve, batch_timeout": (
        "serve.py",
        [*CKPT, "batch_timeout=-1"],
        "batch_timeout=-1: must be a number of at least 0",
    ),
    "serve, max_body_mb": ("serve.py", [*CKPT, "max_body_mb=0"], "max_body_mb=0: must be a number over 0"),
    "serve, host": ("serve.py", [*CKPT, "host=localhost"], "host=localhost: must be 127.0.0.1 (this machine)"),
}


def one_line(main, tmp_path: Path, script: str, args: list[str]) -> str:
    """The run's only line on stderr, after it exited 1 with nothing written."""
    r = main(script, [*args, f"paths.log_dir={tmp_path / 'logs'}", f"paths.data_dir={tmp_path / 'data'}"])
    lines = r.err.strip().splitlines()
    assert r.code == 1 and len(lines) == 1 and lines[0].startswith("error: "), r.err[-2000:]
    assert not (tmp_path / "logs").exists()  # refused before Hydra made a run directory
    return lines[0].removeprefix("error: ")


@pytest.mark.parametrize("case", BAD)
def test_a_bad_value_is_one_line_naming_its_key(case: str, main, tmp_path: Path) -> None:
    script, args, expected = BAD[case]
    line = one_line(main, tmp_path, script, args)
    assert line.startswith(expected), line


def test_several_bad_values_are_one_line_the_first_in_full(main, tmp_path: Path) -> None:
    line = one_line(main, tmp_path, "train.py", ["data.batch_size=0", "data.eval_batch_size=0", "model.tta=x"])
    assert line == (
        "data.batch_size=0: must be an integer of at least 1 (and 2 more: data.eval_batch_size, model.tta)"
    ), line


def test_a_huge_value_is_cut_short(main, tmp_path: Path) -> None:
    line = one_line(main, tmp_path, "train.py", [f"seed={'x' * 5000}"])
    assert line.startswith("seed=xxx") and line.endswith("...: must be an integer") and len(line) < 200, line


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


PRESETS = [
    *(
        [f"{group}={option}"]
        for group in ("data", "model", "trainer", "logger", "callbacks")
        for option in options(group)
    ),
    *([f"experiment={e}", f"debug={d}"] for e in options("experiment") for d in ["", *options("debug")]),
    ["hparams_search=lr_optuna"],
    ["experiment=finetune", "model=timm", "model.net.name=resnet18.a1_in1k", "model.net.pretrained=true"],
]


@pytest.mark.parametrize("overrides", PRESETS, ids=" ".join)
def test_every_preset_passes(overrides: list[str], tmp_path: Path) -> None:
    """Every option of every group, and every experiment with every debug preset, as train.py checks it
    (README's and docs/'s commands: test_docs.py, through the same command-line check)."""
    extra = ["data.root=/x"] if "data=image_folder" in overrides else []
    check(compose(tmp_path, [o for o in overrides if not o.endswith("=")] + extra, with_hydra=True))


@pytest.mark.parametrize("name", ["eval", "predict", "export", "serve"])
def test_every_entry_points_defaults_pass(name: str, tmp_path: Path) -> None:
    check(compose(tmp_path, ["ckpt_path=x.ckpt", *(["inputs=x"] if name == "predict" else [])], name, with_hydra=True))


def test_a_sweeps_job_is_checked_with_its_own_values(main, tmp_path: Path) -> None:
    """The command line checks each sweep's first value; a later job's own bad value fails that job
    alone, in one line, and the sweep goes on."""
    r = main(
        "predict.py",
        ["-m", "top_k=1,0", "ckpt_path=missing.ckpt", "inputs=x", f"paths.log_dir={tmp_path / 'logs'}"],
    )
    assert r.code == 0, r.err[-2000:]
    assert "job failed: inputs=x does not exist" in r.err  # the first job passed the schema
    assert "job failed: top_k=0: must be an integer of at least 1" in r.err
    (sweep,) = (tmp_path / "logs" / "predict" / "multiruns").iterdir()
    assert json.loads((sweep / "1" / "metrics.json").read_text())["error"].startswith("top_k=0: must be")
    assert not run_dirs(tmp_path / "logs", "predict")


def test_the_schemas_names_are_the_codes() -> None:
    """The option names the schema states (it imports no torch) are those the code acts on."""
    from lightning.fabric.connector import _PRECISION_INPUT

    lightnings = {value for literal in get_args(_PRECISION_INPUT) for value in get_args(literal)}
    assert schema.TTA == TTA
    props = schema._adapter("train").json_schema()["$defs"]
    assert set(props["Crop"]["properties"]["mode"]["enum"]) == set(PADDING_MODES)
    assert set(schema._adapter("export").json_schema()["properties"]["format"]["enum"]) == set(FORMATS)
    assert set(schema.PRECISIONS) - {"auto"} == lightnings


def test_an_interpolation_that_cannot_resolve_yet_is_not_an_error(tmp_path: Path) -> None:
    """Before Hydra's run starts, ${hydra:...} has no value: the command-line check skips what depends on it."""
    cfg = compose(tmp_path, [], with_hydra=True)
    cfg.paths.output_dir = "${hydra:runtime.output_dir}"
    check(cfg)
    cfg.data.batch_size = "${hydra:runtime.no_such_key}"
    check(cfg)
    cfg.data.batch_size = 0
    with pytest.raises(UserError, match="data.batch_size=0"):
        check(cfg)
