"""What a data scientist serving scikit-learn models meets: skl2onnx's shapes (a label output of shape [batch]),
a data set sent whole to a model without config.pbtxt, and text columns saved by numpy.

The models are built with onnx.helper in skl2onnx's form (a classifier's `label` of shape [N] beside its
`probabilities` of [N, classes]; a pipeline's numeric and string inputs), so that the tests do not depend on a
converter's version.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper

from tensorgate.client import InferenceClient, InvalidArgument
from tensorgate.server.cli import main
from tensorgate.server.monitoring.drift import ReferenceProfile
from tests.onnx_models import OPSET, write_config
from tests.serving import ServerThread

WEIGHTS = np.array([[1.0, 0.0, -1.0], [0.5, 1.0, 0.0], [-1.0, 0.5, 1.0], [0.0, -0.5, 0.5]], np.float32)


def classifier_model(path: Path) -> Path:
    """X [N, 4] -> probabilities [N, 3] (softmax) and label [N] (argmax, int64), as skl2onnx writes a classifier
    converted with zipmap False."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
            helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
        ],
        "sklearn_like_classifier",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 3]),
        ],
        initializer=[numpy_helper.from_array(WEIGHTS, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def pipeline_inputs_model(path: Path) -> Path:
    """num [N, 1] FP32 and cat [N, 1] string, the two inputs skl2onnx gives a ColumnTransformer pipeline."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["num"], ["num_out"]), helper.make_node("Identity", ["cat"], ["cat_out"])],
        "pipeline_inputs",
        [
            helper.make_tensor_value_info("num", TensorProto.FLOAT, [None, 1]),
            helper.make_tensor_value_info("cat", TensorProto.STRING, [None, 1]),
        ],
        [
            helper.make_tensor_value_info("num_out", TensorProto.FLOAT, [None, 1]),
            helper.make_tensor_value_info("cat_out", TensorProto.STRING, [None, 1]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def regressor_model(path: Path) -> Path:
    """X [N, 4] -> variable [N, 1] FP32, as skl2onnx writes a Ridge or GradientBoostingRegressor."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["variable"])],
        "sklearn_like_regressor",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("variable", TensorProto.FLOAT, [None, 1])],
        initializer=[numpy_helper.from_array(np.full((4, 1), 40.0, np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


LABEL_DIMS_ONE = """
max_batch_size: 64
output [ { name: "label" data_type: TYPE_INT64 dims: [ 1 ] },
         { name: "probabilities" data_type: TYPE_FP32 dims: [ 3 ] } ]
"""
LABEL_RESHAPED = LABEL_DIMS_ONE.replace("dims: [ 1 ] }", "dims: [ 1 ] reshape: { shape: [ ] } }")
REGRESSION_TASK = 'parameters { key: "tensorgate.task" value: { string_value: "regression" } }\n'
# The name `tensorgate monitor` prints for the output scores' drift, copied into a rule.
SCORE_DRIFT_RULE = 'parameters { key: "tensorgate.alert.scores" value: { string_value: "score_drift > 0.2" } }\n'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("sklearn") / "models"
    for name in ("no_config", "label_dims_one", "label_reshaped", "score_rule"):
        classifier_model(root / name / "1" / "model.onnx")
    write_config(root, "score_rule", SCORE_DRIFT_RULE)
    write_config(root, "label_dims_one", LABEL_DIMS_ONE)
    write_config(root, "label_reshaped", LABEL_RESHAPED)
    pipeline_inputs_model(root / "pipeline" / "1" / "model.onnx")
    for name in ("regressor", "regressor_task"):
        regressor_model(root / name / "1" / "model.onnx")
    write_config(root, "regressor_task", REGRESSION_TASK)
    data = tmp_path_factory.mktemp("sklearn-data")
    with ServerThread(root, data_dir=data, monitor_interval_s=3600) as s:
        yield s


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _rows(n: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)


# ----- the label output of shape [batch] in config.pbtxt ---------------------------------------------------------


def test_label_dims_one_without_reshape_fails_the_load_with_how_to_write_it(server: ServerThread) -> None:
    """`dims: [1]` is what ModelConfig shows for the label; written without its reshape it cannot match the
    model's [N], and the reason says how to write it."""
    client = grpcclient.InferenceServerClient(server.address)
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["label_dims_one"].state == "UNAVAILABLE"
    reason = index["label_dims_one"].reason
    assert "output 'label' has dims [1] in config but the model's per-row shape is []" in reason
    assert "reshape: { shape: [ ] }" in reason and "leave dims out" in reason
    assert index["label_reshaped"].state == "READY"


def test_label_reshaped_serves_labels_and_probabilities_as_onnx_runtime_computes_them(server: ServerThread) -> None:
    x = _rows(10)
    logits = x @ WEIGHTS
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    with InferenceClient(server.address, timeout=10) as client:
        result = client.infer("label_reshaped", {"X": x})
    assert result["label"].dtype == np.int64 and result["label"].shape == (10, 1)
    np.testing.assert_array_equal(result["label"].ravel(), expected.argmax(axis=1))
    assert result["probabilities"].dtype == np.float32
    np.testing.assert_allclose(result["probabilities"], expected, rtol=1e-5)


def test_a_rule_on_score_drift_as_the_monitor_prints_it_names_the_metric_to_write(server: ServerThread) -> None:
    client = grpcclient.InferenceServerClient(server.address)
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["score_rule"].state == "UNAVAILABLE"
    assert "unknown metric 'score_drift'" in index["score_rule"].reason
    assert "is drift.score_psi" in index["score_rule"].reason


# ----- a data set sent whole to a model without config.pbtxt ------------------------------------------------------


def test_more_rows_than_the_default_max_batch_size_says_how_to_send_them(server: ServerThread) -> None:
    with InferenceClient(server.address, timeout=10) as client:
        assert client.infer("no_config", {"X": _rows(4)})["label"].shape == (4, 1)
        with pytest.raises(InvalidArgument) as info:
            client.infer("no_config", {"X": _rows(150)})
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details
    assert "model 'no_config'" in details and "'X'" in details
    assert "batch size 150 is outside 1..4 (max_batch_size)" in details
    assert "requests of at most that many" in details and "--default-max-batch-size" in details


def test_a_batch_of_zero_rows_gets_no_advice_to_split(server: ServerThread) -> None:
    with InferenceClient(server.address, timeout=10) as client, pytest.raises(InvalidArgument) as info:
        client.infer("no_config", {"X": np.zeros((0, 4), np.float32)})
    assert "batch size 0 is outside 1..4" in info.value.details and "split" not in info.value.details


# ----- a regressor's true values as feedback ---------------------------------------------------------------------


def test_true_values_for_a_regressor_without_its_task_say_which_parameter_to_set(server: ServerThread) -> None:
    """Without tensorgate.task the model is judged as a classifier, and its one float column as a score."""
    x = _rows(2)
    with InferenceClient(server.address, timeout=10) as client:
        client.infer("regressor", {"X": x}, request_id="reg-1")
        for truth in ([151.0, 75.0], [151.5, 75.25]):
            with pytest.raises(InvalidArgument) as info:
                client.submit_feedback("regressor", "reg-1", truth)
            details = info.value.details
            assert "model 'regressor'" in details and "request 'reg-1'" in details
            assert "tensorgate.task: regression" in details, details
        with pytest.raises(InvalidArgument) as info:  # text is no regression's true value: no advice for it
            client.submit_feedback("regressor", "reg-1", ["cat", "dog"])
        assert "tensorgate.task" not in info.value.details, info.value.details
        client.submit_feedback("regressor", "reg-1", [1, 0])  # a classifier's classes still pass
        client.infer("regressor_task", {"X": x}, request_id="reg-2")
        client.submit_feedback("regressor_task", "reg-2", [151.5, 75.25])


def test_a_fractional_label_for_an_integer_label_output_gets_no_regression_advice(server: ServerThread) -> None:
    with InferenceClient(server.address, timeout=10) as client:
        client.infer("label_reshaped", {"X": _rows(1)}, request_id="cls-1")
        with pytest.raises(InvalidArgument) as info:
            client.submit_feedback("label_reshaped", "cls-1", [7.5])
    assert "not a whole number" in info.value.details and "regression" not in info.value.details


# ----- text columns saved by numpy -------------------------------------------------------------------------------


def _pipeline_data() -> tuple[np.ndarray, np.ndarray]:
    num = np.linspace(-1.0, 1.0, 30, dtype=np.float32).reshape(30, 1)
    cat = np.array(["red", "green", "blue"] * 10).reshape(30, 1)
    return num, cat


def test_profile_of_a_text_column_saved_as_object_says_how_to_save_it(tmp_path: Path) -> None:
    """An .npz reads its arrays lazily: a pickled (dtype=object) one used to escape as a traceback."""
    num, cat = _pipeline_data()
    np.savez(tmp_path / "ref.npz", num=num, cat=cat.astype(object))
    code, _, err = run_cli(
        "profile", "pipeline", "--data", str(tmp_path / "ref.npz"), "--categorical", "cat", "--out", str(tmp_path / "p")
    )
    assert code == 2 and err.startswith("tensorgate profile: "), err
    assert "cannot read array 'cat'" in err and "astype(str)" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["ref.npz", "ref.npy"])
def test_profile_of_a_file_cut_short_says_so(tmp_path: Path, name: str) -> None:
    """A copy cut short (a full disk, an interrupted transfer) ended in a traceback: zipfile's BadZipFile, numpy's
    EOFError (review 123)."""
    num, _ = _pipeline_data()
    whole = tmp_path / f"whole{Path(name).suffix}"
    np.savez(whole, num=num) if name.endswith(".npz") else np.save(whole, num)
    (tmp_path / name).write_bytes(whole.read_bytes()[:40])
    code, _, err = run_cli("profile", "pipeline", "--data", str(tmp_path / name), "--out", str(tmp_path / "p"))
    assert code == 2 and "cannot read it as .npy/.npz" in err and "Traceback" not in err, err


def test_profile_of_a_text_column_saved_as_strings_through_the_server(server: ServerThread, tmp_path: Path) -> None:
    num, cat = _pipeline_data()
    np.savez(tmp_path / "ref.npz", num=num, cat=cat)
    out = tmp_path / "profile.json"
    code, printed, err = run_cli(
        "profile", "pipeline", "--data", str(tmp_path / "ref.npz"), "--categorical", "cat",
        "--server", server.address, "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert "30 rows" in printed
    profile = ReferenceProfile.from_json(out.read_text())
    assert profile.feature("cat").kind == "categorical"
    assert profile.feature("cat").categories == {"red": 10, "green": 10, "blue": 10}
    assert profile.feature("num").kind == "numeric"


def test_infer_with_a_text_npy_saved_as_object_says_how_to_save_it(server: ServerThread, tmp_path: Path) -> None:
    num, cat = _pipeline_data()
    np.save(tmp_path / "cat.npy", cat[:2].astype(object), allow_pickle=True)
    np.save(tmp_path / "cat_str.npy", cat[:2])
    common = ["infer", "pipeline", "--input", "num=[[0.5], [1.5]]", "--server", server.address]
    code, _, err = run_cli(*common, "--input", f"cat={tmp_path / 'cat.npy'}")
    assert code == 2 and "--input cat:" in err and "astype(str)" in err, err
    code, printed, err = run_cli(*common, "--input", f"cat={tmp_path / 'cat_str.npy'}")
    assert code == 0, err
    assert '"cat_out": {"datatype": "BYTES", "shape": [2, 1], "data": [["red"], ["green"]]}' in printed
