"""A checkpoint is a file a stranger can hand you: predict.py and eval.py must build nothing from it
but trusted ``nn.Module`` classes.

Both entry points rebuild the net from the checkpoint's ``hyper_parameters["net"]`` Hydra config.
Each case below is a crafted checkpoint whose net config carries a payload: if any part of it
ran, it would create a canary under the test's tmp_path (a file, a folder, or, for
``cifarkit.cli.fail``, its own ``error:`` line). Each is run as a user would (a subprocess) and
must be refused in one line before anything is called:

* exit code 1, no Traceback, the last stderr line starts with ``error: `` and names the offending
  piece (the target string, the key, the interpolation);
* the canary does not exist afterwards;
* the refusal is the checkpoint check's own: not Hydra failing part-way through a call (``Error in
  call to target``, its blocklist, ...) nor a "does not fit" error, which both mean something was
  already being built.

The rule: only ``nn.Module`` subclasses *defined* in a trusted module (``cifarkit.``) are built,
judged on the resolved object, nested configs included; no ``_partial_``/``_args_``/
``_recursive_``/``_convert_`` (no underscore key but ``_target_``); no ``${...}`` in keys or values.

``test_payload_is_live`` shows that the canaries can really be created: for the cases marked live,
``hydra.utils.instantiate`` of the net config (what an unchecked rebuild does) creates them. The
others are structural (a Hydra key, a torch class) or are stopped by the installed Hydra's own
target blocklist (os.system, exec, subprocess...), which is a second line of defence, not the
project's check. Positive controls: a crafted checkpoint with a valid net config is accepted
in-process here, and a genuine checkpoint from a training run by predict.py in test_predict.py.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CLASSES3, folder_overrides, run_cli
from PIL import Image

from cifarkit.model import BasicCNN

# Phrases that only appear once instantiation was under way: the refusal must come before them.
TOO_LATE = (
    "Error in call to target",  # Hydra called the target and it raised
    "Error locating target",  # Hydra imported / looked up the target
    "is blocklisted",  # Hydra's own target policy (a second line of defence, not the project's check)
    "HYDRA_",
    "do not fit",  # "its weights do not fit": a net was built
    "does not fit",  # "net config does not fit <class>": a trusted class was being called
)


@dataclass(frozen=True)
class Case:
    id: str
    net: Callable[[Path], Any]  # canary path -> the checkpoint's net config
    pieces: tuple[str, ...]  # the offending piece(s): the refusal must name one of them
    extra_canaries: tuple[str, ...] = ()  # suffixes of further canaries (canary path + suffix)
    real_weights: bool = False  # the net target is otherwise valid: give it BasicCNN's real weights
    live: bool = False  # instantiate(net) creates the canary (test_payload_is_live)
    evil_module: bool = False  # write evilmod.py beside the checkpoint and put it on PYTHONPATH
    pickle_payload: bool = False  # write payload.pt, whose unpickling would create the canary
    printed: bool = False  # the canary is cifarkit.cli.fail's own "error: <canary>" line
    run_eval: bool = False  # also run eval.py (a representative subset: each run costs seconds)

    def __str__(self) -> str:
        return self.id


def savetxt_args(c: Path) -> list:
    return [str(c), [1, 2, 3]]


def oc_create(c: Path) -> str:
    """A resolver that would build numpy.savetxt only when the config is resolved."""
    return "${oc.create:{_target_: numpy.savetxt, _args_: ['%s', [1, 2, 3]]}}" % c


CASES = [
    # 1. the known hole: a cifarkit.-prefixed string that reaches numpy through a module attribute
    Case(
        "nested_module_attribute",
        lambda c: {"_target_": "cifarkit.model.BasicCNN", "image_size": {"_target_": "cifarkit.data.np.savetxt", "_args_": savetxt_args(c)}},
        ("cifarkit.data.np.savetxt", "_args_"),
        real_weights=True, live=True, run_eval=True,
    ),
    # 2.
    Case("numpy_savetxt", lambda c: {"_target_": "numpy.savetxt", "_args_": savetxt_args(c)}, ("numpy.savetxt", "_args_"), live=True),
    # 3.
    Case("builtins_exec", lambda c: {"_target_": "builtins.exec", "_args_": [f"open({str(c)!r}, 'w').write('pwned')"]}, ("builtins.exec", "_args_")),
    # 4.
    Case("os_system", lambda c: {"_target_": "os.system", "_args_": [f"touch {c}"]}, ("os.system", "_args_")),
    # 5.
    Case("subprocess_run", lambda c: {"_target_": "subprocess.run", "_args_": [["touch", str(c)]]}, ("subprocess.run", "_args_")),
    # 6. torch.load with weights_only=False of a pickle whose __reduce__ runs os.system
    Case(
        "torch_load_pickle",
        lambda c: {"_target_": "torch.load", "f": str(c.parent / "payload.pt"), "weights_only": False},
        ("torch.load",),
        pickle_payload=True, live=True, run_eval=True,
    ),
    # 7. functools.partial whose argument is built (called) first
    Case(
        "functools_partial",
        lambda c: {"_target_": "functools.partial", "_args_": [{"_target_": "numpy.savetxt", "_args_": savetxt_args(c)}]},
        ("functools.partial", "numpy.savetxt", "_args_"),
        live=True,
    ),
    # 8. Hydra keys on a valid class
    Case(
        "partial_key",
        lambda c: {"_target_": "cifarkit.model.BasicCNN", "_partial_": True, "image_size": 32},
        ("_partial_",),
        real_weights=True, run_eval=True,
    ),
    Case("args_key", lambda c: {"_target_": "cifarkit.model.BasicCNN", "_args_": [3]}, ("_args_",), real_weights=True),
    # 9. interpolations: a resolver in a value, one in a key
    Case(
        "interpolation_in_value",
        lambda c: {"_target_": "cifarkit.model.BasicCNN", "image_size": oc_create(c)},
        ("${oc.create",),
        real_weights=True, live=True, run_eval=True,
    ),
    Case(
        "interpolation_in_key",
        lambda c: {"_target_": "cifarkit.model.BasicCNN", "image_size": 32, oc_create(c): 1},
        ("${oc.create",),
        real_weights=True,
    ),
    # 10. an nn.Module class outside the trusted modules (importable: evilmod.py is on PYTHONPATH),
    # whose import and __init__ both write a canary; and torch's class reached through cifarkit.model
    Case("untrusted_module_class", lambda c: {"_target_": "evilmod.Evil"}, ("evilmod.Evil",), ("-imported",),
         live=True, evil_module=True, run_eval=True),
    Case(
        "torch_class_via_trusted_module",
        lambda c: {"_target_": "cifarkit.model.torch.nn.Linear", "in_features": 3072, "out_features": 3},
        ("cifarkit.model.torch.nn.Linear",),
        run_eval=True,
    ),
    # 11. trusted functions that are not nn.Module classes: at the top, and nested in a valid net
    Case("trusted_function", lambda c: {"_target_": "cifarkit.cli.fail", "message": str(c)}, ("cifarkit.cli.fail",),
         printed=True, run_eval=True),
    Case(
        "trusted_function_nested",
        lambda c: {"_target_": "cifarkit.model.BasicCNN",
                   "image_size": {"_target_": "cifarkit.train.write_metrics", "output_dir": str(c), "metrics": 1}},
        ("cifarkit.train.write_metrics",),
        real_weights=True, live=True, run_eval=True,
    ),
]


class Payload:
    """Unpickling this object runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


EVIL_MODULE = '''
import pathlib
import torch

pathlib.Path({imported!r}).write_text("imported")


class Evil(torch.nn.Module):
    def __init__(self, num_classes: int = 10, **kwargs):
        super().__init__()
        pathlib.Path({built!r}).write_text("built")
'''


@functools.cache
def basic_cnn_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {f"net.{k}": v for k, v in BasicCNN(num_classes=3).state_dict().items()}


def canary(case: Case, tmp_path: Path) -> Path:
    """Distinct per case (tmp_path is per test); a neutral name, so that a message that merely
    echoes a path cannot pass for naming the offending piece."""
    return tmp_path / "canary"


def canaries(case: Case, tmp_path: Path) -> list[Path]:
    c = canary(case, tmp_path)
    return [c, *(c.with_name(c.name + s) for s in case.extra_canaries)]


def prepare(case: Case, tmp_path: Path) -> tuple[Path, dict]:
    """Write the crafted checkpoint (and the payload's helper files); return it and the env to run with."""
    c = canary(case, tmp_path)
    if case.evil_module:
        (tmp_path / "evilmod.py").write_text(EVIL_MODULE.format(imported=str(c) + "-imported", built=str(c)))
    if case.pickle_payload:
        torch.save(Payload(c), tmp_path / "payload.pt")
    info = {"classes": CLASSES3, "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 32}
    hparams = {
        "net": case.net(c),
        "classes": CLASSES3,
        "optimizer": {"lr": 0.001, "weight_decay": 0.0},
    }
    ckpt = tmp_path / "crafted.ckpt"
    state = basic_cnn_weights() if case.real_weights else {}
    torch.save({"state_dict": state, "hyper_parameters": hparams, "data_info": info}, ckpt)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return ckpt, env


def assert_refused(case: Case, r, tmp_path: Path) -> None:
    report = f"rc={r.returncode}\n--- stderr (tail) ---\n{r.stderr[-3000:]}"
    made = [p.name for p in canaries(case, tmp_path) if p.exists()]
    assert not made, f"the payload ran: {made} exist\n{report}"
    if case.printed:
        assert f"error: {canary(case, tmp_path)}" not in r.stderr, f"cifarkit.cli.fail ran\n{report}"
    assert r.returncode == 1, report
    assert "Traceback" not in r.stderr, report
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    assert last.startswith("error: "), report
    last = last.replace(str(tmp_path), "<tmp>")  # tmp_path's name holds the test id: never a match
    assert any(p in last for p in case.pieces), f"the refusal names none of {case.pieces}: {last}"
    late = [phrase for phrase in TOO_LATE if phrase in last]
    assert not late, f"refused only once building was under way ({late}): {last}"


# The default run takes a representative few through each entry point (each run is a Python
# start-up); `-m slow` (CI) takes every case through both.
FAST_PREDICT = {"nested_module_attribute", "torch_class_via_trusted_module", "interpolation_in_key", "untrusted_module_class"}
FAST_EVAL = {"nested_module_attribute", "trusted_function_nested"}


def cases(only: set[str], subset: list[Case] = CASES) -> list:
    return [c if c.id in only else pytest.param(c, marks=pytest.mark.slow) for c in subset]


@pytest.mark.parametrize("case", cases(FAST_PREDICT), ids=str)
def test_predict_refuses(case: Case, tmp_path: Path) -> None:
    ckpt, env = prepare(case, tmp_path)
    img = tmp_path / "img.png"
    Image.new("RGB", (32, 32), (120, 80, 40)).save(img)
    r = run_cli("predict.py", [f"ckpt_path={ckpt}", f"inputs={img}"], cwd=tmp_path, env=env)
    assert_refused(case, r, tmp_path)
    assert r.stdout.strip() == "", r.stdout  # no prediction printed


@pytest.mark.parametrize("case", cases(FAST_EVAL, [c for c in CASES if c.run_eval]), ids=str)
def test_eval_refuses(case: Case, image_folder: Path, tmp_path: Path) -> None:
    ckpt, env = prepare(case, tmp_path)
    args = [f"ckpt_path={ckpt}", "trainer=cpu", f"paths.log_dir={tmp_path / 'logs'}", *folder_overrides(image_folder, tmp_path)]
    r = run_cli("eval.py", args, cwd=tmp_path, env=env)
    assert_refused(case, r, tmp_path)


@pytest.mark.parametrize("case", [c for c in CASES if c.live], ids=str)
def test_payload_is_live(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The canary is a real witness: an unchecked rebuild (Hydra's instantiate) creates it."""
    from hydra.utils import instantiate

    prepare(case, tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "evilmod", raising=False)
    try:
        with contextlib.suppress(Exception):
            instantiate(case.net(canary(case, tmp_path)))
    finally:
        sys.modules.pop("evilmod", None)
    missing = [p.name for p in canaries(case, tmp_path) if not p.exists()]
    assert not missing, f"instantiate did not create {missing}: the canary would prove nothing"


def test_crafted_valid_checkpoint_is_accepted(tmp_path: Path, compose_cfg, capsys: pytest.CaptureFixture) -> None:
    """The crafted layout itself passes: with a valid net config the same file predicts."""
    from cifarkit.predict import predict

    valid = Case("valid", lambda c: {"_target_": "cifarkit.model.BasicCNN", "image_size": 32}, (), real_weights=True)
    ckpt, _ = prepare(valid, tmp_path)
    img = tmp_path / "img.png"
    Image.new("RGB", (32, 32), (120, 80, 40)).save(img)
    predict(compose_cfg([f"ckpt_path={ckpt}", f"inputs={img}"], config_name="predict"))
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"{img}\t"), out
