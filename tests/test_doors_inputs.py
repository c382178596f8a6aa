"""Doors found by reading the code as an attacker would (issue 35): ONNX graphs, folders shared by two splits,
class names that break a run late, CIFAR's pickles, file names that are not UTF-8, 16-bit images.

Each test hands the project the crafted input and asserts the one line, the bound or the unchanged answer.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
from pathlib import Path

import matplotlib.text
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

from cifarkit.core.errors import UserError
from cifarkit.core.untrusted.onnx_graph import OPERATORS, RUN_BYTES, read_onnx
from cifarkit.nets.models import BasicCNN
from conftest import (
    DATA_INFO3,
    FAST,
    Payload,
    craft_checkpoint,
    datamodule,
    error_line,
    folder_overrides,
    free_port,
    run_dirs,
    run_measured,
)
from tiny_files import write_image_folder

# ---------------------------------------------------------------------------------------------
# ONNX graphs: only export.py's operators, static bounded shapes, checked before a session is made.


def graph_model(path: Path, extra_nodes: list, extra_weights: list, *, joins: str | None = None) -> Path:
    """An ONNX file with export.py's input, output and metadata: probabilities = softmax(mean colour), plus
    ``extra_nodes``; ``joins`` names a scalar they compute, added (times 0) to the scores so it is needed."""
    images = helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", 3, 32, 32])
    probs = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])
    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x", "hw"], ["scores"], keepdims=0),
    ]
    weights = [helper.make_tensor("hw", TensorProto.INT64, [2], [2, 3])]
    nodes += extra_nodes
    if joins:
        weights.append(helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]))
        nodes += [
            helper.make_node("Mul", [joins, "zero"], ["nothing"]),
            helper.make_node("Add", ["scores", "nothing"], ["joined"]),
        ]
    nodes.append(helper.make_node("Softmax", ["joined" if joins else "scores"], ["probabilities"], axis=1))
    graph = helper.make_graph(nodes, "crafted", [images], [probs], weights + extra_weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    helper.set_model_props(model, {k: json.dumps(v) for k, v in DATA_INFO3.items()})
    path.write_bytes(model.SerializeToString())
    return path


def loop_model(path: Path) -> Path:
    """A Loop of 10^15 trips, each adding 1: a few hundred bytes that run until killed."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Add", ["v", "one"], ["v_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    weights = [
        helper.make_tensor("trips", TensorProto.INT64, [], [10**15]),
        helper.make_tensor("true", TensorProto.BOOL, [], [True]),
        helper.make_tensor("start", TensorProto.FLOAT, [], [0.0]),
    ]
    loop = helper.make_node("Loop", ["trips", "true", "start"], ["counted"], body=body)
    return graph_model(path, [loop], weights, joins="counted")


def expand_model(path: Path) -> Path:
    """Expand, an operator export.py writes, of one float to 300 million: 1.2 GB computed from a few bytes."""
    weights = [
        helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]),
        helper.make_tensor("huge", TensorProto.INT64, [1], [300_000_000]),
    ]
    nodes = [
        helper.make_node("Expand", ["one", "huge"], ["big"]),
        helper.make_node("ReduceMax", ["big"], ["most"], keepdims=0),
    ]
    return graph_model(path, nodes, weights, joins="most")


LOADER = """
import sys
import onnx, onnxruntime  # imported before the baseline: only the model's own cost is measured
from omegaconf import OmegaConf
from cifarkit.core.errors import UserError
from cifarkit.infer.model import load_model
before = peak_mb()
cfg = {"ckpt_path": sys.argv[1], "threads": 1, "trusted_targets": ["cifarkit."], "device": "cpu"}
try:
    load_model(OmegaConf.create(cfg))
    print("loaded")
except UserError as e:
    print(e)
print(peak_mb() - before, "MB")
"""


@pytest.mark.parametrize(
    "craft,phrase",
    [
        (loop_model, "runs the operator Loop, which export.py never writes"),
        (expand_model, "MiB of values"),
    ],
    ids=["loop_1e15", "expand_1.2GB"],
)
def test_crafted_onnx_graphs_are_refused_before_a_session(craft, phrase: str, tmp_path: Path, main) -> None:
    """A 10^15-trip Loop ran until killed and an Expand to 1.2 GB added +1.1 GB: both are refused from the graph
    (predict.py's and serve.py's one loader, in a process of its own: memory grows < 100 MB), then in one
    line by each command."""
    model = craft(tmp_path / "crafted.onnx")
    assert model.stat().st_size < 3000
    try:
        r = run_measured(LOADER, str(model), cwd=tmp_path, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the loader ran the crafted graph for 2 minutes")
    message, grown = r.stdout.strip().splitlines()
    assert message.startswith(f"ckpt_path={model} ") and phrase in message, (message, r.stderr[-2000:])
    assert message.endswith("; export it again with export.py") and int(grown.split()[0]) < 100, (message, grown)
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), "red").save(image)
    for script, args in (
        ("predict.py", [f"inputs={image}"]),
        ("serve.py", [f"port={free_port()}"]),
    ):  # serve.py: before binding
        r = main(script, [f"ckpt_path={model}", *args, f"paths.log_dir={tmp_path / 'logs'}"])
        assert r.code == 1 and r.out.strip() == "" and phrase in error_line(r.err), (script, r.err[-2000:])


def nodes_reading_the_image(op: str) -> tuple[list, list]:
    """Nodes whose size is an image's brightest pixel: a shape that follows from data, not from the input's size."""
    nodes = [
        helper.make_node("Cast", ["images"], ["as_int"], to=TensorProto.INT64),
        helper.make_node("ReduceMax", ["as_int"], ["brightest"], keepdims=1),
        helper.make_node("Reshape", ["brightest", "flat"], ["size"]),
        helper.make_node(op, ["one", "size"], ["big"]),
        helper.make_node("ReduceMax", ["big"], ["most"], keepdims=0),
    ]
    weights = [
        helper.make_tensor("flat", TensorProto.INT64, [1], [1]),
        helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]),
    ]
    return nodes, weights


def test_graphs_export_py_never_writes_are_one_line(tmp_path: Path) -> None:
    """Another domain's operator, a subgraph, weights in an outside file, a size taken from the pixels, a wrong
    output: each refused from the graph in one line naming the option."""
    where = "ckpt_path=crafted.onnx"

    def refused(model: Path) -> str:
        with pytest.raises(UserError) as e:
            read_onnx(model, where, "export it again")
        assert str(e.value).startswith(f"{where} ") and "\n" not in str(e.value)
        return str(e.value)

    custom = graph_model(tmp_path / "custom.onnx", [], [])
    m = onnx.load(custom)
    m.graph.node[0].domain = "com.example"
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    custom.write_bytes(m.SerializeToString())
    assert "operator set com.example" in refused(custom)

    outside = graph_model(tmp_path / "outside.onnx", [], [])
    m = onnx.load(outside)
    weight = m.graph.initializer[0]
    weight.data_location = TensorProto.EXTERNAL
    weight.ClearField("int64_data")
    weight.external_data.add(key="location", value="/etc/passwd")
    outside.write_bytes(m.SerializeToString())
    assert "outside the file" in refused(outside)

    nodes, weights = nodes_reading_the_image("Expand")
    data_sized = graph_model(tmp_path / "data.onnx", nodes, weights, joins="most")
    assert "whose shape does not follow from the input's (big, a Expand output at batch 1)" in refused(data_sized)

    wide = graph_model(tmp_path / "wide.onnx", [], [])
    m = onnx.load(wide)
    m.graph.node[1].attribute[0].i = 1  # keepdims: (N, 3, 1, 1) scores
    wide.write_bytes(m.SerializeToString())
    assert "outputs of shape [1, 3, 1, 1] for 1 images" in refused(wide)

    plain = read_onnx(graph_model(tmp_path / "plain.onnx", [], []), where, "export it again")
    assert (plain.image_size, plain.num_classes, plain.max_batch) == (32, 3, 256)
    assert plain.metadata == DATA_INFO3
    run = plain.session(1)
    images = np.zeros((300, 3, 32, 32), np.uint8)  # split into 256 + 44 (padded to 64)
    images[1] = 255
    assert run(images).shape == (300, 3) and np.allclose(run(images), 1 / 3)
    assert RUN_BYTES == 2**30 and "Loop" not in OPERATORS and "If" not in OPERATORS and "Scan" not in OPERATORS


# ---------------------------------------------------------------------------------------------
# Folders: one file, one split; class names a checkpoint holds; names drawn as plain text.


def identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def test_a_file_linked_into_both_splits_is_a_test_image_only(tmp_path: Path, caplog) -> None:
    """Test images symbolically and hard linked into train/, a training image hard linked into test/: each file
    is a test image only (the test split keeps it, training drops it), and the run says so."""
    root = write_image_folder(tmp_path / "folder", n_train=6, n_test=3)
    tests = sorted((root / "test").rglob("*.*"))
    train_image = sorted((root / "train" / "dog").glob("*.*"))[0]
    (root / "train" / "cat" / f"linked{tests[0].suffix}").symlink_to(tests[0])
    os.link(tests[1], root / "train" / "dog" / f"twin{tests[1].suffix}")
    os.link(train_image, root / "test" / "dog" / f"from-train{train_image.suffix}")
    dm = datamodule(tmp_path, folder_overrides(root, tmp_path))
    with caplog.at_level("WARNING"):
        files = dm._files()
    train, test = ({identity(p) for p, _ in files[s]} for s in ("train", "test"))
    assert not train & test
    assert len(files["test"]) == len(test) == 9 + 1 and identity(train_image) in test
    assert len(files["train"]) == len(train) == 18 - 1  # the linked twins dropped, and the image test/ took
    assert "3 files under" in caplog.text and "not trained on" in caplog.text


def rename_class(root: Path, old: str, new: str) -> None:
    for split in ("train", "test"):
        (root / split / old).rename(root / split / new)


def test_a_class_name_no_checkpoint_holds_stops_before_training(tmp_path: Path, main) -> None:
    """A class folder of 201 characters trained a whole epoch, then stopped in a pydantic traceback at the first
    checkpoint: now one line before any step."""
    root = write_image_folder(tmp_path / "folder", n_train=8, n_test=2)  # enough to train on
    rename_class(root, "dog", "d" * 201)
    r = main("train.py", FAST + folder_overrides(root, tmp_path) + [f"paths.log_dir={tmp_path / 'logs'}"])
    assert r.code == 1
    line = error_line(r.err)
    assert "cannot be a checkpoint's class name (String should have at most 200 characters)" in line, line
    assert "Traceback" not in r.err and not list((tmp_path / "logs").rglob("*.ckpt"))


def test_class_names_are_drawn_as_plain_text(tmp_path: Path, main) -> None:
    """A class folder named ``$\\x$`` stopped training in matplotlib's math-text parser: both pictures are drawn,
    with the name as it is."""
    from cifarkit.fit.pictures import confusion_figure, render, samples_figure

    names = ["$\\x$", "cat", "$\\frac{a}{b}$"]
    figures = [
        samples_figure(torch.rand(3, 3, 32, 32), torch.arange(3), names),
        confusion_figure(torch.eye(3, dtype=torch.int64), names),
    ]
    for fig in figures:
        assert render(fig).ndim == 3
        drawn = {t.get_text() for t in fig.findobj(matplotlib.text.Text)}
        assert set(names) <= drawn
    root = write_image_folder(tmp_path / "folder", n_train=8, n_test=2)  # 24: 12 held out, 12 trained on
    rename_class(root, "dog", "$\\x$")
    r = main("train.py", FAST + folder_overrides(root, tmp_path) + [f"paths.log_dir={tmp_path / 'logs'}"])
    assert r.code == 0, r.err[-3000:]
    (run,) = run_dirs(tmp_path / "logs")
    assert (run / "samples.png").stat().st_size > 0 and (run / "confusion_matrix.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------
# CIFAR's pickles: NumPy's array reconstruction is all they can call.


def test_a_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    """A meta file whose unpickling would run ``touch``: refused in one line, nothing run; the official layout
    (Python 2's protocol 2 names, and NumPy's protocol 5 ones) still reads."""
    from cifarkit.core.untrusted import read_cifar_pickle

    marker = tmp_path / "pwned"
    evil = tmp_path / "meta"
    evil.write_bytes(pickle.dumps({"fine_label_names": ["a"], "x": Payload(marker)}))
    with pytest.raises(UserError, match=r"is not one of CIFAR's python pickles \(UnpicklingError: it names (posix|os)"):
        read_cifar_pickle(evil, "delete it to download it again")
    assert not marker.exists()
    data = {"data": np.arange(12, dtype=np.uint8).reshape(2, 6), "coarse_labels": [3, 4], "batch_label": "b"}
    written = {protocol: pickle.dumps(data, protocol=protocol) for protocol in (4, 5)}  # tiny_files.py's, NumPy's
    # what Python 2 wrote, as in the official files: protocol 2, byte strings, numpy.core's _reconstruct
    py2 = io.BytesIO()
    Python2Pickler(py2, protocol=2).dump(data)
    written[2] = py2.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy.core.multiarray\n_reconstruct" in written[2] and b"_codecs" not in written[2]
    for protocol, pickled in written.items():
        good = tmp_path / f"batch{protocol}"
        good.write_bytes(pickled)
        got = read_cifar_pickle(good, "x")
        assert np.array_equal(got["data"], data["data"]) and got["coarse_labels"] == [3, 4], protocol


class Python2Pickler(pickle._Pickler):
    """Python's own pickler, writing bytes as Python 2 wrote its strings (not through codecs.encode)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        self.write(
            pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256 else pickle.BINSTRING + struct.pack("<i", n) + obj
        )
        self.memoize(obj)

    dispatch[bytes] = save_bytes


# ---------------------------------------------------------------------------------------------
# Output: JSON every strict reader takes, whatever the file names.


def test_json_output_is_valid_utf8_for_a_name_that_is_not(tmp_path: Path, main) -> None:
    """A file whose name's bytes are not UTF-8 (b"bad\\xff.png") came out of format=json as a lone surrogate
    (\\udcff), which strict readers refuse: its undecodable byte is now written as the text \\udcff, as the
    text output shows it."""
    torch.manual_seed(0)
    ckpt = craft_checkpoint(
        tmp_path / "c.ckpt", {"_target_": "cifarkit.nets.models.BasicCNN"}, BasicCNN(num_classes=3).state_dict()
    )
    images = tmp_path / "images"
    images.mkdir()
    for name in (b"bad\xff.png", "Käfer.png".encode()):
        Image.new("RGB", (32, 32), "red").save(os.fsdecode(bytes(images) + b"/" + name))
    r = main(
        "predict.py", [f"ckpt_path={ckpt}", f"inputs={images}", "format=json", f"paths.log_dir={tmp_path / 'logs'}"]
    )
    assert r.code == 0, r.err
    paths = sorted(json.loads(line.decode("utf-8"))["path"] for line in r.out.encode().splitlines())
    for path in paths:
        path.encode("utf-8")  # a lone surrogate would raise here, as in a strict reader
    assert [Path(p).name for p in paths] == ["Käfer.png", "bad\\udcff.png"]


# ---------------------------------------------------------------------------------------------
# A 16-bit image decodes within an 8-bit one's memory.

DECODER_PEAK = """
import sys
from pathlib import Path
from cifarkit.core.untrusted import decode_image
decode_image(Path(sys.argv[2]), 32, "warm-up", "x")  # the decoders' own first allocations
before = peak_mb()
pixels = decode_image(Path(sys.argv[1]), 32, "image", "x")
print(int(pixels.mean()), peak_mb() - before)
"""


def test_a_16_bit_png_decodes_within_an_8_bit_ones_memory(tmp_path: Path) -> None:
    """At the pixel limit (4000x4000 = 16 megapixels), a 16-bit grey PNG needed 1.7x the peak memory of an 8-bit
    RGB one (NumPy's int64 over the whole image); now no more than it, plus 8 MB."""
    side = 4000
    grey16, rgb8, tiny = tmp_path / "grey16.png", tmp_path / "rgb8.png", tmp_path / "tiny.png"
    Image.fromarray(np.full((side, side), 0x8000, np.uint16)).save(grey16)  # mid grey
    Image.new("RGB", (side, side), (128, 128, 128)).save(rgb8)
    Image.new("RGB", (8, 8)).save(tiny)

    def peak(path: Path) -> tuple[int, int]:
        r = run_measured(DECODER_PEAK, str(path), str(tiny), timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        mean, grown = map(int, r.stdout.split())
        return mean, grown

    (mean16, peak16), (mean8, peak8) = peak(grey16), peak(rgb8)
    assert mean16 == mean8 == 128
    assert peak8 > 100 and peak16 <= peak8 + 8, (peak16, peak8)  # RGB alone is 64 MB (Pillow: 4 bytes a pixel)
