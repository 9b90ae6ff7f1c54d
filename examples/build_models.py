"""Build the example Triton-style model repository that tensorgate's tests, demos and benchmarks serve.

Run ``python examples/build_models.py [--out DIR]`` (default: ``examples/models``, git-ignored). Models are
generated rather than checked in so the repository carries no binaries and the weights are reproducible: every
random choice is seeded, nothing is downloaded, and a rerun rewrites the same content.

The repository::

    digits/config.pbtxt    a real classifier: StandardScaler + LogisticRegression on scikit-learn's bundled
    digits/1/model.onnx    8x8 digits, exported with skl2onnx; "input" FP32 [N,64] -> "label" INT64 [N,1],
    digits/test_data.npz   "probabilities" FP32 [N,10]; the held-out split for quality/drift scripts
    digits/labels.txt      the class names of "probabilities" ("zero" ... "nine"), for classification requests
    mlp/config.pbtxt       the performance model of shared/BENCHMARKING.md: "INPUT0" FP32 [N,256] -> 1024
    mlp/1/model.onnx       -> 1024 -> 10 (ReLU) -> "OUTPUT0" FP32 [N,10], seeded He-initialised weights
    running_mean/...       a stateful (sequence) model: "reading" FP32 [N,4] -> "mean" FP32 [N,4], the mean of
                           the readings its sequence has sent so far, kept in implicit state (sum and count)

The builders are importable (``build_digits``, ``build_mlp``, ``write_repository``) so tests build the same
files into a temporary directory instead of depending on a pre-built tree.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

__all__ = [
    "DIGITS_CONFIG",
    "MLP_CONFIG",
    "DigitsModel",
    "build_digits",
    "build_mlp",
    "build_mlp_model",
    "build_running_mean",
    "export_digits",
    "train_digits",
    "write_repository",
]

# Opset 17 / IR 8 rather than onnx's newest: the server accepts onnxruntime>=1.20, and an older runtime
# refuses a model whose IR version it does not know even when no new operator is used.
OPSET = 17
ML_OPSET = 3
IR_VERSION = 8
BATCH_DIM = "batch"

MLP_IN, MLP_HIDDEN, MLP_OUT = 256, 1024, 10

# Class i of "probabilities" is the digit i: what a classification request (class_count) names it.
DIGITS_LABELS = "".join(f"{word}\n" for word in "zero one two three four five six seven eight nine".split())

DIGITS_CONFIG = """\
name: "digits"
backend: "onnxruntime"
max_batch_size: 64
input [
  {
    name: "input"
    data_type: TYPE_FP32
    dims: [ 64 ]
  }
]
output [
  {
    name: "label"
    data_type: TYPE_INT64
    dims: [ 1 ]
  },
  {
    name: "probabilities"
    data_type: TYPE_FP32
    dims: [ 10 ]
    label_filename: "labels.txt"
  }
]
instance_group [ { kind: KIND_CPU, count: 1 } ]
parameters {
  key: "tensorgate.task"
  value: { string_value: "classification" }
}
parameters {
  key: "tensorgate.prediction.output"
  value: { string_value: "label" }
}
parameters {
  key: "tensorgate.prediction.kind"
  value: { string_value: "label" }
}
parameters {
  key: "tensorgate.capture.sample_rate"
  value: { string_value: "1.0" }
}
parameters {
  key: "tensorgate.capture.inputs"
  value: { string_value: "true" }
}
parameters {
  key: "tensorgate.alert.accuracy_low"
  value: { string_value: "accuracy < 0.8 min_samples=50" }
}
"""

# No `optimization { graph { level } }`: in Triton's onnxruntime backend any explicit level is *below* the
# default (all optimizations), and benchmarks compare against in-process ONNX Runtime at its default level.
MLP_CONFIG = """\
name: "mlp"
backend: "onnxruntime"
max_batch_size: 128
input [
  {
    name: "INPUT0"
    data_type: TYPE_FP32
    dims: [ 256 ]
  }
]
output [
  {
    name: "OUTPUT0"
    data_type: TYPE_FP32
    dims: [ 10 ]
  }
]
instance_group [ { kind: KIND_AUTO, count: 1 } ]
dynamic_batching {
  max_queue_delay_microseconds: 0
}
model_warmup [
  {
    name: "zeros"
    batch_size: 1
    inputs {
      key: "INPUT0"
      value: {
        data_type: TYPE_FP32
        dims: [ 256 ]
        zero_data: true
      }
    }
  }
]
"""


RUNNING_MEAN_CONFIG = """\
name: "running_mean"
backend: "onnxruntime"
max_batch_size: 16
input [ { name: "reading" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "mean" data_type: TYPE_FP32 dims: [ 4 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
sequence_batching {
  max_sequence_idle_microseconds: 60000000
  oldest { max_candidate_sequences: 64 }
  state [
    {
      input_name: "SUM_IN"
      output_name: "SUM_OUT"
      data_type: TYPE_FP32
      dims: [ 4 ]
      initial_state { name: "zeros" data_type: TYPE_FP32 dims: [ 4 ] zero_data: true }
    },
    {
      input_name: "COUNT_IN"
      output_name: "COUNT_OUT"
      data_type: TYPE_FP32
      dims: [ 1 ]
      initial_state { name: "zero" data_type: TYPE_FP32 dims: [ 1 ] zero_data: true }
    }
  ]
}
"""


@dataclass(frozen=True)
class DigitsModel:
    """The trained digits pipeline together with the split it was judged on.

    Kept together so that a test can compare the ONNX export against the very estimator it came from.
    """

    pipeline: Pipeline
    x_test: np.ndarray  # float32 [N, 64]
    y_test: np.ndarray  # int64 [N]

    @property
    def accuracy(self) -> float:
        """Held-out accuracy of the scikit-learn pipeline (the ONNX export should match it)."""
        return float(self.pipeline.score(self.x_test, self.y_test))


def _write_bytes(path: Path, data: bytes) -> None:
    """Write atomically, so a server polling the repository never loads a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp creates 0600; a server in a container runs as another user and must read these files.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _save_model(model: onnx.ModelProto, path: Path) -> None:
    onnx.checker.check_model(model, full_check=True)
    _write_bytes(path, model.SerializeToString())


def train_digits(seed: int = 0) -> DigitsModel:
    """Train the digits classifier on a fixed, stratified 75/25 split (deterministic for a given seed)."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y.astype(np.int64), test_size=0.25, random_state=seed, stratify=y
    )
    pipeline = Pipeline([("scaler", StandardScaler()), ("clf", LogisticRegression(max_iter=2000, random_state=seed))])
    pipeline.fit(x_train, y_train)
    return DigitsModel(pipeline=pipeline, x_test=x_test, y_test=y_test)


def _set_batch_dim(value_info: onnx.ValueInfoProto) -> None:
    value_info.type.tensor_type.shape.dim[0].dim_param = BATCH_DIM


def export_digits(pipeline: Pipeline) -> onnx.ModelProto:
    """Export the pipeline to ONNX with Triton-friendly outputs.

    ZipMap is disabled so probabilities are a plain FP32 tensor (a sequence of maps cannot travel over the V2
    protocol), and the label gets an explicit trailing dimension: with ``max_batch_size > 0`` Triton describes
    every tensor as [batch, dims...] and an output must have at least one dim after the batch.
    """
    clf = pipeline.named_steps["clf"]
    model: onnx.ModelProto = convert_sklearn(
        pipeline,
        name="digits",
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={id(clf): {"zipmap": False}},
        target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
    )
    graph = model.graph
    producers = [node for node in graph.node if "label" in node.output]
    if len(producers) != 1:
        raise RuntimeError(f"expected one node producing 'label', found {len(producers)}")
    producer = producers[0]
    producer.output[list(producer.output).index("label")] = "label_flat"
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == "label":
                node.input[i] = "label_flat"
    graph.initializer.append(numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "label_shape"))
    graph.node.append(helper.make_node("Reshape", ["label_flat", "label_shape"], ["label"], name="label_2d"))

    outputs = {out.name: out for out in graph.output}
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, [BATCH_DIM, 1]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [BATCH_DIM, 10]),
        ]
    )
    if set(outputs) != {"label", "probabilities"}:
        raise RuntimeError(f"unexpected skl2onnx outputs {sorted(outputs)}")
    _set_batch_dim(graph.input[0])
    # skl2onnx lists the default domain twice when given a per-domain target_opset; keep one entry per domain.
    opsets = {op.domain: op.version for op in model.opset_import}
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in sorted(opsets.items()))
    model.ir_version = IR_VERSION
    return model


def build_digits(model_dir: Path, seed: int = 0) -> DigitsModel:
    """Write ``model_dir`` (config, version 1, held-out split) and return the trained model."""
    trained = train_digits(seed)
    _save_model(export_digits(trained.pipeline), model_dir / "1" / "model.onnx")
    _write_bytes(model_dir / "labels.txt", DIGITS_LABELS.encode())  # before the config that names it
    _write_bytes(model_dir / "config.pbtxt", DIGITS_CONFIG.encode())
    tmp = model_dir / ".test_data.tmp.npz"
    np.savez_compressed(tmp, X_test=trained.x_test, y_test=trained.y_test)
    os.replace(tmp, model_dir / "test_data.npz")
    return trained


def build_mlp_model(seed: int = 0) -> onnx.ModelProto:
    """The benchmark MLP, FP32 [batch,256] -> Gemm 1024 -> Relu -> Gemm 1024 -> Relu -> Gemm 10.

    He-initialised hidden layers keep activations at unit scale through the ReLUs and the last layer is scaled
    by 1/sqrt(fan_in), so outputs are O(1): finite, and comparable across batch sizes with a tight tolerance.
    Biases are small but non-zero so that a batching bug that mixes rows cannot hide behind zeros.
    """
    rng = np.random.default_rng(seed)
    sizes = [MLP_IN, MLP_HIDDEN, MLP_HIDDEN, MLP_OUT]
    initializers: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    current = "INPUT0"
    for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        last = layer == len(sizes) - 2
        scale = np.sqrt((1.0 if last else 2.0) / fan_in)
        weight = (rng.standard_normal((fan_out, fan_in)) * scale).astype(np.float32)
        bias = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        initializers += [
            numpy_helper.from_array(weight, f"W{layer}"),
            numpy_helper.from_array(bias, f"B{layer}"),
        ]
        gemm_out = "OUTPUT0" if last else f"gemm{layer}"
        nodes.append(
            helper.make_node("Gemm", [current, f"W{layer}", f"B{layer}"], [gemm_out], name=f"gemm{layer}", transB=1)
        )
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [f"relu{layer}"], name=f"relu{layer}"))
            current = f"relu{layer}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, [BATCH_DIM, MLP_IN])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, [BATCH_DIM, MLP_OUT])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tensorgate-examples"
    )
    model.ir_version = IR_VERSION
    return model


def build_mlp(model_dir: Path, seed: int = 0) -> None:
    """Write ``model_dir`` (config and version 1) for the benchmark MLP."""
    _save_model(build_mlp_model(seed), model_dir / "1" / "model.onnx")
    _write_bytes(model_dir / "config.pbtxt", MLP_CONFIG.encode())


def build_running_mean_model() -> onnx.ModelProto:
    """SUM_OUT = SUM_IN + reading, COUNT_OUT = COUNT_IN + 1, mean = SUM_OUT / COUNT_OUT: the server carries SUM and
    COUNT from one request of a sequence to the next (implicit state), so the model itself holds nothing."""
    row = [BATCH_DIM]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["SUM_IN", "reading"], ["SUM_OUT"]),
            helper.make_node("Add", ["COUNT_IN", "one"], ["COUNT_OUT"]),
            helper.make_node("Div", ["SUM_OUT", "COUNT_OUT"], ["mean"]),
        ],
        "running_mean",
        [
            helper.make_tensor_value_info("reading", TensorProto.FLOAT, [*row, 4]),
            helper.make_tensor_value_info("SUM_IN", TensorProto.FLOAT, [*row, 4]),
            helper.make_tensor_value_info("COUNT_IN", TensorProto.FLOAT, [*row, 1]),
        ],
        [
            helper.make_tensor_value_info("mean", TensorProto.FLOAT, [*row, 4]),
            helper.make_tensor_value_info("SUM_OUT", TensorProto.FLOAT, [*row, 4]),
            helper.make_tensor_value_info("COUNT_OUT", TensorProto.FLOAT, [*row, 1]),
        ],
        initializer=[numpy_helper.from_array(np.ones([1], np.float32), "one")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tensorgate-examples"
    )
    model.ir_version = IR_VERSION
    return model


def build_running_mean(model_dir: Path) -> None:
    """Write ``model_dir`` (config and version 1) for the stateful example."""
    _save_model(build_running_mean_model(), model_dir / "1" / "model.onnx")
    _write_bytes(model_dir / "config.pbtxt", RUNNING_MEAN_CONFIG.encode())


def write_repository(out: Path, seed: int = 0) -> DigitsModel:
    """Build every example model under ``out``; returns the digits model so callers can report on it."""
    out.mkdir(parents=True, exist_ok=True)
    digits = build_digits(out / "digits", seed)
    build_mlp(out / "mlp", seed)
    build_running_mean(out / "running_mean")
    return digits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "models",
        help="model repository to write (default: examples/models next to this script)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the data split and the MLP weights")
    args = parser.parse_args(argv)
    digits = write_repository(args.out, args.seed)
    print(f"wrote {args.out}/digits, {args.out}/mlp and {args.out}/running_mean")
    print(f"digits held-out accuracy: {digits.accuracy:.4f} on {len(digits.y_test)} samples")


if __name__ == "__main__":
    main()
