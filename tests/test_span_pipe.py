"""The span pipe on its own: sampling decisions as the SDK's ParentBased(TraceIdRatioBased) makes them, what a
finished span records, and a pipe whose exporter process is gone (spans dropped and counted, never waited on).
End to end through a real OTLP receiver: tests/test_tracing.py."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from typing import Any

import grpc
import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags, TraceState

from tensorgate.server.errors import InvalidRequestError
from tensorgate.server.telemetry import span_pipe
from tensorgate.server.telemetry.span_pipe import LightSpan, LightTracer, SpanPipe, SpanRecord, steps_record
from tensorgate.server.telemetry.tracing import TracingSettings


def _parent(sampled: bool, state: TraceState | None = None) -> otel_context.Context:
    ctx = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(1 if sampled else 0), trace_state=state)
    return trace.set_span_in_context(NonRecordingSpan(ctx))


def test_a_caller_decides_for_its_trace_whatever_the_rate() -> None:
    sink: list[SpanRecord] = []
    for rate in (0.0, 1.0):
        tracer = LightTracer(sink, rate)
        kept = tracer.start_span("kept", context=_parent(True, TraceState([("vendor", "x")])))
        assert isinstance(kept, LightSpan)
        ctx = kept.get_span_context()
        assert ctx.trace_id == 0xABC and ctx.span_id != 0xDEF and ctx.trace_flags.sampled
        assert ctx.trace_state == TraceState([("vendor", "x")])  # carried on to the child, as the SDK does
        dropped = tracer.start_span("dropped", context=_parent(False))
        assert not dropped.is_recording() and dropped.get_span_context().trace_id == 0xABC
        assert not dropped.get_span_context().trace_flags.sampled


def test_new_traces_are_sampled_by_trace_id_like_the_sdk() -> None:
    sink: list[SpanRecord] = []
    assert not LightTracer(sink, 0.0).start_span("x").is_recording()
    assert LightTracer(sink, 1.0).start_span("x").is_recording()
    half, sdk = LightTracer(sink, 0.5), TraceIdRatioBased(0.5)
    decisions = []
    for _ in range(2000):
        span = half.start_span("x", context=otel_context.Context())  # an empty context: a new trace
        ctx = span.get_span_context()
        assert ctx.is_valid
        # The same trace id gets the same decision from the SDK's sampler.
        sdk_sampled = sdk.should_sample(None, ctx.trace_id, "x").decision.is_sampled()
        assert span.is_recording() == sdk_sampled
        decisions.append(span.is_recording())
    assert 800 < sum(decisions) < 1200


def test_a_span_records_once_with_its_parent_links_status_and_events() -> None:
    sink: list[SpanRecord] = []
    tracer = LightTracer(sink, 1.0)
    parent = tracer.start_span("rpc", kind=SpanKind.SERVER, attributes={"a": 1})
    linked = SpanContext(0x1, 0x2, is_remote=True, trace_flags=TraceFlags(1))
    child = tracer.start_span(
        "execute", context=trace.set_span_in_context(parent), links=[Link(linked)], start_time=100
    )
    child.set_attribute("b", "two")
    child.set_status(StatusCode.ERROR, "INTERNAL")
    try:
        raise ValueError("tensor value 1234.5")
    except ValueError as exc:
        child.record_exception(exc)
    child.end(end_time=200)
    child.end(end_time=300)  # a second end is ignored, and so are changes after the end
    child.set_attribute("late", 1)
    child.set_status(StatusCode.OK)
    assert not child.is_recording()
    parent.end()
    assert len(sink) == 2
    name, trace_id, span_id, _state, up, kind, start, end, attrs, links, events, status = sink[0]
    assert (name, start, end, kind) == ("execute", 100, 200, SpanKind.INTERNAL.value)
    assert trace_id == parent.get_span_context().trace_id and up == (parent.get_span_context().span_id, False)
    assert attrs == {"b": "two"} and links == [(0x1, 0x2, 1, (), True)]
    assert status == (StatusCode.ERROR.value, "INTERNAL")
    assert [(e[0], e[2]) for e in events] == [("exception", {"exception.type": "ValueError"})]
    assert "1234.5" not in repr(sink)
    assert sink[1][0] == "rpc" and sink[1][4] is None and sink[1][8] == {"a": 1}


def test_spans_are_dropped_and_counted_when_the_exporter_process_is_gone() -> None:
    pipe = SpanPipe(TracingSettings(otlp_endpoint="127.0.0.1:9", otlp_insecure=True), queue_batches=1)
    try:
        process = pipe._process  # noqa: SLF001 - the test plays the exporter crashing
        process.kill()
        process.join(10)
        pipe.tracer.start_span("lost").end()  # the request path goes on; never blocks
        request = _context()
        pipe.record(steps_record(request, 1, 2, 3, request, 1, "CPUExecutionProvider"))  # one record, two spans
        deadline = time.monotonic() + 10
        while pipe.dropped < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pipe.dropped == 3
    finally:
        started = time.monotonic()
        pipe.close()
    assert time.monotonic() - started < 5  # no wait on a process that is gone


def test_tracing_needs_one_source_of_spans() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    from tensorgate.server.telemetry.tracing import Tracing

    with pytest.raises(ValueError, match="TracerProvider or a SpanPipe"):
        Tracing()
    assert Tracing(TracerProvider()).pipe is None


def test_the_wire_encoder_writes_what_the_sdk_encoder_writes() -> None:
    """otlp_wire.py's request for a set of span records equals, field by field, the SDK encoder's for the same
    spans as ReadableSpans: kinds, parents local and remote, trace state, every attribute type, events, links,
    status with and without a description, the flags."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from tensorgate.server.telemetry.otlp_wire import TraceRequestWriter
    from tensorgate.server.telemetry.span_pipe import readable

    sink: list[SpanRecord] = []
    tracer = LightTracer(sink, 1.0)
    remote = _parent(True, TraceState([("vendor", "x"), ("other", "y")]))
    server = tracer.start_span("rpc", context=remote, kind=SpanKind.SERVER, attributes={"s": "text", "i": -3})
    server.set_attributes({"b": True, "f": 0.25, "big": 2**40, "seq": ("a", "b"), "ints": [1, 2], "raw": b"\x00"})
    server.set_attributes({"pair": (1, 0), "zero": 0.0, "nan": float("nan")})
    server.set_status(StatusCode.ERROR, "INTERNAL")
    child = tracer.start_span(
        "execute",
        context=trace.set_span_in_context(server),
        links=[Link(_context()), Link(SpanContext(0x9, 0xA, is_remote=False, trace_flags=TraceFlags(1)))],
        # Equal to the server's values, yet of other types (1 == True, (1.0, 0.0) == (1, 0), -0.0 == 0.0): the
        # encoder must not mix them up.
        attributes={"b": 1, "s": "text", "pair": (1.0, 0.0), "zero": -0.0, "nan": float("nan")},
    )
    child.add_event("exception", {"exception.type": "ValueError"}, timestamp=123)
    child.set_status(StatusCode.OK, "an OK has no description")
    child.end(end_time=2**62)
    server.end()
    root = tracer.start_span("alert", context=otel_context.Context(), kind=SpanKind.CLIENT)
    root.end()
    resource = Resource({"service.name": "tensorgate", "service.version": "1.2.3", "host.name": "h"})
    ours = ExportTraceServiceRequest.FromString(TraceRequestWriter(resource, "tensorgate", "1.2.3").write(sink))
    scope = InstrumentationScope("tensorgate", "1.2.3")
    sdk = encode_spans([readable(r, resource, scope) for r in sink])
    assert len(ours.resource_spans[0].scope_spans[0].spans) == 3
    assert sink[0][11] == (StatusCode.OK.value, None)  # as the SDK's Status: only an error has a description
    # As bytes: message equality takes -0.0 for 0.0 and never NaN for NaN.
    assert ours.SerializeToString(deterministic=True) == sdk.SerializeToString(deterministic=True)


def _context() -> SpanContext:
    return SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(1))


def _sdk_and_pipe() -> tuple[Any, Any, Any]:
    """Tracing through an SDK provider that keeps its spans in memory, and through a pipe's sink (no process)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from tensorgate.server.telemetry.tracing import Tracing

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({"service.name": "tensorgate"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    sink: list[SpanRecord] = []
    pipe = SpanPipe.__new__(SpanPipe)  # the recording half only: no shipper thread, no exporter process
    pipe._sink = sink  # noqa: SLF001
    piped = Tracing.__new__(Tracing)
    piped.provider, piped.pipe, piped.tracer = None, pipe, LightTracer(sink, 1.0)
    pipe.tracer = piped.tracer  # as SpanPipe's own: Tracing samples with it
    return (Tracing(provider), memory), (piped, sink), provider.resource


def _exported(records: list[SpanRecord], resource: Any) -> Any:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from tensorgate.server import __version__
    from tensorgate.server.telemetry.otlp_wire import TraceRequestWriter
    from tensorgate.server.telemetry.span_pipe import expand

    writer = TraceRequestWriter(resource, "tensorgate", __version__)
    return ExportTraceServiceRequest.FromString(writer.write(expand(records)))


def test_a_child_recorded_after_the_fact_is_the_span_an_sdk_tracer_makes() -> None:
    """Validation is recorded once it is over, as one record with the pipe; the export must equal, span id and
    end time aside, what the same call makes through an SDK TracerProvider: failed or not, under a local or a
    remote parent, and nothing at all under a parent sampled out. A server error sets the status, a caller's
    mistake only error.type."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    (sdk_tracing, memory), (piped, sink), resource = _sdk_and_pipe()
    state = TraceState([("vendor", "x")])
    for remote in (False, True):
        parent = NonRecordingSpan(SpanContext(0xABC, 0xDEF, remote, TraceFlags(1), state))
        for error in (None, ValueError("the caller's text"), InvalidRequestError("m", "1", "the caller's mistake")):
            memory.clear()
            sink.clear()
            sdk_tracing.record_child(parent, "validate", 10, error)
            piped.record_child(parent, "validate", 10, error)
            sdk, ours = encode_spans(memory.get_finished_spans()), _exported(sink, resource)
            for message in (sdk, ours):
                (span,) = message.resource_spans[0].scope_spans[0].spans
                assert span.span_id
                span.ClearField("span_id")
                span.ClearField("end_time_unix_nano")
            assert ours == sdk
            failed = error is not None and not isinstance(error, InvalidRequestError)
            assert (span.status.code == span.status.STATUS_CODE_ERROR) == failed
            assert [a.value.string_value for a in span.attributes if a.key == "error.type"] == (
                [] if error is None else [type(error).__qualname__]
            )
    unsampled = NonRecordingSpan(SpanContext(0xABC, 0xDEF, False, TraceFlags(0)))
    memory.clear()
    sink.clear()
    sdk_tracing.record_child(unsampled, "validate", 10)
    piped.record_child(unsampled, "validate", 10)
    assert not memory.get_finished_spans() and not sink


def test_a_steps_record_exports_the_queue_and_execute_spans_an_sdk_tracer_makes() -> None:
    """The pipe sends a request's queue and execute spans as one record, expanded in the exporter process; the
    export must equal, span ids aside, what Tracing.request_spans makes through an SDK TracerProvider."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    (sdk_tracing, memory), (piped, sink), resource = _sdk_and_pipe()
    batch = SpanContext(0x123, 0x456, False, TraceFlags(1), TraceState([("b", "y")]))
    for remote, link in ((False, batch), (False, None), (True, batch)):
        request = SpanContext(0xABC, 0xDEF, remote, TraceFlags(1), TraceState([("vendor", "x")]))
        memory.clear()
        sink.clear()
        sdk_tracing.request_spans(request, 10, 20, 30, link, 5, "CPUExecutionProvider")
        piped.request_spans(request, 10, 20, 30, link, 5, "CPUExecutionProvider")
        assert len(sink) == 1  # one STEPS record
        sdk, ours = encode_spans(memory.get_finished_spans()), _exported(sink, resource)
        for message in (sdk, ours):
            spans = message.resource_spans[0].scope_spans[0].spans
            assert [s.name for s in spans] == ["queue", "execute"]
            assert all(s.span_id for s in spans) and spans[0].span_id != spans[1].span_id
            for s in spans:
                s.ClearField("span_id")
        assert ours == sdk


def _records() -> list[SpanRecord]:
    sink: list[SpanRecord] = []
    tracer = LightTracer(sink, 1.0)
    span = tracer.start_span("rpc", context=_parent(True), kind=SpanKind.SERVER, attributes={"rpc.method": "M"})
    span.end()
    tracer.start_span("validate", context=trace.set_span_in_context(span)).end()
    return sink


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_both_otlp_transports_send_what_the_wire_encoder_writes(protocol: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's exporter, built as the exporter process builds it, sends our encoder's bytes as they are (its
    hooks are private: an SDK release without them fails here, not silently back to the slow encoder), with the
    configured headers, to a real receiver on loopback."""
    from opentelemetry.sdk.resources import Resource

    from tensorgate.server.telemetry.otlp_wire import TraceRequestWriter
    from tensorgate.server.telemetry.span_pipe import wire_sender
    from tensorgate.server.telemetry.tracing import build_exporter
    from tests.otlp_sinks import grpc_sink, http_sink

    for name in ("OTEL_EXPORTER_OTLP_COMPRESSION", "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION"):
        monkeypatch.delenv(name, raising=False)  # the body is compared as written, uncompressed
    received: list[tuple[bytes, dict[str, str]]] = []
    sink = grpc_sink if protocol == "grpc" else http_sink
    with sink(lambda body, headers: received.append((body, headers))) as endpoint:
        settings = TracingSettings(
            otlp_endpoint=endpoint, otlp_protocol=protocol, otlp_insecure=True, otlp_headers={"x-api-key": "k1"}
        )
        exporter = build_exporter(settings)
        writer = TraceRequestWriter(Resource({"service.name": "tensorgate"}), "tensorgate", "1.2.3")
        send = wire_sender(exporter, writer)
        assert send is not None, f"{type(exporter).__name__} lost the hook tensorgate's encoder needs"
        records = _records()
        assert send(records) is True  # the collector took it
        exporter.shutdown()
    ((body, headers),) = received
    assert body == writer.write(records)
    assert headers["x-api-key"] == "k1"


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_an_export_the_collector_refuses_is_reported_as_not_sent(protocol: str) -> None:
    """A collector answering an error (gRPC INVALID_ARGUMENT, HTTP 400: neither retried) took nothing: the sender
    says so, for the exporter process to count the spans as dropped (its result was ignored)."""
    from opentelemetry.sdk.resources import Resource

    from tensorgate.server.telemetry.otlp_wire import TraceRequestWriter
    from tensorgate.server.telemetry.span_pipe import wire_sender
    from tensorgate.server.telemetry.tracing import build_exporter
    from tests.otlp_sinks import grpc_sink, http_sink

    received: list[bytes] = []
    refusing = (
        grpc_sink(lambda body, _: received.append(body), refuse=grpc.StatusCode.INVALID_ARGUMENT)
        if protocol == "grpc"
        else http_sink(lambda body, _: received.append(body), status=400)
    )
    with refusing as endpoint:
        exporter = build_exporter(TracingSettings(otlp_endpoint=endpoint, otlp_protocol=protocol, otlp_insecure=True))
        send = wire_sender(exporter, TraceRequestWriter(Resource({"service.name": "tensorgate"}), "tensorgate", "1"))
        assert send is not None
        assert send(_records()) is False
        exporter.shutdown()
    assert len(received) == 1  # answered at once, not retried


def test_an_exporter_stuck_on_a_down_collector_is_stopped_at_close(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the collector down every export waits out its retries; close() gives it CLOSE_TIMEOUT_S, then stops it
    (it used to ignore SIGTERM, and the server process waited for it long after logging 'stopped')."""
    monkeypatch.setattr(span_pipe, "CLOSE_TIMEOUT_S", 1.0)
    pipe = SpanPipe(TracingSettings(otlp_endpoint="127.0.0.1:9", otlp_insecure=True))
    pipe.tracer.start_span("waits").end()
    time.sleep(0.5)  # shipped (every 0.1 s) and taken by the exporter, which is now retrying the dead collector
    started = time.monotonic()
    pipe.close()
    assert not pipe._process.is_alive()  # noqa: SLF001
    assert time.monotonic() - started < 15  # 1 s to finish, then SIGTERM (bounded by join timeouts)


def test_close_with_a_collector_that_never_answers_is_bounded_and_counts_every_span_lost() -> None:
    """A collector that accepts connections and never answers holds each export for its whole timeout (10 s, then
    retries). close() gives the exporter CLOSE_TIMEOUT_S in all (it waited up to 30 s three times in a row, for
    room on a full queue, for room for the end, and for the process) and counts what never left, wherever it
    was: taken by the stuck exporter, queued, refused by the full queue, or not shipped yet."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        pipe = SpanPipe(TracingSettings(otlp_endpoint=f"127.0.0.1:{port}", otlp_insecure=True), queue_batches=1)
        request = _context()
        for _ in range(6):  # shipments: more than the exporter holds and the queue takes
            pipe.tracer.start_span("lost").end()
            pipe.record(steps_record(request, 1, 2, 3, None, 1, "CPUExecutionProvider"))  # two spans
            time.sleep(0.3)
        pipe.tracer.start_span("not shipped yet").end()
        started = time.monotonic()
        pipe.close()
        took = time.monotonic() - started
    assert not pipe._process.is_alive()  # noqa: SLF001
    assert took < 15  # one deadline of a few seconds for the whole close, and SIGTERM (it took 30 s to 90 s)
    assert pipe.dropped == 6 * 3 + 1


def test_the_exporter_ends_when_the_server_dies_without_closing_it() -> None:
    """A server killed with SIGKILL cannot stop its exporter process; the exporter notices and ends by itself."""
    script = (
        "import sys, time\n"
        "from tensorgate.server.telemetry.span_pipe import SpanPipe\n"
        "from tensorgate.server.telemetry.tracing import TracingSettings\n"
        "pipe = SpanPipe(TracingSettings(otlp_endpoint='127.0.0.1:9', otlp_insecure=True))\n"
        "print(pipe._process.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as server:
        _kill_and_watch(server)


def _kill_and_watch(server: subprocess.Popen[str]) -> None:
    try:
        assert server.stdout is not None
        exporter = int(server.stdout.readline())
        assert _alive(exporter)
        server.kill()
        server.wait(10)
        deadline = time.monotonic() + 30
        while _alive(exporter) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(exporter)
    finally:
        if server.poll() is None:
            server.kill()


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
