"""Traces as an operator's collector receives them: a real OTLP receiver (gRPC and HTTP) on loopback, a real
server exporting to it, callers that send W3C trace context from tritonclient, our client and raw stubs."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import struct
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from tritonclient.utils import InferenceServerException

from tensorgate.client import AsyncInferenceClient, InferenceClient
from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.server.telemetry.logs import GRPC_CORE_LOGGER, configure_logging
from tests.onnx_models import identity_model, paced_model, write_config
from tests.otlp_sinks import grpc_sink, http_sink
from tests.pki import Pki, identity_request, secure_channel
from tests.process import ServeProcess
from tests.scraping import metrics_url, scrape, value
from tests.serving import ServerThread
from tests.test_ensemble import ensemble_repository
from tests.test_infer import triton_inputs

SECRET = 1234.5678  # an input value that must never show up in an export
BATCHED = """name: "batched"
max_batch_size: 8
dynamic_batching { preferred_batch_size: [4] max_queue_delay_microseconds: 2000000 }
"""


@dataclass
class Caller:
    """A span of some service calling tensorgate, as its W3C header carries it."""

    trace_id: str
    span_id: str
    sampled: bool = True

    @classmethod
    def new(cls, sampled: bool = True) -> Caller:
        return cls(secrets.token_hex(16), secrets.token_hex(8), sampled)

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


class Collector(otlp_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver keeping every export request (and its raw bytes)."""

    def __init__(self) -> None:
        self.requests: list[otlp.ExportTraceServiceRequest] = []
        self.raw = bytearray()
        self.metadata: list[dict[str, str]] = []
        self._lock = threading.Lock()

    def Export(  # noqa: N802 - the generated servicer's name
        self, request: otlp.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> otlp.ExportTraceServiceResponse:
        self.keep(request, {k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        return otlp.ExportTraceServiceResponse()

    def keep(self, request: otlp.ExportTraceServiceRequest, metadata: dict[str, str]) -> None:
        with self._lock:
            self.requests.append(request)
            self.raw += request.SerializeToString()
            self.metadata.append(metadata)

    def spans(self) -> list[trace_pb2.Span]:
        with self._lock:
            return [s for r in self.requests for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]

    def resource(self) -> dict[str, str]:
        with self._lock:
            attrs = self.requests[0].resource_spans[0].resource.attributes
        return {a.key: a.value.string_value for a in attrs}


@contextlib.contextmanager
def receiving() -> Iterator[tuple[Collector, int]]:
    """A Collector served over OTLP/gRPC on a loopback port, and the port."""
    receiver = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    otlp_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield receiver, port
    finally:
        server.stop(0)


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    with receiving() as received:
        yield received


def attrs(span: trace_pb2.Span) -> dict[str, object]:
    out: dict[str, object] = {}
    for a in span.attributes:
        kind = a.value.WhichOneof("value")
        out[a.key] = getattr(a.value, kind) if kind else None
    return out


def hexid(raw: bytes) -> str:
    return raw.hex()


def server_spans(c: Collector, method: str) -> list[trace_pb2.Span]:
    return [s for s in c.spans() if s.name == f"inference.GRPCInferenceService/{method}"]


def children(c: Collector, parent: trace_pb2.Span) -> dict[str, trace_pb2.Span]:
    return {s.name: s for s in c.spans() if s.parent_span_id == parent.span_id and s.trace_id == parent.trace_id}


def traced(repo: Path, port: int, **settings: object) -> ServerThread:
    return ServerThread(repo, otlp_endpoint=f"127.0.0.1:{port}", otlp_insecure=True, **settings)


def secret_request(model: str = "identity_fp32") -> pb.ModelInferRequest:
    request = identity_request(model)
    request.raw_input_contents[0] = np.full((1, 4), SECRET, dtype=np.float32).tobytes()
    request.id = "req-42"
    return request


def test_caller_context_from_tritonclient_is_the_parent_of_the_server_span(
    repo: Path, collector: tuple[Collector, int]
) -> None:
    c, port = collector
    caller = Caller.new()
    with traced(repo, port) as server:
        client = triton.InferenceServerClient(server.address)
        x = np.full((1, 4), SECRET, dtype=np.float32)
        inp = triton.InferInput("INPUT0", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("identity_fp32", [inp], request_id="req-42", headers={"traceparent": caller.traceparent})
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)
        client.close()
    # stop() flushed the batch processor: every span is at the collector now.
    (span,) = server_spans(c, "ModelInfer")
    assert hexid(span.trace_id) == caller.trace_id
    assert hexid(span.parent_span_id) == caller.span_id
    assert span.kind == trace_pb2.Span.SPAN_KIND_SERVER
    a = attrs(span)
    assert a["rpc.system"] == "grpc"
    assert a["rpc.service"] == "inference.GRPCInferenceService"
    assert a["rpc.method"] == "ModelInfer"
    assert a["rpc.response.status_code"] == "OK"
    assert a["rpc.grpc.status_code"] == 0  # an int, as the RPC conventions define it
    assert a["tensorgate.model.name"] == "identity_fp32"
    assert a["tensorgate.model.version"] == "1"
    assert a["tensorgate.request.id"] == "req-42"
    assert a["tensorgate.batch.size"] == 1
    assert a["tensorgate.execution_provider"] == "CPUExecutionProvider"
    kids = children(c, span)
    assert set(kids) >= {"validate", "queue", "execute", "batch identity_fp32"}
    # The steps happen in order, inside the server span.
    assert span.start_time_unix_nano <= kids["validate"].start_time_unix_nano
    assert kids["queue"].end_time_unix_nano <= kids["execute"].end_time_unix_nano <= span.end_time_unix_nano
    assert attrs(kids["execute"])["tensorgate.batch.size"] == 1
    resource = c.resource()
    assert resource["service.name"] == "tensorgate"
    assert resource["service.version"]
    assert resource["host.name"]
    assert struct.pack("<f", SECRET) not in c.raw
    assert str(SECRET).encode() not in c.raw


def test_our_client_propagates_the_current_span(repo: Path, collector: tuple[Collector, int]) -> None:
    """An application with its own TracerProvider: our client sends its current span as traceparent."""
    c, port = collector
    app_provider = TracerProvider()
    caller = app_provider.get_tracer("backend").start_span("checkout")
    ctx = caller.get_span_context()
    with traced(repo, port) as server, InferenceClient(server.address) as client:
        token = trace.set_span_in_context(caller)
        from opentelemetry import context as otel_context

        attached = otel_context.attach(token)
        try:
            client.infer("identity_fp32", {"INPUT0": np.ones((1, 4), np.float32)})
        finally:
            otel_context.detach(attached)
        client.infer("identity_fp32", {"INPUT0": np.ones((1, 4), np.float32)})  # outside the span: a new trace
    caller.end()
    first, second = sorted(server_spans(c, "ModelInfer"), key=lambda s: s.start_time_unix_nano)
    assert int.from_bytes(first.trace_id, "big") == ctx.trace_id
    assert int.from_bytes(first.parent_span_id, "big") == ctx.span_id
    assert int.from_bytes(second.trace_id, "big") != ctx.trace_id
    assert second.parent_span_id == b""


def test_batch_span_links_every_request_it_served(tmp_path: Path, collector: tuple[Collector, int]) -> None:
    c, port = collector
    repo = tmp_path / "models"
    identity_model(repo / "batched" / "1" / "model.onnx", "FP32")
    write_config(repo, "batched", BATCHED)
    callers = [Caller.new() for _ in range(4)]
    with traced(repo, port) as server:
        channel = grpc.insecure_channel(server.address)
        stub = GRPCInferenceServiceStub(channel)
        calls = [
            stub.ModelInfer.future(
                secret_request("batched"), metadata=[("traceparent", caller.traceparent)], timeout=30
            )
            for caller in callers
        ]
        for call in calls:
            call.result()
        channel.close()
    requests = {hexid(s.trace_id): s for s in server_spans(c, "ModelInfer")}
    assert set(requests) == {caller.trace_id for caller in callers}
    (batch,) = [s for s in c.spans() if s.name == "batch batched"]
    linked = {(hexid(link.trace_id), hexid(link.span_id)) for link in batch.links}
    assert linked == {(hexid(s.trace_id), hexid(s.span_id)) for s in requests.values()}
    a = attrs(batch)
    assert a["tensorgate.batch.size"] == 4
    assert a["tensorgate.batch.requests"] == 4
    # A child of one of the requests it served, so that its trace shows the execution itself.
    assert hexid(batch.trace_id) in requests
    for span in requests.values():
        assert attrs(span)["tensorgate.batch.size"] == 4
        kids = children(c, span)
        assert {"validate", "queue", "execute"} <= set(kids)
        (link,) = kids["execute"].links
        assert link.span_id == batch.span_id


def test_errors_set_status_without_the_message(repo: Path, collector: tuple[Collector, int]) -> None:
    c, port = collector
    caller = Caller.new()
    with traced(repo, port) as server:
        channel = grpc.insecure_channel(server.address)
        stub = GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as missing:
            stub.ModelInfer(secret_request("no_such_model"), metadata=[("traceparent", caller.traceparent)])
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        bad = secret_request()
        bad.inputs[0].name = "NOT_AN_INPUT"
        with pytest.raises(grpc.RpcError) as invalid:
            stub.ModelInfer(bad)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        channel.close()
    spans = {hexid(s.trace_id) == caller.trace_id: s for s in server_spans(c, "ModelInfer")}
    for span, code in ((spans[True], "NOT_FOUND"), (spans[False], "INVALID_ARGUMENT")):
        # The caller's mistakes: recorded, but the server span's status stays unset (OpenTelemetry's RPC rules).
        assert span.status.code == trace_pb2.Status.STATUS_CODE_UNSET
        assert attrs(span)["rpc.response.status_code"] == code
        assert attrs(span)["rpc.grpc.status_code"] == {"NOT_FOUND": 5, "INVALID_ARGUMENT": 3}[code]
        assert attrs(span)["error.type"] in ("ModelNotFoundError", "InvalidRequestError")
    # A call that fails before validation still names what it asked for.
    assert attrs(spans[True])["tensorgate.model.name"] == "no_such_model"
    assert attrs(spans[True])["tensorgate.request.id"] == "req-42"
    (validate,) = [s for s in c.spans() if s.name == "validate"]
    # Validation refused the caller's request: its span says why by type, with its status unset as the server
    # span's (an ERROR here would mark every trace of a bad request failed in Jaeger or Tempo).
    assert validate.status.code == trace_pb2.Status.STATUS_CODE_UNSET
    assert attrs(validate)["error.type"] == "InvalidRequestError"
    # Names appear as attributes; the error texts sent to the callers appear nowhere.
    for details in (missing.value.details(), invalid.value.details()):
        assert details and details.encode() not in c.raw


def test_server_errors_mark_the_span_failed() -> None:
    """Only the codes that mean the server failed set the span status to ERROR, with the code as description."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    from tensorgate.server.telemetry.tracing import Tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    for code in ("INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "NOT_FOUND", "RESOURCE_EXHAUSTED", "OK"):
        span, token = tracing.start_rpc("ModelInfer", [])
        Tracing.end_rpc(span, token, code, None if code == "OK" else RuntimeError("secret detail"))
    got = {s.attributes["rpc.response.status_code"]: s for s in exporter.get_finished_spans()}  # type: ignore[index]
    for code in ("INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED"):
        assert got[code].status.status_code == StatusCode.ERROR
        assert got[code].status.description == code
        assert got[code].attributes["error.type"] == "RuntimeError"  # type: ignore[index]
    for code in ("NOT_FOUND", "RESOURCE_EXHAUSTED", "OK"):
        assert got[code].status.status_code == StatusCode.UNSET
    assert "secret" not in repr([s.to_json() for s in exporter.get_finished_spans()])


def _paced_request(model: str, units: float) -> pb.ModelInferRequest:
    """A request that keeps a paced model (tests/onnx_models.py) busy in proportion to `units` (200: seconds)."""
    x = np.full((1, 1), units, dtype=np.float32)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    return request


def test_a_deadline_passed_while_the_model_runs_is_deadline_exceeded(
    tmp_path: Path, collector: tuple[Collector, int], caplog: pytest.LogCaptureFixture
) -> None:
    """gRPC cancels the handler of a call whose deadline passes as it cancels one whose caller went away. The
    caller of the first saw DEADLINE_EXCEEDED, a server error: its span fails and its access line says so (they
    said CANCELLED, which no alert watches). A call its caller cancels stays CANCELLED, its span status unset."""
    c, port = collector
    root = tmp_path / "models"
    for name in ("paced_unary", "paced_stream", "paced_cancel"):  # one each: no call waits behind another's run
        paced_model(root / name / "1" / "model.onnx")
    caplog.set_level(logging.DEBUG, logger="tensorgate.access")
    with traced(root, port) as server:
        channel = grpc.insecure_channel(server.address)
        stub = GRPCInferenceServiceStub(channel)
        # Seconds of model time against a 0.5 s deadline: validated and running well before the deadline.
        with pytest.raises(grpc.RpcError) as unary:
            stub.ModelInfer(_paced_request("paced_unary", 200), timeout=0.5)
        with pytest.raises(grpc.RpcError) as streamed:
            list(stub.ModelStreamInfer(iter([_paced_request("paced_stream", 200)]), timeout=0.5))
        cancelled = stub.ModelInfer.future(_paced_request("paced_cancel", 200), timeout=30)
        time.sleep(0.5)
        cancelled.cancel()
        time.sleep(0.5)  # the server sees the cancellation before it stops
        channel.close()
    assert unary.value.code() == streamed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    by_model = {attrs(s).get("tensorgate.model.name"): s for s in server_spans(c, "ModelInfer")}
    (stream,) = server_spans(c, "ModelStreamInfer")
    for span in (by_model["paced_unary"], stream):
        assert attrs(span)["rpc.response.status_code"] == "DEADLINE_EXCEEDED"
        assert span.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert attrs(by_model["paced_cancel"])["rpc.response.status_code"] == "CANCELLED"
    assert by_model["paced_cancel"].status.code == trace_pb2.Status.STATUS_CODE_UNSET
    access = [r.getMessage() for r in caplog.records if r.name == "tensorgate.access"]
    for start, code in (
        # The version the request was sent to, though it named none and never got an answer (it said `-`).
        ("ModelInfer model=paced_unary version=1 ", "DEADLINE_EXCEEDED"),
        ("ModelStreamInfer model=- ", "DEADLINE_EXCEEDED"),
        ("ModelInfer model=paced_cancel version=1 ", "CANCELLED"),
    ):
        assert [f"status={code} " in line for line in access if line.startswith(start)] == [True], access


def test_sampling_is_parent_based(repo: Path, collector: tuple[Collector, int]) -> None:
    """Rate 0 keeps no new trace, but a sampled caller is always traced and an unsampled one never is."""
    c, port = collector
    sampled, unsampled = Caller.new(), Caller.new(sampled=False)
    with traced(repo, port, trace_sample_rate=0.0) as server:
        channel = grpc.insecure_channel(server.address)
        stub = GRPCInferenceServiceStub(channel)
        stub.ModelInfer(identity_request(), metadata=[("traceparent", sampled.traceparent)])
        stub.ModelInfer(identity_request(), metadata=[("traceparent", unsampled.traceparent)])
        stub.ModelInfer(identity_request())
        # A stream sampled out answers each request as usual and records nothing either.
        replies = list(
            stub.ModelStreamInfer(iter([identity_request()] * 2), metadata=[("traceparent", unsampled.traceparent)])
        )
        assert [r.error_message for r in replies] == ["", ""]
        assert all(r.infer_response.raw_output_contents for r in replies)
        channel.close()
    assert {hexid(s.trace_id) for s in c.spans()} == {sampled.trace_id}


UNDER, OVER = 1, (1 << 64) - 1
"""Low 64 bits of a trace id, under and over the bound of any ratio between 0 and 1 (TraceIdRatioBased's test)."""
CALLERS = {
    "sampled-under": Caller(secrets.token_hex(8) + format(UNDER, "016x"), secrets.token_hex(8)),
    "unsampled-under": Caller(secrets.token_hex(8) + format(UNDER, "016x"), secrets.token_hex(8), sampled=False),
    "sampled-over": Caller(secrets.token_hex(8) + format(OVER, "016x"), secrets.token_hex(8)),
    "unsampled-over": Caller(secrets.token_hex(8) + format(OVER, "016x"), secrets.token_hex(8), sampled=False),
}
PARENT_BASED = {"sampled-under", "sampled-over", "new"}


@pytest.mark.parametrize(
    ("env", "flag", "expected", "new_decided"),
    [
        pytest.param({}, None, PARENT_BASED, True, id="unset"),
        pytest.param({"OTEL_TRACES_SAMPLER": "always_on"}, None, {*CALLERS, "new"}, True, id="always_on"),
        pytest.param({"OTEL_TRACES_SAMPLER": "always_off"}, None, set(), True, id="always_off"),
        pytest.param(
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"},
            None,
            {"sampled-under", "unsampled-under"},  # the trace id decides, whatever the caller sampled
            False,
            id="traceidratio",
        ),
        pytest.param({"OTEL_TRACES_SAMPLER": "parentbased_always_on"}, None, PARENT_BASED, True, id="pb-always_on"),
        pytest.param(
            {"OTEL_TRACES_SAMPLER": "parentbased_always_off"},
            None,
            {"sampled-under", "sampled-over"},
            True,
            id="pb-always_off",
        ),
        pytest.param(
            {"OTEL_TRACES_SAMPLER": "PARENTBASED_TRACEIDRATIO", "OTEL_TRACES_SAMPLER_ARG": "0"},
            None,
            {"sampled-under", "sampled-over"},
            True,
            id="pb-traceidratio",
        ),
        pytest.param({"OTEL_TRACES_SAMPLER_ARG": "0"}, None, {"sampled-under", "sampled-over"}, True, id="arg-alone"),
        pytest.param({"OTEL_TRACES_SAMPLER": "always_off"}, 1.0, PARENT_BASED, True, id="flag-wins"),
        pytest.param({"OTEL_TRACES_SAMPLER": "bogus_sampler"}, None, PARENT_BASED, True, id="unknown"),
    ],
)
def test_otel_traces_sampler_chooses_the_sampler(
    repo: Path,
    collector: tuple[Collector, int],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    env: dict[str, str],
    flag: float | None,
    expected: set[str],
    new_decided: bool,
) -> None:
    """OpenTelemetry's OTEL_TRACES_SAMPLER (and its _ARG for the ratio samplers) as the SDK reads it: the
    parent-based ones follow a caller's decision, the others decide by trace id whoever calls; --trace-sample-rate
    wins over both (parent-based at its rate). An unknown sampler is logged once and sampled as when unset. (Only
    OTEL_TRACES_SAMPLER_ARG was read, as the ratio of a parent-based sampler, whatever the sampler named.)"""
    c, port = collector
    for name in ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"):
        monkeypatch.delenv(name, raising=False)
    for name, setting in env.items():
        monkeypatch.setenv(name, setting)
    with traced(repo, port, trace_sample_rate=flag) as server:
        client = triton.InferenceServerClient(server.address)
        try:
            for request_id, caller in CALLERS.items():
                _infer_as(client, request_id, caller)
            _infer_as(client, "new")
        finally:
            client.close()
    kept = {attrs(s)["tensorgate.request.id"] for s in server_spans(c, "ModelInfer")}
    if not new_decided:  # a new trace's id is random: kept or not, by chance
        kept.discard("new")
    assert kept == expected
    warnings = [r.getMessage() for r in caplog.records if "OTEL_TRACES_SAMPLER" in r.getMessage()]
    assert len(warnings) == (1 if "bogus" in env.get("OTEL_TRACES_SAMPLER", "") else 0), warnings


def test_streams_trace_each_request_and_health_is_not_traced(repo: Path, collector: tuple[Collector, int]) -> None:
    c, port = collector
    caller = Caller.new()

    async def stream(address: str) -> None:
        async with AsyncInferenceClient(address) as client:
            provider = TracerProvider()
            span = provider.get_tracer("t").start_span(
                "caller", context=trace.set_span_in_context(NonRecordingSpan(_context(caller)))
            )
            from opentelemetry import context as otel_context

            token = otel_context.attach(trace.set_span_in_context(span))
            try:
                items = [("identity_fp32", {"INPUT0": np.ones((1, 4), np.float32)})] * 3
                results = [r async for r in client.stream_infer(items)]
            finally:
                otel_context.detach(token)
            assert len(results) == 3

    with traced(repo, port) as server:
        server.run(stream(server.address))
        channel = grpc.insecure_channel(server.address)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        # KServe's health RPCs are probes too, even when the caller sends a sampled traceparent.
        stub = GRPCInferenceServiceStub(channel)
        probe = [("traceparent", Caller.new().traceparent)]
        assert stub.ServerLive(pb.ServerLiveRequest(), metadata=probe).live
        assert stub.ServerReady(pb.ServerReadyRequest(), metadata=probe).ready
        assert stub.ModelReady(pb.ModelReadyRequest(name="identity_fp32"), metadata=probe).ready
        channel.close()
    (rpc,) = server_spans(c, "ModelStreamInfer")
    assert hexid(rpc.trace_id) == caller.trace_id
    per_request = [s for s in c.spans() if s.name == "ModelStreamInfer request"]
    assert len(per_request) == 3
    assert all(s.parent_span_id == rpc.span_id for s in per_request)
    for span in per_request:
        assert {"validate", "queue", "execute"} <= set(children(c, span))
        assert attrs(span)["tensorgate.model.name"] == "identity_fp32"
    assert not [s for s in c.spans() if "Health" in s.name or s.name.endswith(("Live", "Ready"))]


def _context(caller: Caller) -> SpanContext:
    return SpanContext(int(caller.trace_id, 16), int(caller.span_id, 16), is_remote=True, trace_flags=TraceFlags(1))


def test_identity_from_mtls_is_a_span_attribute(repo: Path, tmp_path: Path, collector: tuple[Collector, int]) -> None:
    c, port = collector
    pki = Pki(tmp_path / "pki")
    with traced(repo, port, **pki.server_settings()) as server:
        channel = secure_channel(server.address, pki.ca_path, pki.client("checkout"))
        GRPCInferenceServiceStub(channel).ModelInfer(identity_request(), timeout=10)
        channel.close()
    (span,) = server_spans(c, "ModelInfer")
    assert attrs(span)["enduser.id"] == "spiffe://tensorgate.local/checkout"


def test_injected_provider_and_tracing_off(repo: Path) -> None:
    """No endpoint: no tracing object at all; an injected provider is used as it is and left running."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from tensorgate.server import ServerSettings, TensorgateServer

    env = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("OTEL_EXPORTER_OTLP")}
    try:
        assert TensorgateServer(ServerSettings(model_repository=repo)).tracing is None
    finally:
        os.environ.update(env)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = ServerThread(repo)
    server.app = TensorgateServer(server.settings, tracer_provider=provider)
    with server:
        channel = grpc.insecure_channel(server.address)
        GRPCInferenceServiceStub(channel).ModelInfer(identity_request(), timeout=10)
        channel.close()
    names = {s.name for s in exporter.get_finished_spans()}
    assert "inference.GRPCInferenceService/ModelInfer" in names
    provider.get_tracer("still").start_span("open").end()  # not shut down by the server
    assert "open" in {s.name for s in exporter.get_finished_spans()}


def test_otlp_over_http_with_headers(repo: Path) -> None:
    receiver = Collector()

    def keep(body: bytes, headers: dict[str, str]) -> None:
        receiver.keep(otlp.ExportTraceServiceRequest.FromString(body), headers)

    with (
        http_sink(keep) as endpoint,
        ServerThread(repo, otlp_endpoint=endpoint, otlp_protocol="http/protobuf", otlp_headers="x-api-key=k123") as s,
    ):
        channel = grpc.insecure_channel(s.address)
        GRPCInferenceServiceStub(channel).ModelInfer(identity_request(), timeout=10)
        channel.close()
    assert server_spans(receiver, "ModelInfer")
    assert receiver.metadata[0]["x-api-key"] == "k123"
    assert receiver.metadata[0]["path"] == "/v1/traces"


def test_otel_protocol_variable_picks_otlp_over_http(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_EXPORTER_OTLP_PROTOCOL, the variable for every signal, is read when the traces one is not set: an
    operator who sets only it gets spans over HTTP (they all went to a gRPC exporter and were lost)."""
    receiver = Collector()

    def keep(body: bytes, headers: dict[str, str]) -> None:
        receiver.keep(otlp.ExportTraceServiceRequest.FromString(body), headers)

    for name in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    with http_sink(keep) as endpoint:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.removesuffix("/v1/traces"))  # the SDK adds it
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        with ServerThread(repo) as server:
            channel = grpc.insecure_channel(server.address)
            GRPCInferenceServiceStub(channel).ModelInfer(identity_request(), timeout=10)
            channel.close()
    assert server_spans(receiver, "ModelInfer")
    assert receiver.metadata[0]["path"] == "/v1/traces"


def test_otel_resource_variables_win_over_tensorgate_s_defaults(
    repo: Path, collector: tuple[Collector, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES name the deployment as an operator sets them; tensorgate's
    service.name, service.version and host.name fill in only what they leave out."""
    c, port = collector
    monkeypatch.setenv("OTEL_SERVICE_NAME", "checkout-inference")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "host.name=pod-7,deployment.environment=prod")
    with traced(repo, port) as server:
        channel = grpc.insecure_channel(server.address)
        GRPCInferenceServiceStub(channel).ModelInfer(identity_request(), timeout=10)
        channel.close()
    resource = c.resource()
    assert resource["service.name"] == "checkout-inference"
    assert resource["host.name"] == "pod-7"
    assert resource["deployment.environment"] == "prod"
    assert resource["service.version"]  # tensorgate's, where the environment says nothing


def test_logs_carry_trace_ids_and_access_lines(repo: Path, collector: tuple[Collector, int]) -> None:
    """`tensorgate serve --log-format json --log-level DEBUG`: one access line per request with its trace id."""
    _, port = collector
    caller = Caller.new()
    proc = ServeProcess(
        [
            "--model-repository",
            str(repo),
            "--grpc-port",
            "0",
            "--log-format",
            "json",
            "--log-level",
            "DEBUG",
            "--otlp-endpoint",
            f"127.0.0.1:{port}",
            "--otlp-insecure",
        ]
    )
    try:
        channel = grpc.insecure_channel(proc.address)
        stub = GRPCInferenceServiceStub(channel)
        grpc.channel_ready_future(channel).result(timeout=30)
        proc.wait_for_line("ready:")
        stub.ModelInfer(secret_request(), metadata=[("traceparent", caller.traceparent)], timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(secret_request("missing"), timeout=10)
        streamed = secret_request()
        streamed.id = "stream-7"
        assert [r.error_message for r in stub.ModelStreamInfer(iter([streamed]), timeout=10)] == [""]
        channel.close()
        proc.wait_for_line("status=NOT_FOUND")
        proc.wait_for_line("id=stream-7")
    finally:
        proc.terminate()
        proc.__exit__()
    records = [json.loads(line) for line in proc.lines if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    access = [r for r in records if r["logger"] == "tensorgate.access"]
    ok = [r for r in access if r["message"].startswith("ModelInfer model=identity_fp32")]
    assert len(ok) == 1
    assert ok[0]["trace_id"] == caller.trace_id
    assert ok[0]["level"] == "DEBUG"
    assert "id=req-42" in ok[0]["message"] and "status=OK" in ok[0]["message"]
    assert "version=1 " in ok[0]["message"]  # the version that answered, though the request named none
    assert "latency_ms=" in ok[0]["message"]
    assert any("model=missing version=- " in r["message"] and "status=NOT_FOUND" in r["message"] for r in access)
    # A stream's messages name their model and the version that answered, as ModelInfer's do.
    assert any(r["message"].startswith("ModelStreamInfer model=identity_fp32 version=1 id=stream-7") for r in access)
    assert str(SECRET) not in proc.output


def test_bad_tracing_settings_stop_the_start(repo: Path) -> None:
    for flag, given, field in (("--otlp-headers", "novalue", "--otlp-headers"), ("--trace-sample-rate", "2", "rate")):
        with ServeProcess(["--model-repository", str(repo), "--grpc-port", "0", flag, given]) as proc:
            assert proc.proc.wait(60) == 2
            proc.wait_for_line(field)


def test_otlp_grpc_over_tls_to_the_collector(repo: Path, tmp_path: Path) -> None:
    """--otlp-ca: the collector's certificate is verified (a collector the CA did not sign gets nothing)."""
    pki, other = Pki(tmp_path / "pki"), Pki(tmp_path / "other", ca_name="other CA")
    receiver = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    otlp_grpc.add_TraceServiceServicer_to_server(receiver, server)
    credentials = grpc.ssl_server_credentials([(pki.server_key.read_bytes(), pki.server_cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        for ca in (other.ca_path, pki.ca_path):
            with ServerThread(repo, otlp_endpoint=f"https://127.0.0.1:{port}", otlp_ca=ca) as tg:
                channel = grpc.insecure_channel(tg.address)
                GRPCInferenceServiceStub(channel).ModelInfer(identity_request(), timeout=10)
                channel.close()
            if ca == other.ca_path:
                assert receiver.spans() == []
    finally:
        server.stop(0)
    assert len(server_spans(receiver, "ModelInfer")) == 1


def test_a_stream_the_client_abandons_ends_its_span_cleanly(
    repo: Path, collector: tuple[Collector, int], caplog: pytest.LogCaptureFixture
) -> None:
    """A client that cancels an open ModelStreamInfer leaves grpc to close the handler's generator from another
    task: the server span still ends and is exported, and no context token is detached in the wrong context."""
    import asyncio

    c, port = collector
    caller = Caller.new()

    async def abandon(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = GRPCInferenceServiceStub(channel)
            call = stub.ModelStreamInfer(metadata=[("traceparent", caller.traceparent)], timeout=30)
            await call.write(identity_request())
            reply = await call.read()
            assert not reply.error_message
            call.cancel()
        await asyncio.sleep(0.2)  # let the server see the cancellation before it stops

    with caplog.at_level(logging.ERROR), traced(repo, port) as server:
        asyncio.run(abandon(server.address))
    assert not [r for r in caplog.records if "detach" in r.getMessage().lower()]
    (span,) = server_spans(c, "ModelStreamInfer")
    assert hexid(span.trace_id) == caller.trace_id
    assert attrs(span)["rpc.response.status_code"] in ("CANCELLED", "OK")


def test_a_large_batch_span_keeps_every_link(collector: tuple[Collector, int]) -> None:
    """A batch of up to max_batch_size traced requests links all of them (the SDK's default limit is 128)."""
    from tensorgate.server.telemetry.tracing import TracingSettings, from_settings

    c, port = collector
    tracing = from_settings(TracingSettings(otlp_endpoint=f"127.0.0.1:{port}", otlp_insecure=True))
    assert tracing is not None
    requests = [_context(Caller.new()) for _ in range(300)]
    span = tracing.start_batch("m", 1, requests, 300, "CPUExecutionProvider", 0)
    span.end()
    tracing.shutdown()
    (batch,) = [s for s in c.spans() if s.name == "batch m"]
    assert len(batch.links) == 300 and batch.dropped_links_count == 0
    assert {hexid(link.trace_id) for link in batch.links} == {format(r.trace_id, "032x") for r in requests}
    assert hexid(batch.trace_id) == format(requests[0].trace_id, "032x")
    assert batch.parent_span_id == requests[0].span_id.to_bytes(8, "big")


def test_spans_dropped_are_a_metric_of_a_traced_server(repo: Path, collector: tuple[Collector, int]) -> None:
    """tensorgate_trace_spans_dropped_total is scraped when tracing is on: 0 while the exporter keeps up, the
    count of lost spans once its process is gone (the requests themselves go on being served)."""
    c, port = collector
    with traced(repo, port) as server:
        channel = grpc.insecure_channel(server.address)
        stub = GRPCInferenceServiceStub(channel)
        stub.ModelInfer(identity_request(), timeout=10)
        assert value(scrape(metrics_url(server)), "tensorgate_trace_spans_dropped_total") == 0
        pipe = server.app.tracing.pipe
        assert pipe is not None
        pipe._process.kill()  # noqa: SLF001 - the exporter process crashing
        pipe._process.join(10)  # noqa: SLF001
        for _ in range(3):
            stub.ModelInfer(identity_request(), timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and pipe.dropped == 0:
            time.sleep(0.05)
        assert pipe.dropped >= 3  # a server span, validate, queue and execute per request
        assert value(scrape(metrics_url(server)), "tensorgate_trace_spans_dropped_total") == pipe.dropped
        channel.close()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_spans_the_collector_refuses_are_counted_as_dropped(repo: Path, protocol: str) -> None:
    """A collector that answers every export with an error (INVALID_ARGUMENT, HTTP 400: the exporter does not
    retry those) keeps none of the spans: tensorgate_trace_spans_dropped_total counts every one of them (it
    counted only spans lost before the exporter process, and said 0 while nothing reached the collector)."""
    refused = Collector()

    def keep(body: bytes, headers: dict[str, str]) -> None:
        refused.keep(otlp.ExportTraceServiceRequest.FromString(body), headers)

    sink = (
        grpc_sink(keep, refuse=grpc.StatusCode.INVALID_ARGUMENT) if protocol == "grpc" else http_sink(keep, status=400)
    )
    with sink as endpoint, ServerThread(repo, otlp_endpoint=endpoint, otlp_protocol=protocol, otlp_insecure=True) as s:
        with grpc.insecure_channel(s.address) as channel:
            for _ in range(3):
                GRPCInferenceServiceStub(channel).ModelInfer(identity_request(), timeout=10)
        deadline = time.monotonic() + 15
        while True:  # the sink sees an export just before the exporter process hears the answer
            dropped = value(scrape(metrics_url(s)), "tensorgate_trace_spans_dropped_total")
            if (len(refused.spans()) >= 3 * 4 and dropped == len(refused.spans())) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert len(server_spans(refused, "ModelInfer")) == 3  # server, validate, queue, execute and batch spans each
    assert dropped == len(refused.spans())


def test_an_ensemble_request_traces_each_step(tmp_path: Path, collector: tuple[Collector, int]) -> None:
    """Each step is a child of the caller's request span, and the composing models' batches link to that span."""
    c, port = collector
    caller = Caller.new()
    with traced(ensemble_repository(tmp_path / "models"), port) as server:
        client = triton.InferenceServerClient(server.address)
        try:
            a = np.full((1, 16), SECRET, np.float32)
            inputs = triton_inputs({"A": a, "B": a})
            client.infer("pipeline", inputs, headers={"traceparent": caller.traceparent})
        finally:
            client.close()
    (span,) = server_spans(c, "ModelInfer")
    assert hexid(span.trace_id) == caller.trace_id
    assert attrs(span)["tensorgate.model.name"] == "pipeline"
    assert attrs(span)["tensorgate.execution_provider"] == "ensemble"
    names = sorted(s.name for s in c.spans() if s.parent_span_id == span.span_id)
    # The batches are children of a request they served too (here the only one), as for any model.
    assert names == ["batch add_sub", "batch scale2", "ensemble step 0 scale2", "ensemble step 1 add_sub",
                     "execute", "execute", "queue", "queue", "validate"]  # fmt: skip
    for model in ("add_sub", "scale2"):
        (batch,) = [s for s in c.spans() if s.name == f"batch {model}"]
        assert [(link.trace_id, link.span_id) for link in batch.links] == [(span.trace_id, span.span_id)]
    assert struct.pack("<f", SECRET) not in c.raw


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_an_answer_too_late_for_its_caller_is_not_logged_as_a_server_error(level: str) -> None:
    """grpc.aio logs `ExecuteBatchError raised in core by servicer method [...]` at ERROR, with a traceback, when a
    caller's deadline passes while its answer is being sent (an audit saw dozens a second under 20 ms deadlines).
    That is a DEBUG line without the traceback; other records of that logger stay as they are."""
    out = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging(level, stream=out)
        core = logging.getLogger(GRPC_CORE_LOGGER)
        try:
            raise RuntimeError('Failed "execute_batch"')
        except RuntimeError:
            core.exception("ExecuteBatchError raised in core by servicer method [%s]", "/inference.X/ModelInfer")
        core.error("something else broke")
        core.debug("[_cygrpc] Loaded running loop: id(loop)=%d", 1234)  # once per RPC: noise at DEBUG
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    text = out.getvalue()
    assert "ERROR grpc._cython.cygrpc: something else broke" in text
    assert "Traceback" not in text and "ExecuteBatchError" not in text
    late = "DEBUG grpc._cython.cygrpc: the call ended (deadline or cancel) before its answer was sent: /inference.X"
    assert (late in text) == (level == "DEBUG")
    assert "Loaded running loop" not in text


# ----- TraceSetting: sampling changed while the server runs ------------------------------------------------------


def _trace_settings(response: object) -> dict[str, list[str]]:
    return {k: list(v.value) for k, v in response.settings.items()}  # type: ignore[attr-defined]


def _infer_as(client: triton.InferenceServerClient, request_id: str, caller: Caller | None = None) -> None:
    inp = triton.InferInput("INPUT0", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    headers = {"traceparent": caller.traceparent} if caller is not None else None
    client.infer("identity_fp32", [inp], request_id=request_id, headers=headers)


def test_trace_settings_change_sampling_while_the_server_runs(repo: Path, collector: tuple[Collector, int]) -> None:
    """tritonclient's update_trace_settings: OFF stops tracing (a sampled caller included), trace_rate N keeps one
    new trace in N (a sampled caller still traced: parent-based), a key sent without a value goes back to the
    start's setting."""
    c, port = collector
    with traced(repo, port) as server:
        client = triton.InferenceServerClient(server.address)
        try:
            settings = _trace_settings(client.get_trace_settings())
            assert settings["trace_level"] == ["TIMESTAMPS"] and settings["trace_rate"] == ["1"]
            assert settings["tensorgate.sample_rate"] == ["1"] and settings["trace_mode"] == ["opentelemetry"]
            _infer_as(client, "on-1")
            off = _trace_settings(client.update_trace_settings(settings={"trace_level": "OFF"}))
            assert off["trace_level"] == ["OFF"]
            _infer_as(client, "off-new")
            _infer_as(client, "off-sampled-caller", Caller.new())
            rare = client.update_trace_settings(settings={"trace_level": "TIMESTAMPS", "trace_rate": "1000000000"})
            assert _trace_settings(rare)["trace_rate"] == ["1000000000"]
            _infer_as(client, "rare-new")
            _infer_as(client, "rare-sampled-caller", Caller.new())
            back = _trace_settings(client.update_trace_settings(settings={"trace_rate": None, "trace_file": None}))
            assert back["trace_rate"] == ["1"]
            _infer_as(client, "on-2")
        finally:
            client.close()
    ids = {attrs(s).get("tensorgate.request.id") for s in server_spans(c, "ModelInfer")}
    assert ids == {"on-1", "rare-sampled-caller", "on-2"}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        pytest.param({"trace_level": "TENSORS"}, "tensorgate never traces payloads", id="tensors"),
        pytest.param({"trace_level": ["OFF", "TIMESTAMPS"]}, "trace_level must be OFF or TIMESTAMPS", id="both"),
        pytest.param({"trace_rate": "0"}, "trace_rate must be a whole number >= 1", id="rate-0"),
        pytest.param({"trace_rate": "\u00b2"}, "trace_rate must be a whole number >= 1", id="rate-unicode-digit"),
        pytest.param({"trace_rate": "9" * 5000}, "trace_rate must be a whole number >= 1", id="rate-5000-digits"),
        pytest.param({"tensorgate.sample_rate": "2"}, "tensorgate.sample_rate must be a number in 0..1", id="share"),
        pytest.param({"trace_file": "/tmp/t.json"}, "trace_file can only be '' here", id="file"),
        pytest.param({"trace_file": ["a", "b"]}, "trace_file can only be '' here", id="files"),
        pytest.param({"trace_colour": "red"}, "unknown trace setting 'trace_colour'", id="unknown"),
        pytest.param(
            {"trace_rate": "7", "tensorgate.sample_rate": "0.5"}, "trace_rate or tensorgate.sample_rate", id="two"
        ),
    ],
)
def test_trace_settings_that_cannot_be_made_are_refused(
    repo: Path, collector: tuple[Collector, int], settings: dict[str, object], message: str
) -> None:
    _, port = collector
    with traced(repo, port) as server:
        client = triton.InferenceServerClient(server.address)
        try:
            with pytest.raises(InferenceServerException) as info:
                client.update_trace_settings(settings={"trace_level": "OFF", **settings})
            assert info.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
            assert message in str(info.value.message())
            # Refused whole: the valid trace_level beside the bad key was not applied either.
            assert _trace_settings(client.get_trace_settings())["trace_level"] == ["TIMESTAMPS"]
            with pytest.raises(InferenceServerException) as info:
                client.update_trace_settings("identity_fp32", {"trace_rate": "2"})
            assert "trace settings are the server's" in str(info.value.message())
        finally:
            client.close()


def test_trace_settings_without_tracing_say_how_to_turn_it_on(server: ServerThread) -> None:
    client = triton.InferenceServerClient(server.address)
    try:
        assert _trace_settings(client.get_trace_settings())["trace_level"] == ["OFF"]
        assert _trace_settings(client.get_trace_settings("identity_fp32"))["trace_level"] == ["OFF"]
        with pytest.raises(InferenceServerException) as info:
            client.update_trace_settings(settings={"trace_level": "TIMESTAMPS"})
        assert info.value.status() == str(grpc.StatusCode.FAILED_PRECONDITION)
        assert "start the server with --otlp-endpoint" in str(info.value.message())
        with pytest.raises(InferenceServerException) as info:
            client.get_trace_settings("no_such_model")
        assert info.value.status() == str(grpc.StatusCode.NOT_FOUND)
    finally:
        client.close()


def test_trace_settings_with_an_injected_provider_are_the_application_s(repo: Path) -> None:
    """An embedding application's TracerProvider samples: TraceSetting says tracing is on (not OFF, which it said)
    and refuses a change, naming whose sampler it is."""
    from tensorgate.server import TensorgateServer

    server = ServerThread(repo)
    server.app = TensorgateServer(server.settings, tracer_provider=TracerProvider())
    with server:
        client = triton.InferenceServerClient(server.address)
        try:
            assert _trace_settings(client.get_trace_settings()) == {
                "trace_level": ["TIMESTAMPS"],
                "trace_mode": ["opentelemetry"],
            }
            with pytest.raises(InferenceServerException) as info:
                client.update_trace_settings(settings={"trace_rate": "10"})
            assert info.value.status() == str(grpc.StatusCode.FAILED_PRECONDITION)
            assert "belongs to the TracerProvider the embedding application gave" in str(info.value.message())
        finally:
            client.close()


def test_a_stream_message_is_traced_and_logged_as_a_model_infer_call(
    repo: Path, collector: tuple[Collector, int]
) -> None:
    """A stream message that fails NOT_FOUND (the caller's mistake): its span records the code and the error type
    and leaves the status unset, as ModelInfer's does (it was ERROR "error response"), and its access line names
    the code (it said ERROR) in the message's span (it carried the stream's). A request sent without an id is
    logged under the id the server gave it (the response's), not as "-"."""
    c, port = collector
    out = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging("DEBUG", stream=out)
        with traced(repo, port) as server, grpc.insecure_channel(server.address) as channel:
            stub = GRPCInferenceServiceStub(channel)
            unnamed = identity_request()
            unnamed.id = ""
            given = stub.ModelInfer(unnamed, timeout=10).id
            missing = identity_request("missing")
            missing.id = "s-1"
            (reply,) = stub.ModelStreamInfer(iter([missing]), timeout=10)
            assert "model 'missing'" in reply.error_message
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    (span,) = [s for s in c.spans() if s.name == "ModelStreamInfer request"]
    assert attrs(span)["rpc.response.status_code"] == "NOT_FOUND"
    assert attrs(span)["error.type"] == "ModelNotFoundError"
    assert span.status.code == trace_pb2.Status.STATUS_CODE_UNSET
    access = [line for line in out.getvalue().splitlines() if "tensorgate.access" in line]
    assert given and [f"id={given} status=OK " in line for line in access if "ModelInfer model=" in line] == [True]
    (line,) = [line for line in access if "model=missing" in line]
    assert "id=s-1 status=NOT_FOUND " in line and f"span_id={span.span_id.hex()}" in line, line
