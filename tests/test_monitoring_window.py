"""The window a model is judged over: its config's `tensorgate.monitor.window_requests` / `window_s`, used by the
monitor loop (gauges, alerts) and by the RPCs that name no window, with a real server and the example digits
model."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score

from tensorgate.client import InferenceClient
from tests.monitoring import digits_repository
from tests.scraping import metrics_url, scrape
from tests.serving import ServerThread
from tests.test_poll import wait_for

ROWS = 10


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    return digits_repository(tmp_path_factory.mktemp("window"))


def _with_window(repo: Path, out: Path, **parameters: str) -> Path:
    """A copy of the digits repository with `tensorgate.monitor.<key>` parameters."""
    copy = shutil.copytree(repo, out)
    config = copy / "digits" / "config.pbtxt"
    text = "".join(
        f'parameters {{ key: "tensorgate.monitor.{key}" value: {{ string_value: "{v}" }} }}\n'
        for key, v in parameters.items()
    )
    config.write_text(config.read_text() + "\n" + text)
    return copy


def test_a_model_s_window_is_its_last_n_requests_for_the_gauges_and_the_rpcs(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """window_requests 5: quality without a window, and the gauges, judge the last five requests (not rows, not the
    default 1000); a window the caller names is still its own."""
    repo, x, y = digits
    models = _with_window(repo, tmp_path / "models", window_requests="5")
    with ServerThread(models, data_dir=tmp_path / "data", monitor_interval_s=0.2) as s:
        with InferenceClient(s.address) as client:
            answers = [client.infer("digits", {"input": x[i * ROWS : (i + 1) * ROWS]}) for i in range(8)]
            for i in range(2, 8):  # the first two stay unlabelled: outside the model's window anyway
                client.submit_feedback("digits", answers[i].id, y[i * ROWS : (i + 1) * ROWS])
            own = client.model_quality("digits")
            named = client.model_quality("digits", count=8)
        assert (own.predictions, own.labelled, own.rows) == (5, 5, 5 * ROWS)
        predicted = np.concatenate([a.outputs["label"].reshape(-1) for a in answers[3:]])
        assert own.metrics["accuracy"] == pytest.approx(accuracy_score(y[3 * ROWS : 8 * ROWS], predicted))
        assert (named.predictions, named.labelled) == (8, 6)
        assert named.metrics["label_coverage"] == pytest.approx(6 / 8)

        def coverage() -> float | None:
            samples = scrape(metrics_url(s))
            key = (
                "tensorgate_model_quality",
                frozenset({"model": "digits", "version": "1", "metric": "label_coverage"}.items()),
            )
            return samples.get(key)

        wait_for("the gauge of the model's window", lambda: coverage() == 1.0)


def test_a_window_by_time_leaves_the_older_requests_out(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    repo, x, _ = digits
    models = _with_window(repo, tmp_path / "models", window_s="3")
    with ServerThread(models, data_dir=tmp_path / "data", monitor_interval_s=60.0) as s:
        with InferenceClient(s.address) as client:
            for i in range(3):
                client.infer("digits", {"input": x[i : i + 1]})
            time.sleep(3.5)  # the three above leave the window; a bound, not a measurement
            for i in range(2):
                client.infer("digits", {"input": x[i : i + 1]})
            recent = client.model_quality("digits")
            everything = client.model_quality("digits", count=100)
        assert recent.predictions == 2
        assert everything.predictions == 5


@pytest.mark.parametrize(
    ("parameters", "problem"),
    [
        pytest.param({"window_requests": "ten"}, "window_requests' must be a whole number in 1..100000", id="words"),
        pytest.param({"window_requests": "1000000"}, "window_requests' must be a whole number", id="too-many"),
        pytest.param({"window_s": "-5"}, "window_s' must be a number of seconds above 0", id="negative"),
    ],
)
def test_a_malformed_window_parameter_is_logged_once_and_its_default_used(
    digits: tuple[Path, np.ndarray, np.ndarray],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    parameters: dict[str, str],
    problem: str,
) -> None:
    repo, x, _ = digits
    models = _with_window(repo, tmp_path / "models", **parameters)
    caplog.set_level(logging.WARNING, logger="tensorgate.server.monitoring.monitor")
    with ServerThread(models, data_dir=tmp_path / "data", monitor_interval_s=0.1) as s:
        with InferenceClient(s.address) as client:
            for i in range(3):
                client.infer("digits", {"input": x[i : i + 1]})
            monitor = s.app.monitor
            assert monitor is not None
            runs = monitor.evaluations
            wait_for("several monitor runs", lambda: monitor.evaluations >= runs + 4)
            assert client.model_quality("digits").predictions == 3  # the default: the last 1000
    lines = [r.getMessage() for r in caplog.records if problem in r.getMessage()]
    assert len(lines) == 1, lines
    assert "model 'digits'" in lines[0] and "using its default" in lines[0]
