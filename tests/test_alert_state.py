"""Alert state that outlives the process: a real server with --data-dir and a real webhook receiver on loopback,
stopped and started again on the same data dir (and two servers sharing one, as --reuse-port processes do).

The digits config's own rule is accuracy_low = "accuracy < 0.8 min_samples=50"."""

from __future__ import annotations

import math
import queue
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensorgate.client import InferenceClient
from tensorgate.server.monitoring.alerts import AlertEngine, AlertRule, AlertTransition
from tensorgate.server.monitoring.report import format_alerts
from tensorgate.server.monitoring.store import PredictionStore
from tensorgate.server.monitoring.webhook import payload
from tests.monitoring import copy_repository, digits_repository
from tests.serving import ServerThread
from tests.test_alerts import Receiver, _evaluate, _labelled, _served, _wrong


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    return digits_repository(tmp_path_factory.mktemp("alert-state"))


def _right(predicted: np.ndarray) -> np.ndarray:
    return predicted


def _recover(client: InferenceClient, x: np.ndarray) -> None:
    """300 rightly labelled rows after the 60 wrong ones: accuracy 300/360, above 0.8 (requests of at most 64)."""
    for start in range(60, 360, 60):
        _labelled(client, x[start : start + 60], _right)


def _posts(receiver: Receiver) -> list[dict[str, Any]]:
    """What the receiver got so far (call once the servers have stopped: their webhook queues are drained)."""
    bodies = []
    while True:
        try:
            bodies.append(receiver.bodies.get_nowait())
        except queue.Empty:
            return bodies


def _fire(repo: Path, data: Path, x: np.ndarray, receiver: Receiver) -> dict[str, Any]:
    """A first run: 60 wrongly labelled rows make accuracy_low fire (one POST); the server stops."""
    with _served(repo, data, alert_webhook=receiver.url) as served, InferenceClient(served.address) as client:
        _labelled(client, x[:60], _wrong)
        _evaluate(served)
        fired = receiver.next()
    assert (fired["rule"], fired["state"], fired["value"]) == ("accuracy_low", "firing", 0.0)
    return fired


def test_a_restart_neither_sends_a_firing_alert_again_nor_moves_its_since(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """Review 98, finding 2: a plain restart POSTed "firing" again for every alert already firing."""
    repo, x, _ = digits
    with Receiver() as receiver:
        fired = _fire(repo, tmp_path / "data", x, receiver)
        with (
            _served(repo, tmp_path / "data", alert_webhook=receiver.url) as served,
            InferenceClient(served.address) as client,
        ):
            _evaluate(served)
            _evaluate(served)
            (alert,) = client.alerts("digits")
            assert (alert.rule, alert.timestamp, alert.value) == ("accuracy_low", fired["timestamp"], 0.0)
            _recover(client, x)
            _evaluate(served)
            assert client.alerts("digits") == []
        posts = _posts(receiver)
    assert [(p["state"], p.get("reason")) for p in posts] == [("resolved", "recovered")]
    assert posts[0]["since"] == fired["timestamp"] and posts[0]["fired_value"] == 0.0
    assert posts[0]["value"] == pytest.approx(300 / 360)


def _without_version_1(repo: Path, dst: Path) -> Path:
    models = copy_repository(repo, dst)
    shutil.move(models / "digits" / "1", models / "digits" / "2")
    return models


def _without_the_rule(repo: Path, dst: Path) -> Path:
    models = copy_repository(repo, dst)
    config = models / "digits" / "config.pbtxt"
    config.write_text(config.read_text().replace("tensorgate.alert.accuracy_low", "tensorgate.alert.f1_low"))
    return models


def _with_the_rule_changed(repo: Path, dst: Path) -> Path:
    models = copy_repository(repo, dst)
    config = models / "digits" / "config.pbtxt"
    config.write_text(config.read_text().replace("accuracy < 0.8 min_samples=50", "accuracy < 0.5 min_samples=50"))
    return models


@pytest.mark.parametrize(
    ("second_run", "reason", "then"),
    [
        pytest.param(_without_version_1, "version no longer served", [], id="version-gone"),
        pytest.param(_without_the_rule, "rule removed", ["f1_low"], id="rule-removed"),
        pytest.param(_with_the_rule_changed, "rule changed", ["accuracy_low"], id="rule-changed"),
    ],
)
def test_a_restart_resolves_the_alerts_it_no_longer_judges(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path, second_run: Any, reason: str, then: list[str]
) -> None:
    """Review 98, finding 2: a restart after the alerting version stopped being served (or its rule went) sent
    nothing, and the receiver kept the incident open for ever. The "resolved" says why (finding 5)."""
    repo, x, _ = digits
    with Receiver() as receiver:
        _fire(repo, tmp_path / "data", x, receiver)
        models = second_run(repo, tmp_path / "models")
        with _served(models, tmp_path / "data", alert_webhook=receiver.url) as served:
            _evaluate(served)
            _evaluate(served)
        posts = _posts(receiver)
    resolved = posts[0]
    assert (resolved["rule"], resolved["version"], resolved["state"], resolved["reason"]) == (
        "accuracy_low",
        "1",
        "resolved",
        reason,
    )
    # The rule in its place (renamed: f1_low, or changed: below 0.5) judges afresh, after the resolution: accuracy
    # 0 breaches it too.
    assert [(p["rule"], p["state"]) for p in posts[1:]] == [(rule, "firing") for rule in then]


def test_processes_sharing_the_data_dir_and_webhook_announce_each_transition_once(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """Two servers on one data dir (as --reuse-port processes) both judge the same store: with the same webhook,
    each transition is POSTed once; one of them stopping does not resolve what the other still holds."""
    repo, x, _ = digits
    with Receiver() as receiver:
        first = _served(repo, tmp_path / "data", alert_webhook=receiver.url)
        with first, InferenceClient(first.address) as client:
            with _served(repo, tmp_path / "data", alert_webhook=receiver.url) as second:
                _labelled(client, x[:60], _wrong)
                _evaluate(first)
                _evaluate(second)
                with InferenceClient(second.address) as other:
                    (alert,) = other.alerts("digits")  # taken up, with the first one's since
                assert alert.timestamp == client.alerts("digits")[0].timestamp
            _evaluate(first)  # the second has stopped: the first still holds the alert, nothing to resolve
            assert [a.rule for a in client.alerts("digits")] == ["accuracy_low"]
            _recover(client, x)
            _evaluate(first)
        posts = _posts(receiver)
    assert [(p["state"], p.get("reason")) for p in posts] == [("firing", None), ("resolved", "recovered")]


def test_a_process_without_the_webhook_does_not_take_the_alerts_of_one_with_it(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """README's set-up: one process has the webhook, the others share its data dir without. The others firing
    first (the model's own rules are in every process) must not keep the webhook's process from POSTing."""
    repo, x, _ = digits
    with Receiver() as receiver:
        with (
            _served(repo, tmp_path / "data") as quiet,
            _served(repo, tmp_path / "data", alert_webhook=receiver.url) as sender,
            InferenceClient(quiet.address) as client,
        ):
            _labelled(client, x[:60], _wrong)
            _evaluate(quiet)
            _evaluate(sender)
        posts = _posts(receiver)
    assert [(p["rule"], p["state"]) for p in posts] == [("accuracy_low", "firing")]


def test_a_firing_alert_shows_its_latest_value_and_none_without_data(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """Review 98, finding 5: ListAlerts kept the value of the firing transition while the window moved."""
    repo, x, _ = digits
    with _served(repo, tmp_path / "data") as served, InferenceClient(served.address) as client:
        _labelled(client, x[:60], _wrong)
        _evaluate(served)
        assert [a.value for a in client.alerts("digits")] == [0.0]
        _labelled(client, x[60:80], _right)  # 20 of 80 right
        _evaluate(served)
        assert [a.value for a in client.alerts("digits")] == [0.25]


def test_an_alert_without_a_judgeable_window_keeps_firing_with_no_current_value() -> None:
    """Like Prometheus without data, the state stays; but the value of a window it could not judge (fewer than
    min_samples) is not shown as if it were current: `tensorgate monitor` prints n/a."""
    seen: list[AlertTransition] = []
    engine = AlertEngine([AlertRule("mae_high", "mae", ">", 3.0, min_samples=10)], on_transition=seen.append)
    engine.new_window("reg", "1", 1.0)
    engine.evaluate("reg", "1", {"mae": 5.25}, 30, now=1.0)
    engine.new_window("reg", "1", 2.0)
    engine.evaluate("reg", "1", {"mae": 6.44}, 30, now=2.0)
    (alert,) = engine.active()
    assert (alert.value, alert.fired_value, alert.timestamp) == (6.44, 5.25, 1.0)
    engine.new_window("reg", "1", 3.0)
    engine.evaluate("reg", "1", {}, 0, now=3.0)  # no labelled rows in the window
    (alert,) = engine.active()
    assert math.isnan(alert.value) and alert.fired_value == 5.25
    assert "n/a" in format_alerts([alert])
    (resolved,) = engine.resolve_all(now=4.0)
    assert "alert mae_high resolved (version no longer served): model 'reg' version 1 value 6.44" in (
        resolved.describe()
    )
    assert [t.state for t in seen] == ["firing", "resolved"]


def test_a_payload_is_strict_json_and_a_firing_one_keeps_its_fields() -> None:
    fired = AlertTransition("a", "m", "1", "firing", 0.5, 0.8, 10.0)
    assert set(payload(fired)) == {"source", "rule", "model", "version", "state", "value", "threshold", "timestamp"}
    resolved = fired.resolution("version no longer served", math.nan, 20.0)
    assert payload(resolved) | {"source": "tensorgate"} == {
        "source": "tensorgate",
        "rule": "a",
        "model": "m",
        "version": "1",
        "state": "resolved",
        "value": None,
        "threshold": 0.8,
        "timestamp": 20.0,
        "reason": "version no longer served",
        "since": 10.0,
        "fired_value": 0.5,
    }


def test_a_data_dir_of_the_previous_release_opens_and_keeps_alerts(tmp_path: Path) -> None:
    """The previous release's store had only predictions and model_rows: opening it adds the alerts' table."""
    path = tmp_path / "tensorgate.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE predictions (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, model TEXT NOT NULL,"
            " version TEXT NOT NULL, ts REAL NOT NULL, inputs BLOB, outputs BLOB NOT NULL, label BLOB, label_ts REAL);"
            "CREATE TABLE model_rows (model TEXT PRIMARY KEY, rows INTEGER NOT NULL);"
        )
    db.close()
    store = PredictionStore(path)
    try:
        assert store.firing_alerts("") == []
        assert store.count("digits") == 0
    finally:
        store.close()


def test_a_restart_on_an_explicit_mode_server_resolves_what_is_not_loaded(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """A version that is not served after the restart resolves, whatever the reason it is not (here: explicit
    mode, not loaded yet); loading it later judges it afresh."""
    repo, x, _ = digits
    with Receiver() as receiver:
        _fire(repo, tmp_path / "data", x, receiver)
        settings: dict[str, Any] = {"model_control_mode": "explicit", "alert_webhook": receiver.url}
        with ServerThread(repo, data_dir=tmp_path / "data", monitor_interval_s=3600, **settings) as served:
            _evaluate(served)
        posts = _posts(receiver)
    assert [(p["state"], p["reason"]) for p in posts] == [("resolved", "version no longer served")]
