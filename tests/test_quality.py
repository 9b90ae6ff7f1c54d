"""Quality metrics: the digits classifier answers held-out digits, their true labels come back as feedback, and
GetModelQuality (and the Prometheus gauges) must equal scikit-learn's figures on the same joined pairs."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    mean_absolute_error,
    mean_squared_error,
    precision_recall_fscore_support,
)

from tensorgate.client import InferenceClient
from tensorgate.client.errors import FailedPrecondition, InvalidArgument, NotFound
from tensorgate.protos import model_config_pb2 as mc
from tensorgate.protos import monitoring_pb2 as mpb
from tensorgate.server.app import TensorgateServer
from tensorgate.server.monitoring.monitor import MONITORING_FAMILIES, reference_markdown
from tensorgate.server.monitoring.quality import TaskSpec, TaskSpecError, compute_quality
from tensorgate.server.monitoring.store import Prediction
from tensorgate.server.telemetry.metrics import reference as metrics_reference
from tests.monitoring import digits_repository
from tests.scraping import families_of, scrape, scrape_text
from tests.serving import ServerThread

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
CHUNK = 5  # rows per request: labels are joined per request, one per row


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    return digits_repository(tmp_path_factory.mktemp("quality"))


@pytest.fixture
def served(digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path) -> Iterator[ServerThread]:
    repo, _, _ = digits
    with ServerThread(repo, data_dir=tmp_path / "data", monitor_interval_s=0.2) as s:
        yield s


def _traffic(client: InferenceClient, x: np.ndarray, n: int) -> tuple[list[str], list[np.ndarray]]:
    """Send the first n held-out rows in requests of CHUNK rows; return each request's id and predicted labels."""
    ids, predicted = [], []
    for start in range(0, n, CHUNK):
        result = client.infer("digits", {"input": x[start : start + CHUNK]})
        ids.append(result.id)
        predicted.append(result["label"].reshape(-1))
    return ids, predicted


def test_quality_equals_scikit_learn_on_joined_pairs(
    served: ServerThread, digits: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    _, x, y = digits
    n = 300
    with InferenceClient(served.address) as client:
        ids, predicted = _traffic(client, x, n)
        # Label two requests in three: coverage is then 2/3 and only labelled requests count in the metrics.
        labelled = [i for i in range(len(ids)) if i % 3 != 2]
        statuses = client.submit_feedback_batch("digits", [(ids[i], y[i * CHUNK : (i + 1) * CHUNK]) for i in labelled])
        assert all(s.ok for s in statuses)
        quality = client.model_quality("digits")
    y_true = np.concatenate([y[i * CHUNK : (i + 1) * CHUNK] for i in labelled])
    y_pred = np.concatenate([predicted[i] for i in labelled])
    assert quality.predictions == len(ids)
    assert quality.labelled == len(labelled)
    assert quality.rows == len(y_true)
    assert quality.metrics["label_coverage"] == pytest.approx(len(labelled) / len(ids))
    assert quality.metrics["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    assert quality.metrics["precision_macro"] == pytest.approx(p)
    assert quality.metrics["recall_macro"] == pytest.approx(r)
    assert quality.metrics["f1_macro"] == pytest.approx(f)
    classes = np.unique(np.concatenate([y_true, y_pred]))
    pc, rc, fc, support = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    assert [c.label for c in quality.classes] == [str(c) for c in classes]
    assert [c.precision for c in quality.classes] == pytest.approx(pc.tolist())
    assert [c.recall for c in quality.classes] == pytest.approx(rc.tolist())
    assert [c.f1 for c in quality.classes] == pytest.approx(fc.tolist())
    assert [c.support for c in quality.classes] == support.tolist()
    np.testing.assert_array_equal(quality.confusion, confusion_matrix(y_true, y_pred, labels=classes))


def test_windows_by_count_and_by_time(served: ServerThread, digits: tuple[Path, np.ndarray, np.ndarray]) -> None:
    _, x, y = digits
    with InferenceClient(served.address) as client:
        ids, predicted = _traffic(client, x, 100)
        client.submit_feedback_batch("digits", [(rid, y[i * CHUNK : (i + 1) * CHUNK]) for i, rid in enumerate(ids)])
        last = client.model_quality("digits", count=4)
        everything = client.model_quality("digits", seconds=3600.0)
        version = client.model_quality("digits", version=1, count=len(ids))
    y_last = y[(len(ids) - 4) * CHUNK : len(ids) * CHUNK]
    assert last.predictions == 4
    assert last.metrics["accuracy"] == pytest.approx(accuracy_score(y_last, np.concatenate(predicted[-4:])))
    assert everything.predictions == len(ids)
    assert everything.metrics["accuracy"] == pytest.approx(
        accuracy_score(y[: len(ids) * CHUNK], np.concatenate(predicted))
    )
    assert version.metrics == everything.metrics


def test_prometheus_gauges_follow_the_monitor(
    served: ServerThread, digits: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    _, x, y = digits
    with InferenceClient(served.address) as client:
        ids, _ = _traffic(client, x, 60)
        client.submit_feedback_batch("digits", [(rid, y[i * CHUNK : (i + 1) * CHUNK]) for i, rid in enumerate(ids)])
        expected = client.model_quality("digits").metrics["accuracy"]
    url = f"http://127.0.0.1:{served.app.metrics_port}/metrics"
    key = ("tensorgate_model_quality", frozenset({("model", "digits"), ("version", "1"), ("metric", "accuracy")}))
    # The monitor runs every 0.2 s: wait (bounded) for an evaluation that saw the labels.
    for _ in range(200):
        if scrape(url).get(key) == pytest.approx(expected):
            break
        time.sleep(0.05)
    assert scrape(url)[key] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("call", "error", "needle"),
    [
        pytest.param(lambda c: c.model_quality("nope"), NotFound, "model 'nope'", id="unknown-model"),
        pytest.param(lambda c: c.model_quality("digits", version=7), NotFound, "version 7", id="unknown-version"),
        pytest.param(
            lambda c: c._call(
                "GetModelQuality", mpb.GetModelQualityRequest(model="digits", window=mpb.Window(seconds=-1)), None
            ),
            InvalidArgument,
            "model 'digits': window.seconds",
            id="negative-window",
        ),
    ],
)
def test_bad_quality_requests_name_model_and_problem(
    served: ServerThread, call: Callable[[InferenceClient], object], error: type, needle: str
) -> None:
    with InferenceClient(served.address) as client, pytest.raises(error) as caught:
        call(client)
    assert needle in str(caught.value)


# ----- the pure metric functions -------------------------------------------------------------------------------


def _config(**parameters: str) -> mc.ModelConfig:
    config = mc.ModelConfig(name="m")
    for key, value in parameters.items():
        config.parameters[key.replace("_", ".")].string_value = value
    return config


def _window(outputs: list[np.ndarray], labels: list[np.ndarray | None]) -> list[Prediction]:
    return [
        Prediction(str(i), "m", "1", float(i), None, {"OUT": out}, label)
        for i, (out, label) in enumerate(zip(outputs, labels, strict=True))
    ]


def test_regression_mae_rmse_equal_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    outputs = [rng.normal(size=(3, 1)).astype(np.float32) for _ in range(20)]
    labels: list[np.ndarray | None] = [rng.normal(size=3) for _ in range(20)]
    labels[5] = None
    spec = TaskSpec.from_config(_config(tensorgate_task="regression"))
    report = compute_quality(spec, _window(outputs, labels))
    pairs = [(lab, out.reshape(-1)) for out, lab in zip(outputs, labels, strict=True) if lab is not None]
    t = np.concatenate([p[0] for p in pairs])
    pred = np.concatenate([p[1] for p in pairs]).astype(np.float64)
    assert report.metrics["mae"] == pytest.approx(mean_absolute_error(t, pred))
    assert report.metrics["rmse"] == pytest.approx(np.sqrt(mean_squared_error(t, pred)))
    assert report.metrics["label_coverage"] == pytest.approx(19 / 20)


@pytest.mark.parametrize(
    ("parameters", "output", "expected"),
    [
        pytest.param({}, np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], np.float32), [1, 0], id="default-argmax"),
        pytest.param({}, np.array([[4], [2]], np.int64), [4, 2], id="default-label"),
        pytest.param(
            {"tensorgate_prediction_kind": "threshold", "tensorgate_prediction_threshold": "0.6"},
            np.array([[0.3, 0.7], [0.5, 0.5]], np.float32),
            [1, 0],
            id="threshold-two-columns",
        ),
        pytest.param(
            {"tensorgate_prediction_kind": "threshold"}, np.array([0.9, 0.1], np.float32), [1, 0], id="threshold-1d"
        ),
    ],
)
def test_how_a_prediction_is_read(parameters: dict[str, str], output: np.ndarray, expected: list[int]) -> None:
    spec = TaskSpec.from_config(_config(**parameters))
    truth = np.asarray(expected, dtype=np.float64)
    report = compute_quality(spec, _window([output], [truth]))
    assert report.metrics["accuracy"] == 1.0
    assert report.class_labels == sorted({str(v) for v in expected})


# ----- the monitor loop: alerts from config.pbtxt, drift from the first N requests --------------------------------

FIRING = ("tensorgate_alerts_firing", frozenset({("model", "digits"), ("version", "1"), ("rule", "accuracy_low")}))


def _wait_for(check: Callable[[], bool]) -> bool:
    for _ in range(300):  # bounded: the monitor evaluates every 0.2 s
        if check():
            return True
        time.sleep(0.05)
    return check()


def test_alert_fires_and_resolves_and_is_counted_and_traced(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """The digits config's `tensorgate.alert.accuracy_low` = "accuracy < 0.8 min_samples=50"; with tracing on
    (an injected provider), each transition is also a span `alert accuracy_low` with its OpenTelemetry event."""
    repo, x, _ = digits
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    served = ServerThread(repo, data_dir=tmp_path / "data", monitor_interval_s=0.2)
    served.app = TensorgateServer(served.settings, tracer_provider=provider)
    with served, InferenceClient(served.address) as client:
        url = f"http://127.0.0.1:{served.app.metrics_port}/metrics"
        ids, predicted = _traffic(client, x, 60)
        wrong = [(rid, (p + 1) % 10) for rid, p in zip(ids, predicted, strict=True)]
        client.submit_feedback_batch("digits", wrong)
        assert _wait_for(lambda: scrape(url).get(FIRING) == 1)
        (alert,) = client.alerts("digits")
        assert (alert.rule, alert.model, alert.version, alert.state) == ("accuracy_low", "digits", "1", "firing")
        assert alert.value == 0.0 and alert.threshold == 0.8
        client.submit_feedback_batch("digits", [(rid, p) for rid, p in zip(ids, predicted, strict=True)])
        assert _wait_for(lambda: not client.alerts())
        samples = scrape(url)
    spans = [s for s in exporter.get_finished_spans() if s.name == "alert accuracy_low"]
    assert len(spans) == 2, [s.name for s in exporter.get_finished_spans()]
    for span, state, value in zip(spans, ("firing", "resolved"), (0.0, 1.0), strict=True):
        expected = {
            "tensorgate.model.name": "digits",
            "tensorgate.model.version": "1",
            "tensorgate.alert.rule": "accuracy_low",
            "tensorgate.alert.state": state,
            "tensorgate.alert.value": value,
            "tensorgate.alert.threshold": 0.8,
        }
        if state == "resolved":
            expected["tensorgate.alert.reason"] = "recovered"
        assert dict(span.attributes or {}) == expected
        (event,) = span.events
        assert event.name == f"alert.{state}"
        assert dict(event.attributes or {}) == expected
        assert span.parent is None  # its own trace: not under whichever request span was current
    assert FIRING not in samples
    for state in ("firing", "resolved"):
        key = (
            "tensorgate_alert_transitions_total",
            frozenset({("model", "digits"), ("rule", "accuracy_low"), ("state", state)}),
        )
        assert samples[key] == 1


def _readme_monitoring_table() -> str:
    section = README.split("\n## Watching a model: quality, drift, alerts\n", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    start = lines.index("| Name | Type | Labels | Meaning |")
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end]) + "\n"


def test_readme_monitoring_metrics_table_is_the_generated_one() -> None:
    assert _readme_monitoring_table() == reference_markdown(), (
        "regenerate the metrics table of README's monitoring section: python -c "
        "'from tensorgate.server.monitoring.monitor import reference_markdown as r; print(r())'"
    )


def test_readme_monitoring_table_lists_exactly_what_a_monitoring_server_adds(
    served: ServerThread, digits: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    """A scrape of a server with --data-dir, while an alert fires: its families beyond those of README's Metrics
    table (tests/test_metrics.py scrapes a server without monitoring) are exactly the monitoring table's."""
    _, x, _ = digits
    url = f"http://127.0.0.1:{served.app.metrics_port}/metrics"
    with InferenceClient(served.address) as client:
        ids, predicted = _traffic(client, x, 60)
        client.submit_feedback_batch("digits", [(rid, (p + 1) % 10) for rid, p in zip(ids, predicted, strict=True)])
        assert _wait_for(lambda: scrape(url).get(FIRING) == 1)
        scraped = families_of(scrape_text(url))
    base = {s.name for s in metrics_reference()}
    listed = {line.split("`")[1] for line in _readme_monitoring_table().splitlines()[2:]}
    assert listed == scraped.keys() - base
    specs = {s.name: s for s in MONITORING_FAMILIES}
    for name in listed:
        kind, samples = scraped[name]
        assert kind == specs[name].type, name
        for sample in samples:
            assert set(sample.labels) == set(specs[name].labels), (name, sample)
    # The families this scenario fills (no reference profile here: drift is tested with one below).
    filled = {name for name, (_, samples) in scraped.items() if samples}
    assert listed - filled == {"tensorgate_model_drift"}


def test_drift_against_a_profile_of_the_first_requests(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """`tensorgate.drift.reference_requests`: the first N captured requests become the reference; held-out digits
    from the same distribution stay close to it, inverted digits (16 - pixel) do not."""
    repo, x, _ = digits
    models = tmp_path / "models"
    shutil.copytree(repo, models)
    config = models / "digits" / "config.pbtxt"
    config.write_text(
        config.read_text()
        + 'parameters {\n  key: "tensorgate.drift.reference_requests"\n  value: { string_value: "40" }\n}\n'
    )
    data = tmp_path / "data"
    with ServerThread(models, data_dir=data, monitor_interval_s=0.2) as s, InferenceClient(s.address) as client:
        with pytest.raises(FailedPrecondition, match="model 'digits' version 1: no reference profile"):
            client.model_drift("digits")
        for i in range(0, 200, 5):  # 40 requests of 5 rows: the reference
            client.infer("digits", {"input": x[i : i + 5]})
        assert _wait_for(lambda: (data / "profiles" / "digits.json").is_file())
        for i in range(200, 400, 5):
            client.infer("digits", {"input": x[i : i + 5]})
        same = client.model_drift("digits", count=40)
        for i in range(200, 400, 5):
            client.infer("digits", {"input": 16.0 - x[i : i + 5]})
        shifted = client.model_drift("digits", count=40)
    assert same.samples == shifted.samples == 200
    assert len(same.features) >= 64
    assert shifted.psi_max > same.psi_max
    assert shifted.drifted_share > same.drifted_share
    assert shifted.drifted


# ----- odd windows and lifecycles (found by an audit, each once broke monitoring) ---------------------------------


def test_a_labelled_request_without_the_prediction_output_is_skipped() -> None:
    """One caller asked for other outputs only: its row is left out, not the whole model's quality."""
    spec = TaskSpec.from_config(_config(tensorgate_task="classification", tensorgate_prediction_output="OUT"))
    window = _window([np.array([[3]], np.int64)] * 4, [np.array([3.0]), np.array([3.0]), None, np.array([1.0])])
    window.append(Prediction("other", "m", "1", 9.0, None, {"PROBS": np.zeros((1, 10), np.float32)}, np.array([3.0])))
    report = compute_quality(spec, window)
    assert report.rows == 3
    assert report.metrics["accuracy"] == pytest.approx(2 / 3)
    # When no labelled request has it, the spec names the wrong output: that is still an error.
    with pytest.raises(TaskSpecError, match="was not captured"):
        compute_quality(spec, window[-1:])


def test_a_text_label_for_a_regression_model_is_skipped() -> None:
    spec = TaskSpec.from_config(_config(tensorgate_task="regression"))
    labels: list[np.ndarray | None] = [np.array([1.0]), np.array(["n/a"], dtype=object), np.array([3.0])]
    report = compute_quality(spec, _window([np.array([[1.5]], np.float32)] * 3, labels))
    assert report.rows == 2
    assert report.metrics["mae"] == pytest.approx(1.0)


def test_a_nonfinite_regression_prediction_is_left_out_and_counted() -> None:
    """One NaN used to make mae and rmse NaN, and an alert on them could then neither fire nor resolve."""
    spec = TaskSpec.from_config(_config(tensorgate_task="regression"))
    outputs = [
        np.array([[50.0], [np.nan]], np.float32),
        np.array([[np.inf]], np.float32),
        np.array([[12.0]], np.float32),
    ]
    report = compute_quality(spec, _window(outputs, [np.array([10.0, 10.0]), np.array([10.0]), np.array([10.0])]))
    assert (report.rows, report.nonfinite) == (2, 2)
    assert report.metrics["mae"] == pytest.approx(mean_absolute_error([10.0, 10.0], [50.0, 12.0]))
    assert report.metrics["rmse"] == pytest.approx(np.sqrt(mean_squared_error([10.0, 10.0], [50.0, 12.0])))
    assert report.metrics["nonfinite_share"] == 0.5
    only_nan = compute_quality(spec, _window([np.array([[np.nan]], np.float32)], [np.array([1.0])]))
    assert (only_nan.rows, only_nan.metrics) == (0, {"label_coverage": 1.0, "nonfinite_share": 1.0})


@pytest.mark.parametrize(
    "label",
    [
        pytest.param(np.array(["3"], dtype=object), id="text"),
        pytest.param(np.array([b"3"], dtype=object), id="bytes"),
        pytest.param(np.array([3.0]), id="float"),
    ],
)
def test_a_label_names_the_class_as_drift_does(label: np.ndarray) -> None:
    """Text "3" is the INT64 output 3, as in drift's categories (it used to be another class: accuracy 0)."""
    spec = TaskSpec.from_config(_config(tensorgate_task="classification"))
    outputs = [np.array([[3]], np.int64), np.array([[10]], np.int64), np.array([[9]], np.int64)]
    report = compute_quality(spec, _window(outputs, [label, np.array(["10"], dtype=object), np.array([2])]))
    assert report.metrics["accuracy"] == pytest.approx(2 / 3)
    assert report.class_labels == ["2", "3", "9", "10"]  # numbers in numeric order


def _with_rule(repo: Path, out: Path, rule: str) -> Path:
    """A copy of the digits repository whose config adds the alert rule `coverage_low`."""
    copy = shutil.copytree(repo, out)
    config = copy / "digits" / "config.pbtxt"
    config.write_text(
        config.read_text()
        + f'\nparameters {{ key: "tensorgate.alert.coverage_low" value: {{ string_value: "{rule}" }} }}\n'
    )
    return copy


def test_label_coverage_alerts_fire_and_resolve_when_the_model_goes(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """Coverage is judged on the predictions it is a share of (it never fired: it waited for labelled rows), and
    an unloaded model's alerts resolve instead of firing for ever."""
    repo, x, _ = digits
    repo = _with_rule(repo, tmp_path / "models", "label_coverage < 0.5 min_samples=4")
    served = ServerThread(
        repo, data_dir=tmp_path / "data", monitor_interval_s=0.2, model_control_mode="explicit", load_model=["digits"]
    )
    with served, InferenceClient(served.address) as client:
        _traffic(client, x, 40)  # no labels: coverage 0
        assert _wait_for(lambda: [a.rule for a in client.alerts("digits")] == ["coverage_low"])
        client.unload("digits")
        assert _wait_for(lambda: client.alerts() == [])
        monitor = served.app.monitor
        assert monitor is not None
        assert monitor.transitions[("digits", "coverage_low", "resolved")] == 1  # the webhook hears it too
