"""Alert rules (config parameters and YAML), the engine's fire/resolve logic, the webhook against a real HTTP
receiver on 127.0.0.1, and the Prometheus rules shipped in deploy/monitoring/."""

from __future__ import annotations

import base64
import json
import logging
import queue
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tensorgate.client import InferenceClient
from tensorgate.server.monitoring.alerts import (
    DRIFT_METRICS,
    QUALITY_METRICS,
    AlertEngine,
    AlertRule,
    AlertRuleError,
    AlertTransition,
    load_rules_file,
    model_rules,
    parse_rule,
    rules_from_config,
)
from tensorgate.server.monitoring.webhook import WebhookSender
from tests.monitoring import copy_repository, digits_repository
from tests.process import ServeProcess
from tests.serving import ServerThread

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_RULES = ROOT / "deploy" / "monitoring" / "prometheus-alerts.yaml"

# ----- parsing -----------------------------------------------------------------------------------------------


def test_rules_from_config_parameters() -> None:
    params = {
        "tensorgate.task": "classification",
        "tensorgate.alert.low_accuracy": "accuracy < 0.9 min_samples=200 for=3",
        "tensorgate.alert.input_drift": "drift.drifted_share > 0.1",
    }
    assert rules_from_config(params, model="digits") == [
        AlertRule("input_drift", "drift.drifted_share", ">", 0.1, model="digits"),
        AlertRule("low_accuracy", "accuracy", "<", 0.9, min_samples=200, for_windows=3, model="digits"),
    ]
    assert rules_from_config({"tensorgate.task": "regression"}) == []


@pytest.mark.parametrize(
    "text, problem",
    [
        pytest.param("accuracy <", "expected '<metric> <op> <threshold>", id="too-short"),
        pytest.param("acuracy < 0.9", "unknown metric 'acuracy'", id="metric"),
        pytest.param("accuracy <= 0.9", "operator must be '<' or '>'", id="op"),
        pytest.param("accuracy < high", "threshold 'high' is not a number", id="threshold"),
        pytest.param("accuracy < nan", "threshold must be a finite number", id="nan"),
        pytest.param("accuracy < 0.9 min_samples=lots", "min_samples='lots' is not an integer", id="min-samples"),
        pytest.param("accuracy < 0.9 min_samples=0", "min_samples must be at least 1", id="min-samples-0"),
        pytest.param("accuracy < 0.9 for=0", "for_windows must be at least 1", id="for-0"),
        pytest.param("accuracy < 0.9 every=2", "unknown option 'every=2'", id="option"),
        pytest.param(
            "accuracy < 0.9 min_sample=2", "unknown option 'min_sample=2': did you mean 'min_samples'?", id="typo"
        ),
        pytest.param(
            "drifted_share > 0.1",
            "unknown metric 'drifted_share': drift metrics are written drift.drifted_share",
            id="drift-prefix",
        ),
        pytest.param("accuraccy < 0.9", "unknown metric 'accuraccy': did you mean 'accuracy'?", id="metric-typo"),
    ],
)
def test_bad_config_rules_name_the_rule_and_the_problem(text: str, problem: str) -> None:
    with pytest.raises(AlertRuleError, match=re.escape(problem)) as info:
        rules_from_config({"tensorgate.alert.my_rule": text})
    assert "alert rule 'my_rule'" in str(info.value)


def test_a_model_with_a_malformed_alert_rule_does_not_load(tmp_path: Path) -> None:
    """A rule that cannot be read would never fire: the load fails, naming the model, the rule and the problem,
    and the other models serve."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from tests.onnx_models import identity_model, write_config
    from tests.serving import ServerThread

    repo = tmp_path / "models"
    for name, rule in (("watched", "acuracy < 0.9"), ("fine", "accuracy < 0.9 for=2")):
        identity_model(repo / name / "1" / "model.onnx", "FP32")
        write_config(
            repo,
            name,
            f'name: "{name}" parameters {{ key: "tensorgate.alert.low" value: {{ string_value: "{rule}" }} }}',
        )
    with ServerThread(repo, model_control_mode="explicit", load_model=[]) as server:
        client = grpcclient.InferenceServerClient(server.address)
        with pytest.raises(InferenceServerException, match=re.escape("unknown metric 'acuracy'")) as info:
            client.load_model("watched")
        assert "watched" in str(info.value) and "alert rule 'low'" in str(info.value)
        assert not client.is_model_ready("watched")
        client.load_model("fine")
        assert client.is_model_ready("fine")
        client.close()


def test_rules_file(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        "rules:\n"
        "  - {name: drift, metric: drift.psi_mean, op: '>', threshold: 0.2, min_samples: 200}\n"
        "  - name: acc\n    model: digits\n    metric: accuracy\n    op: '<'\n    threshold: 0.9\n    for_windows: 2\n"
    )
    assert load_rules_file(path) == [
        AlertRule("drift", "drift.psi_mean", ">", 0.2, min_samples=200),
        AlertRule("acc", "accuracy", "<", 0.9, for_windows=2, model="digits"),
    ]


def test_for_and_for_windows_are_one_option_in_both_forms(tmp_path: Path) -> None:
    """README shows `for=2` in a config rule: the same word in a rules file (and the field's own name in a config
    rule) means the same, rather than failing the server's start as an unknown key."""
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - {name: acc, metric: accuracy, op: '<', threshold: 0.9, for: 2}\n")
    assert load_rules_file(path) == [AlertRule("acc", "accuracy", "<", 0.9, for_windows=2)]
    assert parse_rule("acc", "accuracy < 0.9 for_windows=3") == AlertRule("acc", "accuracy", "<", 0.9, for_windows=3)


@pytest.mark.parametrize(
    "text, problem",
    [
        pytest.param("rules: [\n", "not valid YAML", id="yaml"),
        pytest.param("- name: a\n", "expected a mapping with a 'rules' list", id="top-level-list"),
        pytest.param("rules:\n  - accuracy < 0.9\n", "rules[0]: a rule is a mapping", id="string-rule"),
        pytest.param("rules:\n  - {name: a, metric: accuracy, op: '<'}\n", "rules[0]: missing threshold", id="missing"),
        pytest.param(
            "rules:\n  - {name: a, metric: accuracy, op: '<', threshold: 1, severity: x}\n",
            "unknown key(s) severity",
            id="unknown-key",
        ),
        pytest.param(
            "rules:\n  - {name: a, metric: accuracy, op: '<', threshold: lots}\n", "rules[0]:", id="bad-threshold"
        ),
        pytest.param("rules:\n  - {name: a, metric: f1, op: '<', threshold: 1}\n", "unknown metric 'f1'", id="metric"),
        pytest.param(
            "rules:\n  - {name: a, metric: drifted_share, op: '>', threshold: 0.1}\n",
            "unknown metric 'drifted_share': drift metrics are written drift.drifted_share",
            id="drift-prefix",
        ),
        pytest.param(
            "rules:\n  - {name: a, metric: accuracy, op: '<', threshold: 1, min_sample: 5}\n",
            "unknown key(s) min_sample: did you mean 'min_samples'?",
            id="key-typo",
        ),
        pytest.param(
            "rules:\n  - {name: a, metric: accuracy, op: '<', threshold: 1, for: 2, for_windows: 3}\n",
            "'for' and 'for_windows' are the same key: give one",
            id="for-twice",
        ),
        pytest.param(
            "rules:\n  - {name: a, metric: mae, op: '>', threshold: 1}\n"
            "  - {name: a, metric: rmse, op: '>', threshold: 1}\n",
            "rule 'a' for model '*' is defined twice",
            id="duplicate",
        ),
    ],
)
def test_bad_rules_files_name_the_file_and_the_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(AlertRuleError, match=re.escape(problem)) as info:
        load_rules_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param("rules:\n  - {name: a, metric: f1, op: '<', threshold: 1}\n", "unknown metric 'f1'", id="metric"),
        pytest.param("rules: [unclosed\n", "not valid YAML", id="yaml"),
    ],
)
def test_serve_with_a_bad_rules_file_stops_with_one_line_and_exit_1(tmp_path: Path, text: str, problem: str) -> None:
    """A real `tensorgate serve`: the rules file is read at start; a bad one is a clear reason, not a traceback."""
    models = tmp_path / "models"
    models.mkdir()
    rules = tmp_path / "rules.yaml"
    rules.write_text(text)
    args = ["--model-repository", str(models), "--grpc-port", "0", "--data-dir", str(tmp_path / "data")]
    with ServeProcess([*args, "--alert-rules", str(rules)]) as server:
        assert server.proc.wait(60) == 1
        server.wait_for_line(re.escape(problem))
    assert "Traceback" not in server.output
    (line,) = [line for line in server.output.splitlines() if problem in line]
    assert str(rules) in line


# ----- the engine --------------------------------------------------------------------------------------------


def test_fires_after_n_consecutive_windows_and_resolves() -> None:
    seen: list[AlertTransition] = []
    engine = AlertEngine([parse_rule("low_acc", "accuracy < 0.9 min_samples=100 for=2")], on_transition=seen.append)

    def window(accuracy: float, samples: int = 500, now: float = 0.0) -> list[str]:
        return [t.state for t in engine.evaluate("digits", "1", {"accuracy": accuracy}, samples, now=now)]

    assert window(0.8, now=1) == []  # one breaching window of two
    assert window(0.95, now=2) == []  # the streak restarts
    assert window(0.8, now=3) == []
    assert window(0.7, samples=50, now=4) == []  # too few samples: no change at all
    assert window(0.8, now=5) == ["firing"]
    assert [(t.rule, t.model, t.version, t.value, t.threshold, t.timestamp) for t in engine.active()] == [
        ("low_acc", "digits", "1", 0.8, 0.9, 5)
    ]
    assert window(0.5, now=6) == []  # still firing: no second transition
    assert engine.evaluate("digits", "1", {"f1_macro": 0.1}, 500) == []  # other metrics leave the rule alone
    assert window(0.92, now=7) == ["resolved"]
    assert engine.active() == []
    assert [(t.state, t.value) for t in seen] == [("firing", 0.8), ("resolved", 0.92)]


def test_rules_are_per_model_and_version() -> None:
    engine = AlertEngine(
        [AlertRule("drift", "drift.drifted_share", ">", 0.1), AlertRule("mae", "mae", ">", 2.0, model="house")]
    )
    engine.evaluate("digits", "1", {"drift.drifted_share": 0.5, "mae": 9.0}, 500, now=1)
    engine.evaluate("digits", "2", {"drift.drifted_share": 0.0}, 500, now=2)
    engine.evaluate("house", "1", {"mae": 3.0, "drift.drifted_share": float("nan")}, 500, now=3)
    assert [(t.rule, t.model, t.version) for t in engine.active()] == [("drift", "digits", "1"), ("mae", "house", "1")]


def test_one_rule_per_name_and_model_the_most_specific_wins() -> None:
    """Same-named rules would share one state and fire and resolve each other every window: the model's own rule
    (config.pbtxt) overrides a rules-file rule naming the model, which overrides a '*' one."""
    fleet = [
        AlertRule("acc", "accuracy", "<", 0.99),
        AlertRule("drift", "drift.psi_mean", ">", 0.2),
        AlertRule("drift", "drift.psi_mean", ">", 0.5, model="digits"),
        AlertRule("acc", "accuracy", "<", 0.5, model="house"),
    ]
    own = [AlertRule("acc", "accuracy", "<", 0.8, model="digits")]
    assert model_rules("digits", fleet, own) == [own[0], fleet[2]]
    assert model_rules("house", fleet, []) == [fleet[3], fleet[1]]
    assert model_rules("other", fleet, []) == fleet[:2]
    with pytest.raises(AlertRuleError, match="alert rule 'acc' is defined for model '\\*' and for model 'digits'"):
        AlertEngine([fleet[0], own[0]])
    AlertEngine([own[0], fleet[3]])  # one name for two different models is fine


def test_a_failing_observer_does_not_stop_the_engine() -> None:
    def broken(_: AlertTransition) -> None:
        raise RuntimeError("observer bug")

    engine = AlertEngine([AlertRule("acc", "accuracy", "<", 0.9)], on_transition=broken)
    assert [t.state for t in engine.evaluate("m", "1", {"accuracy": 0.1}, 100)] == ["firing"]


# ----- the webhook, against a real receiver on loopback -------------------------------------------------------


class Receiver:
    """An HTTP server on 127.0.0.1 that records JSON bodies; the first ``fail`` requests get ``status`` (and
    ``location``, for a redirect). ``requests`` holds each request's method, path and Authorization header."""

    def __init__(self, fail: int = 0, status: int = 500, location: str | None = None) -> None:
        self.bodies: queue.Queue[dict[str, Any]] = queue.Queue()
        self.attempts = 0
        self.requests: list[tuple[str, str, str | None]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server hook's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.attempts += 1
                receiver.requests.append(("POST", self.path, self.headers["Authorization"]))
                if receiver.attempts <= fail:
                    self.send_response(status)
                    if location is not None:
                        self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                assert self.headers["Content-Type"] == "application/json"
                receiver.bodies.put(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802 - what urllib sends when it follows a redirect
                receiver.requests.append(("GET", self.path, self.headers["Authorization"]))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def next(self) -> dict[str, Any]:
        return self.bodies.get(timeout=30)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def test_webhook_gets_fire_and_resolve(receiver: Receiver) -> None:
    sender = WebhookSender(receiver.url, timeout_s=5)
    engine = AlertEngine([parse_rule("drift", "drift.drifted_share > 0.1 min_samples=200")], webhook=sender)
    engine.evaluate("digits", "1", {"drift.drifted_share": 0.6}, 450, now=100.0)
    engine.evaluate("digits", "1", {"drift.drifted_share": 0.0}, 450, now=110.0)
    fired, resolved = receiver.next(), receiver.next()
    sender.close()
    assert fired == {
        "source": "tensorgate",
        "rule": "drift",
        "model": "digits",
        "version": "1",
        "state": "firing",
        "value": 0.6,
        "threshold": 0.1,
        "timestamp": 100.0,
    }
    assert resolved["state"] == "resolved" and resolved["value"] == 0.0 and resolved["timestamp"] == 110.0
    assert (sender.sent, sender.failed, sender.dropped) == (2, 0, 0)


def test_webhook_retries_after_a_500() -> None:
    with Receiver(fail=2) as receiver:
        sender = WebhookSender(receiver.url, retries=3, backoff_s=0.01)
        sender.send(AlertTransition("acc", "digits", "1", "firing", 0.5, 0.9, 1.0))
        assert receiver.next()["rule"] == "acc"
        sender.close()
    assert receiver.attempts == 3
    assert (sender.sent, sender.failed) == (1, 0)


def test_webhook_gives_up_after_its_retries_and_does_not_retry_a_4xx() -> None:
    with Receiver(fail=100) as receiver:
        sender = WebhookSender(receiver.url, retries=2, backoff_s=0.01)
        sender.send(AlertTransition("acc", "digits", "1", "firing", 0.5, 0.9, 1.0))
        sender.close(timeout_s=30)
    assert receiver.attempts == 3 and (sender.sent, sender.failed) == (0, 1)

    with Receiver(fail=100, status=404) as receiver:
        sender = WebhookSender(receiver.url, retries=2, backoff_s=0.01)
        sender.send(AlertTransition("acc", "digits", "1", "firing", 0.5, 0.9, 1.0))
        sender.close(timeout_s=30)
    assert receiver.attempts == 1 and (sender.sent, sender.failed) == (0, 1)
    with pytest.raises(ValueError, match="expected an http:// or https:// URL"):
        WebhookSender("ftp://127.0.0.1/alerts")


def test_webhook_to_a_dead_port_never_blocks_the_caller() -> None:
    with Receiver() as receiver:
        url = receiver.url
    sender = WebhookSender(url, retries=1, backoff_s=0.01, timeout_s=2, max_queue=1)
    for i in range(50):  # the queue holds one; the rest are dropped and counted, send() returns at once
        sender.send(AlertTransition("acc", "digits", "1", "firing", float(i), 0.9, 1.0))
    sender.close(timeout_s=30)
    assert sender.sent == 0 and sender.dropped >= 1 and sender.failed + sender.dropped == 50


FIRED = AlertTransition("acc", "digits", "1", "firing", 0.5, 0.9, 1.0)


def test_webhook_logs_no_secret_of_its_url(caplog: pytest.LogCaptureFixture) -> None:
    """Slack-style webhook URLs carry their secret in the path or query: a failure names scheme://host:port only."""
    with Receiver(fail=100, status=503) as receiver, caplog.at_level(logging.WARNING, "tensorgate.monitoring"):
        sender = WebhookSender(f"{receiver.url}/T0001/SECRET-PATH?token=SECRET-TOKEN", retries=0)
        sender.send(FIRED)
        sender.close(timeout_s=30)
    assert receiver.requests == [("POST", "/alerts/T0001/SECRET-PATH?token=SECRET-TOKEN", None)]
    (line,) = [r.getMessage() for r in caplog.records if r.name == "tensorgate.monitoring.webhook"]
    assert line.startswith(f"alert webhook http://127.0.0.1:{receiver.server.server_port}: gave up"), line
    assert "SECRET" not in line and "HTTP 503" in line
    with pytest.raises(ValueError, match="expected an http:// or https:// URL") as info:
        WebhookSender("ftp://user:SECRET@127.0.0.1/SECRET")
    assert "SECRET" not in str(info.value)


def test_webhook_sends_url_credentials_as_basic_auth_and_never_logs_them(caplog: pytest.LogCaptureFixture) -> None:
    """urllib would take "user:password@host" for the host name: nothing would ever arrive, and the failure log
    would print the password."""
    with Receiver(fail=1, status=503) as receiver, caplog.at_level(logging.DEBUG, "tensorgate.monitoring"):
        url = receiver.url.replace("http://", "http://alert%40ops:S3cr%3At@")
        sender = WebhookSender(url, retries=1, backoff_s=0.01)
        sender.send(FIRED)
        assert receiver.next()["rule"] == "acc"
        sender.close()
    assert (sender.sent, sender.failed) == (1, 0)
    basic = "Basic " + base64.b64encode(b"alert@ops:S3cr:t").decode()
    assert receiver.requests == [("POST", "/alerts", basic)] * 2
    assert not [r for r in caplog.records if "S3cr" in r.getMessage() or "alert%40ops" in r.getMessage()]


def test_webhook_does_not_follow_a_redirect() -> None:
    """urllib would repeat the POST as a GET without its body and count it delivered; a 3xx is a failure."""
    with Receiver(fail=100, status=302, location="/login") as receiver:
        sender = WebhookSender(receiver.url, retries=2, backoff_s=0.01)
        sender.send(FIRED)
        sender.close(timeout_s=30)
    assert receiver.requests == [("POST", "/alerts", None)]  # not retried either: the URL is wrong
    assert (sender.sent, sender.failed) == (0, 1)


# ----- the monitor on a real server: reloads, rule names, what a window is --------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    return digits_repository(tmp_path_factory.mktemp("alerts"))


def _served(repo: Path, data: Path, **settings: Any) -> ServerThread:
    """A monitoring server whose own loop never evaluates in a test: the test runs each evaluation itself."""
    return ServerThread(repo, data_dir=data, monitor_interval_s=3600, **settings)


def _evaluate(served: ServerThread) -> None:
    """One monitor run over the loaded models, as the monitor's loop does it."""
    monitor = served.app.monitor
    assert monitor is not None

    async def targets() -> list[Any]:  # the repository lives on the server's loop
        return monitor.targets()

    monitor.evaluate(served.run(targets()))


def _labelled(client: InferenceClient, x: np.ndarray, label: Callable[[np.ndarray], np.ndarray]) -> None:
    """One request of ``x``'s rows, then its labels: ``label(predicted)``."""
    result = client.infer("digits", {"input": x})
    client.submit_feedback("digits", result.id, label(result["label"].reshape(-1)))


def _wrong(predicted: np.ndarray) -> np.ndarray:
    return (predicted + 1) % 10


def _fired(served: ServerThread) -> Counter[tuple[str, str, str]]:
    assert served.app.monitor is not None
    return served.app.monitor.transitions


def test_a_reload_keeps_a_firing_alert_and_resolves_a_changed_rule(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """The digits config's accuracy_low = "accuracy < 0.8 min_samples=50". A reload used to drop the firing state:
    an unrelated change fired the alert a second time, a relaxed rule never sent "resolved"."""
    repo, x, _ = digits
    config = copy_repository(repo, tmp_path / "models") / "digits" / "config.pbtxt"
    with Receiver() as receiver:
        served = _served(
            tmp_path / "models",
            tmp_path / "data",
            model_control_mode="explicit",
            load_model=["digits"],
            alert_webhook=receiver.url,
        )
        with served, InferenceClient(served.address) as client:
            _labelled(client, x[:60], _wrong)
            _evaluate(served)
            assert (receiver.next()["state"], [a.rule for a in client.alerts("digits")]) == ("firing", ["accuracy_low"])
            config.write_text(config.read_text().replace('string_value: "1.0"', 'string_value: "1"'))
            client.load("digits")
            _evaluate(served)
            assert [a.rule for a in client.alerts("digits")] == ["accuracy_low"]  # still firing, and only once
            config.write_text(config.read_text().replace("accuracy < 0.8", "accuracy < 0.0"))
            client.load("digits")
            _evaluate(served)
            resolved = receiver.next()
            assert client.alerts("digits") == []
            transitions = _fired(served)
        assert receiver.bodies.empty()  # the server has stopped: its webhook queue is drained
    assert (resolved["rule"], resolved["state"], resolved["threshold"]) == ("accuracy_low", "resolved", 0.8)
    assert transitions == Counter({("digits", "accuracy_low", "firing"): 1, ("digits", "accuracy_low", "resolved"): 1})


def test_a_models_own_rule_overrides_a_fleet_rule_of_the_same_name(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """--alert-rules says accuracy_low below 0.99 for every model, the digits config says below 0.8: at an
    accuracy of 0.9 the two used to fire and resolve each other in every window."""
    repo, x, _ = digits
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n"
        "  - {name: accuracy_low, metric: accuracy, op: '<', threshold: 0.99, min_samples: 10}\n"
        "  - {name: fleet_f1, metric: f1_macro, op: '<', threshold: 0.99, min_samples: 10}\n"
    )

    def two_wrong(predicted: np.ndarray) -> np.ndarray:
        return np.where(np.arange(len(predicted)) < 2, _wrong(predicted), predicted)

    with _served(repo, tmp_path / "data", alert_rules=rules) as served, InferenceClient(served.address) as client:
        for start in (0, 20, 40):  # accuracy 0.9 in each window: between the two thresholds
            _labelled(client, x[start : start + 20], two_wrong)
            _evaluate(served)
        assert [a.rule for a in client.alerts("digits")] == ["fleet_f1"]  # the other '*' rules still apply
        transitions = _fired(served)
    assert transitions == Counter({("digits", "fleet_f1", "firing"): 1})


def test_for_counts_windows_with_new_evidence_not_monitor_runs(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """Judging the same labelled predictions every interval is one window of evidence, however many runs."""
    repo, x, _ = digits
    config = copy_repository(repo, tmp_path / "models") / "digits" / "config.pbtxt"
    rule = "accuracy < 0.8 min_samples=10 for=3"
    config.write_text(
        config.read_text() + f'parameters {{ key: "tensorgate.alert.acc3" value: {{ string_value: "{rule}" }} }}\n'
    )
    with _served(tmp_path / "models", tmp_path / "data") as served, InferenceClient(served.address) as client:

        def firing() -> bool:
            return "acc3" in {a.rule for a in client.alerts("digits")}

        _labelled(client, x[:20], _wrong)
        for _ in range(4):
            _evaluate(served)
        assert not firing()
        _labelled(client, x[20:40], _wrong)
        _evaluate(served)
        assert not firing()
        _labelled(client, x[40:60], _wrong)
        _evaluate(served)
        assert firing()


# ----- Prometheus rules ----------------------------------------------------------------------------------------


def _gauges() -> dict[str, set[str]]:
    """The monitoring gauges the server exports and their labels (engineer A's monitor.py)."""
    from tensorgate.server.monitoring.monitor import DRIFT, QUALITY

    return {QUALITY.name: set(QUALITY.labels), DRIFT.name: set(DRIFT.labels)}


METRIC_VALUES = {
    "tensorgate_model_quality": set(QUALITY_METRICS),
    # The drift gauge carries the contract's drift names without "drift." plus the window's row count.
    "tensorgate_model_drift": {m.removeprefix("drift.") for m in DRIFT_METRICS} | {"samples"},
}


def test_prometheus_rules_parse_and_name_only_exported_metrics_and_labels() -> None:
    data = yaml.safe_load(PROMETHEUS_RULES.read_text())
    rules = [rule for group in data["groups"] for rule in group["rules"]]
    assert len(rules) >= 5
    gauges = _gauges()
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        expr = rule["expr"]
        selectors = re.findall(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", expr)
        assert selectors, rule["alert"]
        for metric, matchers in selectors:
            assert metric in gauges, (rule["alert"], metric)
            for label, value in re.findall(r'(\w+)\s*=\s*"([^"]*)"', matchers):
                assert label in gauges[metric], (rule["alert"], label)
                if label == "metric":
                    assert value in METRIC_VALUES[metric], (rule["alert"], value)
        for group in re.findall(r"\bon\s*\(([^)]*)\)", expr):
            assert {g.strip() for g in group.split(",")} <= {"instance", "job"} | gauges["tensorgate_model_drift"]
        templated = re.findall(r"\$labels\.(\w+)", json.dumps(rule.get("annotations", {})))
        assert set(templated) <= {"instance", "job"} | set().union(*(gauges[m] for m, _ in selectors))
    covered = {v for rule in rules for v in re.findall(r'metric="([^"]+)"', rule["expr"])}
    assert {"accuracy", "f1_macro", "drifted_share", "psi_mean", "score_psi"} <= covered


def test_report_formats_active_alerts() -> None:
    from tensorgate.server.monitoring.report import format_alerts

    engine = AlertEngine([parse_rule("low_acc", "accuracy < 0.9")])
    assert format_alerts(engine.active()) == "alerts: none firing"
    engine.evaluate("digits", "1", {"accuracy": 0.5}, 500, now=0.0)
    lines = format_alerts(engine.active()).splitlines()
    assert lines[0] == "alerts firing:"
    assert lines[-1].split() == ["low_acc", "digits", "1", "0.5000", "0.9000", "1970-01-01T00:00:00Z"]
