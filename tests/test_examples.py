"""The example model repository: valid Triton configs, and ONNX models that agree with configs and sources.

The repository is built once per module by running ``examples/build_models.py`` as a subprocess (so the
command line that users run is what is tested), then checked with tritonclient's own ModelConfig message and
real ONNX Runtime sessions.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "build_models.py"
MODELS = ["digits", "mlp"]

# Triton data types as spelled in config.pbtxt against the ONNX Runtime type strings of the same tensors.
ORT_TYPES = {
    model_config_pb2.TYPE_FP32: "tensor(float)",
    model_config_pb2.TYPE_INT64: "tensor(int64)",
}


def _load_builder() -> ModuleType:
    # examples/ is not a package and pytest does not put the repository root on sys.path: load it by file.
    spec = importlib.util.spec_from_file_location("tensorgate_examples_build_models", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module through sys.modules
    spec.loader.exec_module(module)
    return module


build_models = _load_builder()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "held-out accuracy" in done.stdout
    return out


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _config(repo: Path, model: str) -> model_config_pb2.ModelConfig:
    config = model_config_pb2.ModelConfig()
    text_format.Parse((repo / model / "config.pbtxt").read_text(), config)
    return config


def test_repository_layout(repo: Path) -> None:
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    assert files == [
        "digits/1/model.onnx",
        "digits/config.pbtxt",
        "digits/labels.txt",
        "digits/test_data.npz",
        "mlp/1/model.onnx",
        "mlp/config.pbtxt",
        "running_mean/1/model.onnx",
        "running_mean/config.pbtxt",
    ]


@pytest.mark.parametrize("model", [pytest.param(m, id=m) for m in MODELS])
def test_config_is_a_valid_triton_model_config(repo: Path, model: str) -> None:
    # text_format.Parse rejects unknown fields and enum values: this is Triton's own schema.
    config = _config(repo, model)
    assert config.name == model
    assert config.backend == "onnxruntime"
    assert len(config.instance_group) == 1


@pytest.mark.parametrize("model", [pytest.param(m, id=m) for m in MODELS])
def test_config_matches_onnx_signature(repo: Path, model: str) -> None:
    """Triton dims exclude the batch dim; the ONNX graph must have a dynamic batch dim in front of them."""
    config = _config(repo, model)
    session = _session(repo / model / "1" / "model.onnx")
    for declared, actual in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
        assert [t.name for t in declared] == [a.name for a in actual]
        for tensor, arg in zip(declared, actual, strict=True):
            assert ORT_TYPES[tensor.data_type] == arg.type
            assert isinstance(arg.shape[0], str), f"{arg.name}: batch dim must be dynamic"
            assert list(tensor.dims) == arg.shape[1:]


def test_digits_config_details(repo: Path) -> None:
    config = _config(repo, "digits")
    assert config.max_batch_size == 64
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert config.parameters["tensorgate.task"].string_value == "classification"
    assert config.output[1].label_filename == "labels.txt"
    labels = (repo / "digits" / "labels.txt").read_text().splitlines()
    assert labels[0] == "zero" and labels[9] == "nine" and len(labels) == 10


def test_mlp_config_details(repo: Path) -> None:
    config = _config(repo, "mlp")
    assert config.max_batch_size == 128
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_AUTO
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    (warmup,) = config.model_warmup
    assert warmup.batch_size == 1
    assert warmup.inputs["INPUT0"].zero_data
    assert list(warmup.inputs["INPUT0"].dims) == [256]


def test_digits_test_split(repo: Path) -> None:
    with np.load(repo / "digits" / "test_data.npz") as data:
        x_test, y_test = data["X_test"], data["y_test"]
    assert x_test.dtype == np.float32 and x_test.shape[1:] == (64,)
    assert y_test.dtype == np.int64 and y_test.shape == (len(x_test),)
    assert set(np.unique(y_test)) == set(range(10))


def test_digits_onnx_agrees_with_scikit_learn(repo: Path) -> None:
    trained = build_models.train_digits(seed=0)  # deterministic: the same estimator the script exported
    with np.load(repo / "digits" / "test_data.npz") as data:
        x_test, y_test = data["X_test"], data["y_test"]
    np.testing.assert_array_equal(x_test, trained.x_test)

    label, probabilities = _session(repo / "digits" / "1" / "model.onnx").run(
        ["label", "probabilities"], {"input": x_test}
    )
    assert label.dtype == np.int64 and label.shape == (len(x_test), 1)
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(x_test), 10)

    np.testing.assert_array_equal(label[:, 0], trained.pipeline.predict(x_test))
    np.testing.assert_allclose(probabilities, trained.pipeline.predict_proba(x_test), atol=1e-5)
    np.testing.assert_array_equal(label[:, 0], probabilities.argmax(axis=1))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert (label[:, 0] == y_test).mean() > 0.9


def test_mlp_rows_do_not_depend_on_batch(repo: Path) -> None:
    session = _session(repo / "mlp" / "1" / "model.onnx")
    x = np.random.default_rng(1).standard_normal((7, 256)).astype(np.float32)

    (single,) = session.run(["OUTPUT0"], {"INPUT0": x[:1]})
    (batch,) = session.run(["OUTPUT0"], {"INPUT0": x})

    assert single.shape == (1, 10) and batch.shape == (7, 10)
    assert single.dtype == np.float32 and batch.dtype == np.float32
    assert np.isfinite(batch).all()
    # Outputs are O(1) (He init), so a mixed-up row or a blown-up layer shows here, not just a NaN.
    assert 0.01 < np.abs(batch).max() < 100
    assert not np.allclose(batch[0], batch[1])
    np.testing.assert_allclose(batch[:1], single, rtol=1e-5, atol=1e-5)


def test_rebuild_is_idempotent(repo: Path, tmp_path: Path) -> None:
    """Same seed, same bytes: reruns of the script must not look like a new model version to a poller."""
    build_models.write_repository(tmp_path)
    for rel in ("digits/1/model.onnx", "digits/config.pbtxt", "mlp/1/model.onnx", "mlp/config.pbtxt"):
        assert (tmp_path / rel).read_bytes() == (repo / rel).read_bytes(), rel
    for rel in ("running_mean/1/model.onnx", "running_mean/config.pbtxt"):
        assert (tmp_path / rel).read_bytes() == (repo / rel).read_bytes(), rel


def test_running_mean_carries_its_state_through_the_outputs(repo: Path) -> None:
    """The stateful example, run by hand as the sequence scheduler runs it: each request's SUM_OUT and COUNT_OUT
    are the next one's SUM_IN and COUNT_IN, and `mean` is the mean of the readings so far."""
    config = _config(repo, "running_mean")
    assert config.HasField("sequence_batching") and not config.HasField("dynamic_batching")
    assert [s.input_name for s in config.sequence_batching.state] == ["SUM_IN", "COUNT_IN"]
    session = _session(repo / "running_mean" / "1" / "model.onnx")
    readings = np.array([[1, 2, 3, 4], [3, 2, 1, 0], [5, 5, 5, 5]], np.float32)
    total, count = np.zeros((1, 4), np.float32), np.zeros((1, 1), np.float32)
    for i, reading in enumerate(readings):
        mean, total, count = session.run(
            ["mean", "SUM_OUT", "COUNT_OUT"], {"reading": reading[None], "SUM_IN": total, "COUNT_IN": count}
        )
        np.testing.assert_allclose(mean, readings[: i + 1].mean(axis=0, keepdims=True))
