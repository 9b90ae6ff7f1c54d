"""Feedback labels are checked against the prediction of the version that made it: a class name from the model's
labels file means its class, and a label that can never match (3.5 or "cat" for whole-number classes, text for a
regression model) is INVALID_ARGUMENT for its item alone. Such labels used to be accepted: "three" was a class of
its own (accuracy 0 for a right answer), and "six" for a regression model was silently left out of mae/rmse."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from tensorgate.client import InferenceClient
from tensorgate.client._monitoring import FeedbackStatus, Label
from tensorgate.client.errors import InvalidArgument
from tensorgate.server.monitoring.store import DB_NAME, PredictionStore
from tests.monitoring import digits_repository
from tests.onnx_models import identity_model, row_sum_model, write_config
from tests.serving import ServerThread
from tests.test_feedback import TENSORGATE
from tests.test_monitoring_outputs import DIGIT_NAMES

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT

REGRESSION = """backend: "onnxruntime"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ ] } ]
parameters { key: "tensorgate.task" value: { string_value: "regression" } }
"""


CLASSIFIER = """backend: "onnxruntime"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ WIDTH ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ WIDTH ] } ]
"""
THRESHOLD = 'parameters { key: "tensorgate.prediction.kind" value: { string_value: "threshold" } }\n'


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """The digits model (INT64 `label`, and `probabilities` with labels.txt "zero".."nine"), a regression model
    (`sum`: the sum of 4 floats), one whose prediction is text (`text`: BYTES identity), and FP32 identities read as
    classes: `score` (one column, a score thresholded unless it is a whole number), `binary` (two columns, prediction
    kind threshold) and `three` (three columns, argmax)."""
    repo, x, y = digits_repository(tmp_path_factory.mktemp("labels"))
    row_sum_model(repo / "sum" / "1" / "model.onnx")
    write_config(repo, "sum", REGRESSION)
    identity_model(repo / "text" / "1" / "model.onnx", "BYTES", shape=("batch", 1))
    for name, width, extra in (("score", 1, ""), ("binary", 2, THRESHOLD), ("three", 3, "")):
        identity_model(repo / name / "1" / "model.onnx", "FP32", shape=("batch", width))
        write_config(repo, name, CLASSIFIER.replace("WIDTH", str(width)) + extra)
    return repo, x, y


@pytest.fixture
def served(digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(digits[0], data_dir=tmp_path / "data", monitor_interval_s=60.0) as s:
        yield s


def _stored_labels(served: ServerThread, model: str) -> dict[str, np.ndarray]:
    data_dir = served.settings.data_dir
    assert data_dir is not None
    reader = PredictionStore(data_dir / DB_NAME)
    try:
        return {p.id: p.label for p in reader.predictions(model, labelled_only=True) if p.label is not None}
    finally:
        reader.close()


def test_a_class_name_is_its_class(served: ServerThread, digits: tuple[Path, np.ndarray, np.ndarray]) -> None:
    """The names of the digits' labels.txt ("three"), and "3" written as " 3" or "3.0", all name class 3."""
    _, x, y = digits
    with InferenceClient(served.address) as client:
        results = [client.infer("digits", {"input": x[i : i + 2]}) for i in range(0, 40, 2)]
        spellings = [
            lambda v: DIGIT_NAMES[v],
            lambda v: f" {v} ",
            lambda v: f"{v}.0",
            lambda v: str(v),
            lambda v: float(v),
        ]
        items: list[tuple[str, Label]] = [
            (r.id, [spellings[(i + j) % len(spellings)](int(v)) for j, v in enumerate(y[i : i + 2])])
            for r, i in zip(results, range(0, 40, 2), strict=True)
        ]
        statuses = client.submit_feedback_batch("digits", items)
        quality = client.model_quality("digits")
    assert [s.code for s in statuses] == [OK] * len(items)
    predicted = np.concatenate([r["label"].reshape(-1) for r in results])
    assert quality.rows == 40
    assert quality.metrics["accuracy"] == pytest.approx(accuracy_score(y[:40], predicted))
    assert quality.metrics["accuracy"] > 0.5
    assert quality.metrics["f1_macro"] == pytest.approx(f1_score(y[:40], predicted, average="macro"))
    assert quality.class_labels == tuple(str(c) for c in sorted({*predicted, *y[:40]}))
    # Stored as quality compares them: "three" is kept as "3".
    stored = _stored_labels(served, "digits")
    assert [str(v) for v in stored[results[0].id]] == [str(int(v)) for v in y[:2]]


def _bad_items(client: InferenceClient, x: np.ndarray, y: np.ndarray) -> tuple[list[tuple[str, Label]], list[str]]:
    ids = [client.infer("digits", {"input": x[i : i + 1]}).id for i in range(6)]
    items: list[tuple[str, Label]] = [
        (ids[0], DIGIT_NAMES[int(y[0])]),
        (ids[1], 3.5),
        (ids[2], "seven!"),
        (ids[3], "3.5"),
        (ids[4], "nan"),
        (ids[5], int(y[5])),
    ]
    return items, ids


def _assert_bad_items(statuses: list[FeedbackStatus], ids: list[str]) -> None:
    assert [s.request_id for s in statuses] == ids
    assert [s.code for s in statuses] == [OK, INVALID, INVALID, INVALID, INVALID, OK]
    for status, label in zip(statuses[1:5], ["3.5", "'seven!'", "'3.5'", "'nan'"], strict=True):
        assert "model 'digits' version 1" in status.message, status.message
        assert f"request '{status.request_id}'" in status.message
        assert f"label {label}" in status.message
        assert "whole-number classes" in status.message
    assert "neither a whole number nor a class name" in statuses[2].message
    assert "'zero', 'one', 'two'" in statuses[2].message  # where the names come from
    assert "not a whole number" in statuses[1].message and "not a whole number" in statuses[3].message


@pytest.mark.parametrize("how", [pytest.param("batch", id="batch"), pytest.param("stream", id="stream")])
def test_a_label_that_cannot_match_is_refused_for_its_item_only(
    served: ServerThread, digits: tuple[Path, np.ndarray, np.ndarray], how: str
) -> None:
    _, x, y = digits
    with InferenceClient(served.address) as client:
        items, ids = _bad_items(client, x, y)
        if how == "batch":
            statuses = client.submit_feedback_batch("digits", items)
        else:
            statuses = list(client.submit_feedback_stream("digits", items))
        quality = client.model_quality("digits")
    _assert_bad_items(statuses, ids)
    assert (quality.labelled, quality.rows) == (2, 2)
    assert set(_stored_labels(served, "digits")) == {ids[0], ids[5]}


def test_one_label_refused_is_invalid_argument(
    served: ServerThread, digits: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    _, x, _ = digits
    with InferenceClient(served.address) as client:
        rid = client.infer("digits", {"input": x[:2]}).id
        with pytest.raises(InvalidArgument, match=r"label 'cat' is neither a whole number nor a class name"):
            client.submit_feedback("digits", rid, ["three", "cat"])
        assert client.model_quality("digits").labelled == 0


@pytest.mark.parametrize(
    ("model", "row", "labels", "reading"),
    [
        pytest.param(
            "score", [0.8], [1, 0, 2, 7, -1, "2"], "a score read with threshold 0.5 on output 'OUTPUT0'", id="score"
        ),
        pytest.param(
            "binary", [0.3, 0.7], [1, 0, 2, 7, -1, "2.0"], "read with threshold 0.5 on output 'OUTPUT0'", id="threshold"
        ),
        pytest.param(
            "three", [0.1, 0.2, 0.7], [2, 0, 3, 7, -1, "3"], "the argmax of output 'OUTPUT0' (3 columns)", id="argmax"
        ),
    ],
)
def test_a_class_the_prediction_cannot_be_is_refused(
    served: ServerThread, model: str, row: list[float], labels: list[Label], reading: str
) -> None:
    """A prediction read with a threshold is class 0 or 1, an argmax over N columns class 0 to N-1: a label 2, 7 or
    -1 can never match it (it used to be stored as a class of its own, dragging accuracy down unseen)."""
    with InferenceClient(served.address) as client:
        ids = [client.infer(model, {"INPUT0": np.asarray([row], np.float32)}).id for _ in labels]
        statuses = client.submit_feedback_batch(model, list(zip(ids, labels, strict=True)))
        quality = client.model_quality(model)
    assert [s.code for s in statuses] == [OK, OK, INVALID, INVALID, INVALID, INVALID], statuses
    classes = "classes 0 to 2" if model == "three" else "classes 0 and 1"
    for status, label in zip(statuses[2:], labels[2:], strict=True):
        assert f"model '{model}' version 1" in status.message, status.message
        assert f"request '{status.request_id}'" in status.message
        assert f"label {label!r} can never match" in status.message
        assert reading in status.message and classes in status.message
    assert (quality.labelled, quality.rows) == (2, 2)


def test_a_whole_number_in_a_score_column_is_a_class_of_its_own(served: ServerThread) -> None:
    """A one-column float that is a whole number is the class itself (a model writing classes as floats), not a
    score: a label 7 can match it, and is kept."""
    with InferenceClient(served.address) as client:
        ids = [client.infer("score", {"INPUT0": np.asarray([[v]], np.float32)}).id for v in (7.0, 3.0)]
        statuses = client.submit_feedback_batch("score", [(ids[0], 7), (ids[1], 2)])
        quality = client.model_quality("score")
    assert [s.code for s in statuses] == [OK, OK], statuses
    assert quality.metrics["accuracy"] == pytest.approx(0.5)


def test_text_is_refused_for_a_regression_model(served: ServerThread) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    with InferenceClient(served.address) as client:
        ids = [client.infer("sum", {"INPUT0": x[i : i + 1]}).id for i in range(3)]
        statuses = client.submit_feedback_batch("sum", [(ids[0], "six"), (ids[1], " 23.5"), (ids[2], 39.0)])
        quality = client.model_quality("sum")
    assert [s.code for s in statuses] == [INVALID, OK, OK]
    message = statuses[0].message
    assert "model 'sum' version 1" in message and f"request '{ids[0]}'" in message
    assert "label 'six' is not a number" in message and "regression" in message
    # Sums 22 and 38: errors 1.5 and 1.
    assert (quality.labelled, quality.rows) == (2, 2)
    assert quality.metrics["mae"] == pytest.approx(1.25)


def test_a_version_no_longer_loaded_takes_the_label_as_sent(served: ServerThread) -> None:
    """Nothing is left to check it against (its config may be gone): the label is kept, as before."""
    with InferenceClient(served.address) as client:
        rid = client.infer("sum", {"INPUT0": np.ones((1, 4), np.float32)}).id
        served.run(served.app.repository.unload("sum"))
        (status,) = client.submit_feedback_batch("sum", [(rid, "six")])
    assert status.code == OK, status.message
    assert [str(v) for v in _stored_labels(served, "sum")[rid]] == ["six"]


def test_a_text_prediction_takes_free_text(served: ServerThread) -> None:
    words = np.array([["cat"], ["dog"], ["3.5"]], dtype=np.object_)
    with InferenceClient(served.address) as client:
        rid = client.infer("text", {"INPUT0": words}).id
        client.submit_feedback("text", rid, ["cat", "bird", "3.5"])
        quality = client.model_quality("text")
    assert quality.rows == 3
    assert quality.metrics["accuracy"] == pytest.approx(2 / 3)


def test_cli_sends_a_class_name(served: ServerThread, digits: tuple[Path, np.ndarray, np.ndarray]) -> None:
    _, x, y = digits
    with InferenceClient(served.address) as client:
        ids = [client.infer("digits", {"input": x[i : i + 1]}).id for i in range(2)]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [TENSORGATE, "feedback", "digits", "--server", served.address, *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    named = cli("--id", ids[0], "--label", DIGIT_NAMES[int(y[0])])
    assert named.returncode == 0 and "accepted 1 of 1" in named.stdout, named.stderr
    fraction = cli("--id", ids[1], "--label", "3.5")
    assert fraction.returncode == 1, fraction.stdout
    assert f"{ids[1]}: INVALID_ARGUMENT" in fraction.stderr and "not a whole number" in fraction.stderr
    with InferenceClient(served.address) as client:
        quality = client.model_quality("digits")
    assert quality.labelled == 1 and str(int(y[0])) in quality.class_labels
    assert all(c.isdigit() for c in quality.class_labels), quality.class_labels
