"""The monitor's own loop on a real monitoring server: how it stops, and what it tells an operator about models it
cannot watch fully (a broken reference profile, inputs whose shape varies)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensorgate.client import InferenceClient
from tensorgate.client.errors import FailedPrecondition
from tensorgate.server.monitoring.drift import DriftReport, build_profile, profile_path, save_profile
from tensorgate.server.monitoring.monitor import Window
from tests.monitoring import digits_repository
from tests.onnx_models import identity_model, write_config
from tests.serving import ServerThread


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    return digits_repository(tmp_path_factory.mktemp("loop"))


def test_stop_waits_for_the_evaluation_running_in_its_thread(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """Stopping used to cancel the loop only: the evaluation's thread ran on, and the server closed the store
    under it ("Cannot operate on a closed database")."""
    repo, x, _ = digits
    server = ServerThread(repo, data_dir=tmp_path / "data", monitor_interval_s=0.1).__enter__()
    monitor = server.app.monitor
    assert monitor is not None
    with InferenceClient(server.address) as client:
        client.infer("digits", {"input": x[:4]})
    assert server.app.capture is not None and server.app.capture.flush()
    entered, release = threading.Event(), threading.Event()
    failures: list[BaseException] = []
    evaluate = monitor.evaluate

    def held_evaluate(targets: Iterable[Any], now: float | None = None) -> None:
        # The first evaluation holds until the test lets it go, then reads the store as any evaluation does.
        if not entered.is_set():
            entered.set()
            release.wait(30)
            try:
                evaluate(targets, now)
            except BaseException as exc:
                failures.append(exc)
                raise
        else:
            evaluate(targets, now)

    monitor.evaluate = held_evaluate  # type: ignore[method-assign]
    assert entered.wait(30), "the monitor never evaluated"
    stopper = threading.Thread(target=server.__exit__, args=(None, None, None))
    stopper.start()
    try:
        stopper.join(3.0)
        assert stopper.is_alive(), "the server stopped while an evaluation was still running"
    finally:
        release.set()
        stopper.join(60)
    assert not stopper.is_alive()
    assert failures == []
    assert monitor.evaluations >= 1


VARIABLE_CONFIG = """
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
parameters { key: "tensorgate.drift.reference_requests" value { string_value: "2" } }
"""


def test_drift_names_and_logs_once_a_tensor_whose_shape_varies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A -1 dim that varies between requests used to drop the tensor from drift without a word: an operator
    believed it watched."""
    repo = tmp_path / "models"
    identity_model(repo / "seq" / "1" / "model.onnx", "FP32", ("batch", "len"))
    write_config(repo, "seq", VARIABLE_CONFIG)
    rng = np.random.default_rng(0)
    with ServerThread(repo, data_dir=tmp_path / "data", monitor_interval_s=3600) as server:
        monitor = server.app.monitor
        assert monitor is not None

        async def target() -> Any:  # the repository lives on the server's loop
            return monitor.target("seq", "")

        def drift(count: int) -> DriftReport:
            return monitor.drift(server.run(target()), Window(count=count))

        with InferenceClient(server.address) as client:
            for _ in range(2):
                client.infer("seq", {"INPUT0": rng.normal(size=(2, 3)).astype(np.float32)})
            first = drift(10)  # builds the profile from those two requests: three elements per row
            assert first.skipped == {} and {f.name for f in first.features} >= {"INPUT0[2]", "OUTPUT0[2]"}
            client.infer("seq", {"INPUT0": rng.normal(size=(1, 5)).astype(np.float32)})
        with caplog.at_level(logging.WARNING, logger="tensorgate.server.monitoring.monitor"):
            mixed = drift(10)
            assert set(mixed.skipped) == {"INPUT0", "OUTPUT0"}
            assert mixed.skipped["INPUT0"] == "its shape after the batch axis varies between requests ([3], [5])"
            assert mixed.features == []
            wider = drift(1)  # only the five-element request: it stacks, but does not fit the profile
            assert wider.skipped["INPUT0"] == "its rows have 5 element(s), the reference profile's 3"
            drift(10)
        with InferenceClient(server.address) as client:  # GetModelDrift names them too
            assert dict(client.model_drift("seq", count=10).skipped) == mixed.skipped
        said = [r.getMessage() for r in caplog.records if "leaves out tensor" in r.getMessage()]
        assert sorted(said) == [
            "monitor: drift of model 'seq' version 1 leaves out tensor 'INPUT0': its shape after the batch axis "
            "varies between requests ([3], [5])",
            "monitor: drift of model 'seq' version 1 leaves out tensor 'OUTPUT0': its shape after the batch axis "
            "varies between requests ([3], [5])",
        ]


def test_an_unusable_profile_is_one_line_logged_once_per_broken_state(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It used to be a full traceback on every monitor run."""
    repo, x, _ = digits
    with ServerThread(repo, data_dir=tmp_path / "data", monitor_interval_s=3600) as server:
        monitor = server.app.monitor
        assert monitor is not None

        async def targets() -> list[Any]:  # the repository lives on the server's loop
            return monitor.targets()

        def runs(n: int) -> list[logging.LogRecord]:
            caplog.clear()
            for _ in range(n):
                monitor.evaluate(server.run(targets()))
            return [r for r in caplog.records if r.name == "tensorgate.server.monitoring.monitor"]

        with InferenceClient(server.address) as client:
            client.infer("digits", {"input": x[:8]})
        assert server.app.capture is not None and server.app.capture.flush()
        path = profile_path(tmp_path / "data", "digits")
        path.parent.mkdir(parents=True)
        with caplog.at_level(logging.INFO, logger="tensorgate.server.monitoring.monitor"):
            path.write_text("[]")
            (broken,) = runs(3)
            assert broken.levelno == logging.ERROR and broken.exc_info is None
            assert broken.getMessage() == (
                "monitor: no drift: model 'digits' version 1: profiles/digits.json in the data directory: "
                "a reference profile is a JSON object"
            )
            path.write_text('{"format": 1')  # another problem in the same file: news
            (changed,) = runs(2)
            assert "not a tensorgate reference profile" in changed.getMessage()
            save_profile(build_profile("digits", {"input": x}), path)
            assert runs(2) == [] and ("digits", "1") in monitor.state.drift
            path.write_text("[]")  # broken again as it was the first time: news again
            (again,) = runs(2)
            assert again.getMessage() == broken.getMessage()


def test_a_reference_profile_that_cannot_be_built_is_a_failed_precondition(tmp_path: Path) -> None:
    """The first requests, which tensorgate.drift.reference_requests builds the profile from, vary in shape:
    nothing can be profiled. GetModelDrift used to answer INTERNAL (a bare ValueError); it is the model's
    setup, so FAILED_PRECONDITION saying why, and the server goes on."""
    repo = tmp_path / "models"
    identity_model(repo / "seq" / "1" / "model.onnx", "FP32", ("batch", "len"))
    write_config(repo, "seq", VARIABLE_CONFIG)
    rng = np.random.default_rng(0)
    with ServerThread(repo, data_dir=tmp_path / "data", monitor_interval_s=3600) as server:
        with InferenceClient(server.address) as client:
            for width in (3, 5):
                client.infer("seq", {"INPUT0": rng.normal(size=(1, width)).astype(np.float32)})
            with pytest.raises(FailedPrecondition) as refused:
                client.model_drift("seq", count=10)
            assert "cannot build a reference profile from the first 2 captured requests" in str(refused.value)
            assert "no inputs or outputs to profile" in str(refused.value)
            assert client.infer("seq", {"INPUT0": np.ones((1, 3), np.float32)}).outputs["OUTPUT0"].shape == (1, 3)
