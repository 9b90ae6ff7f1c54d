"""Which output a captured request's prediction is read from, whatever outputs its caller asked for.

Triton's clients often ask for some outputs only: tritonclient for `probabilities`, or for their top classes
(`class_count`). Such requests were captured with only those outputs, so their feedback was accepted and never
judged (and, when all traffic asked so, GetModelQuality failed with "was not captured"). A captured request now
computes the model's prediction output too; its response still carries only what was asked, in the form asked.
A classifier's one-column float output (a sigmoid) is read by threshold, not as one class per probability.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from sklearn.metrics import accuracy_score

from tensorgate.client import InferenceClient
from tests.monitoring import digits_repository
from tests.onnx_models import OPSET, _save, identity_model, write_config
from tests.serving import ServerThread
from tests.test_ensemble import PIPELINE, _ensemble, ensemble_repository
from tests.test_infer import triton_inputs

ROWS = 10  # rows per request; feedback sends one label per row
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    return digits_repository(tmp_path_factory.mktemp("outputs"))


def _with(repo: Path, out: Path, text: str) -> Path:
    """A copy of the digits repository whose config.pbtxt ends with `text`."""
    copy = shutil.copytree(repo, out)
    config = copy / "digits" / "config.pbtxt"
    config.write_text(config.read_text() + "\n" + text + "\n")
    return copy


@pytest.fixture
def served(digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path) -> Iterator[ServerThread]:
    repo, _, _ = digits
    # A long monitor interval: the test asks GetModelQuality itself.
    with ServerThread(repo, data_dir=tmp_path / "data", monitor_interval_s=60.0) as s:
        yield s


Asked = list[str | tuple[str, int]] | None
"""Outputs a request asks for, by name or as (name, class_count); None: all."""

# tritonclient's ways to ask the digits model for its outputs.
ASKED: dict[str, Asked] = {
    "none named": None,
    "probabilities only": ["probabilities"],
    "probabilities top-1": [("probabilities", 1)],
    "label only": ["label"],
}


def _requested(asked: Asked) -> list[tc.InferRequestedOutput] | None:
    if asked is None:
        return None
    return [
        tc.InferRequestedOutput(a[0], class_count=a[1]) if isinstance(a, tuple) else tc.InferRequestedOutput(a)
        for a in asked
    ]


def _infer(client: tc.InferenceServerClient, x: np.ndarray, asked: Asked) -> tc.InferResult:
    return client.infer("digits", triton_inputs({"input": x}), outputs=_requested(asked))


def _labels_of(served: ServerThread, x: np.ndarray) -> np.ndarray:
    """The model's `label` for each row, asked for directly (these requests are captured too: call it after the
    window under test, or before it with a window of the newest requests)."""
    with InferenceClient(served.address) as client:
        return np.concatenate(
            [
                np.asarray(client.infer("digits", {"input": x[i : i + ROWS]}, outputs=["label"])["label"]).reshape(-1)
                for i in range(0, len(x), ROWS)
            ]
        )


def _answered(asked: Asked) -> list[str]:
    """The outputs a response carries: those asked for, or all of the model's."""
    if asked is None:
        return ["label", "probabilities"]
    return [a[0] if isinstance(a, tuple) else a for a in asked]


def test_every_way_of_asking_is_judged_and_answered_as_asked(
    served: ServerThread, digits: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    _, x, y = digits
    batches = [(x[i * ROWS : (i + 1) * ROWS], y[i * ROWS : (i + 1) * ROWS]) for i in range(len(ASKED))]
    ids = []
    with tc.InferenceServerClient(served.address) as client:
        for (rows, _), (how, asked) in zip(batches, ASKED.items(), strict=True):
            result = _infer(client, rows, asked)
            ids.append(result.get_response().id)
            names = [o.name for o in result.get_response().outputs]
            assert names == _answered(asked), how
            if how == "probabilities top-1":
                top = result.as_numpy("probabilities")
                assert top is not None and top.shape == (ROWS, 1)
                # "score:index:name", the class named from labels.txt, as Triton answers.
                first = top[0, 0].decode().split(":")
                assert first[2] == DIGIT_NAMES[int(first[1])]
    with InferenceClient(served.address) as client:
        statuses = client.submit_feedback_batch(
            "digits", [(rid, truth) for rid, (_, truth) in zip(ids, batches, strict=True)]
        )
        assert all(s.ok for s in statuses)
        quality = client.model_quality("digits", count=len(ids))
    predicted = np.concatenate([_labels_of(served, rows) for rows, _ in batches])
    truth = np.concatenate([t for _, t in batches])
    assert (quality.predictions, quality.labelled, quality.rows) == (4, 4, 4 * ROWS)
    assert quality.metrics["label_coverage"] == 1.0
    assert quality.metrics["accuracy"] == pytest.approx(accuracy_score(truth, predicted))


def test_traffic_that_never_asks_for_the_prediction_output_has_quality(
    served: ServerThread, digits: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    """All requests ask for `probabilities` only: GetModelQuality was INVALID_ARGUMENT ("was not captured")."""
    _, x, y = digits
    n = 6
    with tc.InferenceServerClient(served.address) as client:
        ids = [_infer(client, x[i * ROWS : (i + 1) * ROWS], ["probabilities"]).get_response().id for i in range(n)]
    with InferenceClient(served.address) as client:
        client.submit_feedback_batch("digits", [(rid, y[i * ROWS : (i + 1) * ROWS]) for i, rid in enumerate(ids)])
        quality = client.model_quality("digits")
    predicted = _labels_of(served, x[: n * ROWS])
    assert (quality.labelled, quality.rows) == (n, n * ROWS)
    assert quality.metrics["accuracy"] == pytest.approx(accuracy_score(y[: n * ROWS], predicted))


def test_requests_batched_together_each_get_what_they_asked(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """One batch, requests asking for different outputs: each answer holds its own, and every capture the
    prediction output."""
    repo, x, y = digits
    models = _with(repo, tmp_path / "models", "dynamic_batching { max_queue_delay_microseconds: 50000 }")
    asked = list(ASKED.values()) * 3
    chunks = [x[i * ROWS : (i + 1) * ROWS] for i in range(len(asked))]
    with ServerThread(models, data_dir=tmp_path / "data", monitor_interval_s=60.0) as s:
        expected = _labels_of(s, np.concatenate(chunks))

        def call(i: int) -> tuple[str, list[str]]:
            with tc.InferenceServerClient(s.address) as client:
                response = _infer(client, chunks[i], asked[i]).get_response()
                return response.id, [o.name for o in response.outputs]

        with ThreadPoolExecutor(len(asked)) as pool:
            answers = list(pool.map(call, range(len(asked))))
        for (_, names), how in zip(answers, asked, strict=True):
            assert names == _answered(how)
        with InferenceClient(s.address) as client:
            truth = [y[i * ROWS : (i + 1) * ROWS] for i in range(len(asked))]
            client.submit_feedback_batch("digits", [(rid, t) for (rid, _), t in zip(answers, truth, strict=True)])
            # The window: the reference request above, then the concurrent ones (the newest).
            quality = client.model_quality("digits", count=len(asked))
    assert (quality.labelled, quality.rows) == (len(asked), len(asked) * ROWS)
    assert quality.metrics["accuracy"] == pytest.approx(accuracy_score(np.concatenate(truth), expected))


def test_a_cached_answer_of_a_captured_request_is_judged(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """With the response cache, the second of two equal `probabilities` requests is a hit: its capture holds the
    prediction output still (the cached answer was computed with it)."""
    repo, x, y = digits
    models = _with(repo, tmp_path / "models", "response_cache { enable: true }")
    rows, truth = x[:ROWS], y[:ROWS]
    with ServerThread(models, data_dir=tmp_path / "data", monitor_interval_s=60.0, response_cache_bytes=1 << 20) as s:
        with tc.InferenceServerClient(s.address) as client:
            first = _infer(client, rows, ["probabilities"])
            second = _infer(client, rows, ["probabilities"])
            stats = client.get_inference_statistics("digits").model_stats[0].inference_stats
            assert (stats.cache_miss.count, stats.cache_hit.count) == (1, 1)
            np.testing.assert_array_equal(first.as_numpy("probabilities"), second.as_numpy("probabilities"))
            assert second.as_numpy("label") is None
        ids = [first.get_response().id, second.get_response().id]
        with InferenceClient(s.address) as client:
            client.submit_feedback_batch("digits", [(rid, truth) for rid in ids])
            quality = client.model_quality("digits")
        predicted = _labels_of(s, rows)
    assert (quality.labelled, quality.rows) == (2, 2 * ROWS)
    assert quality.metrics["accuracy"] == pytest.approx(accuracy_score(truth, predicted))


def test_a_request_whose_capture_lacks_the_prediction_output_is_not_counted_as_labelled(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """Captures stored while the config read predictions from `probabilities` lack `label`, which the config then
    names (as captures of an earlier tensorgate lack it): they are not judged, so label_coverage must not count them
    (it said 1.0 while half the labels could never be judged)."""
    repo, x, y = digits
    before = _with(repo, tmp_path / "before", "")
    config = before / "digits" / "config.pbtxt"
    config.write_text(config.read_text().replace('string_value: "label"', 'string_value: "probabilities"', 1))
    data = tmp_path / "data"
    with ServerThread(before, data_dir=data, monitor_interval_s=60.0) as s, InferenceClient(s.address) as client:
        old = client.infer("digits", {"input": x[:ROWS]}, outputs=["probabilities"]).id
    with ServerThread(repo, data_dir=data, monitor_interval_s=60.0) as s, InferenceClient(s.address) as client:
        new = client.infer("digits", {"input": x[ROWS : 2 * ROWS]}, outputs=["probabilities"]).id
        client.submit_feedback_batch("digits", [(old, y[:ROWS]), (new, y[ROWS : 2 * ROWS])])
        quality = client.model_quality("digits", count=2)
    assert (quality.predictions, quality.labelled, quality.rows) == (2, 1, ROWS)
    assert quality.metrics["label_coverage"] == 0.5


def _runs(client: tc.InferenceServerClient, model: str) -> int:
    return int(client.get_inference_statistics(model).model_stats[0].inference_stats.success.count)


def test_only_a_captured_request_runs_what_its_prediction_needs(tmp_path: Path) -> None:
    """The `pipeline` ensemble: DIFF = A - B (add_sub), OUT_SCALED = 2 * (A + B) (add_sub, then scale2), its first
    output and so its prediction. A captured request asking for DIFF only runs scale2 too, and is judged; the same
    request of a copy that captures nothing (sample_rate 0) runs add_sub alone, as before."""
    root = ensemble_repository(tmp_path / "models")
    regression = 'parameters { key: "tensorgate.task" value: { string_value: "regression" } }\n'
    config = root / "pipeline" / "config.pbtxt"
    config.write_text(config.read_text() + regression)
    unsampled = 'parameters { key: "tensorgate.capture.sample_rate" value: { string_value: "0" } }\n'
    _ensemble(root, "unsampled", PIPELINE.replace('name: "pipeline"', 'name: "unsampled"') + unsampled)
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    b = np.ones((2, 16), np.float32)
    with ServerThread(root, data_dir=tmp_path / "data", monitor_interval_s=60.0) as s:
        with tc.InferenceServerClient(s.address) as client:
            before = _runs(client, "scale2")
            captured = client.infer(
                "pipeline", triton_inputs({"A": a, "B": b}), outputs=[tc.InferRequestedOutput("DIFF")]
            )
            assert [o.name for o in captured.get_response().outputs] == ["DIFF"]
            np.testing.assert_array_equal(captured.as_numpy("DIFF"), a - b)
            assert _runs(client, "scale2") == before + 1
            plain = client.infer(
                "unsampled", triton_inputs({"A": a, "B": b}), outputs=[tc.InferRequestedOutput("DIFF")]
            )
            np.testing.assert_array_equal(plain.as_numpy("DIFF"), a - b)
            assert _runs(client, "scale2") == before + 1
        with InferenceClient(s.address) as client:
            client.submit_feedback("pipeline", captured.get_response().id, (2 * (a + b))[:, 0] + 1.0)
            quality = client.model_quality("pipeline")
    assert (quality.labelled, quality.rows) == (1, 2)
    assert quality.metrics["mae"] == pytest.approx(1.0)


# ----- a classifier's one-column float output -------------------------------------------------------------------


def _sigmoid_model(path: Path) -> Path:
    """x [batch, 2] -> p [batch, 1] = sigmoid(x0 - x1): a binary classifier's one probability column."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.array([[1.0], [-1.0]], np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Sigmoid", ["z"], ["p"])],
        "binary",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["batch", 1])],
        [w],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def test_a_one_column_probability_is_read_by_threshold(tmp_path: Path) -> None:
    """No `tensorgate.prediction.*`: each probability was its own class (accuracy 0 over as many "classes" as
    rows); a classifier's one float column is now thresholded at 0.5, as `kind threshold` would."""
    repo = tmp_path / "models"
    _sigmoid_model(repo / "binary" / "1" / "model.onnx")
    write_config(repo, "binary", 'name: "binary"\nbackend: "onnxruntime"\nmax_batch_size: 64\n')
    rng = np.random.default_rng(7)
    x = rng.normal(size=(200, 2)).astype(np.float32)
    truth = (x[:, 0] - x[:, 1] + rng.normal(scale=0.5, size=200) > 0).astype(np.int64)
    with ServerThread(repo, data_dir=tmp_path / "data", monitor_interval_s=60.0) as s:
        with InferenceClient(s.address) as client:
            ids, scores = [], []
            for i in range(0, 200, 20):
                result = client.infer("binary", {"x": x[i : i + 20]})
                ids.append(result.id)
                scores.append(np.asarray(result["p"]).reshape(-1))
            client.submit_feedback_batch("binary", [(rid, truth[i * 20 : (i + 1) * 20]) for i, rid in enumerate(ids)])
            quality = client.model_quality("binary")
    predicted = (np.concatenate(scores) >= 0.5).astype(np.int64)
    assert quality.class_labels == ("0", "1")
    assert quality.rows == 200
    assert quality.metrics["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert 0.7 < quality.metrics["accuracy"] < 1.0  # the noise makes some wrong: a real figure, not a trivial one


def test_a_one_column_float_class_id_is_taken_as_it_is(tmp_path: Path) -> None:
    """A class id written as a float (0.0, 1.0, 2.0) is not a score: whole numbers stay the classes they are."""
    repo = tmp_path / "models"
    identity_model(repo / "ids" / "1" / "model.onnx", "FP32", ("batch", 1))
    write_config(repo, "ids", 'name: "ids"\nbackend: "onnxruntime"\nmax_batch_size: 8\n')
    classes = np.array([[0.0], [1.0], [2.0], [2.0]], np.float32)
    with ServerThread(repo, data_dir=tmp_path / "data", monitor_interval_s=60.0) as s:
        with InferenceClient(s.address) as client:
            rid = client.infer("ids", {"INPUT0": classes}).id
            client.submit_feedback("ids", rid, [0, 1, 2, 1])
            quality = client.model_quality("ids")
    assert quality.class_labels == ("0", "1", "2")
    assert quality.metrics["accuracy"] == 0.75


def test_a_prediction_that_cannot_be_read_is_logged_once(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A WARNING on every monitor run (8640 a day at the default interval) buried the log: once per model version."""
    repo, x, y = digits
    models = _with(repo, tmp_path / "models", "")
    config = models / "digits" / "config.pbtxt"
    config.write_text(config.read_text().replace('string_value: "label"', 'string_value: "nothing"', 1))
    with ServerThread(models, data_dir=tmp_path / "data", monitor_interval_s=0.1) as s:
        with InferenceClient(s.address) as client:
            rid = client.infer("digits", {"input": x[:ROWS]}).id
            client.submit_feedback("digits", rid, y[:ROWS])
        monitor = s.app.monitor
        assert monitor is not None
        runs = monitor.evaluations
        for _ in range(600):  # bounded (30 s): several evaluations after the label
            if monitor.evaluations >= runs + 5:
                break
            time.sleep(0.05)
        assert monitor.evaluations >= runs + 5
    lines = [r.getMessage() for r in caplog.records if "was not captured" in r.getMessage()]
    assert len(lines) == 1, lines
