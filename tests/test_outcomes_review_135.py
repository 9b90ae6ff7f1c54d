"""Review 135: each way a request ends, as an operator sees it four times over: the status the client got, the
access line (logger tensorgate.access at DEBUG), the server span at a real OTLP receiver and /metrics. Requests
that ended before their handler ran, or before their stream message ran, and stream messages cut by their
deadline read differently in one of the four; these tests hold them to one story."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import queue
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from opentelemetry.proto.trace.v1 import trace_pb2

from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tests.onnx_models import accumulator_config, accumulator_model, identity_model, paced_model, write_config
from tests.scraping import metrics_url, scrape
from tests.serving import ServerThread
from tests.test_poll import wait_for
from tests.test_tracing import Collector, attrs, receiving

TOKEN = "review-135-token"
POLICY = {
    "rules": [{"identities": "alice", "apis": ["inference", "health"], "models": ["ident", "paced", "acc"]}],
    "tokens": [{"sha256": hashlib.sha256(TOKEN.encode()).hexdigest(), "identity": "alice"}],
}
ALICE = (("authorization", f"Bearer {TOKEN}"),)
MS_PER_UNIT = 10
"""paced's run time per unit of its input, about, on an idle core (slower on a loaded one: the tests only need a
request to outlast a shorter deadline, or a second message to arrive while the first runs)."""


def paced(value: float, request_id: str) -> pb.ModelInferRequest:
    x = np.full((1, 1), value, np.float32)
    request = pb.ModelInferRequest(model_name="paced", id=request_id)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def ident(request_id: str) -> pb.ModelInferRequest:
    x = np.ones((1, 4), np.float32)
    request = pb.ModelInferRequest(model_name="ident", id=request_id)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    with receiving() as received:
        yield received


@dataclass
class Observed:
    server: ServerThread
    receiver: Collector
    stopped: bool = False

    def stop(self) -> None:
        """Stop the server once: stop() flushes its spans, which are all at the receiver after this."""
        if not self.stopped:
            self.stopped = True
            self.server.__exit__(None, None, None)


@pytest.fixture
def observed(tmp_path: Path, collector: tuple[Collector, int], caplog: pytest.LogCaptureFixture) -> Iterator[Observed]:
    """A server under a token policy (alice), one call in flight per identity, tracing to the receiver and access
    lines on. The spans are all at the receiver once the server stopped (stop() flushes them): read them after."""
    repo = tmp_path / "models"
    identity_model(repo / "ident" / "1" / "model.onnx", "FP32")
    paced_model(repo / "paced" / "1" / "model.onnx")
    write_config(repo, "paced", "max_batch_size: 8\n")
    accumulator_model(repo / "acc" / "1" / "model.onnx")
    write_config(repo, "acc", accumulator_config("acc"))
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    caplog.set_level(logging.DEBUG, logger="tensorgate.access")
    receiver, port = collector
    settings = {"otlp_endpoint": f"127.0.0.1:{port}", "otlp_insecure": True, "shutdown_grace_s": 10.0}
    server = ServerThread(repo, auth_policy=policy, max_in_flight_per_identity=1, **settings).__enter__()
    observed = Observed(server, receiver)
    try:
        yield observed
    finally:
        observed.stop()


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage().split(" latency_ms=")[0] for r in caplog.records if r.name == "tensorgate.access"]


def spans_named(receiver: Collector, name: str) -> list[trace_pb2.Span]:
    return [s for s in receiver.spans() if s.name == name]


def by_request_id(spans: list[trace_pb2.Span], request_id: str) -> trace_pb2.Span:
    (span,) = [s for s in spans if attrs(s).get("tensorgate.request.id") == request_id]
    return span


def counted(server: ServerThread, name: str, **labels: str) -> float:
    return scrape(metrics_url(server)).get((name, frozenset(labels.items())), 0.0)


def acc(step: str) -> pb.ModelInferRequest:
    """A request of sequence 41 of the accumulator: `step` start or end."""
    x = np.ones((1, 1), np.float32)
    request = pb.ModelInferRequest(model_name="acc", id=step)
    request.inputs.add(name="INPUT", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    request.parameters["sequence_id"].int64_param = 41
    request.parameters[f"sequence_{step}"].bool_param = True
    return request


MESSAGE_SPAN = "ModelStreamInfer request"
INFER_SPAN = "inference.GRPCInferenceService/ModelInfer"


def test_a_stream_message_cut_by_its_deadline_is_deadline_exceeded_in_its_line_and_span(
    observed: Observed, caplog: pytest.LogCaptureFixture
) -> None:
    """The caller saw DEADLINE_EXCEEDED and /metrics counted it so, but the message's access line and span said
    CANCELLED: they were written with that code fixed for any message whose stream ended under it."""
    server, receiver = observed.server, observed.receiver
    with grpc.insecure_channel(server.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        # 150 units: about 1.5 s of compute, three times the deadline (more on a loaded machine).
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ModelStreamInfer(iter([paced(150.0, "late")]), metadata=ALICE, timeout=0.5))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        labels = {"model": "paced", "version": "1", "code": "DEADLINE_EXCEEDED"}
        wait_for("the message counted", lambda: counted(server, "tensorgate_inference_requests_total", **labels) == 1)
        wait_for("its access line", lambda: any("id=late" in line for line in access_lines(caplog)))
        assert counted(server, "tensorgate_inference_requests_total", **{**labels, "code": "CANCELLED"}) == 0
    lines = [line for line in access_lines(caplog) if "id=late" in line]
    assert lines == ["ModelStreamInfer model=paced version=1 id=late status=DEADLINE_EXCEEDED"]
    observed.stop()
    span = by_request_id(spans_named(receiver, MESSAGE_SPAN), "late")
    assert attrs(span)["rpc.response.status_code"] == "DEADLINE_EXCEEDED"
    assert attrs(span)["rpc.grpc.status_code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert span.status.code == trace_pb2.Status.STATUS_CODE_ERROR  # a server error, as the stream's own span says
    (stream,) = spans_named(receiver, "inference.GRPCInferenceService/ModelStreamInfer")
    assert attrs(stream)["rpc.response.status_code"] == "DEADLINE_EXCEEDED"


def test_stream_messages_refused_before_they_ran_have_their_access_line_and_span(
    observed: Observed, caplog: pytest.LogCaptureFixture
) -> None:
    """A message that did not parse and one past the in-flight cap got their error on the stream (and the second a
    denial in /metrics) but no access line and no span, where a ModelInfer call refused alike has both."""
    server, receiver = observed.server, observed.receiver
    with grpc.insecure_channel(server.address) as channel:
        raw: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer"
        )
        [answer] = [pb.ModelStreamInferResponse.FromString(b) for b in raw(iter([b"\xff\xff\xff"]), metadata=ALICE)]
        assert answer.error_message.endswith("(it does not parse)")
        stub = GRPCInferenceServiceStub(channel)
        # The first runs about 0.5 s; the second is read while it runs: one past alice's one call in flight.
        replies = list(stub.ModelStreamInfer(iter([paced(50.0, "first"), ident("second")]), metadata=ALICE, timeout=60))
        assert [r.error_message for r in replies] == [
            "",
            "identity 'alice' already has 1 call(s) in flight, the most allowed per identity",
        ]
        denials = {"identity": "alice", "reason": "in_flight_limit", "rpc": ""}
        assert counted(server, "tensorgate_auth_denials_total", **denials) == 1
        # A denial, not a request: /metrics counts it once, in the denials.
        for code in ("RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"):
            labels = {"model": "ident", "version": "1", "code": code}
            assert counted(server, "tensorgate_inference_requests_total", **labels) == 0
    lines = access_lines(caplog)
    assert "ModelStreamInfer model=- version=- id=- status=INVALID_ARGUMENT" in lines, lines
    assert "ModelStreamInfer model=ident version=- id=second status=RESOURCE_EXHAUSTED" in lines, lines
    assert "ModelStreamInfer model=paced version=1 id=first status=OK" in lines, lines
    observed.stop()
    messages = spans_named(receiver, MESSAGE_SPAN)
    (malformed,) = [s for s in messages if attrs(s).get("error.type") == "MalformedRequestError"]
    assert attrs(malformed)["rpc.response.status_code"] == "INVALID_ARGUMENT"
    assert malformed.status.code == trace_pb2.Status.STATUS_CODE_UNSET  # the caller's mistake
    second = attrs(by_request_id(messages, "second"))
    assert (second["rpc.response.status_code"], second["error.type"]) == (
        "RESOURCE_EXHAUSTED",
        "ResourceExhaustedError",
    )
    assert second["tensorgate.model.name"] == "ident"


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [pytest.param((), "missing_token", id="no-token"), pytest.param((("authorization", "Bearer x"),), "invalid_token")],
)
def test_a_call_refused_unread_for_its_token_has_its_span(
    observed: Observed, caplog: pytest.LogCaptureFixture, metadata: tuple, reason: str
) -> None:
    """A unary call without a valid token is refused before its message is read (rpc/token_gate.py): it kept its
    access line and its denial, but lost its span, which the RPC boundary gives every refused call."""
    server, receiver = observed.server, observed.receiver
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            GRPCInferenceServiceStub(channel).ModelInfer(ident("anonymous"), metadata=metadata, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        labels = {"identity": "anonymous", "reason": reason, "rpc": ""}
        assert counted(server, "tensorgate_auth_denials_total", **labels) == 1
    assert access_lines(caplog) == ["ModelInfer model=- version=- id=- status=UNAUTHENTICATED"]
    observed.stop()
    (span,) = spans_named(receiver, INFER_SPAN)
    a = attrs(span)
    assert (a["rpc.response.status_code"], a["error.type"]) == ("UNAUTHENTICATED", "UnauthenticatedError")
    assert "tensorgate.request.id" not in a  # the message was never read
    assert span.status.code == trace_pb2.Status.STATUS_CODE_UNSET


def test_a_call_refused_by_the_drain_has_its_span(observed: Observed, caplog: pytest.LogCaptureFixture) -> None:
    """A call that arrives while the server drains gets UNAVAILABLE and an access line, and had no span: the
    refusal came before the RPC boundary started one. It is a server error (the caller retries elsewhere)."""
    server, receiver = observed.server, observed.receiver
    with grpc.insecure_channel(server.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        # About 2 s of compute keeps the drain open (the grace, 10 s, bounds it on a slow machine).
        parked = stub.ModelInfer.future(paced(200.0, "parked"), metadata=ALICE, timeout=60)
        gate = server.app._gate
        assert gate is not None
        wait_for("the parked call to run", lambda: gate.in_flight > 0)
        stopping = asyncio.run_coroutine_threadsafe(server.app.stop(), server._loop)
        wait_for("the drain", lambda: gate.draining)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(ident("drained"), metadata=ALICE, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert parked.result(timeout=60).id == "parked"
        stopping.result(timeout=30)
    assert "ModelInfer model=ident version=- id=drained status=UNAVAILABLE" in access_lines(caplog)
    observed.stop()
    span = by_request_id(spans_named(receiver, INFER_SPAN), "drained")
    a = attrs(span)
    assert (a["rpc.response.status_code"], a["error.type"]) == ("UNAVAILABLE", "ServerUnavailableError")
    assert a["tensorgate.model.name"] == "ident"
    assert span.status.code == trace_pb2.Status.STATUS_CODE_ERROR


def test_a_stream_message_refused_by_the_drain_has_its_span(
    observed: Observed, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream in the middle of a sequence stays open through a drain for that sequence's next requests; another
    request on it is refused UNAVAILABLE in its turn. It had its access line and no span."""
    server, receiver = observed.server, observed.receiver
    gate = server.app._gate
    assert gate is not None
    sent: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
    with grpc.insecure_channel(server.address) as channel:
        stream = GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(sent.get, None), metadata=ALICE, timeout=60)
        sent.put(acc("start"))
        assert next(stream).error_message == ""
        stopping = asyncio.run_coroutine_threadsafe(server.app.stop(), server._loop)
        wait_for("the drain", lambda: gate.draining)
        sent.put(ident("refused"))
        assert next(stream).error_message.startswith("the server is shutting down")
        sent.put(acc("end"))
        assert next(stream).error_message == ""
        sent.put(None)
        assert list(stream) == []  # the caller ended it, its sequence over
        stopping.result(timeout=30)
    assert "ModelStreamInfer model=ident version=- id=refused status=UNAVAILABLE" in access_lines(caplog)
    observed.stop()
    span = by_request_id(spans_named(receiver, MESSAGE_SPAN), "refused")
    a = attrs(span)
    assert (a["rpc.response.status_code"], a["error.type"]) == ("UNAVAILABLE", "ServerUnavailableError")
    assert span.status.code == trace_pb2.Status.STATUS_CODE_ERROR
