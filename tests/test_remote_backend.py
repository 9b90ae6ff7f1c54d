"""The remote Triton backend's reactions to what an upstream can do, against tests/scripted_upstream.py on loopback
(fast, and scriptable where a real Triton is not): callers that leave, unloads mid-call, mixed deadlines in one
batch, upstream errors, several upstream addresses, bad parameters. A real Triton's turn is in
tests/test_triton_backend.py. Clients: unmodified tritonclient, and our stubs where a call must be cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from google.protobuf import text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from tensorgate.protos import SERVICE_NAME, GRPCInferenceServiceStub
from tensorgate.protos import model_config_pb2 as mc
from tensorgate.protos.tensors import encode_infer_request
from tensorgate.server.backends.triton import TritonBackend
from tensorgate.server.backends.upstream_targets import upstream_allowed
from tensorgate.server.cli import build_parser
from tensorgate.server.errors import InvalidRequestError, ModelLoadError
from tensorgate.server.repository.manager import ModelRepository
from tensorgate.server.scheduling.policy import SchedulingPolicy
from tensorgate.server.scheduling.scheduler import Scheduler
from tensorgate.server.settings import ServerSettings
from tensorgate.server.telemetry.metrics import MODEL_STATES
from tensorgate.server.telemetry.statistics import ModelStats
from tests.onnx_models import write_config
from tests.process import ServeProcess
from tests.scraping import metrics_url, scrape, value
from tests.scripted_upstream import ScriptedUpstream
from tests.serving import ServerThread
from tests.test_decoupled import Stream, _remote
from tests.test_poll import wait_for


def _param(key: str, value: str) -> str:
    return f'parameters {{ key: "tensorgate.triton.{key}" value {{ string_value: "{value}" }} }}'


def _x(rows: int = 1) -> list[tc.InferInput]:
    item = tc.InferInput("X", [rows, 2], "FP32")
    item.set_data_from_numpy(np.ones((rows, 2), np.float32))
    return [item]


def _outcome(client: tc.InferenceServerClient, model: str, timeout: float | None = None) -> str:
    """ "OK", or the status code name and message the caller got."""
    try:
        client.infer(model, _x(), client_timeout=timeout)
    except InferenceServerException as exc:
        return f"{str(exc.status()).removeprefix('StatusCode.')} {exc.message()}"
    return "OK"


# ----- callers that leave, unloads, deadlines ------------------------------------------------------------------


def test_a_caller_that_leaves_ends_its_upstream_call_and_frees_the_instance(tmp_path: Path) -> None:
    """With one instance, a caller without a deadline cancels its call: the upstream call is cancelled (the
    upstream stops working for nobody) and the next caller runs at once, not after the first call's 30 s."""
    root = tmp_path / "models"
    with ScriptedUpstream() as up:
        _remote(root, "r", up.url, "instance_group { count: 1 }")
        with (
            ServerThread(root) as s,
            tc.InferenceServerClient(s.address) as client,
            grpc.insecure_channel(s.address) as channel,
        ):
            assert _outcome(client, "r") == "OK"
            up.script.delay_s = 30.0
            request = encode_infer_request("r", [("X", np.ones((1, 2), np.float32))])
            left = GRPCInferenceServiceStub(channel).ModelInfer.future(request)  # no deadline
            wait_for("the call to reach the upstream", lambda: up.script.in_flight.get(None, 0) == 1)
            up.script.delay_s = 0.0
            left.cancel()
            wait_for("the upstream call to be cancelled", lambda: up.script.infer_cancelled == 1, 10)
            started = time.monotonic()
            assert _outcome(client, "r", timeout=20) == "OK"
            assert time.monotonic() - started < 20


def test_a_batch_runs_on_for_the_callers_that_stay(tmp_path: Path) -> None:
    """Only a batch that nobody waits for is cancelled: one caller of two leaving does not take the other's
    answer away."""
    root = tmp_path / "models"
    with ScriptedUpstream() as up:
        _remote(
            root,
            "r",
            up.url,
            "max_batch_size: 8",
            "dynamic_batching { max_queue_delay_microseconds: 5000000 preferred_batch_size: 2 }",
        )
        with (
            ServerThread(root) as s,
            tc.InferenceServerClient(s.address) as client,
            grpc.insecure_channel(s.address) as channel,
        ):
            up.script.delay_s = 1.0
            request = encode_infer_request("r", [("X", np.ones((1, 2), np.float32))])
            leaves = GRPCInferenceServiceStub(channel).ModelInfer.future(request)
            stays: dict[str, str] = {}
            thread = threading.Thread(target=lambda: stays.update(r=_outcome(client, "r", timeout=30)))
            thread.start()
            wait_for("the batch of both to reach the upstream", lambda: up.script.in_flight.get(None, 0) == 1)
            leaves.cancel()
            thread.join(30)
            assert stays == {"r": "OK"}
            assert up.script.infer_cancelled == 0 and up.script.calls == 1


def test_an_unload_past_its_grace_ends_the_call_as_unavailable(tmp_path: Path) -> None:
    """A call still running upstream when its model's unload grace runs out is answered UNAVAILABLE with why
    (retryable once the model is back), at once: not INTERNAL, nor after the call's whole timeout."""
    root = tmp_path / "models"
    with ScriptedUpstream() as up:
        _remote(root, "r", up.url)
        with ServerThread(root, model_control_mode="explicit", load_model=["r"]) as s:
            s.app.repository._grace = 0.5  # the unload grace (30 s by default) runs out mid-call
            with tc.InferenceServerClient(s.address) as client:
                up.script.delay_s = 30.0
                got: dict[str, str] = {}
                thread = threading.Thread(target=lambda: got.update(r=_outcome(client, "r", timeout=20)))
                thread.start()
                wait_for("the call to reach the upstream", lambda: up.script.in_flight.get(None, 0) == 1)
                client.unload_model("r")
                thread.join(30)
    assert got["r"].startswith("UNAVAILABLE"), got
    assert "model 'r' version 1 is not ready: the model was unloaded while it ran" in got["r"]


def test_a_caller_without_a_deadline_does_not_cut_short_one_with_a_longer_deadline(tmp_path: Path) -> None:
    """timeout_s (1 s here) bounds calls without a deadline; in one batch with a caller that allows 20 s, the
    upstream call gets the longer of the two, and both callers their answer (the upstream takes 2 s)."""
    root = tmp_path / "models"
    with ScriptedUpstream() as up:
        _remote(
            root,
            "r",
            up.url,
            _param("timeout_s", "1"),
            "max_batch_size: 8",
            "dynamic_batching { max_queue_delay_microseconds: 5000000 preferred_batch_size: 2 }",
        )
        with ServerThread(root) as s, tc.InferenceServerClient(s.address) as client:
            up.script.delay_s = 2.0
            got: dict[str, str] = {}
            threads = [
                threading.Thread(target=lambda: got.update(none=_outcome(client, "r"))),
                threading.Thread(target=lambda: got.update(long=_outcome(client, "r", timeout=20))),
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert up.script.calls == 1  # one batch
    assert got == {"none": "OK", "long": "OK"}


# ----- upstream errors ------------------------------------------------------------------------------------------

RESTRICTED = "This protocol is restricted, expecting header 'triton-grpc-protocol-infer-key'"


@pytest.mark.parametrize(
    ("code", "message", "expected", "says", "ready"),
    [
        pytest.param(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "Request timeout expired",
            "DEADLINE_EXCEEDED",
            "answered DEADLINE_EXCEEDED after",  # at once: not "did not answer within 60s"
            True,
            id="upstream-timeout",
        ),
        pytest.param(
            grpc.StatusCode.UNAVAILABLE,
            "Exceeds maximum queue size",
            "UNAVAILABLE",
            "answered UNAVAILABLE: Exceeds maximum queue size",  # there and busy: not "is not ready"
            True,
            id="queue-full",
        ),
        pytest.param(
            grpc.StatusCode.UNAVAILABLE,
            RESTRICTED,
            "FAILED_PRECONDITION",  # not retried forever as UNAVAILABLE would be
            "refused tensorgate's call (UNAVAILABLE): This protocol is restricted",
            True,
            id="restricted-protocol",
        ),
        pytest.param(
            grpc.StatusCode.CANCELLED,
            "request cancelled",
            "UNAVAILABLE",
            "answered CANCELLED: request cancelled",
            True,  # one cancelled request says nothing about the model
            id="cancelled",
        ),
        pytest.param(
            grpc.StatusCode.PERMISSION_DENIED,
            "no access to model 'm'",
            "FAILED_PRECONDITION",
            "refused tensorgate's call (PERMISSION_DENIED): no access to model 'm'; the model's "
            "'tensorgate.triton.header.*' parameters",
            True,
            id="permission-denied",
        ),
        pytest.param(
            grpc.StatusCode.UNAUTHENTICATED,
            "invalid token",
            "FAILED_PRECONDITION",
            "refused tensorgate's call (UNAUTHENTICATED): invalid token",
            True,
            id="unauthenticated",
        ),
        pytest.param(
            grpc.StatusCode.NOT_FOUND,
            "model 'm' is not found",
            "UNAVAILABLE",
            "version 1 is not ready: upstream Triton",
            False,  # the upstream model is gone
            id="not-found",
        ),
    ],
)
def test_upstream_errors_reach_the_caller_with_what_they_mean(
    tmp_path: Path, code: grpc.StatusCode, message: str, expected: str, says: str, ready: bool
) -> None:
    root = tmp_path / "models"
    with ScriptedUpstream() as up:
        _remote(root, "r", up.url, _param("health_interval_s", "60"))  # readiness as the call left it
        with ServerThread(root) as s, tc.InferenceServerClient(s.address) as client:
            up.script.error = (code, message)
            got = _outcome(client, "r")
            assert got.startswith(expected + " "), got
            assert f"model 'r' version 1: upstream Triton {up.url} (model 'm')" in got or "is not ready" in got
            assert says in got, got
            assert client.is_model_ready("r") is ready


def test_an_upstream_lost_mid_call_marks_the_model_not_ready_at_once(tmp_path: Path) -> None:
    """The upstream goes away with a call in flight: the caller hears UNAVAILABLE, and the model is not ready
    from then on, without waiting for the next readiness probe (60 s away here)."""
    root = tmp_path / "models"
    up = ScriptedUpstream()
    with up:
        _remote(root, "r", up.url, _param("health_interval_s", "60"))
        with ServerThread(root) as s, tc.InferenceServerClient(s.address) as client:
            up.script.delay_s = 30.0
            got: dict[str, str] = {}
            thread = threading.Thread(target=lambda: got.update(r=_outcome(client, "r", timeout=20)))
            thread.start()
            wait_for("the call to reach the upstream", lambda: up.script.in_flight.get(None, 0) == 1)
            up.stop()
            thread.join(30)
            assert got["r"].startswith("UNAVAILABLE model 'r' version 1 is not ready"), got
            assert not client.is_model_ready("r")


# ----- connections and parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "spread"),
    [pytest.param(None, True, id="default-round-robin"), pytest.param("pick_first", False, id="pick-first")],
)
def test_a_url_with_several_addresses_spreads_the_calls(tmp_path: Path, policy: str | None, spread: bool) -> None:
    root = tmp_path / "models"
    with ScriptedUpstream() as a, ScriptedUpstream() as b:
        extra = [] if policy is None else [_param("load_balancing", policy)]
        _remote(root, "r", f"ipv4:{a.url},{b.url}", *extra)
        with ServerThread(root) as s, tc.InferenceServerClient(s.address) as client:
            for _ in range(20):
                assert _outcome(client, "r", timeout=20) == "OK"
        if spread:
            assert a.script.calls >= 5 and b.script.calls >= 5, (a.script.calls, b.script.calls)
        else:
            assert sorted((a.script.calls, b.script.calls)) == [0, 20]


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        pytest.param(
            "header.x token",
            "s3cret",
            "parameter 'tensorgate.triton.header.x token' does not name a usable gRPC header",
        ),
        pytest.param("header.x-token", "Bearer s3cret\n", "'tensorgate.triton.header.x-token': a gRPC header value"),
        pytest.param("header.x-token", "s3crét", "'tensorgate.triton.header.x-token': a gRPC header value"),
        pytest.param("header.grpc-timeout", "s3cret", "does not name a usable gRPC header"),
        pytest.param("load_balancing", "random", "'tensorgate.triton.load_balancing' must be one of round_robin"),
    ],
)
def test_bad_parameters_fail_the_load_naming_the_parameter(tmp_path: Path, key: str, value: str, reason: str) -> None:
    """Refused when the config is read, with the parameter's name (and never a header's value, which may be a
    credential), not later by gRPC's core with its internals."""
    config = mc.ModelConfig(name="m", backend="tensorgate_triton")
    config.parameters["tensorgate.triton.url"].string_value = "127.0.0.1:1"
    config.parameters[f"tensorgate.triton.{key}"].string_value = value
    with pytest.raises(ModelLoadError) as info:
        TritonBackend(config, tmp_path)
    assert reason in info.value.message
    assert "s3cr" not in info.value.message


def test_printable_header_values_reach_the_upstream(tmp_path: Path) -> None:
    root = tmp_path / "models"
    with ScriptedUpstream() as up:
        _remote(root, "r", up.url, _param("header.x-token", "Bearer a.b-c_d ~!"))
        with ServerThread(root) as s, tc.InferenceServerClient(s.address) as client:
            assert client.is_model_ready("r")
            assert _outcome(client, "r") == "OK"


def test_a_remote_model_s_metadata_names_its_backend_as_platform(tmp_path: Path) -> None:
    """As Triton's ModelMetadata does for a model run by a backend (a Python one says "python"): it was empty."""
    root = tmp_path / "models"
    with ScriptedUpstream() as up:
        _remote(root, "r", up.url)
        with ServerThread(root) as s, tc.InferenceServerClient(s.address) as client:
            assert client.get_model_metadata("r").platform == "tensorgate_triton"


# ----- readiness: of the server, in /metrics, after the upstream changed ---------------------------------------


@pytest.mark.parametrize(
    ("strict", "server_ready"),
    [pytest.param(True, False, id="strict-default"), pytest.param(False, True, id="not-strict")],
)
def test_one_upstream_down_and_the_server_s_readiness(tmp_path: Path, strict: bool, server_ready: bool) -> None:
    """An upstream goes down: its model is not ready, and /metrics says so (`not_ready`). The server as a whole
    is not ready either with strict readiness (Triton's default), and stays ready without it, with the health of
    the inference service following ServerReady."""
    root = tmp_path / "models"
    up = ScriptedUpstream()
    with up, ScriptedUpstream() as other:
        _remote(root, "r", up.url, _param("health_interval_s", "0.1"))
        _remote(root, "other", other.url)
        settings = {} if strict else {"strict_readiness": False}
        with (
            ServerThread(root, **settings) as s,
            tc.InferenceServerClient(s.address) as client,
            grpc.insecure_channel(s.address) as channel,
        ):
            health = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

            assert client.is_server_ready() and serving()
            assert value(scrape(metrics_url(s)), "tensorgate_model_state", model="r", version="1", state="ready") == 1
            up.stop()
            wait_for("ModelReady false", lambda: not client.is_model_ready("r"))
            assert client.is_model_ready("other")
            samples = scrape(metrics_url(s))
            state = {
                name: value(samples, "tensorgate_model_state", model="r", version="1", state=name)
                for name in MODEL_STATES
            }
            assert state == {name: float(name == "not_ready") for name in MODEL_STATES}
            assert value(samples, "tensorgate_model_state", model="other", version="1", state="ready") == 1
            time.sleep(1.0)  # the health status follows ServerReady every 0.5 s
            assert client.is_server_ready() is server_ready
            assert serving() is server_ready


def test_an_upstream_slower_to_answer_readiness_than_the_interval_stays_ready(tmp_path: Path) -> None:
    """A busy upstream answers a readiness probe later than a short health interval: late is not down, and the
    model (and with it ServerReady) must not flap to not ready, failing its callers, for every slow answer."""
    root = tmp_path / "models"
    with ScriptedUpstream() as up:
        _remote(root, "r", up.url, _param("health_interval_s", "0.1"))
        with ServerThread(root) as s, tc.InferenceServerClient(s.address) as client:
            asked = up.script.ready_asked
            up.script.ready_delay_s = 0.4
            wait_for("three slow readiness probes", lambda: up.script.ready_asked >= asked + 3)
            assert client.is_model_ready("r") and client.is_server_ready()
            assert _outcome(client, "r") == "OK"


def test_an_upstream_back_with_another_model_keeps_it_not_ready_until_reloaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The upstream model goes away and comes back with a smaller max_batch_size: tensorgate, which read the old
    one at load and would send batches the new one refuses, keeps the model not ready and refuses its calls with
    why, until the model is loaded again (which reads the upstream afresh)."""
    root = tmp_path / "models"
    with ScriptedUpstream() as up:
        _remote(root, "r", up.url, _param("health_interval_s", "0.1"))
        with (
            ServerThread(root, model_control_mode="explicit", load_model=["r"]) as s,
            tc.InferenceServerClient(s.address) as client,
        ):
            assert client.get_model_config("r").config.max_batch_size == 8
            up.script.ready = False
            wait_for("ModelReady false", lambda: not client.is_model_ready("r"))
            described = up.script.described
            up.script.max_batch_size = 2
            up.script.ready = True
            wait_for("the upstream model to be described again", lambda: up.script.described > described)
            time.sleep(0.5)  # several more readiness probes
            assert not client.is_model_ready("r")
            got = _outcome(client, "r")
            assert got.startswith("UNAVAILABLE model 'r' version 1 is not ready: upstream Triton"), got
            assert "now has another max_batch_size than when the model loaded: reload the model" in got
            assert "now has another max_batch_size" in caplog.text
            # A load of unchanged files keeps a version that serves, but not one that is not ready: it reads the
            # upstream afresh.
            client.load_model("r")
            assert client.is_model_ready("r")
            assert client.get_model_config("r").config.max_batch_size == 2
            assert _outcome(client, "r") == "OK"


# ----- what goes upstream with a batch ---------------------------------------------------------------------------


async def test_a_request_s_id_and_parameters_go_upstream_with_its_batch(tmp_path: Path) -> None:
    """An upstream Python, vLLM or TensorRT-LLM model reads its sampling parameters from the request: each batch
    carries its requests' parameters, the same for all of them (requests with other parameters wait for a batch
    of their own), a lone request its id. `priority` and `timeout` are the front's queue's, and stay there. The
    scheduler with the remote backend, as the repository builds them (the pipeline hands each request's id and
    parameters over)."""
    config = text_format.Parse(
        'name: "r" backend: "tensorgate_triton" max_batch_size: 8 '
        "dynamic_batching { max_queue_delay_microseconds: 300000 preferred_batch_size: 3 }",
        mc.ModelConfig(),
    )
    x = np.ones((1, 2), np.float32)
    with ScriptedUpstream() as up:
        config.parameters["tensorgate.triton.url"].string_value = up.url
        config.parameters["tensorgate.triton.model_name"].string_value = "m"
        backend = await asyncio.to_thread(TritonBackend, config, tmp_path)
        scheduler = Scheduler("r", 1, backend, ModelStats(), 2, SchedulingPolicy.from_config(config))
        try:
            await scheduler.submit(
                {"X": x},
                ["Y"],
                1,
                request_id="solo",
                parameters={"temperature": 0.5, "custom": "v", "greedy": True, "priority": 1, "timeout": 2_000_000},
            )
            (solo,) = up.script.requests
            assert solo.id == "solo"
            assert {k: str(v).strip() for k, v in solo.parameters.items()} == {
                "temperature": "double_param: 0.5",
                "custom": 'string_param: "v"',
                "greedy": "bool_param: true",
            }
            await asyncio.gather(
                *(
                    scheduler.submit({"X": x}, ["Y"], 1, request_id=rid, parameters={"temperature": t})
                    for rid, t in (("a", 0.5), ("b", 0.5), ("c", 0.9))
                )
            )
            batches = sorted(
                (r.parameters["temperature"].double_param, r.inputs[0].shape[0], r.id) for r in up.script.requests[1:]
            )
            assert batches == [(0.5, 2, ""), (0.9, 1, "c")]  # a batch of several has no one id
        finally:
            await scheduler.close(5.0)
            await asyncio.to_thread(backend.close)


def test_connections_are_renewed_after_their_max_age_without_failing_a_call(tmp_path: Path) -> None:
    """With max_connection_age_s, connections are replaced (a new one resolves the url again, so that upstreams
    added behind a DNS name get calls); calls running on a replaced connection finish on it first."""
    root = tmp_path / "models"
    with ScriptedUpstream() as up:
        _remote(root, "r", up.url, _param("max_connection_age_s", "0.2"))
        with ServerThread(root) as s, tc.InferenceServerClient(s.address) as client:
            up.script.delay_s = 0.3  # each call outlives its connection's age
            got = [_outcome(client, "r", timeout=20) for _ in range(6)]
        assert got == ["OK"] * 6
        assert len(up.script.peers) >= 3, up.script.peers


def test_requests_that_differ_only_in_the_server_s_parameters_share_one_upstream_call(tmp_path: Path) -> None:
    """`timeout` and `priority` are the front's own queue's (the upstream gets the callers' deadline instead): two
    callers that set different ones, and the same parameters for the model, are one batch, one upstream call,
    which carries the model's parameters only."""
    root = tmp_path / "models"
    with ScriptedUpstream() as up:
        _remote(
            root,
            "r",
            up.url,
            "max_batch_size: 8",
            "dynamic_batching { max_queue_delay_microseconds: 5000000 preferred_batch_size: 2 }",
        )
        with ServerThread(root) as s, tc.InferenceServerClient(s.address) as client:
            got: dict[int, str] = {}

            def call(timeout_us: int, priority: int) -> None:
                try:
                    client.infer(
                        "r",
                        _x(),
                        timeout=timeout_us,
                        priority=priority,
                        parameters={"temperature": 0.5},
                        client_timeout=30,
                    )
                    got[timeout_us] = "OK"
                except InferenceServerException as exc:
                    got[timeout_us] = str(exc)

            threads = [threading.Thread(target=call, args=a) for a in ((5_000_000, 1), (6_000_000, 2))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
        assert got == {5_000_000: "OK", 6_000_000: "OK"}
        assert up.script.calls == 1, [dict(r.parameters) for r in up.script.requests]
        (request,) = up.script.requests
        assert request.inputs[0].shape[0] == 2
        assert {k: str(v).strip() for k, v in request.parameters.items()} == {"temperature": "double_param: 0.5"}


ONE_REMOTE_STEP = """
name: "e"
platform: "ensemble"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 2 ] } ]
ensemble_scheduling {
  step [ { model_name: "r" input_map { key: "X" value: "X" } output_map { key: "Y" value: "Y" } } ]
}
"""


@pytest.mark.parametrize("sequence", [pytest.param(False, id="stateless"), pytest.param(True, id="sequence")])
def test_the_caller_s_parameters_reach_a_remote_model_called_directly_and_as_an_ensemble_step(
    tmp_path: Path, sequence: bool
) -> None:
    """An upstream model reads its own parameters (an LLM's sampling ones) from the request, whether the caller
    called it or an ensemble over it, as Triton's ensembles pass the request's parameters to each step; a
    sequence model's too, besides its sequence's (which go as they are, from the front's sequencing)."""
    root = tmp_path / "models"
    with ScriptedUpstream() as up:
        up.script.sequence = sequence
        _remote(root, "r", up.url)
        (root / "e" / "1").mkdir(parents=True)
        (root / "e" / "config.pbtxt").write_text(ONE_REMOTE_STEP)
        with ServerThread(root) as s, tc.InferenceServerClient(s.address) as client:
            for model, rid, temperature, sid in (("r", "direct", "hot", 7), ("e", "via-e", "cold", 8)):
                flags = {"sequence_id": sid, "sequence_start": True, "sequence_end": True} if sequence else {}
                client.infer(model, _x(), request_id=rid, parameters={"temperature": temperature}, **flags)
        sent = [
            (r.id, {k: str(v).strip() for k, v in r.parameters.items() if not k.startswith("sequence_")})
            for r in up.script.requests
        ]
        assert sent == [
            ("direct", {"temperature": 'string_param: "hot"'}),
            ("via-e", {"temperature": 'string_param: "cold"'}),
        ]
        if sequence:
            assert [seen[:3] for seen in up.script.seen] == [(7, True, True), (8, True, True)]


# ----- a forced stop ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sequence", [pytest.param(False, id="stateless"), pytest.param(True, id="sequence")])
def test_a_second_signal_does_not_wait_for_an_upstream_that_does_not_answer(tmp_path: Path, sequence: bool) -> None:
    """Ctrl-C twice: the process exits soon, not after an upstream call that takes minutes (the unload grace, 30
    s, would bound it otherwise). A sequence model's call is not cancelled when its caller leaves (its
    sequence's next request must not overtake it), so the forced stop cancels it (base.Interrupts)."""
    repo = tmp_path / "models"
    with ScriptedUpstream() as up:
        up.script.sequence = sequence
        _remote(repo, "r", up.url)
        args = ["--model-repository", str(repo), "--grpc-port", "0", "--shutdown-grace-s", "300"]
        with ServeProcess(args) as server:
            server.wait_for_line("model 'r' ready")
            up.script.delay_s = 600.0

            async def scenario() -> float:
                async with grpc.aio.insecure_channel(server.address) as channel:
                    request = encode_infer_request("r", [("X", np.ones((1, 2), np.float32))])
                    if sequence:
                        request.parameters["sequence_id"].int64_param = 7
                        request.parameters["sequence_start"].bool_param = True
                    call = GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=300)
                    await asyncio.to_thread(wait_for, "the call upstream", lambda: up.script.calls == 1)
                    server.proc.send_signal(signal.SIGTERM)
                    await asyncio.to_thread(server.wait_for_line, "refusing new calls")
                    server.proc.send_signal(signal.SIGINT)
                    hurried = time.monotonic()
                    with pytest.raises(grpc.aio.AioRpcError):
                        await asyncio.wait_for(call, 60)
                    return hurried

            hurried = asyncio.run(scenario())
            assert server.proc.wait(60) == 0
            assert time.monotonic() - hurried < 20, server.output
            assert "stopped" in server.output
        wait_for("the upstream call to be cancelled", lambda: up.script.infer_cancelled == 1, 10)


# ----- connections renewed ----------------------------------------------------------------------------------------


def test_a_decoupled_model_s_stream_connection_is_renewed_after_its_max_age(tmp_path: Path) -> None:
    """max_connection_age_s renews the connection a decoupled model's streams go over too (a url's addresses are
    resolved again, so that upstreams added behind it get streams): a stream that starts once it is that old goes
    over a new one. A stream running on the old one is not moved, nor cut: it ends there."""
    root = tmp_path / "models"
    with ScriptedUpstream() as up:
        up.script.decoupled = True
        up.script.delay_s = 0.2
        _remote(root, "gen", up.url, _param("max_connection_age_s", "0.2"))
        with ServerThread(root) as s:
            stream = Stream(s.address)
            try:
                long, short = (tc.InferInput("X", [1, 2], "FP32") for _ in range(2))
                long.set_data_from_numpy(np.full((1, 2), 8.0, np.float32))  # 8 responses, 0.2 s apart
                short.set_data_from_numpy(np.full((1, 2), 1.0, np.float32))
                stream.client.async_stream_infer("gen", [long], request_id="long")
                # Waited for: on a loaded machine the long stream reached the front so late after a fixed sleep that
                # the short one came within the connection's age, and went over the same connection.
                wait_for("the long stream upstream", lambda: len(up.script.stream_requests) == 1)
                time.sleep(0.4)  # the connection is older than its age now, and the long stream runs on it
                stream.client.async_stream_infer("gen", [short], request_id="short")
                answers = stream.take(9)
            finally:
                stream.close()
        assert [error for _, error in answers] == [None] * 9
        ids = sorted(result.get_response().id for result, _ in answers if result is not None)
        assert ids == ["long"] * 8 + ["short"]
        assert len(up.script.stream_peers) == 2, up.script.stream_peers


class _FarLink:
    """A TCP forwarder to `target` that holds every chunk `delay_s` before passing it on, as the link to an upstream
    far away does: setting a connection up (TCP, then the upstream's HTTP/2 SETTINGS) takes a few such delays."""

    def __init__(self, target: str, delay_s: float) -> None:
        self._target, self._delay_s = target, delay_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self) -> _FarLink:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self._listener.accept()
            except OSError:  # closed
                return
            host, port = self._target.rsplit(":", 1)
            far = socket.create_connection((host, int(port)))
            for src, dst in ((near, far), (far, near)):
                threading.Thread(target=self._carry, args=(src, dst), daemon=True).start()

    def _carry(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(65536):
                time.sleep(self._delay_s)
                dst.sendall(chunk)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def test_an_upstream_slower_to_connect_to_than_100_ms_is_served(tmp_path: Path) -> None:
    """gRPC's min_reconnect_backoff_ms, which tensorgate set to 100 ms to reconnect quickly, is also the time a
    connection attempt may take: an upstream 150 ms away (or a TLS handshake on a loaded machine) timed out on
    every first attempt, and the model failed its load "before receiving SETTINGS frame"."""
    root = tmp_path / "models"
    with ScriptedUpstream() as up, _FarLink(up.url, 0.15) as link:
        _remote(root, "r", link.url)
        with ServerThread(root) as s, tc.InferenceServerClient(s.address) as client:
            assert client.is_model_ready("r")
            assert _outcome(client, "r") == "OK"


# ----- which upstream a config override may name ------------------------------------------------------------------


def _override(url: str, **extra: str) -> str:
    """A RepositoryModelLoad `config` (JSON) for a remote model in front of `url`; `extra`: more
    `tensorgate.triton.*` parameters, by their short names."""
    parameters = {"url": url, "model_name": "m", **extra}
    return json.dumps(
        {
            "backend": "tensorgate_triton",
            "parameters": {f"tensorgate.triton.{k}": {"string_value": v} for k, v in parameters.items()},
        }
    )


def _not_allowed(name: str, url: str) -> str:
    """The refusal of an override's url: names the model, the url and the flag, never the flag's patterns (the
    operator's network, which a caller with repository rights on one model has no business reading)."""
    return (
        f"model '{name}': parameter 'tensorgate.triton.url' of a config override names the upstream '{url}', which "
        "is not the one the repository's config.pbtxt names, and the server's --allowed-upstreams does not allow "
        "it: a config sent with a load may name another upstream only where the operator allows it"
    )


def test_a_config_override_may_not_point_a_model_at_another_upstream(tmp_path: Path) -> None:
    """A caller that may load a model is not the operator: its config override may keep the upstream the
    repository's config.pbtxt names (and change the rest), but not name another host, which the server would
    connect to with whatever headers the override adds (SSRF); nor may uploaded files bring one. Refused before
    anything is connected to, naming the model, the url and the flag that would allow it."""
    root = tmp_path / "models"
    with ScriptedUpstream() as up, ScriptedUpstream() as elsewhere:
        _remote(root, "r", up.url)
        with ServerThread(root, model_control_mode="explicit") as s, tc.InferenceServerClient(s.address) as client:
            for name, files in (("r", None), ("r", {"file:notes.txt": b""}), ("new", {"file:notes.txt": b""})):
                with pytest.raises(InferenceServerException) as info:
                    client.load_model(name, config=_override(elsewhere.url, **{"header.x-probe": "1"}), files=files)
                assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
                assert info.value.message() == _not_allowed(name, elsewhere.url)
            assert elsewhere.script.described == 0  # never connected to
            assert [row.name for row in s.app.repository.states()] == []  # nothing was loaded, nor tried
            client.load_model("r", config=_override(up.url))  # its own upstream: loads
            client.load_model("r", config=json.dumps({**json.loads(_override(up.url)), "max_batch_size": 2}))
            assert client.get_model_config("r").config.max_batch_size == 2


async def test_allowed_upstreams_let_an_override_name_the_upstreams_they_match(tmp_path: Path) -> None:
    """--allowed-upstreams (the repository's `allowed_upstreams`) names the upstreams an override may point a
    model at, besides its own: one it matches loads, one it does not is refused without the patterns being
    shown to the caller."""
    root = tmp_path / "models"
    with ScriptedUpstream() as up, ScriptedUpstream() as other:
        _remote(root, "r", up.url)
        host, port = other.url.rsplit(":", 1)
        text = f'backend: "tensorgate_triton" {_param("url", other.url)} {_param("model_name", "m")}'
        refusing = ModelRepository(root, allowed_upstreams=[f"{host}:{int(port) + 1}", "10.*:*"])
        try:
            with pytest.raises(InvalidRequestError) as info:
                await refusing.load("r", text)
            assert info.value.message == _not_allowed("r", other.url)
        finally:
            await refusing.close()
        assert other.script.described == 0
        allowing = ModelRepository(root, allowed_upstreams=["10.*:*", f"{host}:*"])
        try:
            await allowing.load("r", text)
            assert allowing.get("r", "").backend.execution_provider == f"triton:{other.url}"
        finally:
            await allowing.close()
        assert other.script.described == 1


def test_an_override_url_that_grpc_reads_otherwise_is_refused_and_nothing_is_contacted(tmp_path: Path) -> None:
    """gRPC reads a url as a URI: it decodes `%3A` into the port's colon, and drops a `?query` or a `#fragment`,
    so each of these reaches the upstream's real port while its text ends in an allowed ':8001' or
    '.internal:8001'. Refused, whatever the patterns, and nothing is connected to; the same upstream named
    plainly, where a pattern allows it, loads."""
    (tmp_path / "models").mkdir()
    with ScriptedUpstream() as elsewhere:
        port = elsewhere.url.rsplit(":", 1)[1]
        allowed = ["127.0.0.*:8001", "*.internal:8001", "*.*.*.*:8001", f"127.0.0.*:{port}"]
        with (
            ServerThread(tmp_path / "models", model_control_mode="explicit", allowed_upstreams=allowed) as s,
            tc.InferenceServerClient(s.address) as client,
        ):
            for url in (
                f"127.0.0.1%3A{port}?:8001",
                f"127.0.0.1%3a{port}#.internal:8001",
                f"localhost%3A{port}?.internal:8001",
                f"dns:localhost%3A{port}?x:8001",
            ):
                with pytest.raises(InferenceServerException) as info:
                    client.load_model("new", config=_override(url, **{"header.x-stolen": "1"}), files={"file:x": b""})
                assert info.value.status() == "StatusCode.INVALID_ARGUMENT", url
                message = info.value.message()
                assert message.startswith(
                    f"model 'new': parameter 'tensorgate.triton.url' of a config override names "
                    f"the upstream '{url}', which is not the one the repository's config.pbtxt "
                    "names, nor a plain address the server's --allowed-upstreams could allow"
                )
                assert "127.0.0.*" not in message
            assert elsewhere.script.described == 0
            client.load_model("new", config=_override(elsewhere.url), files={"file:x": b""})
            assert elsewhere.script.described == 1


def test_an_override_that_keeps_the_url_keeps_the_upstream_model(tmp_path: Path) -> None:
    """An override may keep its model's upstream url without --allowed-upstreams, but then not its upstream
    model: another model_name or model_version would front any model of the operator's upstream, with the
    headers and client certificate the model directory holds for it. Where --allowed-upstreams allows the url,
    the override names the model it likes."""
    root = tmp_path / "models"
    with ScriptedUpstream() as up:
        _remote(root, "r", up.url)  # model_name "m"
        with ServerThread(root, model_control_mode="explicit") as s, tc.InferenceServerClient(s.address) as client:
            for key, value in (("model_name", "admin"), ("model_version", "7")):
                with pytest.raises(InferenceServerException) as info:
                    client.load_model("r", config=_override(up.url, **{key: value}))
                assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
                assert info.value.message() == (
                    f"model 'r': parameter 'tensorgate.triton.{key}' of a config override is not the one the "
                    "repository's config.pbtxt gives with the same url: an override that keeps the model's upstream "
                    "keeps its upstream model, unless the server's --allowed-upstreams allows the url"
                )
            assert up.script.described == 0
            client.load_model("r", config=_override(up.url, **{"header.x-token": "t"}))  # the rest may change
        with ServerThread(root, model_control_mode="explicit", allowed_upstreams=[up.url]) as s:
            with tc.InferenceServerClient(s.address) as client:
                client.load_model("r", config=_override(up.url, model_name="other"))
                assert client.is_model_ready("r")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "ca\0.pem",
            "parameter 'tensorgate.triton.ca_file' of a config override must be a path inside the model directory "
            "(relative, without '..'), got 'ca\\x00.pem'",  # escaped in the status message, as every control character
            id="nul",
        ),
        pytest.param(
            "outside/ca.pem",
            "parameter 'tensorgate.triton.ca_file': a relative path must name a file inside the model directory (no "
            "'..', no link leading out of it), got 'outside/ca.pem'",
            id="link-leading-out",
        ),
    ],
)
def test_an_override_s_tls_file_must_stay_inside_the_model_directory(tmp_path: Path, text: str, message: str) -> None:
    """The TLS files of an override follow the repository's one rule for a file a config names (no NUL; links
    followed, still inside the model directory): a link in the model directory that leads elsewhere must not let a
    caller make the server read, or test for, a file there."""
    root = tmp_path / "models"
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "ca.pem").write_text("not for callers\n")
    with ScriptedUpstream() as up:
        _remote(root, "r", up.url)
        (root / "r" / "outside").symlink_to(tmp_path / "secrets")
        with ServerThread(root, model_control_mode="explicit") as s, tc.InferenceServerClient(s.address) as client:
            with pytest.raises(InferenceServerException) as info:
                client.load_model("r", config=_override(up.url, ca_file=text))
            assert message in info.value.message()
            assert "not for callers" not in info.value.message()
        assert up.script.described == 0


@pytest.mark.parametrize(
    ("url", "patterns", "allowed"),
    [
        pytest.param("triton-1.internal:8001", ["triton-*.internal:8001"], True, id="wildcard-host"),
        pytest.param("Triton-1.Internal:8001", ["triton-*.internal:8001"], True, id="host-case"),
        pytest.param("TRITON-1.INTERNAL:8001", ["Triton-*.Internal:8001"], True, id="pattern-case"),
        pytest.param("triton-1.internal:8002", ["triton-*.internal:8001"], False, id="other-port"),
        pytest.param("10.0.0.7:8001", ["10.0.0.*:*"], True, id="wildcard-port"),
        pytest.param("ipv4:10.0.0.1:8001,10.0.0.2:8001", ["10.0.0.*:8001"], True, id="every-address"),
        pytest.param("ipv4:10.0.0.1:8001,10.9.0.2:8001", ["10.0.0.*:8001"], False, id="one-address-not"),
        pytest.param("dns:triton:8001", ["triton:8001"], True, id="dns-scheme"),
        pytest.param("[fd00::1]:8001", ["[fd00::*]:8001"], True, id="ipv6"),
        pytest.param("[FD00:0:0::1]:8001", ["[fd00::1]:8001"], True, id="ipv6-spelt-otherwise"),
        pytest.param("ipv6:[fd00::1]:8001,[fd00::2]:8001", ["[fd00::*]:8001"], True, id="ipv6-list"),
        pytest.param("dns:[fd00::1]:8001", ["[fd00::*]:8001"], True, id="dns-ipv6"),
        pytest.param("[::ffff:10.0.0.7]:8001", ["10.0.0.*:8001"], True, id="ipv4-mapped-is-its-ipv4"),
        pytest.param("unix:8001", ["*:8001"], False, id="unix-socket-is-no-host"),
        pytest.param("unix:/run/docker.sock", ["*:*"], False, id="unix-path"),
        pytest.param("triton:8001", [], False, id="none-allowed"),
        # gRPC reads a url as a URI: %-decoded, `?query` and `#fragment` dropped, `//authority` a DNS server.
        pytest.param("127.0.0.1%3A41487?:8001", ["127.0.0.*:8001"], False, id="percent-and-query"),
        pytest.param("127.0.0.1%3A41487#.internal:8001", ["*.internal:8001"], False, id="percent-and-fragment"),
        pytest.param("dns:localhost%3A41487?x:8001", ["*:8001"], False, id="dns-percent"),
        pytest.param("dns://203.0.113.9/triton-a.internal:8001", ["*.internal:8001"], False, id="dns-authority"),
        pytest.param("dns:///triton-a.internal:8001", ["*.internal:8001"], False, id="dns-empty-authority"),
        pytest.param("evil@triton-a.internal:8001", ["*triton-a.internal:8001"], False, id="userinfo"),
        pytest.param("triton-a .internal:8001", ["triton-*.internal:8001"], False, id="space"),
        pytest.param("DNS:triton-a.internal:8001", ["*.internal:8001"], False, id="upper-case-scheme"),
        pytest.param("ipv4:triton-a.internal:8001", ["*.internal:8001"], False, id="ipv4-scheme-with-a-name"),
        # `*` stands within one label, and an IP pattern matches IP addresses only.
        pytest.param("10.0.0.1.evil.example:443", ["10.0.0.*:*"], False, id="ip-pattern-and-a-name"),
        pytest.param("triton-a.evil.internal:8001", ["triton-*.internal:8001"], False, id="star-across-a-dot"),
        pytest.param("a.b.internal:8001", ["*.internal:8001"], False, id="star-across-labels"),
        pytest.param("triton-a.internal.:8001", ["triton-*.internal:8001"], False, id="trailing-dot"),
        pytest.param("localhost:8001", ["127.0.0.*:8001"], False, id="localhost-is-no-ip"),
        pytest.param("127.0.0.1:8001", ["localhost:8001"], False, id="ip-is-no-localhost"),
        pytest.param("[::ffff:127.0.0.1]:8001", ["[::ffff:*]:8001"], False, id="ipv4-mapped-is-no-ipv6"),
        pytest.param("2130706433:8001", ["*:8001"], False, id="decimal-ip"),
        pytest.param("0177.0.0.1:8001", ["*.0.0.1:8001"], False, id="octal-ip"),
        pytest.param("127.1:8001", ["127.*:8001"], False, id="short-ip"),
        pytest.param("0x7f000001:8001", ["*:8001"], False, id="hex-ip"),
        pytest.param("\uff11\uff12\uff17.0.0.1:8001", ["*.0.0.1:8001"], False, id="unicode-digits"),
        pytest.param("triton-a\u3002internal:8001", ["triton-*:8001"], False, id="unicode-dot"),
        pytest.param("\u212a.internal:8001", ["k.internal:8001"], False, id="kelvin-sign-is-no-k"),
        pytest.param("triton-a.internal:\uff18\uff10\uff10\uff11", ["triton-*.internal:*"], False, id="unicode-port"),
        pytest.param("triton-a.internal:70000", ["triton-*.internal:*"], False, id="port-out-of-range"),
        pytest.param("triton-a.internal:08001", ["triton-*.internal:*"], False, id="port-leading-zero"),
        pytest.param("[fe80::1%25eth0]:8001", ["[fe80::*]:8001"], False, id="ipv6-zone"),
    ],
)
def test_which_upstream_urls_the_patterns_allow(url: str, patterns: list[str], allowed: bool) -> None:
    assert upstream_allowed(url, patterns) is allowed


def test_allowed_upstreams_come_from_the_command_line_as_host_port_patterns(tmp_path: Path) -> None:
    args = build_parser().parse_args(["serve", "--allowed-upstreams", "triton-*.internal:8001, 10.0.0.*:*"])
    assert args.allowed_upstreams == ["triton-*.internal:8001", "10.0.0.*:*"]
    assert build_parser().parse_args(["serve"]).allowed_upstreams == []
    with pytest.raises(ValueError, match="allowed_upstreams takes host:port patterns, got 'triton'"):
        ServerSettings(model_repository=tmp_path, allowed_upstreams=["triton"])
    # `*` stands within one part of a host: patterns that would match nothing, or only one-label names, silently.
    for pattern, words in (("10.*:*", "an IPv4 pattern: write its four parts"), ("*:8001", "names no host")):
        with pytest.raises(ValueError, match=words):
            ServerSettings(model_repository=tmp_path, allowed_upstreams=[pattern])
    assert ServerSettings(model_repository=tmp_path, allowed_upstreams=["10.*.*.*:8001", "*.internal:*"])


def test_a_cached_remote_model_keys_its_answers_by_the_parameters_it_sends_upstream(tmp_path: Path) -> None:
    """The upstream reads the request's parameters (an LLM's temperature), so two requests with the same tensors
    and other parameters have different answers: the response cache, which left parameters out of its key as
    Triton's does, answered the second from the first. The server's own (`priority`) still share an entry, and so
    does a request sent again; an ensemble with a remote step keys its cache the same way."""
    root = tmp_path / "models"
    with ScriptedUpstream() as up:
        _remote(root, "r", up.url, 'name: "r" max_batch_size: 8', "response_cache { enable: true }")
        _remote(root, "plain", up.url, 'name: "plain" max_batch_size: 8')
        write_config(
            root,
            "e",
            'name: "e" platform: "ensemble" max_batch_size: 8 response_cache { enable: true }\n'
            'input { name: "X" data_type: TYPE_FP32 dims: [2] }\noutput { name: "Y" data_type: TYPE_FP32 dims: [2] }\n'
            'ensemble_scheduling { step { model_name: "plain" model_version: -1 input_map { key: "X" value: "X" } '
            'output_map { key: "Y" value: "Y" } } }',
        )
        (root / "e" / "1").mkdir()
        with ServerThread(root, response_cache_bytes=1 << 20) as s, tc.InferenceServerClient(s.address) as client:
            for model in ("r", "e"):
                before = up.script.calls
                for parameters, priority in (
                    ({"temperature": 0.5}, 0),
                    ({"temperature": 0.5}, 0),  # the same again: from the cache
                    ({"temperature": 0.5}, 1),  # the server's own parameter (priority): the same answer
                    ({"temperature": 0.9}, 0),
                    ({"temperature": "0.9"}, 0),  # another type, another value upstream
                    ({}, 0),
                ):
                    client.infer(model, _x(), parameters=parameters, priority=priority)
                assert up.script.calls - before == 4, model
                (r,) = [m for m in client.get_inference_statistics(model).model_stats if m.name == model]
                assert (r.inference_stats.cache_hit.count, r.inference_stats.cache_miss.count) == (2, 4), model
