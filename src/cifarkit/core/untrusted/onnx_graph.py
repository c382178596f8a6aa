"""An ONNX model from a file (predict.py's and serve.py's ``ckpt_path=*.onnx``): its graph is read with the
``onnx`` package and held to what export.py writes before ONNX Runtime sees it, and the session is made here
only, from the bytes that were checked.

What passes: one graph of the operators export.py writes for the project's nets (``OPERATORS``: no Loop, Scan,
If or other control flow, no subgraph, no function, no operator of another domain), its weights inside the
file, one uint8 (N, 3, H, W) input and one (N, C) float output, and at every batch size it may be run with
(the powers of two up to ``MAX_BATCH``) every value's shape fixed by the input's, so ONNX's shape inference
knows each one before anything runs. From those shapes, a run's values (what ONNX Runtime may allocate, weights
aside) and its work (elements read and written, multiply-adds of convolutions and matrix products) are bounded:
a batch whose values pass ``RUN_BYTES`` is not run (batches are split), a graph whose one image passes either
bound is refused. The session then only ever runs the batch sizes checked (a batch is padded to the next one).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifarkit.core.errors import UserError
from cifarkit.core.extras import require
from cifarkit.core.untrusted.text import shown

# The operators torch's exporter (export.py) writes for the project's nets: BasicCNN, AirbenchNet (cpu10's net),
# ResNet18, and timm's resnet18 (CIFAR stem, and timm's stem fed at a larger input_size) and vit_tiny_patch16_224
# (CIFAR stem), the preprocessing and softmax included; tests/test_export.py exports them and compares. All are
# plain data flow: what they compute and allocate follows from their inputs' shapes.
OPERATORS = frozenset(
    """Add BatchNormalization Cast Concat Conv Div Expand Gather Gelu Gemm LayerNormalization MatMul MaxPool Mul
    ReduceMax ReduceMean Relu Reshape Resize Shape Slice Softmax Squeeze Sub Transpose""".split()
)
DOMAINS = ("", "ai.onnx")  # the standard operator set only
MIN_OPSET = 18  # the oldest torch.onnx's exporter (dynamo=True) writes
MAX_BYTES = 2**31 - 1  # protobuf's own limit on one message: export.py writes no larger file
MAX_BATCH = 256  # predict.py's batch; serve.py's max_batch_size is split into chunks of at most this
RUN_BYTES = 2**30  # what one run's computed values may add up to (weights aside); larger batches are split
WORK_PER_IMAGE = 10**11  # elements read and written, plus multiply-adds, per image (ViT-L/16 at 224: ~6e10)
DATA_INFO = ("classes", "mean", "std", "image_size")  # the metadata export.py writes
SMALL = 1024  # initializers up to this many elements keep their values for shape inference (a Reshape's target)
Runner = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class OnnxGraph:
    """A checked ONNX model: what predict.py and serve.py need to know before running it."""

    data: bytes  # the file's bytes as checked: the session is made from these, not from the path again
    metadata: dict[str, Any]  # export.py's metadata_props, each value parsed from JSON
    input_name: str
    image_size: int  # the input's H (= W)
    num_classes: int  # the output's C
    max_batch: int  # the largest checked batch whose values fit RUN_BYTES

    def session(self, threads: int | None) -> Runner:
        """ONNX Runtime on the CPU (``threads`` or its own choice) running uint8 (N, 3, H, W) batches of any N,
        split and padded to the checked batch sizes; returns the (N, C) output."""
        ort = require("ckpt_path=*.onnx", "export", "onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's choice
        session = ort.InferenceSession(self.data, options, providers=["CPUExecutionProvider"])
        name, most = self.input_name, self.max_batch  # the closure keeps neither the bytes nor self

        def run(images: np.ndarray) -> np.ndarray:
            outputs = []
            for start in range(0, len(images), most):
                chunk = images[start : start + most]
                n = len(chunk)
                padded = 1 << (n - 1).bit_length()  # the next checked size
                if padded != n:
                    chunk = np.concatenate([chunk, np.zeros((padded - n, *chunk.shape[1:]), chunk.dtype)])
                outputs.append(session.run(None, {name: np.ascontiguousarray(chunk)})[0][:n])
            return np.concatenate(outputs)

        return run


def read_onnx(path: Path, where: str, fix: str) -> OnnxGraph:
    """``path`` as a checked ``OnnxGraph``, or one line "``where`` <what is wrong>; ``fix``" (``where`` names the
    option, e.g. ``ckpt_path=model.onnx``)."""
    onnx = require("ckpt_path=*.onnx", "export", "onnx")

    def refuse(what: str) -> UserError:
        return UserError(f"{shown(where)} {what}; {fix}")

    size = path.stat().st_size
    if size > MAX_BYTES:
        raise refuse(f"is {size / 1e9:.1f} GB, over the 2.1 GB an ONNX file can hold")
    data = path.read_bytes()
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:  # not protobuf
        raise refuse(f"is not an ONNX model written by export.py ({_first_line(e)})") from None
    _check_structure(model, onnx, refuse)
    try:
        onnx.checker.check_model(model)  # the schema of every node (no full check: shapes are checked below)
    except Exception as e:
        raise refuse(f"is not an ONNX model written by export.py ({_first_line(e)})") from None
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in weights]
    if len(inputs) != 1 or len(graph.output) != 1 or not _is_images(inputs[0], onnx):
        raise refuse("lacks export.py's one uint8 (N, 3, H, W) input and one output")
    side = inputs[0].type.tensor_type.shape.dim[2].dim_value
    skeleton = _skeleton(model, onnx)
    max_batch, num_classes = 0, 0
    for batch in (1 << i for i in range(MAX_BATCH.bit_length())):
        values, work, num_classes = _costs(skeleton, batch, onnx, refuse)
        if batch == 1 and (values > RUN_BYTES or work > WORK_PER_IMAGE):
            raise refuse(
                f"would compute {values / 2**20:.0f} MiB of values and {work:.2g} operations for one image, over "
                f"the {RUN_BYTES / 2**20:.0f} MiB and {WORK_PER_IMAGE:.0e} allowed"
            )
        if values > RUN_BYTES or work > batch * WORK_PER_IMAGE:
            break
        max_batch = batch
    try:  # export.py's metadata_props: one JSON string per DataInfo field (any other entry is ignored)
        meta = {p.key: json.loads(p.value) for p in model.metadata_props if p.key in DATA_INFO}
    except (ValueError, RecursionError):
        raise refuse("has metadata that is not JSON") from None
    return OnnxGraph(data, meta, inputs[0].name, side, num_classes, max_batch)


def _check_structure(model: Any, onnx: Any, refuse: Callable[[str], UserError]) -> None:
    """Only export.py's operators, of the standard domain, in one graph with its weights inside the file."""
    newest = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain not in DOMAINS or not MIN_OPSET <= opset.version <= newest:
            raise refuse(
                f"imports the operator set {shown(opset.domain or 'ai.onnx')[:60]} {opset.version}; only the "
                f"standard one, versions {MIN_OPSET} to {newest}, is read"
            )
    graph = model.graph
    if len(model.functions) or len(model.training_info) or len(graph.sparse_initializer):
        raise refuse("holds functions, training graphs or sparse weights, which export.py never writes")
    attr = onnx.AttributeProto
    for node in graph.node:
        if node.domain not in DOMAINS or node.op_type not in OPERATORS:
            raise refuse(
                f"runs the operator {shown(node.op_type)[:60]}, which export.py never writes (docs/trust.md lists "
                "the 25 it does)"
            )
        for a in node.attribute:
            if a.type in (attr.GRAPH, attr.GRAPHS, attr.SPARSE_TENSOR, attr.SPARSE_TENSORS) or (
                a.type == attr.TENSOR and not _inside(a.t, onnx)
            ):
                raise refuse(f"gives its {shown(node.op_type)[:60]} a subgraph or an outside tensor as {a.name}")
    for t in graph.initializer:
        if not _inside(t, onnx):
            raise refuse(f"keeps the weight {shown(t.name)[:60]} outside the file, or not the size it declares")


def _inside(t: Any, onnx: Any) -> bool:
    """Whether tensor ``t``'s data is in the file and as large as its shape says (no external data file)."""
    if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) or any(d < 0 for d in t.dims):
        return False
    kind = onnx.TensorProto
    if t.data_type in (kind.UNDEFINED, kind.STRING, kind.COMPLEX64, kind.COMPLEX128):
        return False
    n = math.prod(t.dims)
    if t.HasField("raw_data"):
        return len(t.raw_data) == n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return len(getattr(t, onnx.helper.tensor_dtype_to_field(t.data_type))) == n


def _is_images(value: Any, onnx: Any) -> bool:
    """Whether a graph input is export.py's: uint8 (N, 3, H, H), N free or fixed."""
    t = value.type
    if not t.HasField("tensor_type") or t.tensor_type.elem_type != onnx.TensorProto.UINT8:
        return False
    dims = t.tensor_type.shape.dim
    if len(dims) != 4 or not all(d.HasField("dim_value") for d in dims[1:]):
        return False
    channels, height, width = (d.dim_value for d in dims[1:])
    return channels == 3 and 1 <= height == width <= 4096


def _skeleton(model: Any, onnx: Any) -> Any:
    """The graph without its weights' values (each large initializer becomes an input of its shape), for shape
    inference: no copy of the weights, and no shape the file merely claims (``value_info``, the output's)."""
    g = model.graph
    small = [t for t in g.initializer if math.prod(t.dims) <= SMALL]
    large = [
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in g.initializer
        if math.prod(t.dims) > SMALL
    ]
    weights = {t.name for t in g.initializer}
    inputs = [v for v in g.input if v.name not in weights]
    outputs = [onnx.helper.make_tensor_value_info(v.name, v.type.tensor_type.elem_type, None) for v in g.output]
    graph = onnx.helper.make_graph(list(g.node), "checked", [*inputs, *large], outputs, small)
    return onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def _costs(skeleton: Any, batch: int, onnx: Any, refuse: Callable[[str], UserError]) -> tuple[int, int, int]:
    """At ``batch`` images: the bytes of every value the graph computes, its work (elements read and written,
    and multiply-adds), and the output's width; refused where a shape is not fixed by the input's."""
    probe = onnx.ModelProto()
    probe.CopyFrom(skeleton)
    probe.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    probe.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:
        raise refuse(f"has a graph whose shapes do not follow from its input ({_first_line(e)})") from None
    g = inferred.graph
    shapes: dict[str, tuple[list[int], int]] = {}
    for v in [*g.input, *g.value_info, *g.output]:
        t = v.type.tensor_type if v.type.HasField("tensor_type") else None
        dims = t.shape.dim if t is not None and t.HasField("shape") else None
        if dims is None or not all(d.HasField("dim_value") for d in dims) or t.elem_type in (0, 8):
            continue  # unknown: refused below where a node computes it
        shapes[v.name] = ([d.dim_value for d in dims], onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize)
    for t in g.initializer:
        shapes[t.name] = (list(t.dims), onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize)
    values = work = 0
    for node in g.node:
        for name in filter(None, node.output):  # an empty name: an optional output not computed
            if name not in shapes:
                raise refuse(
                    f"has a value whose shape does not follow from the input's ({shown(name)[:60]}, a "
                    f"{shown(node.op_type)[:40]} output at batch {batch})"
                )
            dims, itemsize = shapes[name]
            values += math.prod(dims) * itemsize
        work += _work(node, shapes)
    out = shapes.get(g.output[0].name, ([], 0))[0]
    if len(out) != 2 or out[0] != batch or out[1] < 1:
        raise refuse(f"gives outputs of shape {out} for {batch} images, not ({batch}, classes)")
    return values, work, out[1]


def _work(node: Any, shapes: dict[str, tuple[list[int], int]]) -> int:
    """Elements the node reads and writes, plus the multiply-adds of a convolution, matrix product or pool."""
    ins = [shapes[n][0] for n in node.input if n in shapes]
    outs = [shapes[n][0] for n in node.output if n]
    work = sum(math.prod(d) for d in ins) + sum(math.prod(d) for d in outs)
    out = math.prod(outs[0]) if outs else 0
    if node.op_type == "Conv" and len(ins) > 1:  # each output: C_in / groups * kernel multiply-adds
        work += out * math.prod(ins[1][1:])
    elif node.op_type == "MatMul" and ins and ins[0]:
        work += out * ins[0][-1]
    elif node.op_type == "Gemm" and ins and ins[0]:
        work += out * max(ins[0])  # A's shared dimension, transposed or not
    elif node.op_type == "MaxPool":
        kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), [])
        work += out * math.prod(kernel)
    return work


def _first_line(e: Exception) -> str:
    return shown(" ".join(f"{e.__class__.__name__}: {e}".split())[:200])
