"""A checkpoint is a file a stranger can hand you: reading it runs no code, and predict.py, eval.py,
export.py and serve.py build nothing from it but trusted ``nn.Module`` classes.

The entry points rebuild the net from the checkpoint's ``hyper_parameters["net"]`` Hydra config.
Each case below is a crafted checkpoint whose net config carries a payload: if any part of it
ran, it would create a canary under the test's tmp_path (a file, a folder, or, for
``cifarkit.run.cli.fail``, its own ``error:`` line). Each goes through all four entry points, as
their command lines run them, and must be refused in one line before anything is called:

* exit code 1, no Traceback, the last stderr line starts with ``error: `` and names the offending
  piece (the target string, the key, the interpolation);
* the canary does not exist afterwards, and nothing was printed or written;
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
project's check. Positive control: the same crafted layout with a valid net config predicts.
"""

from __future__ import annotations

import contextlib
import functools
import math
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from cifarkit.core.errors import UserError
from cifarkit.nets.models import BasicCNN
from cifarkit.nets.saved import check_net_config, read_checkpoint
from conftest import (
    DATA_INFO3,
    FAST,
    Payload,
    craft_checkpoint,
    error_line,
    folder_overrides,
    inflating,
    run_measured,
)

# serve.py is given a port that is taken: had a crafted checkpoint not been refused first, it would
# stop there (failing the test) rather than serve.
TAKEN = socket.create_server(("127.0.0.1", 0))

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
    printed: bool = False  # the canary is cifarkit.run.cli.fail's own "error: <canary>" line

    def __str__(self) -> str:
        return self.id


def savetxt_args(c: Path) -> list:
    return [str(c), [1, 2, 3]]


def oc_create(c: Path) -> str:
    """A resolver that would build numpy.savetxt only when the config is resolved."""
    return "${oc.create:{_target_: numpy.savetxt, _args_: ['" + str(c) + "', [1, 2, 3]]}}"


CASES = [
    # 1. the known hole: a cifarkit.-prefixed string that reaches numpy through a module attribute
    Case(
        "nested_module_attribute",
        lambda c: {
            "_target_": "cifarkit.nets.models.BasicCNN",
            "image_size": {"_target_": "cifarkit.data.sources.np.savetxt", "_args_": savetxt_args(c)},
        },
        ("cifarkit.data.sources.np.savetxt", "_args_"),
        real_weights=True,
        live=True,
    ),
    # 2.
    Case(
        "numpy_savetxt",
        lambda c: {"_target_": "numpy.savetxt", "_args_": savetxt_args(c)},
        ("numpy.savetxt", "_args_"),
        live=True,
    ),
    # 3.
    Case(
        "builtins_exec",
        lambda c: {"_target_": "builtins.exec", "_args_": [f"open({str(c)!r}, 'w').write('pwned')"]},
        ("builtins.exec", "_args_"),
    ),
    # 4.
    Case("os_system", lambda c: {"_target_": "os.system", "_args_": [f"touch {c}"]}, ("os.system", "_args_")),
    # 5.
    Case(
        "subprocess_run",
        lambda c: {"_target_": "subprocess.run", "_args_": [["touch", str(c)]]},
        ("subprocess.run", "_args_"),
    ),
    # 6. torch.load with weights_only=False of a pickle whose __reduce__ runs os.system
    Case(
        "torch_load_pickle",
        lambda c: {"_target_": "torch.load", "f": str(c.parent / "payload.pt"), "weights_only": False},
        ("torch.load",),
        pickle_payload=True,
        live=True,
    ),
    # 7. functools.partial whose argument is built (called) first
    Case(
        "functools_partial",
        lambda c: {
            "_target_": "functools.partial",
            "_args_": [{"_target_": "numpy.savetxt", "_args_": savetxt_args(c)}],
        },
        ("functools.partial", "numpy.savetxt", "_args_"),
        live=True,
    ),
    # 8. Hydra keys on a valid class
    Case(
        "partial_key",
        lambda c: {"_target_": "cifarkit.nets.models.BasicCNN", "_partial_": True, "image_size": 32},
        ("_partial_",),
        real_weights=True,
    ),
    Case(
        "args_key",
        lambda c: {"_target_": "cifarkit.nets.models.BasicCNN", "_args_": [3]},
        ("_args_",),
        real_weights=True,
    ),
    # 9. interpolations: a resolver in a value, one in a key
    Case(
        "interpolation_in_value",
        lambda c: {"_target_": "cifarkit.nets.models.BasicCNN", "image_size": oc_create(c)},
        ("${oc.create",),
        real_weights=True,
        live=True,
    ),
    Case(
        "interpolation_in_key",
        lambda c: {"_target_": "cifarkit.nets.models.BasicCNN", "image_size": 32, oc_create(c): 1},
        ("${oc.create",),
        real_weights=True,
    ),
    # 10. an nn.Module class outside the trusted modules (importable: evilmod.py is on sys.path),
    # whose import and __init__ both write a canary; and torch's class reached through cifarkit.nets.models
    Case(
        "untrusted_module_class",
        lambda c: {"_target_": "evilmod.Evil"},
        ("evilmod.Evil",),
        ("-imported",),
        live=True,
        evil_module=True,
    ),
    Case(
        "torch_class_via_trusted_module",
        lambda c: {"_target_": "cifarkit.nets.models.torch.nn.Linear", "in_features": 3072, "out_features": 3},
        ("cifarkit.nets.models.torch.nn.Linear",),
    ),
    # 11. trusted functions that are not nn.Module classes: at the top, and nested in a valid net
    Case(
        "trusted_function",
        lambda c: {"_target_": "cifarkit.run.cli.fail", "message": str(c)},
        ("cifarkit.run.cli.fail",),
        printed=True,
    ),
    Case(
        "trusted_function_nested",
        lambda c: {
            "_target_": "cifarkit.nets.models.BasicCNN",
            "image_size": {"_target_": "cifarkit.run.jobs.write_metrics", "output_dir": str(c), "metrics": 1},
        },
        ("cifarkit.run.jobs.write_metrics",),
        real_weights=True,
        live=True,
    ),
]


EVIL_MODULE = """
import pathlib
import torch

pathlib.Path({imported!r}).write_text("imported")


class Evil(torch.nn.Module):
    def __init__(self, num_classes: int = 10, **kwargs):
        super().__init__()
        pathlib.Path({built!r}).write_text("built")
"""


@functools.cache
def basic_cnn_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return BasicCNN(num_classes=3).state_dict()


def canary(case: Case, tmp_path: Path) -> Path:
    """Distinct per case (tmp_path is per test); a neutral name, so that a message that merely
    echoes a path cannot pass for naming the offending piece."""
    return tmp_path / "canary"


def canaries(case: Case, tmp_path: Path) -> list[Path]:
    c = canary(case, tmp_path)
    return [c, *(c.with_name(c.name + s) for s in case.extra_canaries)]


def prepare(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Write the crafted checkpoint (and the payload's helper files, evilmod.py importable)."""
    c = canary(case, tmp_path)
    if case.evil_module:
        (tmp_path / "evilmod.py").write_text(EVIL_MODULE.format(imported=str(c) + "-imported", built=str(c)))
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, "evilmod", raising=False)  # and forgotten after the test
    if case.pickle_payload:
        torch.save(Payload(c), tmp_path / "payload.pt")
    weights = basic_cnn_weights() if case.real_weights else None
    return craft_checkpoint(tmp_path / "crafted.ckpt", case.net(c), weights)


def assert_refused(case: Case, r, tmp_path: Path) -> None:
    report = f"code={r.code}\n--- stderr (tail) ---\n{r.err[-3000:]}"
    made = [p.name for p in canaries(case, tmp_path) if p.exists()]
    assert not made, f"the payload ran: {made} exist\n{report}"
    if case.printed:
        assert f"error: {canary(case, tmp_path)}" not in r.err, f"cifarkit.run.cli.fail ran\n{report}"
    assert r.code == 1, report
    last = error_line(r.err).replace(str(tmp_path), "<tmp>")  # tmp_path's name holds the test id: never a match
    assert any(p in last for p in case.pieces), f"the refusal names none of {case.pieces}: {last}"
    late = [phrase for phrase in TOO_LATE if phrase in last]
    assert not late, f"refused only once building was under way ({late}): {last}"
    assert r.out.strip() == "", r.out  # no prediction, no exported path


def entry_args(script: str, ckpt: Path, tmp_path: Path, image_folder: Path) -> list[str]:
    img = tmp_path / "img.png"
    Image.new("RGB", (32, 32), (120, 80, 40)).save(img)
    return {
        "predict.py": [f"ckpt_path={ckpt}", f"inputs={img}"],
        "eval.py": [f"ckpt_path={ckpt}", "trainer=cpu", *folder_overrides(image_folder, tmp_path)],
        "export.py": [f"ckpt_path={ckpt}", f"output={tmp_path / 'model.onnx'}"],
        "serve.py": [f"ckpt_path={ckpt}", f"port={TAKEN.getsockname()[1]}"],
    }[script] + [f"paths.log_dir={tmp_path / 'logs'}"]


@pytest.mark.parametrize("script", ["predict.py", "eval.py", "export.py", "serve.py"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_entry_points_refuse(case: Case, script: str, main, image_folder: Path, tmp_path: Path, monkeypatch) -> None:
    ckpt = prepare(case, tmp_path, monkeypatch)
    r = main(script, entry_args(script, ckpt, tmp_path, image_folder))
    assert_refused(case, r, tmp_path)
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.filterwarnings(
    "ignore:Using '_target_. functools.partial' is deprecated"
)  # the crafted config's, on purpose
@pytest.mark.parametrize("case", [c for c in CASES if c.live], ids=str)
def test_payload_is_live(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The canary is a real witness: an unchecked rebuild (Hydra's instantiate) creates it."""
    from hydra.utils import instantiate

    prepare(case, tmp_path, monkeypatch)
    with contextlib.suppress(Exception):
        instantiate(case.net(canary(case, tmp_path)))
    missing = [p.name for p in canaries(case, tmp_path) if not p.exists()]
    assert not missing, f"instantiate did not create {missing}: the canary would prove nothing"


def test_crafted_valid_checkpoint_is_accepted(tmp_path: Path, main, image_folder: Path, monkeypatch) -> None:
    """The crafted layout itself passes: with a valid net config the same file predicts."""
    valid = Case(
        "valid", lambda c: {"_target_": "cifarkit.nets.models.BasicCNN", "image_size": 32}, (), real_weights=True
    )
    ckpt = prepare(valid, tmp_path, monkeypatch)
    r = main("predict.py", entry_args("predict.py", ckpt, tmp_path, image_folder))
    assert r.code == 0, r.err[-3000:]
    out = r.out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"{tmp_path / 'img.png'}\t"), out


def test_nested_targets_are_checked() -> None:
    check_net_config({"_target_": "cifarkit.nets.models.BasicCNN", "image_size": 32}, ["cifarkit."])
    with pytest.raises(UserError, match=r"net.block .*subprocess.run"):
        check_net_config(
            {"_target_": "cifarkit.nets.models.BasicCNN", "block": {"_target_": "subprocess.run"}}, ["cifarkit."]
        )
    with pytest.raises(UserError, match=r"net.layers\[0\] .*builtins.eval"):
        check_net_config(
            {"_target_": "cifarkit.nets.models.BasicCNN", "layers": [{"_target_": "builtins.eval"}]}, ["cifarkit."]
        )
    # judged on the resolved object: numpy and torch reached through a trusted module's attributes
    for target in (
        "cifarkit.data.sources.np.savetxt",
        "cifarkit.nets.models.nn.Linear",
        "cifarkit.nets.models.torch.nn.Linear",
    ):
        with pytest.raises(UserError, match="only nn.Module classes defined under"):
            check_net_config({"_target_": target}, ["cifarkit."])
    for key in ("_partial_", "_args_", "_recursive_", "_convert_"):
        with pytest.raises(UserError, match=key):
            check_net_config({"_target_": "cifarkit.nets.models.BasicCNN", key: True}, ["cifarkit."])


def bad_files(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    plain = tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.ones(2)}, plain)  # a plain state dict, not Lightning's
    pickled = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Payload(tmp_path / "pwned")}, pickled)  # unpickling would run touch
    return {"missing": tmp_path / "nope.ckpt", "text": text, "plain torch": plain, "pickle": pickled}


@pytest.mark.parametrize("kind", ["missing", "text", "plain torch", "pickle"])
def test_reading_a_bad_file_is_one_line_and_runs_nothing(kind: str, tmp_path: Path) -> None:
    path = bad_files(tmp_path)[kind]
    with pytest.raises(UserError, match=f"ckpt_path={path} ") as e:
        read_checkpoint(path)
    assert "\n" not in str(e.value) and ".ckpt" in str(e.value)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "script,kind", [("train.py", "plain torch"), ("train.py", "missing"), ("eval.py", "text"), ("predict.py", "pickle")]
)
def test_bad_ckpt_path_on_the_command_line(script: str, kind: str, main, image_folder: Path, tmp_path: Path) -> None:
    """One line, and the runs already in the log directory are left as they were."""
    previous = tmp_path / "logs" / "train" / "runs" / "earlier"
    (previous / "checkpoints").mkdir(parents=True)
    (previous / "checkpoints" / "last.ckpt").write_bytes(b"good")
    path = bad_files(tmp_path)[kind]
    args = {
        "train.py": FAST + folder_overrides(image_folder, tmp_path),
        "eval.py": ["trainer=cpu", *folder_overrides(image_folder, tmp_path)],
        "predict.py": [f"inputs={tmp_path}"],
    }[script]
    r = main(script, args + [f"ckpt_path={path}", f"paths.log_dir={tmp_path / 'logs'}"])
    assert r.code == 1 and error_line(r.err).startswith(f"error: ckpt_path={path} ")
    assert (previous / "checkpoints" / "last.ckpt").read_bytes() == b"good"
    assert sorted(p.name for p in previous.iterdir()) == ["checkpoints"]
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------------------------
# The checkpoint's plain data: every field a stranger can set, held to the schema's bounds.


def shared_lists(levels: int, fanout: int) -> list:
    """A few kB pickled, ``fanout ** levels`` values when walked (one list referenced over and over)."""
    node: list = [0] * fanout
    for _ in range(levels):
        node = [node] * fanout
    return node


def nested(depth: int) -> list:
    node: list = []
    for _ in range(depth):
        node = [node]
    return node


def info(**changes: Any) -> dict:
    return {**DATA_INFO3, **changes}


BASIC = {"_target_": "cifarkit.nets.models.BasicCNN"}
# (id, net config, top-level entries to set, weights changed by, a phrase of the refusal)
CRAFTED = [
    (
        "mean_nan",
        BASIC,
        {"data_info": info(mean=[math.nan, 0.5, 0.5])},
        None,
        "mean.0: Input should be a finite number",
    ),
    ("std_inf", BASIC, {"data_info": info(std=[math.inf, 0.2, 0.2])}, None, "std.0: Input should be a finite number"),
    (
        "std_zero",
        BASIC,
        {"data_info": info(std=[0.0, 0.2, 0.2])},
        None,
        "std.0: Input should be greater than or equal to 0.001",
    ),
    (
        "mean_huge",
        BASIC,
        {"data_info": info(mean=[1e9, 0.5, 0.5])},
        None,
        "mean.0: Input should be less than or equal to 10",
    ),
    (
        "image_size_20000",
        BASIC,
        {"data_info": info(image_size=20_000)},
        None,
        "image_size: Input should be less than or equal to 1024",
    ),
    (
        "image_size_bool",
        BASIC,
        {"data_info": info(image_size=True)},
        None,
        "image_size: Input should be a valid integer",
    ),
    (
        "class_escape",
        BASIC,
        {"data_info": info(classes=["cat", "\x1b]0;pwned\x07dog", "frog"])},
        None,
        "class 1 holds a character",
    ),
    (
        "class_newline",
        BASIC,
        {"data_info": info(classes=["cat", "dog\ncat 0.99", "frog"])},
        None,
        "class 1 holds a character",
    ),
    ("class_nul", BASIC, {"data_info": info(classes=["cat", "dog\x00", "frog"])}, None, "class 1 holds a character"),
    ("class_duplicate", BASIC, {"data_info": info(classes=["cat", "cat", "frog"])}, None, "a class name repeats (cat)"),
    (
        "class_10mb",
        BASIC,
        {"data_info": info(classes=["c" * 10_000_000, "dog", "frog"])},
        None,
        "classes.0: String should have at most 200",
    ),
    (
        "classes_20k",
        BASIC,
        {"data_info": info(classes=[f"c{i}" for i in range(20_000)])},
        None,
        "List should have at most 10000",
    ),
    ("classes_string", BASIC, {"data_info": info(classes="catdogfrog")}, None, "classes: Input should be a valid list"),
    ("hparams_list", BASIC, {"hyper_parameters": [1, 2]}, None, "has a hyper_parameters that is a list, not a mapping"),
    (
        "label_smoothing_nan",
        BASIC,
        {"hyper_parameters": {"net": BASIC, "label_smoothing": math.nan}},
        None,
        "label_smoothing",
    ),
    ("tta_unknown", BASIC, {"hyper_parameters": {"net": BASIC, "tta": "rot90"}}, None, "tta: Input should be"),
    (
        "width_negative",
        {"_target_": "cifarkit.nets.models.AirbenchNet", "widths": [-1]},
        {},
        None,
        "net config does not fit cifarkit.nets.models.AirbenchNet (RuntimeError",
    ),
    (
        "width_million",
        {"_target_": "cifarkit.nets.models.AirbenchNet", "widths": [1_000_000]},
        {},
        None,
        "net.widths[0] is 1000000",
    ),
    ("nested_1200", {**BASIC, "image_size": nested(1200)}, {}, None, "crafted.ckpt is nested over 12 levels deep"),
    ("nested_8", {**BASIC, "image_size": nested(8)}, {}, None, "net config is nested over 6 levels deep"),
    ("shared_references", {**BASIC, "image_size": shared_lists(1, 100)}, {}, None, "net config holds over 500 values"),
    ("shared_references_elsewhere", BASIC, {"loops": shared_lists(5, 1000)}, None, "holds over 100000 values"),
    ("long_string", {**BASIC, "image_size": "x" * 1000}, {}, None, "net.image_size is a string of 1000 characters"),
    ("wrong_image_size", BASIC, {"data_info": info(image_size=16)}, None, "its net cannot classify a 16x16 image"),
    ("weights_nan", BASIC, {}, lambda w: w["fc3.bias"].fill_(math.nan), "NaN or infinite values in net.fc3.bias"),
    (
        "weights_broadcast",
        BASIC,
        {},
        lambda w: w.update({"fc3.weight": torch.zeros(1, 1).expand(3, 256)}),
        "weight net.fc3.weight that is not a plain stored tensor",
    ),
    ("weights_missing", BASIC, {}, lambda w: w.pop("fc1.weight"), "its weights do not fit its net config"),
]


def crafted(tmp_path: Path, net: Any, extra: dict, change: Any) -> Path:
    weights = {k: v.clone() for k, v in basic_cnn_weights().items()}
    if change is not None:
        change(weights)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)  # pickling the 1,200-deep config recurses
    try:
        return craft_checkpoint(tmp_path / "crafted.ckpt", net, weights, **extra)
    finally:
        sys.setrecursionlimit(limit)


@pytest.mark.parametrize("case", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_crafted_metadata_is_refused_in_one_line(case: tuple, main, tmp_path: Path) -> None:
    """Through predict.py's command line: one ``error:`` line naming the field, nothing printed."""
    _, net, extra, change, phrase = case
    ckpt = crafted(tmp_path, net, extra, change)
    img = tmp_path / "img.png"
    Image.new("RGB", (32, 32), (120, 80, 40)).save(img)
    r = main("predict.py", [f"ckpt_path={ckpt}", f"inputs={img}", f"paths.log_dir={tmp_path / 'logs'}"])
    line = error_line(r.err)
    assert r.code == 1 and phrase in line and r.out == "", line
    assert line.isprintable() and len(line) < 1000, line[:300]


@pytest.mark.parametrize("script", ["eval.py", "export.py", "serve.py"])
@pytest.mark.parametrize(
    "case", [c for c in CRAFTED if c[0] in ("image_size_20000", "class_escape", "wrong_image_size")], ids=lambda c: c[0]
)
def test_every_door_refuses_crafted_metadata(
    case: tuple, script: str, main, image_folder: Path, tmp_path: Path
) -> None:
    """The same refusal at eval.py, export.py and serve.py (serve.py before any port is bound)."""
    _, net, extra, change, phrase = case
    ckpt = crafted(tmp_path, net, extra, change)
    r = main(script, entry_args(script, ckpt, tmp_path, image_folder))
    assert r.code == 1 and phrase in error_line(r.err) and r.out.strip() == ""
    assert not (tmp_path / "model.onnx").exists()


INFLATER = """
import sys
from cifarkit.nets.saved import read_checkpoint
from cifarkit.core.errors import UserError
before = peak_mb()
try:
    read_checkpoint(sys.argv[1])
    print("read")
except UserError as e:
    print(e)
print(peak_mb() - before, "MB")
"""


def test_a_record_that_inflates_1000x_is_refused_without_the_memory(tmp_path: Path) -> None:
    """A 0.3 MB checkpoint whose one record inflates to 300 MB (a deflated zip entry of zeros;
    torch's reader inflates it): refused from the archive's directory, the process's peak memory
    grows by far less than the record."""
    size = 300_000_000
    crafted_file = inflating(tmp_path / "inflates.ckpt", size)
    assert crafted_file.stat().st_size * 1000 < size
    r = run_measured(INFLATER, str(crafted_file), cwd=tmp_path)
    message, grown = r.stdout.strip().splitlines()
    assert "holds compressed records (300.0 MB from a 0.3 MB file)" in message and "nothing was inflated" in message, (
        r.stderr
    )
    assert int(grown.split()[0]) < 100, grown
