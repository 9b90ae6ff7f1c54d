"""Small ONNX models built with onnx.helper for tests, and a writer for Triton-style repositories."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17

# V2 datatype -> ONNX element type, for the types ONNX Identity carries.
ONNX_ELEM = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
    "BF16": TensorProto.BFLOAT16,
}

Dim = int | str | None

# Triton's classic "simple" model (add_sub_model) with batching, as most tests serve it.
ADD_SUB_CONFIG = """
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
        { name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
         { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]
"""


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def identity_model(path: Path, datatype: str, shape: Sequence[Dim] = ("batch", 4)) -> Path:
    """INPUT0 -> Identity -> OUTPUT0, of one element type (any V2 type, BYTES as ONNX string)."""
    elem = ONNX_ELEM[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        f"identity_{datatype.lower()}",
        [helper.make_tensor_value_info("INPUT0", elem, list(shape))],
        [helper.make_tensor_value_info("OUTPUT0", elem, list(shape))],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def add_sub_model(path: Path, shape: Sequence[Dim] = ("batch", 16), datatype: str = "FP32") -> Path:
    """Triton's classic "simple" model: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1."""
    elem = ONNX_ELEM[datatype]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "add_sub",
        [helper.make_tensor_value_info(n, elem, list(shape)) for n in ("INPUT0", "INPUT1")],
        [helper.make_tensor_value_info(n, elem, list(shape)) for n in ("OUTPUT0", "OUTPUT1")],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def scale_model(path: Path, factor: float, width: int = 4) -> Path:
    """OUTPUT0 = INPUT0 * factor: versions of "the same" model that answer differently."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["INPUT0", "k"], ["OUTPUT0"])],
        "scale",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", width])],
        initializer=[numpy_helper.from_array(np.array([factor], dtype=np.float32), "k")],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def slow_model(path: Path, size: int = 512, repeats: int = 24) -> Path:
    """A chain of [size x size] MatMuls: tens of milliseconds per call, for drain and deadline tests."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)
    nodes = []
    prev = "INPUT0"
    for i in range(repeats):
        nodes.append(helper.make_node("MatMul", [prev, "W"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["OUTPUT0"]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", size])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", size])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def write_config(repo: Path, name: str, text: str) -> Path:
    path = repo / name / "config.pbtxt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def row_sum_model(path: Path, width: int = 4) -> Path:
    """INPUT0 [batch, width] -> OUTPUT0 [batch]: the sum of each row, for outputs with no dims past the batch."""
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["INPUT0", "axes"], ["OUTPUT0"], keepdims=0)],
        "row_sum",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch"])],
        initializer=[numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def broadcast_add_model(path: Path) -> Path:
    """OUTPUT0 = INPUT0 + INPUT1 over 1-D tensors of independent length.

    Any two lengths pass schema validation (dims [-1] each) but onnxruntime fails at run time unless they are
    equal or one is 1: a model that breaks inside the runtime for some requests and works for others.
    """
    graph = helper.make_graph(
        [helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"])],
        "broadcast_add",
        [
            helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["a"]),
            helper.make_tensor_value_info("INPUT1", TensorProto.FLOAT, ["b"]),
        ],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["c"])],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def tile_model(path: Path, width: int = 16, repeats: int = 4096) -> Path:
    """OUTPUT0 [batch, width * repeats] = INPUT0 [batch, width] tiled: a small request with a large response."""
    graph = helper.make_graph(
        [helper.make_node("Tile", ["INPUT0", "repeats"], ["OUTPUT0"])],
        "tile",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", width * repeats])],
        initializer=[numpy_helper.from_array(np.array([1, repeats], dtype=np.int64), "repeats")],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def _matmul_round(size: int) -> onnx.GraphProto:
    """The body of a Loop that costs one [1 x size] MatMul per round (state through Tanh, reading outer `W`)."""
    return helper.make_graph(
        [
            helper.make_node("MatMul", ["state_in", "W"], ["prod"]),
            helper.make_node("Tanh", ["prod"], ["state_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "matmul_round",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_in", TensorProto.FLOAT, [1, size]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [1, size]),
        ],
    )


def busy_model(path: Path, iterations: int = 200, width: int = 4, size: int = 256) -> Path:
    """OUTPUT0 = INPUT0 * 2, after a Loop of `iterations` [1 x size] MatMuls: a fixed cost per execution whatever
    the batch size (as on a GPU), so concurrent requests queue behind a busy instance and batch together.

    The loop state starts from the input's mean and feeds the output (times 0), so ONNX Runtime can neither fold
    the loop into a constant nor prune it.
    """
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)
    body = _matmul_round(size)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["INPUT0"], ["mean"], keepdims=1),
            helper.make_node("Expand", ["mean", "state_shape"], ["state0"]),
            helper.make_node("Loop", ["trips", "cond", "state0"], ["state"], body=body),
            helper.make_node("ReduceSum", ["state"], ["total"], keepdims=0),
            helper.make_node("Mul", ["total", "zero"], ["nothing"]),
            helper.make_node("Mul", ["INPUT0", "two"], ["doubled"]),
            helper.make_node("Add", ["doubled", "nothing"], ["OUTPUT0"]),
        ],
        "busy",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", width])],
        initializer=[
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(np.array([1, size], dtype=np.int64), "state_shape"),
            numpy_helper.from_array(np.array(iterations, dtype=np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "cond"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
            numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"),
        ],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def rows_seen_model(path: Path, width: int = 4) -> Path:
    """OUTPUT0 = INPUT0 * 2, and ROWS: the batch size the session ran at, repeated on every row ([batch, 1]).

    ROWS shows what the model really computed on, e.g. whether the server padded a batch before running it.
    """
    nodes = [
        helper.make_node("Mul", ["INPUT0", "two"], ["OUTPUT0"]),
        helper.make_node("Shape", ["INPUT0"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
        helper.make_node("Cast", ["batch"], ["batch_f"], to=TensorProto.FLOAT),
        helper.make_node("Concat", ["batch", "one"], ["target"], axis=0),
        helper.make_node("Expand", ["batch_f", "target"], ["ROWS"]),
    ]
    graph = helper.make_graph(
        nodes,
        "rows_seen",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", width])],
        [
            helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", width]),
            helper.make_tensor_value_info("ROWS", TensorProto.FLOAT, ["batch", 1]),
        ],
        initializer=[
            numpy_helper.from_array(np.array([2.0], dtype=np.float32), "two"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
        ],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def cast_model(path: Path, to: int, width: int = 4, opset: int = OPSET) -> Path:
    """FP32 INPUT0 -> Cast(to) -> OUTPUT0: a model whose output has the given ONNX element type."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["INPUT0"], ["OUTPUT0"], to=to)],
        "cast",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("OUTPUT0", to, ["batch", width])],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)


def bf16_model(path: Path, width: int = 2) -> Path:
    """BF16 X -> FP32 Y = 2X + 1 (computed in float32) and BF16 Z = Y rounded to bfloat16: a model with BF16
    tensors on both sides and an FP32 output beside them."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["X"], ["XF"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["XF", "two"], ["X2"]),
            helper.make_node("Add", ["X2", "one"], ["Y"]),
            helper.make_node("Cast", ["Y"], ["Z"], to=TensorProto.BFLOAT16),
        ],
        "bf16",
        [helper.make_tensor_value_info("X", TensorProto.BFLOAT16, ["batch", width])],
        [
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", width]),
            helper.make_tensor_value_info("Z", TensorProto.BFLOAT16, ["batch", width]),
        ],
        initializer=[
            numpy_helper.from_array(np.array(2.0, np.float32), "two"),
            numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        ],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


FLOAT_SUFFIX = "__fp32"


def with_float_io(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with its BF16 inputs taken, and outputs given, as FP32 under the name + FLOAT_SUFFIX (both
    casts exact): in-process ONNX Runtime, whose Python API has no bfloat16, computes references with it."""
    g = model.graph

    def is_bf16(vi: onnx.ValueInfoProto) -> bool:
        return bool(vi.type.tensor_type.elem_type == TensorProto.BFLOAT16)

    def twin(vi: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
        dims = [
            d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in vi.type.tensor_type.shape.dim
        ]
        if not vi.type.tensor_type.HasField("shape"):  # no shape at all, rather than a scalar's empty one
            return helper.make_tensor_value_info(vi.name + FLOAT_SUFFIX, TensorProto.FLOAT, None)
        return helper.make_tensor_value_info(vi.name + FLOAT_SUFFIX, TensorProto.FLOAT, dims)

    inputs = [twin(vi) if is_bf16(vi) else vi for vi in g.input]
    outputs = [twin(vi) if is_bf16(vi) else vi for vi in g.output]
    cast = helper.make_node
    before = [cast("Cast", [v.name + FLOAT_SUFFIX], [v.name], to=TensorProto.BFLOAT16) for v in g.input if is_bf16(v)]
    after = [cast("Cast", [v.name], [v.name + FLOAT_SUFFIX], to=TensorProto.FLOAT) for v in g.output if is_bf16(v)]
    graph = helper.make_graph([*before, *g.node, *after], g.name, inputs, outputs, initializer=list(g.initializer))
    return helper.make_model(graph, opset_imports=list(model.opset_import))


def accumulator_model(path: Path, batching: bool = True, corrid: str = "UINT64", summing: bool = False) -> Path:
    """A stateful model for sequence batching: OUTPUT = ACC_IN + INPUT, carried to the next request as ACC_OUT
    (implicit state). FLAGS echoes the START, END and READY controls as [start, end, ready] and CORRID_OUT the
    correlation ID, so that tests see what the scheduler fed. `corrid` is the CORRID control's type. `summing`:
    INPUT is a row of any length, and OUTPUT = ACC_IN + the row's sum (a request as large as a test needs)."""
    lead: list[Dim] = ["batch"] if batching else []
    row = [*lead, 1]
    added, initializer = "INPUT", []
    nodes = []
    if summing:
        nodes.append(helper.make_node("ReduceSum", ["INPUT", "AXES"], ["ROW_SUM"], keepdims=1))
        initializer.append(helper.make_tensor("AXES", TensorProto.INT64, [1], [len(lead)]))
        added = "ROW_SUM"
    nodes += [
        helper.make_node("Add", ["ACC_IN", added], ["OUTPUT"]),
        helper.make_node("Identity", ["OUTPUT"], ["ACC_OUT"]),
        helper.make_node("Cast", ["END"], ["END_F"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["READY"], ["READY_F"], to=TensorProto.FLOAT),
        helper.make_node("Concat", ["START", "END_F", "READY_F"], ["FLAGS"], axis=-1),
        helper.make_node("Identity", ["CORRID"], ["CORRID_OUT"]),
    ]
    graph = helper.make_graph(
        nodes,
        "accumulator",
        [
            helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, [*lead, "n"] if summing else row),
            helper.make_tensor_value_info("START", TensorProto.FLOAT, row),
            helper.make_tensor_value_info("END", TensorProto.INT32, row),
            helper.make_tensor_value_info("READY", TensorProto.BOOL, row),
            helper.make_tensor_value_info("CORRID", ONNX_ELEM[corrid], row),
            helper.make_tensor_value_info("ACC_IN", TensorProto.FLOAT, row),
        ],
        [
            helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, row),
            helper.make_tensor_value_info("ACC_OUT", TensorProto.FLOAT, row),
            helper.make_tensor_value_info("FLAGS", TensorProto.FLOAT, [*lead, 3]),
            helper.make_tensor_value_info("CORRID_OUT", ONNX_ELEM[corrid], row),
        ],
        initializer=initializer,
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def accumulator_config(name: str, max_batch_size: int = 8, corrid: str = "TYPE_UINT64", extra: str = "") -> str:
    """config.pbtxt for accumulator_model: the four controls and the ACC state; `extra` goes inside
    sequence_batching (a strategy, max_sequence_idle_microseconds...)."""
    return f"""
name: "{name}"
backend: "onnxruntime"
max_batch_size: {max_batch_size}
sequence_batching {{
  {extra}
  control_input [
    {{ name: "START" control [ {{ kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] }} ] }},
    {{ name: "END" control [ {{ kind: CONTROL_SEQUENCE_END int32_false_true: [ 0, 1 ] }} ] }},
    {{ name: "READY" control [ {{ kind: CONTROL_SEQUENCE_READY bool_false_true: [ false, true ] }} ] }},
    {{ name: "CORRID" control [ {{ kind: CONTROL_SEQUENCE_CORRID data_type: {corrid} }} ] }}
  ]
  state [ {{ input_name: "ACC_IN" output_name: "ACC_OUT" data_type: TYPE_FP32 dims: [ 1 ] }} ]
}}
"""


def paced_model(path: Path, iterations_per_unit: float = 2000.0, size: int = 256) -> Path:
    """OUTPUT0 = INPUT0 ([batch, 1] FP32), after max(INPUT0) * iterations_per_unit rounds of a [1, size] matmul: a
    model whose run time the request chooses, to make one request overtake another."""
    rng = np.random.default_rng(0)
    body = _matmul_round(size)
    initializers = {
        "W": (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32),
        "k": np.array(iterations_per_unit, np.float32),
        "cond": np.array(True),
        "s0": np.zeros((1, size), np.float32),
        "zero": np.array(0.0, np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMax", ["INPUT0"], ["most"], keepdims=0),
            helper.make_node("Mul", ["most", "k"], ["scaled"]),
            helper.make_node("Cast", ["scaled"], ["trips"], to=TensorProto.INT64),
            helper.make_node("Loop", ["trips", "cond", "s0"], ["state"], body=body),
            helper.make_node("ReduceSum", ["state"], ["total"], keepdims=0),
            helper.make_node("Mul", ["total", "zero"], ["nothing"]),
            helper.make_node("Add", ["INPUT0", "nothing"], ["OUTPUT0"]),
        ],
        "paced",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", 1])],
        initializer=[numpy_helper.from_array(v, k) for k, v in initializers.items()],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def side_outputs_model(path: Path, width: int = 4) -> Path:
    """INPUT0 [batch, width] -> OUTPUT0 (the rows) and, besides, MEAN [width] (their mean: no batch dimension) and
    PROBS, a scikit-learn ZipMap's sequence of maps: outputs a config can leave unserved."""
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"]),
            helper.make_node("ReduceMean", ["INPUT0"], ["MEAN"], axes=[0], keepdims=0),
            helper.make_node(
                "ZipMap", ["INPUT0"], ["PROBS"], domain="ai.onnx.ml", classlabels_int64s=list(range(width))
            ),
        ],
        "side_outputs",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", width])],
        [
            helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", width]),
            helper.make_tensor_value_info("MEAN", TensorProto.FLOAT, [width]),
            helper.make_value_info(
                "PROBS",
                helper.make_sequence_type_proto(
                    helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))
                ),
            ),
        ],
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnx.ml", 3)]
    return _save(helper.make_model(graph, opset_imports=opsets), path)


def default_bias_model(path: Path, shape: Sequence[Dim] = (4,), bias: float = 0.0, external_data: bool = False) -> Path:
    """OUTPUT0 = INPUT0 + BIAS, where BIAS is an initializer that is also a graph input: the model holds its value
    (`bias` everywhere), which a request may override. `external_data` keeps it in `weights.bin` beside the model."""
    value = np.full([d if isinstance(d, int) else 1 for d in shape], bias, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["INPUT0", "BIAS"], ["OUTPUT0"])],
        "default_bias",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape)) for n in ("INPUT0", "BIAS")],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, list(shape))],
        initializer=[numpy_helper.from_array(value, "BIAS")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    if not external_data:
        return _save(model, path)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    return path
