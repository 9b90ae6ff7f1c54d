"""Server-side rollout (tensorgate.rollout.*): the weighted canary split of requests that name no version, the
shadow version that mirrors the stable one's traffic, the rollback while an alert fires on the canary, and the
load failures of a rollout that cannot be served. Real servers, real ONNX models whose versions answer
differently (version 1 multiplies by 1, version 2 by 2), real scrapes of /metrics."""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tensorgate.client import InferenceClient
from tensorgate.client.errors import DeadlineExceeded, Internal, InvalidArgument, Unavailable
from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.server.errors import BackendError, DeadlineExceededError, ServerUnavailableError
from tensorgate.server.pipeline.handler import _failed_on_server
from tensorgate.server.pipeline.types import InferRequest
from tensorgate.server.repository.rollout import CANARY_PERCENT, Rollout, RolloutSpec
from tensorgate.server.rpc.drain import DRAINING
from tests.monitoring import copy_repository, digits_repository
from tests.onnx_models import (
    OPSET,
    accumulator_config,
    accumulator_model,
    busy_model,
    identity_model,
    scale_model,
    write_config,
)
from tests.scraping import metrics_url, scrape, value
from tests.serving import ServerThread
from tests.test_bad_input import contents_request

X = np.arange(8, dtype=np.float32).reshape(2, 4)


def _params(**values: str) -> str:
    return "".join(
        f'parameters {{ key: "tensorgate.rollout.{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in values.items()
    )


def _repo(root: Path, extra: str = "", v2: Callable[[Path], Path] | None = None, name: str = "m") -> Path:
    """Model `name`: version 1 answers x, version 2 answers 2x (or what `v2` builds); both served."""
    scale_model(root / name / "1" / "model.onnx", 1.0)
    (v2 or (lambda p: scale_model(p, 2.0)))(root / name / "2" / "model.onnx")
    write_config(root, name, f'name: "{name}" max_batch_size: 8 version_policy {{ all {{}} }}\n{extra}')
    return root


def _version_of(client: InferenceClient, request_id: str | None = None, **kwargs: Any) -> str:
    """Which version answered, by the response's model_version, checked against the output it computed."""
    result = client.infer("m", {"INPUT0": X}, request_id=request_id, **kwargs)
    factor = {"1": 1.0, "2": 2.0}[result.version]
    np.testing.assert_array_equal(result["OUTPUT0"], X * factor)
    return result.version


@pytest.fixture
def served(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[ServerThread, InferenceClient]]:
    with ServerThread(_repo(tmp_path / "models", request.param)) as server, InferenceClient(server.address) as client:
        yield server, client


# ----- the canary split --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "served, expected",
    [
        pytest.param(_params(canary_version="2", canary_percent="0"), "1", id="0-percent"),
        pytest.param(_params(canary_version="2", canary_percent="100"), "2", id="100-percent"),
        pytest.param(_params(canary_version="1", canary_percent="100"), "1", id="canary-below-stable"),
        pytest.param(_params(stable_version="1"), "1", id="stable-pinned"),
    ],
    indirect=["served"],
)
def test_every_request_without_a_version_goes_where_the_share_says(
    served: tuple[ServerThread, InferenceClient], expected: str
) -> None:
    _, client = served
    seen = Counter(_version_of(client, f"id-{i}") for i in range(20))
    seen += Counter(_version_of(client) for _ in range(20))  # ids the server makes
    assert seen == Counter({expected: 40})
    for version in ("1", "2"):  # named versions are never rerouted
        assert {_version_of(client, f"named-{i}", version=version) for i in range(10)} == {version}


@pytest.mark.parametrize(
    "served", [pytest.param(_params(canary_version="2", canary_percent="30"), id="30")], indirect=True
)
def test_a_30_percent_canary_gets_about_30_percent_and_the_same_id_the_same_version(
    served: tuple[ServerThread, InferenceClient],
) -> None:
    server, client = served
    n = 400
    by_id = {f"user-{i}": _version_of(client, f"user-{i}") for i in range(n)}
    generated = Counter(_version_of(client) for _ in range(n))
    # Binomial(400, 0.3): mean 120, standard deviation 9.2; six of them either side cannot flake.
    for counts in (Counter(by_id.values()), generated):
        assert 120 - 55 <= counts["2"] <= 120 + 55, counts
        assert counts["1"] + counts["2"] == n
    for request_id in list(by_id)[:40]:  # sticky: an id asked again goes where it went
        assert _version_of(client, request_id) == by_id[request_id]
    assert {_version_of(client, "user-0", version=v) for v in ("1", "2")} == {"1", "2"}  # named: never rerouted
    assert value(scrape(metrics_url(server)), "tensorgate_rollout_canary_share", model="m", version="2") == 30.0


def test_a_canary_no_longer_served_sends_everything_to_stable(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Its directory removed (here under `latest 2`, then loaded again, as poll mode would): the reload serves
    version 1 alone, says so, and the split sends every request there instead of failing the load."""
    repo = tmp_path / "models"
    _repo(repo, _params(canary_version="2", canary_percent="100"))
    config = repo / "m" / "config.pbtxt"
    config.write_text(
        config.read_text().replace("version_policy { all {} }", "version_policy { latest { num_versions: 2 } }")
    )
    served = ServerThread(repo, model_control_mode="explicit", load_model=["m"])
    with served as server, InferenceClient(server.address) as client:
        assert _version_of(client, "a") == "2"
        shutil.rmtree(repo / "m" / "2")
        with caplog.at_level(logging.WARNING, logger="tensorgate.server.repository.rollout"):
            client.load("m")
        assert {_version_of(client, f"id-{i}") for i in range(10)} == {"1"}
        assert value(scrape(metrics_url(server)), "tensorgate_rollout_canary_share", model="m", version="2") == 0.0
    said = [r.getMessage() for r in caplog.records if r.name == "tensorgate.server.repository.rollout"]
    assert said == [
        "model 'm': parameter 'tensorgate.rollout.canary_version' names version 2, which is no longer served: "
        "requests that name no version all go to stable version 1"
    ]


def _set_params(repo: Path, name: str, **values: str) -> None:
    """Replace the model's tensorgate.rollout.* parameters in its config.pbtxt."""
    config = repo / name / "config.pbtxt"
    kept = [line for line in config.read_text().splitlines(keepends=True) if "tensorgate.rollout." not in line]
    config.write_text("".join(kept) + _params(**values))


def test_a_new_split_keeps_the_versions_serving_their_statistics_and_sessions(tmp_path: Path) -> None:
    """Ramping canary_percent from 10 to 100 is a load of the same files: the versions are kept as they serve
    (ModelStatistics counts go on, nothing is built or warmed again) and only the split changes. It used to rebuild
    every version, since the parameters were part of each version's signature."""
    repo = _repo(tmp_path / "models", _params(canary_version="2", canary_percent="10"))
    served = ServerThread(repo, model_control_mode="explicit", load_model=["m"])
    with served as server, InferenceClient(server.address) as client:
        before = Counter(_version_of(client, f"id-{i}") for i in range(20))
        counts = {v: _inferences(client, v) for v in ("1", "2")}
        assert sum(n for n, _ in counts.values()) == 20
        loaded = {v: server.app.repository.get("m", v) for v in ("1", "2")}
        _set_params(repo, "m", canary_version="2", canary_percent="100")
        client.load("m")
        assert {v: _inferences(client, v) for v in ("1", "2")} == counts
        assert all(server.app.repository.get("m", v) is loaded[v] for v in ("1", "2"))
        assert Counter(_version_of(client, f"id-{i}") for i in range(20)) == Counter({"2": 20}), before
        assert value(scrape(metrics_url(server)), "tensorgate_rollout_canary_share", model="m", version="2") == 100.0
        shown = client.config("m").parameters["tensorgate.rollout.canary_percent"].string_value
        assert shown == "100"


def test_a_large_tensor_only_the_canary_takes_is_not_refused_before_it_is_decoded(tmp_path: Path) -> None:
    """The check of a large typed tensor before its decoding (codec.LARGE_ELEMENTS) knows no request id yet: a
    request that names no version passes it when the canary takes it, and the canary answers it. It used to be
    judged against the stable version alone, and refused for a shape the canary serves."""
    width = 4096
    repo = _repo(
        tmp_path / "models",
        _params(canary_version="2", canary_percent="100"),
        v2=lambda p: scale_model(p, 2.0, width=width),
    )
    values = np.arange(5 * width, dtype=np.float32) / 7
    request = contents_request("m", "FP32", [5, width], "fp32_contents", values.tolist())
    with ServerThread(repo) as server, grpc.insecure_channel(server.address) as channel:
        reply = GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert reply.model_version == "2"
    np.testing.assert_array_equal(np.frombuffer(reply.raw_output_contents[0], "<f4"), values * 2)


# ----- bad configs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, problem",
    [
        pytest.param(
            _params(canary_version="3", canary_percent="10"),
            "parameter 'tensorgate.rollout.canary_version' names version 3, which the model does not serve (it serves "
            "[1, 2]",
            id="unknown-canary",
        ),
        pytest.param(
            _params(shadow_version="7"),
            "parameter 'tensorgate.rollout.shadow_version' names version 7, which the model does not serve",
            id="unknown-shadow",
        ),
        pytest.param(
            _params(canary_version="2", canary_percent="10", stable_version="5"),
            "parameter 'tensorgate.rollout.stable_version' names version 5, which the model does not serve",
            id="unknown-stable",
        ),
        pytest.param(
            _params(canary_version="2", canary_percent="150"),
            "parameter 'tensorgate.rollout.canary_percent' must be a number from 0 to 100, got '150'",
            id="percent-above-100",
        ),
        pytest.param(
            _params(canary_version="2", canary_percent="ten"),
            "parameter 'tensorgate.rollout.canary_percent' must be a number from 0 to 100, got 'ten'",
            id="percent-not-a-number",
        ),
        pytest.param(
            _params(shadow_version="2", shadow_percent="-1"),
            "parameter 'tensorgate.rollout.shadow_percent' must be a number from 0 to 100, got '-1'",
            id="shadow-percent-negative",
        ),
        pytest.param(
            _params(canary_version="2", canary_percent="10", stable_version="2"),
            "parameter 'tensorgate.rollout.canary_version' names version 2, the stable version",
            id="canary-is-stable",
        ),
        pytest.param(
            _params(canary_version="2", canary_percent="10", shadow_version="2"),
            "parameters 'tensorgate.rollout.canary_version' and 'tensorgate.rollout.shadow_version' both name "
            "version 2",
            id="canary-is-shadow",
        ),
        pytest.param(
            _params(canary_version="v2", canary_percent="10"),
            "parameter 'tensorgate.rollout.canary_version' must be a version number, got 'v2'",
            id="version-not-a-number",
        ),
        pytest.param(
            _params(canary_version="2", canary_pct="10"),
            "unknown parameter 'tensorgate.rollout.canary_pct': did you mean 'tensorgate.rollout.canary_percent'?",
            id="unknown-key",
        ),
        pytest.param(
            _params(canary_version="2"),
            "parameter 'tensorgate.rollout.canary_version' needs 'tensorgate.rollout.canary_percent'",
            id="no-percent",
        ),
        pytest.param(
            _params(canary_version="2", canary_percent="5", rollback_on_alert="sometimes"),
            "parameter 'tensorgate.rollout.rollback_on_alert' must be true or false, got 'sometimes'",
            id="rollback-not-a-bool",
        ),
    ],
)
def test_a_rollout_that_cannot_be_served_fails_the_load_naming_model_key_and_problem(
    tmp_path: Path, extra: str, problem: str
) -> None:
    repo = _repo(tmp_path / "models", extra)
    with ServerThread(repo, model_control_mode="explicit", load_model=[]) as server:
        with InferenceClient(server.address) as client:
            with pytest.raises(Unavailable, match=re.escape(problem)) as info:
                client.load("m")
            assert "failed to load model 'm'" in str(info.value)
            assert not client.ready("m")


# ----- shadow ----------------------------------------------------------------------------------------------------


def _eventually(check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _inferences(client: InferenceClient, version: str) -> tuple[int, int]:
    """ModelStatistics' successes and failures of version `version` of model m."""
    stats = client.statistics("m", version).model_stats[0]
    return stats.inference_stats.success.count, stats.inference_stats.fail.count


def _shadow_runs(server: ServerThread) -> Counter[str]:
    samples = scrape(metrics_url(server))
    return Counter(
        {
            outcome: int(n)
            for (name, labels), n in samples.items()
            if name == "tensorgate_rollout_shadow_runs_total"
            for key, outcome in labels
            if key == "outcome"
        }
    )


@pytest.mark.parametrize("served", [pytest.param(_params(shadow_version="2"), id="shadow")], indirect=True)
def test_the_shadow_runs_what_stable_answers_and_the_caller_gets_stable(
    served: tuple[ServerThread, InferenceClient],
) -> None:
    server, client = served
    assert {_version_of(client, f"id-{i}") for i in range(12)} == {"1"}
    _eventually(lambda: _inferences(client, "2")[0] == 12)
    _version_of(client, "named", version="1")  # a named version is not mirrored
    time.sleep(0.2)
    assert _inferences(client, "2") == (12, 0) and _inferences(client, "1") == (13, 0)
    assert _shadow_runs(server) == Counter(ok=12)


def test_a_shadow_that_fails_never_fails_the_caller(tmp_path: Path) -> None:
    """Version 2 takes rows of 8 values: every mirrored request of 4 is refused there, counted as failed."""
    repo = _repo(tmp_path / "models", _params(shadow_version="2"), v2=lambda p: scale_model(p, 2.0, width=8))
    with ServerThread(repo) as server, InferenceClient(server.address) as client:
        assert {_version_of(client, f"id-{i}") for i in range(10)} == {"1"}
        _eventually(lambda: _shadow_runs(server)["failed"] == 10)
        assert _shadow_runs(server) == Counter(failed=10)


def test_shadow_runs_beyond_the_bound_are_dropped_not_waited_for(tmp_path: Path) -> None:
    """A shadow far slower than the live path: the live requests go on at their own pace, and the runs beyond the
    few allowed at once are dropped and counted."""
    repo = _repo(tmp_path / "models", _params(shadow_version="2"), v2=lambda p: busy_model(p, iterations=60_000))
    with ServerThread(repo) as server, InferenceClient(server.address) as client:
        for i in range(12):
            assert client.infer("m", {"INPUT0": X}, request_id=f"id-{i}").version == "1"
        _eventually(lambda: sum(_shadow_runs(server).values()) == 12)
        runs = _shadow_runs(server)
    assert runs["dropped"] >= 1 and runs["ok"] + runs["dropped"] == 12, runs


def test_a_shadow_run_has_the_callers_budget_and_gives_its_place_back(tmp_path: Path) -> None:
    """A shadow far slower than the caller allows (seconds a run, callers giving 1.5 s): each run ends at the
    caller's budget, failed, and the next request is mirrored again. Without a deadline the runs held every
    place until each had run, and every request meanwhile was dropped."""
    repo = _repo(tmp_path / "models", _params(shadow_version="2"), v2=lambda p: busy_model(p, iterations=1_000_000))
    with ServerThread(repo) as server, InferenceClient(server.address) as client:
        for i in range(4):
            assert client.infer("m", {"INPUT0": X}, request_id=f"id-{i}", timeout=1.5).version == "1"
        _eventually(lambda: sum(_shadow_runs(server).values()) == 4, timeout=20.0)
        assert _shadow_runs(server) == Counter(failed=4)
        assert client.infer("m", {"INPUT0": X}, request_id="id-4", timeout=1.5).version == "1"
        _eventually(lambda: sum(_shadow_runs(server).values()) == 5, timeout=20.0)
        assert _shadow_runs(server) == Counter(failed=5)


def test_a_shadow_run_still_going_at_stop_is_cancelled_before_capture_and_models_go(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server stops while the shadow computes (a second a run): the run is cancelled before the capture it
    writes to is detached. It used to run on, and fail on the capture gone (an AssertionError, counted as a failed
    run)."""
    repo = _repo(tmp_path / "models", _params(shadow_version="2"), v2=lambda p: busy_model(p, iterations=250_000))
    caplog.set_level(logging.DEBUG, logger="tensorgate.server.pipeline.handler")
    with ServerThread(repo, data_dir=tmp_path / "data") as server, InferenceClient(server.address) as client:
        assert client.infer("m", {"INPUT0": X}, request_id="at-stop").version == "1"  # its shadow starts now
    failures = [r for r in caplog.records if r.getMessage().startswith("shadow run of model 'm'")]
    assert not [r.args for r in failures if any(isinstance(a, AssertionError) for a in r.args or ())]


def test_shadow_runs_are_counted_under_the_version_that_ran_them(tmp_path: Path) -> None:
    """The shadow moved from version 2 to version 3 by a reload: version 2's runs stay under its label, version
    3's start from 0 (the counter carried across the reload used to move them all to the new label)."""
    repo = _repo(tmp_path / "models", _params(shadow_version="2", stable_version="1"))
    scale_model(repo / "m" / "3" / "model.onnx", 3.0)
    with ServerThread(repo, model_control_mode="explicit", load_model=["m"]) as server:
        with InferenceClient(server.address) as client:
            for i in range(3):
                _version_of(client, f"a-{i}")
            _eventually(lambda: _inferences(client, "2")[0] == 3)
            _set_params(repo, "m", shadow_version="3", stable_version="1")
            client.load("m")
            for i in range(2):
                _version_of(client, f"b-{i}")
            _eventually(lambda: _inferences(client, "3")[0] == 2)
            samples = scrape(metrics_url(server))
    runs = {v: value(samples, "tensorgate_rollout_shadow_runs_total", model="m", version=v, outcome="ok") for v in "23"}
    assert runs == {"2": 3.0, "3": 2.0}


def _first_columns(path: Path, width: int, kept: int) -> Path:
    """OUTPUT0 = the first `kept` of INPUT0's `width` columns: a classifier (argmax) with fewer classes."""
    pick = np.eye(width, kept, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["INPUT0", "pick"], ["OUTPUT0"])],
        "first_columns",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", kept])],
        initializer=[numpy_helper.from_array(pick, "pick")],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), str(path))
    return path


def test_feedback_is_checked_and_stored_per_version_and_the_caller_hears_of_its_own(tmp_path: Path) -> None:
    """Stable version 1 has 10 classes (argmax of 10 columns), shadow version 2 only 8. Label 9 is right for
    what version 1 answered: accepted and stored there, skipped for the shadow, which can never predict it. Label
    3 is stored on both; label 10 is refused, naming version 1. The newer capture (the shadow's) used to decide:
    label 9 was refused, for a version the caller never heard from."""
    repo = tmp_path / "models"
    identity_model(repo / "c" / "1" / "model.onnx", "FP32", shape=("batch", 10))
    _first_columns(repo / "c" / "2" / "model.onnx", 10, 8)
    write_config(
        repo,
        "c",
        'name: "c" max_batch_size: 8 version_policy { all {} }\n'
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 10 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]\n' + _params(shadow_version="2"),
    )
    row = np.eye(1, 10, 9, dtype=np.float32) + np.eye(1, 10, 3, dtype=np.float32) / 2  # v1: class 9, v2: class 3
    with ServerThread(repo, data_dir=tmp_path / "data") as server, InferenceClient(server.address) as client:
        ids = [client.infer("c", {"INPUT0": row}, request_id=f"r-{i}").id for i in range(3)]
        _eventually(lambda: client.statistics("c", "2").model_stats[0].inference_stats.success.count == 3)
        statuses = client.submit_feedback_batch("c", [(ids[0], 9), (ids[1], 3), (ids[2], 10)])
        assert [s.code for s in statuses] == [grpc.StatusCode.OK, grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT]
        assert "model 'c' version 1" in statuses[2].message and "label 10" in statuses[2].message
        with pytest.raises(InvalidArgument, match="model 'c' version 1"):
            client.submit_feedback("c", ids[2], 12)
        quality = {v: client.model_quality("c", v) for v in ("1", "2")}
    assert [(q.labelled, q.metrics["accuracy"]) for q in quality.values()] == [(2, 0.5), (1, 1.0)]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    repo, x, _ = digits_repository(tmp_path_factory.mktemp("rollout"))
    return repo, x


def _two_digits(digits: tuple[Path, np.ndarray], root: Path, rollout: str) -> Path:
    """The digits model (its monitoring parameters, accuracy_low = "accuracy < 0.8 min_samples=50") with a copy
    of its version 1 as version 2, both served, and `rollout`'s parameters."""
    repo = copy_repository(digits[0], root)
    shutil.copytree(repo / "digits" / "1", repo / "digits" / "2")
    config = repo / "digits" / "config.pbtxt"
    config.write_text(config.read_text() + "version_policy { all {} }\n" + rollout)
    return repo


def test_a_shadows_predictions_are_captured_and_judged_by_the_requests_labels(
    digits: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    """The shadow's run of a request keeps the request's id: one label judges the stable version's prediction and
    the shadow's alike (it used to label only the newer of the two)."""
    x = digits[1]
    repo = _two_digits(digits, tmp_path / "models", _params(shadow_version="2"))
    with ServerThread(repo, data_dir=tmp_path / "data") as server, InferenceClient(server.address) as client:
        answered = [client.infer("digits", {"input": x[i : i + 10]}, request_id=f"s-{i}") for i in range(0, 50, 10)]
        assert {r.version for r in answered} == {"1"}
        _eventually(lambda: client.statistics("digits", "2").model_stats[0].inference_stats.success.count == 5)
        for result in answered:
            client.submit_feedback("digits", result.id, result["label"].reshape(-1))
        quality = {v: client.model_quality("digits", v) for v in ("1", "2")}
    assert [(q.predictions, q.labelled, q.metrics["accuracy"]) for q in quality.values()] == [(5, 5, 1.0)] * 2


# ----- rollback while an alert fires on the canary -----------------------------------------------------------------


def _evaluate(server: ServerThread) -> None:
    """One monitor evaluation now, as the loop would run it (the servers here evaluate only when told)."""
    monitor = server.app.monitor
    assert monitor is not None

    async def targets() -> list[Any]:
        return monitor.targets()

    monitor.evaluate(server.run(targets()))

    async def settled() -> None:  # the repository hears of the alerts on the event loop: after what is queued there
        pass

    server.run(settled())


def _split(client: InferenceClient, x: np.ndarray, tag: str) -> Counter[str]:
    return Counter(client.infer("digits", {"input": x[:1]}, request_id=f"{tag}-{i}").version for i in range(40))


def _label_canary(client: InferenceClient, x: np.ndarray, rows: slice, right: bool) -> None:
    for start in range(rows.start, rows.stop, 10):
        result = client.infer("digits", {"input": x[start : start + 10]}, version="2")
        predicted = result["label"].reshape(-1)
        client.submit_feedback("digits", result.id, predicted if right else (predicted + 1) % 10)


def _canary_share(server: ServerThread) -> float:
    return value(scrape(metrics_url(server)), "tensorgate_rollout_canary_share", model="digits", version="2")


def test_an_alert_on_the_canary_rolls_it_back_until_it_resolves(
    digits: tuple[Path, np.ndarray], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The digits config's accuracy_low on a canary of the same model as version 2: wrong labels fire it there,
    and requests that name no version all go to version 1 until labels bring the canary's accuracy back."""
    x = digits[1]
    repo = _two_digits(digits, tmp_path / "models", _params(canary_version="2", canary_percent="50"))
    server = ServerThread(repo, data_dir=tmp_path / "data", monitor_interval_s=3600)  # evaluated by the test
    caplog.set_level(logging.WARNING, logger="tensorgate.server.repository.rollout")
    with server, InferenceClient(server.address) as client:
        assert set(_split(client, x, "before")) == {"1", "2"} and _canary_share(server) == 50.0
        _label_canary(client, x, slice(0, 60), right=False)
        _evaluate(server)
        assert [(a.rule, a.version) for a in client.alerts("digits")] == [("accuracy_low", "2")]
        assert _split(client, x, "rolled-back") == Counter({"1": 40}) and _canary_share(server) == 0.0
        assert _rolled_back(server, "digits") == {"alert": 1.0, "errors": 0.0}
        _label_canary(client, x, slice(60, 360), right=True)  # 300 right of 360: accuracy 0.83
        _evaluate(server)
        assert client.alerts("digits") == [] and _rolled_back(server, "digits") == {"alert": 0.0, "errors": 0.0}
        assert set(_split(client, x, "after")) == {"1", "2"} and _canary_share(server) == 50.0
    said = [r.getMessage() for r in caplog.records if r.name == "tensorgate.server.repository.rollout"]
    assert said == [
        "model 'digits': alert accuracy_low fires on canary version 2: rolled back, requests that name no version "
        "all go to stable version 1 until it resolves",
        "model 'digits': alert accuracy_low on canary version 2 resolved: 50% of the requests that name no version go "
        "to it again",
    ]


def test_a_canary_whose_alert_fires_starts_rolled_back_after_an_unload_and_after_a_restart(
    digits: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    """The split built by a load, or by a restart on the same data dir, knows the alert firing on its canary from
    the start: it used to give the canary its share until the monitor's next evaluation (an interval later)."""
    x = digits[1]
    repo = _two_digits(digits, tmp_path / "models", _params(canary_version="2", canary_percent="50"))
    settings: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "monitor_interval_s": 3600,
        "model_control_mode": "explicit",
        "load_model": ["digits"],
    }
    with (server := ServerThread(repo, **settings)), InferenceClient(server.address) as client:
        _label_canary(client, x, slice(0, 60), right=False)
        _evaluate(server)
        assert _split(client, x, "rolled-back") == Counter({"1": 40})
        client.unload("digits")
        client.load("digits")
        assert _split(client, x, "reloaded") == Counter({"1": 40}) and _canary_share(server) == 0.0
    with (server := ServerThread(repo, **settings)), InferenceClient(server.address) as client:
        assert _split(client, x, "restarted") == Counter({"1": 40}) and _canary_share(server) == 0.0
        assert server.app.monitor is not None and server.app.monitor.evaluations == 0


# ----- sequences, and the error gate ------------------------------------------------------------------------------


def test_every_step_of_a_sequence_reaches_the_version_its_sequence_started_on(tmp_path: Path) -> None:
    """An accumulator (OUTPUT = the sum of the sequence's inputs so far) served as versions 1 and 2, canary 50%:
    20 sequences of 4 steps, sent without request ids, all succeed, sum right, and each sequence's steps are
    answered by one version. Split by each step's own id, the steps landed on a version where their sequence was
    never started ("sequence N is not active"), or carried on another version's sum."""
    repo = tmp_path / "models"
    for version in ("1", "2"):
        accumulator_model(repo / "acc" / version / "model.onnx")
    config = (
        accumulator_config("acc") + "version_policy { all {} }\n" + _params(canary_version="2", canary_percent="50")
    )
    write_config(repo, "acc", config)
    with ServerThread(repo) as server, InferenceClient(server.address) as client:
        versions: dict[int, set[str]] = {}
        for sequence in range(1, 21):
            for step in range(4):
                result = client.infer(
                    "acc",
                    {"INPUT": np.full((1, 1), step + 1.0, np.float32)},
                    sequence_id=sequence,
                    sequence_start=step == 0,
                    sequence_end=step == 3,
                )
                assert result["OUTPUT"].item() == sum(range(1, step + 2)), (sequence, step)
                versions.setdefault(sequence, set()).add(result.version)
    assert all(len(seen) == 1 for seen in versions.values()), versions
    assert Counter(v for (v,) in versions.values()).keys() == {"1", "2"}  # the split still splits


def _one_row(path: Path, name: str = "one_row") -> Path:
    """OUTPUT0 = 2 * INPUT0 reshaped to [1, 4] and back: right for one row, a run-time failure (INTERNAL) for
    more. Another `name`: other bytes, the same behaviour."""
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["INPUT0", "one_row"], ["row"]),
            helper.make_node("Mul", ["row", "two"], ["doubled"]),
            helper.make_node("Shape", ["INPUT0"], ["shape"]),
            helper.make_node("Reshape", ["doubled", "shape"], ["OUTPUT0"]),
        ],
        name,
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", 4])],
        initializer=[
            numpy_helper.from_array(np.array([1, 4], np.int64), "one_row"),
            numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        ],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), str(path))
    return path


def _failures(client: InferenceClient, n: int, tag: str, **kwargs: Any) -> tuple[Counter[str], int]:
    """`n` two-row requests to m with ids `tag-i`: the versions that answered, and how many failed."""
    answered: Counter[str] = Counter()
    failed = 0
    for i in range(n):
        try:
            answered[_version_of(client, f"{tag}-{i}", **kwargs)] += 1
        except Internal:  # the canary's run on two rows
            failed += 1
    return answered, failed


def _share_of_m(server: ServerThread) -> float:
    return value(scrape(metrics_url(server)), "tensorgate_rollout_canary_share", model="m", version="2")


def _rolled_back(server: ServerThread, model: str) -> dict[str, float]:
    """tensorgate_rollout_canary_rolled_back of canary version 2, by reason."""
    samples = scrape(metrics_url(server))
    return {
        reason: value(samples, "tensorgate_rollout_canary_rolled_back", model=model, version="2", reason=reason)
        for reason in ("alert", "errors")
    }


def test_a_canary_that_fails_its_requests_is_rolled_back_until_the_model_is_loaded_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Canary version 2 fails every request of more than one row (INTERNAL), at 50%: once 20 routed requests
    have ended there, all failed, it is rolled back (share 0, one WARNING) and every later request succeeds on
    version 1, however many come. A load that keeps its build (the same files) keeps it rolled back (it used to
    give it its share again, silently); a load of new files for it judges it afresh, with a WARNING. Alerts, on
    quality and drift only, never saw it: it kept failing its share of the requests for good."""
    repo = _repo(tmp_path / "models", _params(canary_version="2", canary_percent="50"), v2=_one_row)
    caplog.set_level(logging.WARNING, logger="tensorgate.server.repository.rollout")
    served = ServerThread(repo, model_control_mode="explicit", load_model=["m"])
    with served as server, InferenceClient(server.address) as client:
        assert _rolled_back(server, "m") == {"alert": 0.0, "errors": 0.0}
        answered, failed = _failures(client, 100, "before")
        assert failed == 20 and answered == Counter({"1": 80})
        assert _share_of_m(server) == 0.0 and _rolled_back(server, "m") == {"alert": 0.0, "errors": 1.0}
        assert _failures(client, 60, "after") == (Counter({"1": 60}), 0)
        one = X[:1]
        assert client.infer("m", {"INPUT0": one}, version="2")["OUTPUT0"].tolist() == (one * 2).tolist()
        client.load("m")
        assert _share_of_m(server) == 0.0
        _one_row(repo / "m" / "2" / "model.onnx", name="rebuilt")  # new files: a new build of version 2
        client.load("m")
        assert _share_of_m(server) == 50.0 and _rolled_back(server, "m") == {"alert": 0.0, "errors": 0.0}
        answered, failed = _failures(client, 30, "reloaded")
        assert failed > 0 and set(answered) == {"1"}
    said = [r.getMessage() for r in caplog.records if r.name == "tensorgate.server.repository.rollout"]
    assert said == [
        "model 'm': 20 of the last 20 requests routed to canary version 2 failed (100.0%, against 0.0% on stable "
        "version 1: over max_error_percent 5 points): rolled back, requests that name no version all go to stable "
        "version 1. None reaches the canary now to judge it again: it stays rolled back until its build or "
        "max_error_percent changes, or the model is unloaded and loaded again",
        "model 'm': canary version 2, rolled back for its errors, is judged afresh (a new build): 50% of the "
        "requests that name no version go to it again",
    ]


def test_a_canary_too_slow_for_its_callers_deadlines_is_rolled_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Canary version 2 takes a quarter of a second a run, its callers allow 0.1 s: their calls end in
    DEADLINE_EXCEEDED (cancelled by gRPC, or by the queue's timer), which the gate counts as the canary's."""
    repo = _repo(
        tmp_path / "models",
        _params(canary_version="2", canary_percent="100"),
        v2=lambda p: busy_model(p, iterations=60_000),
    )
    caplog.set_level(logging.WARNING, logger="tensorgate.server.repository.rollout")
    with ServerThread(repo) as server, InferenceClient(server.address) as client:
        for i in range(100):  # 20 are enough; the server may hear of the last few after their callers
            try:
                answered = client.infer("m", {"INPUT0": X}, request_id=f"slow-{i}", timeout=0.1)
            except DeadlineExceeded:
                continue
            assert answered.version == "1"  # rolled back
            break
        assert _share_of_m(server) == 0.0
        assert {_version_of(client, f"after-{i}") for i in range(10)} == {"1"}
    said = [r.getMessage() for r in caplog.records if r.name == "tensorgate.server.repository.rollout"]
    # 20 of 20 as a rule; on a loaded machine one of them once ended otherwise (19 of 20): the count is not the point.
    assert len(said) == 1 and re.match(
        r"model 'm': (\d+) of the last (\d+) requests routed to canary version 2 failed", said[0]
    )


@pytest.mark.parametrize(
    "extra, send",
    [
        pytest.param(
            _params(canary_version="2", canary_percent="50", max_error_percent="off"),
            {},
            id="gate-off",
        ),
        pytest.param(
            _params(canary_version="2", canary_percent="50", max_error_percent="100"),
            {},
            id="gate-at-100",
        ),
        pytest.param(
            _params(canary_version="2", canary_percent="50"),
            {"version": "2"},
            id="failures-of-callers-naming-the-canary",
        ),
    ],
)
def test_failures_the_error_gate_does_not_judge_leave_the_canary_its_share(
    tmp_path: Path, extra: str, send: dict[str, str]
) -> None:
    repo = _repo(tmp_path / "models", extra, v2=_one_row)
    with ServerThread(repo) as server, InferenceClient(server.address) as client:
        _, failed = _failures(client, 60, "r", **send)
        assert failed >= 20
        assert _share_of_m(server) == 50.0


def test_requests_the_canary_refuses_as_invalid_do_not_roll_it_back(tmp_path: Path) -> None:
    """Rows of 3 values to a model of 4: refused (INVALID_ARGUMENT) on either version, the caller's mistake."""
    repo = _repo(tmp_path / "models", _params(canary_version="2", canary_percent="50"))
    with ServerThread(repo) as server, InferenceClient(server.address) as client:
        for i in range(60):
            with pytest.raises(InvalidArgument):
                client.infer("m", {"INPUT0": np.zeros((1, 3), np.float32)}, request_id=f"bad-{i}")
        assert _share_of_m(server) == 50.0


@pytest.mark.parametrize("raw", ["ten", "-1", "101", ""])
def test_a_max_error_percent_that_is_no_percent_fails_the_load(tmp_path: Path, raw: str) -> None:
    repo = _repo(tmp_path / "models", _params(canary_version="2", canary_percent="10", max_error_percent=raw))
    with ServerThread(repo, model_control_mode="explicit", load_model=[]) as server:
        with InferenceClient(server.address) as client:
            problem = (
                f"failed to load model 'm': parameter 'tensorgate.rollout.max_error_percent' must be a number from "
                f"0 to 100, or off, got {raw!r}"
            )
            with pytest.raises(Unavailable, match=re.escape(problem)):
                client.load("m")


# ----- the error gate against the stable version, and across rebuilds (review 104) -----------------------------


def _spec(percent: float = 10.0, max_error: float | None = 5.0) -> RolloutSpec:
    """Canary 2 at `percent`, stable 1, as parse_rollout would make it."""
    return RolloutSpec(2, percent, 1, None, 100.0, True, ((CANARY_PERCENT, f"{percent:g}"),), max_error)


def _end(rollout: Rollout, version: int, total: int, failed: int) -> None:
    """`total` requests routed to `version` end, the last `failed` of them failed."""
    for i in range(total):
        rollout.outcome(version, i >= total - failed)


def test_failures_both_versions_share_leave_the_canary_its_share() -> None:
    """A load spike times out 8% of the requests on both versions: the canary is judged against the stable
    version (it used to be rolled back alone, at 8% over 5%). Past 5 points above the stable's, it goes."""
    rollout = Rollout("m", _spec(), [1, 2])
    _end(rollout, 1, 100, 8)
    _end(rollout, 2, 100, 8)
    assert (rollout.tripped, rollout.share) == (False, 10.0)
    _end(rollout, 2, 20, 6)  # 14 of its last 100 against 8: 6 points over
    assert (rollout.tripped, rollout.share) == (True, 0.0)


def test_two_slow_cold_start_requests_of_the_first_twenty_do_not_roll_the_canary_back() -> None:
    """2 of 20 is 10%, over the default 5%, but 2 failures are no broken version: it takes ERROR_MIN_FAILURES."""
    rollout = Rollout("m", _spec(), [1, 2])
    _end(rollout, 2, 20, 2)
    assert (rollout.tripped, rollout.share) == (False, 10.0)
    _end(rollout, 2, 10, 3)  # 5 of 30
    assert rollout.tripped


@pytest.mark.parametrize(
    "exc, counted",
    [
        pytest.param(
            ServerUnavailableError(f"model 'm' version 2 did not run the request; {DRAINING}"), False, id="drain"
        ),
        pytest.param(ServerUnavailableError("model 'm' version 2 is being unloaded"), False, id="unload"),
        pytest.param(BackendError("m", 2, "the run failed"), True, id="run-failed"),
        pytest.param(DeadlineExceededError("model 'm' version 2: timed out in the queue"), True, id="deadline"),
    ],
)
def test_the_servers_own_refusals_do_not_count_against_the_version(exc: Exception, counted: bool) -> None:
    req = InferRequest("m", "", "r-1", {}, {})
    assert _failed_on_server(exc, req) is counted


def test_a_new_split_keeps_a_tripped_canary_rolled_back_until_its_build_or_gate_changes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Tripped at 10%, a ramp step to 25% (the same canary build) used to give it 25% again, silently. A new build
    of the canary (new files), or a new max_error_percent, judges it afresh, with a WARNING."""
    caplog.set_level(logging.WARNING, logger="tensorgate.server.repository.rollout")
    stable, canary = object(), object()
    tripped = Rollout("m", _spec(10.0), {1: stable, 2: canary})
    _end(tripped, 2, 20, 20)
    assert tripped.tripped
    ramped = Rollout("m", _spec(25.0), {1: stable, 2: canary}, previous=tripped)
    assert (ramped.tripped, ramped.share) == (True, 0.0)
    caplog.clear()
    rebuilt = Rollout("m", _spec(25.0), {1: stable, 2: object()}, previous=ramped)
    assert (rebuilt.tripped, rebuilt.share, len(rebuilt.outcomes.window)) == (False, 25.0, 0)
    assert [r.getMessage() for r in caplog.records] == [
        "model 'm': canary version 2, rolled back for its errors, is judged afresh (a new build): 25% of the "
        "requests that name no version go to it again"
    ]
    _end(rebuilt, 2, 20, 20)
    regated = Rollout("m", _spec(25.0, max_error=50.0), {1: stable, 2: rebuilt._canary_build}, previous=rebuilt)
    assert (regated.tripped, regated.share) == (False, 25.0)


def test_shadow_runs_going_through_a_rebuild_still_count_against_the_bound() -> None:
    """Runs started under one split end under the next: the count is the model's, not the split's (it used to
    start at 0 on every rebuild, and quick ramp steps let more than shadow_max_in_flight run at once)."""
    spec = RolloutSpec(None, 0.0, 1, 2, 100.0, True)
    first = Rollout("m", spec, [1, 2])
    first.shadow_in_flight += 3
    second = Rollout("m", spec, [1, 2], previous=first)
    assert second.shadow_in_flight == 3
    first.shadow_in_flight -= 1  # a run started under the first split ends
    assert second.shadow_in_flight == 2


def test_answers_from_the_response_cache_do_not_count_as_the_canarys_successes(tmp_path: Path) -> None:
    """A single row answered once and then 60 times from the cache, then 20 runs that fail: 20 of 21 runs failed.
    The hits used to count as 60 successes (20 of 81, under max_error_percent 30)."""
    extra = _params(canary_version="2", canary_percent="100", max_error_percent="30")
    repo = _repo(tmp_path / "models", extra + "response_cache { enable: true }\n", v2=_one_row)
    with ServerThread(repo, response_cache_bytes=1 << 20) as server, InferenceClient(server.address) as client:
        for i in range(61):
            assert client.infer("m", {"INPUT0": X[:1]}, request_id=f"one-{i}").version == "2"
        answered, failed = _failures(client, 20, "two")
        assert failed == 19 and answered == Counter({"1": 1})
        assert _share_of_m(server) == 0.0


def test_a_routed_request_that_fails_is_counted_under_the_version_that_ran_it(tmp_path: Path) -> None:
    """/metrics labelled every failure of a request that named no version with the highest served version: a
    failing canary below the stable one (here version 1 of 2, all the traffic, its error gate off) showed its
    failures under the stable version, which was never asked."""
    repo = _repo(tmp_path / "models", _params(canary_version="1", canary_percent="100", max_error_percent="off"))
    _one_row(repo / "m" / "1" / "model.onnx")  # version 1 fails every request of two rows
    with ServerThread(repo) as server, InferenceClient(server.address) as client:
        answered, failed = _failures(client, 6, "routed")
        assert (answered, failed) == (Counter(), 6)
        samples = scrape(metrics_url(server))
    counted = {"1": 0.0, "2": 0.0}
    for version in counted:
        with contextlib.suppress(KeyError):
            counted[version] = value(
                samples, "tensorgate_inference_requests_total", model="m", version=version, code="INTERNAL"
            )
    assert counted == {"1": 6.0, "2": 0.0}
