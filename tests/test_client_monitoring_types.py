"""The Monitoring calls of both clients answer in one style: frozen dataclasses of Python values, as ``model_quality``
always did. ``model_drift`` and ``alerts`` used to hand back the protobuf messages themselves (``mpb.ModelDrift``,
a list of ``mpb.Alert``), so a caller's code depended on the wire format."""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from tensorgate.client import (
    Alert,
    AsyncInferenceClient,
    FeatureDrift,
    InferenceClient,
    ModelDrift,
    ModelQuality,
)
from tensorgate.client._monitoring import MonitoringStub
from tensorgate.protos import monitoring_pb2 as mpb
from tests.monitoring import digits_repository
from tests.serving import ServerThread

REFERENCE = 'parameters {\n  key: "tensorgate.drift.reference_requests"\n  value: { string_value: "20" }\n}\n'


def _wait_for(check: Callable[[], bool]) -> bool:
    for _ in range(300):  # bounded: the monitor evaluates every 0.2 s
        if check():
            return True
        time.sleep(0.05)
    return check()


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, float]]:
    """The digits model with a reference profile of its first 20 requests, 40 requests since, and its alert
    `accuracy_low` ("accuracy < 0.8 min_samples=50") firing on wrong labels; also when the alert was provoked."""
    root = tmp_path_factory.mktemp("client_types")
    repo, x, _ = digits_repository(root / "built")
    models = shutil.copytree(repo, root / "models")
    config = models / "digits" / "config.pbtxt"
    config.write_text(config.read_text() + REFERENCE)
    data = root / "data"
    with ServerThread(models, data_dir=data, monitor_interval_s=0.2) as served:
        with InferenceClient(served.address) as client:
            for i in range(0, 100, 5):
                client.infer("digits", {"input": x[i : i + 5]})
            assert _wait_for(lambda: (data / "profiles" / "digits.json").is_file())
            results = [client.infer("digits", {"input": x[i : i + 5]}) for i in range(100, 300, 5)]
            provoked = time.time()
            wrong = [(r.id, (r["label"].reshape(-1) + 1) % 10) for r in results]
            assert all(s.ok for s in client.submit_feedback_batch("digits", wrong))
            assert _wait_for(lambda: bool(client.alerts("digits")))
        yield served, provoked


def _raw(served: ServerThread, method: str, request: Any) -> Any:
    """The message on the wire, read with the generated stub: what the client's types must carry over."""
    with grpc.insecure_channel(served.address) as channel:
        return getattr(MonitoringStub(channel), method)(request, timeout=30)


def _assert_drift(drift: ModelDrift, raw: mpb.ModelDrift) -> None:
    assert type(drift) is ModelDrift
    assert (drift.model, drift.version, drift.samples) == ("digits", "1", 200)
    assert type(drift.samples) is int and type(drift.drifted) is bool and type(drift.psi_max) is float
    summary = ("drifted", "psi_max", "psi_mean", "drifted_share", "score_drift")
    assert [getattr(drift, k) for k in summary] == [getattr(raw, k) for k in summary]
    assert isinstance(drift.features, tuple) and len(drift.features) == len(raw.features) >= 64
    assert all(type(f) is FeatureDrift for f in drift.features)
    fields = ("name", "kind", "psi", "statistic", "p_value", "drifted")
    assert [tuple(getattr(f, k) for k in fields) for f in drift.features] == [
        tuple(getattr(f, k) for k in fields) for f in raw.features
    ]
    assert drift.psi_max == max(f.psi for f in drift.features if f.kind != "score")  # the inputs' PSI
    assert drift.skipped == dict(raw.skipped) and type(drift.skipped) is dict
    with pytest.raises(dataclasses.FrozenInstanceError):
        drift.samples = 0  # type: ignore[misc]


def _assert_alerts(alerts: list[Alert], raw: mpb.ListAlertsResponse, provoked: float) -> None:
    assert type(alerts) is list
    (alert,) = alerts
    assert type(alert) is Alert
    assert (alert.rule, alert.model, alert.version, alert.state) == ("accuracy_low", "digits", "1", "firing")
    assert (alert.value, alert.threshold) == (0.0, 0.8)
    # When it started firing, in seconds since the epoch: after the wrong labels went in, well before now.
    assert type(alert.timestamp) is float and provoked - 1 <= alert.timestamp <= time.time()
    (wire,) = raw.alerts
    assert dataclasses.astuple(alert) == (
        wire.rule,
        wire.model,
        wire.version,
        wire.state,
        wire.value,
        wire.threshold,
        wire.timestamp,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        alert.state = "resolved"  # type: ignore[misc]


def test_sync_client_answers_dataclasses(watched: tuple[ServerThread, float]) -> None:
    served, provoked = watched
    window = mpb.Window(count=40)
    with InferenceClient(served.address) as client:
        quality = client.model_quality("digits", count=40)
        drift = client.model_drift("digits", count=40)
        alerts = client.alerts("digits")
        assert client.alerts("no_such_model") == []
    assert type(quality) is ModelQuality and quality.labelled == 40
    _assert_drift(drift, _raw(served, "GetModelDrift", mpb.GetModelDriftRequest(model="digits", window=window)))
    _assert_alerts(alerts, _raw(served, "ListAlerts", mpb.ListAlertsRequest(model="digits")), provoked)


async def test_asyncio_client_answers_the_same_dataclasses(watched: tuple[ServerThread, float]) -> None:
    served, provoked = watched
    window = mpb.Window(count=40)
    async with AsyncInferenceClient(served.address) as client:
        quality = await client.model_quality("digits", count=40)
        drift = await client.model_drift("digits", count=40)
        alerts = await client.alerts()  # every model's: only digits has any
    assert type(quality) is ModelQuality and quality.labelled == 40
    _assert_drift(drift, _raw(served, "GetModelDrift", mpb.GetModelDriftRequest(model="digits", window=window)))
    _assert_alerts(alerts, _raw(served, "ListAlerts", mpb.ListAlertsRequest()), provoked)


def test_monitoring_results_are_exported() -> None:
    import tensorgate.client as client_pkg

    for name in ("Alert", "ClassQuality", "FeatureDrift", "FeedbackStatus", "ModelDrift", "ModelQuality"):
        assert name in client_pkg.__all__
        assert dataclasses.is_dataclass(getattr(client_pkg, name))
        assert getattr(client_pkg, name).__dataclass_params__.frozen
