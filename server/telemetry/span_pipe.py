"""Spans recorded cheaply in the server process and exported to the collector from a child process.

Why: in the OpenTelemetry SDK a span costs about 20 us of GIL time to start and end, and its export thread spends
10-25 us more per span encoding OTLP, in the same process and under the same GIL as the event loop. At four spans
a request that was more than half of the server's Python time per request: at sample rate 1.0, throughput fell to
0.42 of tracing off. Here a sampled span is a small object whose `end()` appends one tuple to a list; a shipper
thread hands the list to an exporter process ten times a second (pickled, in C), and that process rebuilds SDK
`ReadableSpan`s and exports them with the SDK's own OTLP exporter: same endpoint, headers, TLS, retries and
resource as an in-process provider would use.

The request path keeps OpenTelemetry's API (`Tracer.start_span`, `Span`, W3C contexts); sampling is the SDK's
ParentBased(TraceIdRatioBased(rate)) decision, made here. When the exporter process falls behind (a collector that
is down, a saturated machine), batches are dropped and counted rather than queued without bound: the request path
never waits on tracing.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.util.types import Attributes, AttributeValue

from tensorgate.server.telemetry.logs import configure_logging, current_setup
from tensorgate.server.telemetry.trace_settings import UNLIMITED

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from tensorgate.server.telemetry.otlp_wire import TraceRequestWriter
    from tensorgate.server.telemetry.tracing import TracingSettings

log = logging.getLogger(__name__)

SHIP_INTERVAL_S = 0.1
"""How often the shipper hands finished spans to the exporter process."""
QUEUE_BATCHES = 100
"""Shipments waiting for the exporter process (about 10 s of spans); past it, shipments are dropped and counted."""
EXPORT_CHUNK = 512
"""Spans per OTLP export request (the SDK's BatchSpanProcessor default)."""
CLOSE_TIMEOUT_S = 5.0
"""On shutdown, how long the exporter process gets, all told, to send what is left before it is stopped: past the
drain's grace, so short (a collector that is down makes every export wait out its retries, about 10 s)."""
PARENT_CHECK_S = 1.0
"""How often an idle exporter process checks that the server is still alive (else it ends: no orphans)."""

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSAMPLED = TraceFlags(TraceFlags.DEFAULT)
_NO_STATE = TraceState()  # immutable, so every new trace can start with this one
_LOW_64 = (1 << 64) - 1  # TraceIdRatioBased decides on these bits of the trace id
_ids = random.Random()

# One finished span, as it crosses to the exporter process:
# (name, trace_id, span_id, trace_state, parent, kind, start_ns, end_ns, attributes, links, events, status)
# parent: (span_id, is_remote) or None; links: [(trace_id, span_id, flags, trace_state, is_remote)];
# events: [(name, time_ns, attributes)]; status: (StatusCode value, description) or None.
SpanRecord = tuple[Any, ...]

# A request's queue wait and its share of a batch's execution, both known once the batch has run, cross as one
# record; the exporter process makes the two spans (and their ids: nothing in the server refers to them). Half
# the objects to build, pickle and unpickle, on the worker thread that holds the GIL for it.
# (STEPS, trace_id, trace_state, (request span_id, is_remote), enqueued_ns, started_ns, ended_ns, batch link or
# None, rows, provider); the batch link as in a span record's links.
STEPS = 0
"""A STEPS record's first field, where a span record has its name (a string)."""
QUEUE_SPAN, EXECUTE_SPAN = "queue", "execute"


def execute_attributes(rows: int, provider: str) -> dict[str, AttributeValue]:
    """What a request's execute span says about the batch it ran in."""
    return {"tensorgate.batch.size": rows, "tensorgate.execution_provider": provider}


def _new_id(bits: int) -> int:
    while True:
        value = _ids.getrandbits(bits)
        if value:  # 0 is the invalid id
            return value


class LightSpan(trace.Span):
    """A sampled span recording into a list; ended once, from any thread."""

    __slots__ = ("_name", "_ctx", "_parent", "_kind", "_start", "_attrs", "_links", "_events", "_status", "_sink")

    def __init__(
        self,
        sink: list[SpanRecord],
        name: str,
        ctx: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        start_ns: int,
        attributes: Attributes,
        links: Sequence[Link] | None,
    ) -> None:
        self._sink: list[SpanRecord] | None = sink
        self._name = name
        self._ctx = ctx
        self._parent = parent
        self._kind = kind
        self._start = start_ns
        self._attrs: dict[str, AttributeValue] = dict(attributes) if attributes else {}
        self._links = [_link(x.context) for x in links or ()]
        self._events: list[tuple[str, int, dict[str, AttributeValue]]] = []
        self._status: tuple[int, str | None] | None = None

    def get_span_context(self) -> SpanContext:
        return self._ctx

    def is_recording(self) -> bool:
        return self._sink is not None

    # After end() the record belongs to the shipper (it may be pickling it): changes are ignored, as the SDK does.

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self._sink is not None:
            self._attrs[key] = value

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        if self._sink is not None:
            self._attrs.update(attributes)

    def add_event(self, name: str, attributes: Attributes = None, timestamp: int | None = None) -> None:
        if self._sink is not None:
            self._events.append((name, timestamp or time.time_ns(), dict(attributes) if attributes else {}))

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        if self._sink is not None:
            self._links.append(_link(context))

    def update_name(self, name: str) -> None:
        if self._sink is not None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._sink is None:
            return
        if isinstance(status, Status):
            code, description = status.status_code, status.description
        else:
            code = status
        # As the SDK's Status: only an error has a description.
        self._status = (code.value, description if code is StatusCode.ERROR else None)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        # The type only: an exception's message may quote the request (tensor values, names a caller sent).
        self.add_event("exception", {"exception.type": type(exception).__qualname__, **(attributes or {})}, timestamp)

    def end(self, end_time: int | None = None) -> None:
        sink, self._sink = self._sink, None
        if sink is None:
            return  # ended already
        ctx, parent = self._ctx, self._parent
        sink.append(
            (
                self._name,
                ctx.trace_id,
                ctx.span_id,
                _state(ctx),
                None if parent is None else (parent.span_id, parent.is_remote),
                self._kind.value,
                self._start,
                end_time or time.time_ns(),
                self._attrs,
                self._links or (),  # the shared empty tuple: nothing to build when unpickled
                self._events or (),
                self._status,
            )
        )


def steps_record(
    request: SpanContext,
    enqueued_ns: int,
    started_ns: int,
    ended_ns: int,
    batch: SpanContext | None,
    rows: int,
    provider: str,
) -> SpanRecord:
    link = None if batch is None else _link(batch)
    return (
        STEPS,
        request.trace_id,
        _state(request),
        (request.span_id, request.is_remote),
        enqueued_ns,
        started_ns,
        ended_ns,
        link,
        rows,
        provider,
    )


def child_record(
    parent: SpanContext, name: str, start_ns: int, end_ns: int, error: str | None, status: str | None
) -> SpanRecord:
    """A finished child of a sampled span, with the times already measured: what a LightSpan started and ended at
    those times records, without the span object (validation, once per request). `error` is the error's type,
    `status` the description of an ERROR status (None: unset)."""
    return (
        name,
        parent.trace_id,
        _new_id(64),
        _state(parent),
        (parent.span_id, parent.is_remote),
        0,
        start_ns,
        end_ns,
        {} if error is None else {"error.type": error},
        (),
        (),
        None if status is None else (StatusCode.ERROR.value, status),
    )


def _link(ctx: SpanContext) -> tuple[int, int, int, tuple[tuple[str, str], ...], bool]:
    return (ctx.trace_id, ctx.span_id, int(ctx.trace_flags), _state(ctx), ctx.is_remote)


def _state(ctx: SpanContext) -> tuple[tuple[str, str], ...]:
    return tuple(ctx.trace_state.items()) if ctx.trace_state else ()


class LightTracer(trace.Tracer):
    """ParentBased(TraceIdRatioBased(rate)) sampling, or TraceIdRatioBased(rate) alone when not `parent_based`
    (OTEL_TRACES_SAMPLER's always_on, always_off, traceidratio); sampled spans are LightSpans, the others carry ids
    only."""

    def __init__(self, sink: list[SpanRecord], rate: float, *, parent_based: bool = True) -> None:
        self._sink = sink
        self.enabled = True
        """False: nothing is traced, sampled callers included (TraceSetting's trace_level OFF), and a caller's context
        passes through unchanged."""
        self.parent_based = parent_based
        """Whether a caller's decision is followed; otherwise its trace id decides, as for a new trace."""
        self.rate = rate
        self.remaining = UNLIMITED
        """TraceSetting's trace_count: the inference traces still to take (`took` counts them down, on the event
        loop); at 0 no trace starts or is joined, as while OFF, but the traces under way finish."""

    @property
    def rate(self) -> float:
        """The share of new traces kept; set at run time by TraceSetting (one int store, safe under the GIL)."""
        return self._rate

    @rate.setter
    def rate(self, rate: float) -> None:
        self._rate = rate
        self._bound = round(rate * (1 << 64))  # TraceIdRatioBased: the low 64 bits of the trace id under it

    def took(self, span: trace.Span) -> None:
        """`span` is an inference request's (its RPC's): one fewer left under trace_count if it is sampled."""
        if self.remaining > 0 and span.is_recording():
            self.remaining -= 1

    def start_span(
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        current = trace.get_current_span(context).get_span_context()
        parent: SpanContext | None = current
        if current.is_valid:
            if not self.enabled or (current.is_remote and self.remaining == 0):
                # OFF (or trace_count spent): tensorgate is not there for the trace. The caller's context goes on
                # as it came, its sampled flag and span id included, so that a remote backend still joins the
                # caller's trace under the caller's span (a span of ours, recorded by nobody, would leave it under
                # a parent never exported).
                return NonRecordingSpan(current)
            trace_id, state = current.trace_id, current.trace_state
            sampled = current.trace_flags.sampled if self.parent_based else (trace_id & _LOW_64) < self._bound
        else:
            trace_id = _new_id(128)
            sampled = self.enabled and self.remaining != 0 and (trace_id & _LOW_64) < self._bound
            state, parent = _NO_STATE, None
        ctx = SpanContext(trace_id, _new_id(64), False, _SAMPLED if sampled else _UNSAMPLED, state)
        if not sampled:
            return NonRecordingSpan(ctx)
        return LightSpan(self._sink, name, ctx, parent, kind, start_time or time.time_ns(), attributes, links)

    @contextmanager
    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        span = self.start_span(name, context, kind, attributes, links, start_time)
        with trace.use_span(span, end_on_exit=end_on_exit, record_exception=record_exception) as current:
            yield current


class SpanPipe:
    """The server side: a LightTracer, the list its spans end in, and the thread shipping that list to the
    exporter process. `dropped` counts spans lost because the exporter process was behind or gone, had not sent
    them when close() stopped it, or could not export them (the collector refused them, or never took them within
    the exporter's retries)."""

    def __init__(self, settings: TracingSettings, *, queue_batches: int = QUEUE_BATCHES) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork of grpc's threads
        self._queue: multiprocessing.Queue[list[SpanRecord] | None] = ctx.Queue(queue_batches)
        self._sink: list[SpanRecord] = []
        sampler = settings.sampler()
        self.tracer = LightTracer(self._sink, sampler.rate, parent_based=sampler.parent_based)
        self._lost = 0
        """Spans that never reached the exporter process, or that it had not handled when it was stopped."""
        self._shipped = 0
        """Spans put on the queue; what the exporter process has not handled of them by the end is dropped too."""
        # Written by the exporter process only: spans it tried to send, and those of them that did not go out.
        self._handled = ctx.Value("q", 0, lock=False)
        self._failed = ctx.Value("q", 0, lock=False)
        self._warned_at = 0.0
        self._process: BaseProcess = ctx.Process(
            target=export_main,
            args=(settings, self._queue, self._handled, self._failed, current_setup()),
            name="tensorgate-span-export",
            daemon=True,
        )
        self._process.start()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._ship_forever, name="tensorgate-span-ship", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Spans lost on the way to the collector, wherever they were lost (read by the metrics collector)."""
        return self._lost + int(self._failed.value)

    def record(self, record: SpanRecord) -> None:
        """A record made outside a LightSpan (a STEPS record, or a finished child from `child_record`), shipped
        with the spans."""
        self._sink.append(record)

    def _take(self) -> list[SpanRecord]:
        """The finished spans so far; `end()` may append meanwhile from other threads, so slice, then delete."""
        n = len(self._sink)
        taken = self._sink[:n]
        del self._sink[:n]
        return taken

    def _ship(self) -> None:
        spans = self._take()
        if not spans:
            return
        count = span_count(spans)
        try:
            if not self._process.is_alive():
                raise queue.Full
            self._queue.put_nowait(spans)
            self._shipped += count
        except (queue.Full, ValueError, OSError):  # behind, or gone
            self._lost += count
            now = time.monotonic()
            if now - self._warned_at > 60:
                self._warned_at = now
                state = "behind" if self._process.is_alive() else "not running"
                log.warning("span export process is %s: %d span(s) dropped so far", state, self.dropped)

    def _ship_forever(self) -> None:
        while not self._stop.wait(SHIP_INTERVAL_S):
            self._ship()

    def close(self) -> None:
        """Ship what is left and let the exporter process send it, within CLOSE_TIMEOUT_S in all; then stop it.
        What it had not sent by then is counted in `dropped`."""
        self._stop.set()
        self._thread.join()
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        self._ship()  # a full queue is an exporter many seconds behind: waiting for room would not get these out
        if self._process.is_alive():
            try:
                # Room for the end only comes as the exporter sends: wait for it no longer than for the export.
                self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
                self._process.join(max(0.0, deadline - time.monotonic()))
            except (queue.Full, ValueError, OSError):
                pass
        if self._process.is_alive():
            log.warning("span export process did not finish in %.0f s; stopping it", CLOSE_TIMEOUT_S)
            self._process.terminate()
            self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._queue.close()
        self._queue.cancel_join_thread()  # what the process did not read is gone with it
        lost = self._shipped - self._handled.value
        if lost > 0:
            self._lost += lost
            log.warning("span export: %d span(s) not sent before the exporter stopped", lost)


# ----- the exporter process --------------------------------------------------------------------------------


def _span_context(
    trace_id: int, span_id: int, flags: int, state: Sequence[tuple[str, str]], remote: bool
) -> SpanContext:
    return SpanContext(trace_id, span_id, remote, TraceFlags(flags), TraceState(list(state)) if state else None)


def expand(records: list[SpanRecord]) -> list[SpanRecord]:
    """Span records only: each STEPS record becomes its queue and execute spans, with new span ids."""
    spans: list[SpanRecord] = []
    for r in records:
        if r[0] != STEPS:
            spans.append(r)
            continue
        _, trace_id, state, parent, enqueued, started, ended, link, rows, provider = r
        spans.append((QUEUE_SPAN, trace_id, _new_id(64), state, parent, 0, enqueued, started, {}, (), (), None))
        spans.append(
            (
                EXECUTE_SPAN,
                trace_id,
                _new_id(64),
                state,
                parent,
                0,
                started,
                ended,
                execute_attributes(rows, provider),
                () if link is None else (link,),
                (),
                None,
            )
        )
    return spans


def readable(record: SpanRecord, resource: Resource, scope: InstrumentationScope) -> ReadableSpan:
    """The SDK's view of a span record (for an exporter that takes ReadableSpans)."""
    from opentelemetry.sdk.trace import Event, ReadableSpan

    name, trace_id, span_id, state, parent, kind, start, end, attrs, links, events, status = record
    sampled = TraceFlags.SAMPLED
    return ReadableSpan(
        name=name,
        context=_span_context(trace_id, span_id, sampled, state, False),
        parent=None if parent is None else _span_context(trace_id, parent[0], sampled, (), parent[1]),
        resource=resource,
        attributes=attrs,
        events=[Event(n, a, t) for n, t, a in events],
        links=[Link(_span_context(lt, ls, lf, lstate, remote)) for lt, ls, lf, lstate, remote in links],
        kind=SpanKind(kind),
        status=Status(StatusCode(status[0]), status[1]) if status is not None else Status(StatusCode.UNSET),
        start_time=start,
        end_time=end,
        instrumentation_scope=scope,
    )


Sender = Callable[[list[SpanRecord]], bool]
"""Exports a chunk of records; False when they did not go out (the collector refused them, or the exporter's
retries ran out): the SDK's exporter logs why, the server counts them as dropped."""


def wire_sender(exporter: SpanExporter, writer: TraceRequestWriter) -> Sender | None:
    """The SDK exporter sending requests that `writer` encodes from the records (otlp_wire.py), or None when the
    exporter lacks the hook this needs. Its retries, headers, compression, TLS and timeouts stay the SDK's; only
    the encoding is ours, about eight times cheaper than ReadableSpans and the SDK's encoder.

    - gRPC: the exporter's `_translate_data` hook, where the SDK passes its spans through its own encoder.
    - HTTP: the exporter's transport client (`_client.export(bytes)`), which its `export` calls with the bytes
      the SDK's encoder wrote. Requests stay far under the exporter's size limit: EXPORT_CHUNK spans each."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.sdk.trace.export import SpanExportResult

    if isinstance(exporter, GrpcExporter) and callable(getattr(exporter, "_translate_data", None)):
        hooked: Any = exporter  # records go where the SDK passes ReadableSpans
        hooked._translate_data = lambda records: ExportTraceServiceRequest.FromString(writer.write(records))
        hooked._count_data = len
        return lambda records: hooked.export(records) is SpanExportResult.SUCCESS
    client: Any = getattr(exporter, "_client", None)
    if isinstance(exporter, HttpExporter) and callable(getattr(client, "export", None)):
        # Logs its own failures, as export() would; its result says whether the collector took the request.
        return lambda records: bool(client.export(writer.write(records)).success)
    return None


def _sender(settings: TracingSettings) -> tuple[Sender, Callable[[], None]]:
    """How the exporter process sends a chunk of records (`wire_sender`, else ReadableSpans through the SDK's
    own encoder), and how it shuts its exporter down."""
    from opentelemetry.sdk.trace.export import SpanExportResult
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from tensorgate.server import __version__
    from tensorgate.server.telemetry.otlp_wire import TraceRequestWriter
    from tensorgate.server.telemetry.tracing import build_exporter, build_resource

    resource = build_resource()
    exporter = build_exporter(settings)
    send = wire_sender(exporter, TraceRequestWriter(resource, "tensorgate", __version__))
    if send is None:
        log.warning("span export: %s has no hook for tensorgate's encoder; using the SDK's", type(exporter).__name__)
        scope = InstrumentationScope("tensorgate", __version__)

        def send_readable(records: list[SpanRecord]) -> bool:
            return exporter.export([readable(r, resource, scope) for r in records]) is SpanExportResult.SUCCESS

        send = send_readable
    return send, exporter.shutdown


def span_count(records: list[SpanRecord]) -> int:
    """The spans these records make: a STEPS record is two."""
    return len(records) + sum(1 for r in records if r[0] == STEPS)


def export_main(
    settings: TracingSettings,
    spans: multiprocessing.Queue[list[SpanRecord] | None],
    handled: Any = None,
    failed: Any = None,
    log_setup: tuple[str, str] = ("WARNING", "text"),
) -> None:
    """Process entry point (importable, for "spawn"): OTLP export of what the server ships, until None. `handled`
    (a shared int) counts the spans it has tried to send, so that the server can count the rest as dropped
    when it has to stop this process; `failed` (another) those of them that did not go out. `log_setup` is the
    server's level and format: this process's lines (the exporter's retries and failures, which the dropped-spans
    alert sends operators to read) share the server's stream and must parse like its own."""
    import signal

    # The server decides when this process ends (None on the queue, after its drain); Ctrl-C, and the SIGHUP of a
    # closed terminal, reach the whole process group and must not cut the last export short. SIGTERM keeps its
    # default: it is how the server stops an exporter that has not finished in time (a collector that is down
    # makes every export wait).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    configure_logging(*log_setup)
    send, shutdown = _sender(settings)
    parent = multiprocessing.parent_process()
    try:
        while True:
            try:
                shipment = spans.get(timeout=PARENT_CHECK_S)
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    return  # the server died without saying so (SIGKILL): nothing more will come
                continue
            if shipment is None:
                return
            records = expand(shipment)
            for i in range(0, len(records), EXPORT_CHUNK):
                chunk = records[i : i + EXPORT_CHUNK]
                try:
                    sent = send(chunk)
                except Exception:  # noqa: BLE001 - one failed export must not end the process
                    log.exception("span export failed")
                    sent = False
                if not sent and failed is not None:
                    failed.value += len(chunk)
                if handled is not None:
                    handled.value += len(chunk)
    finally:
        shutdown()


__all__ = [
    "LightSpan",
    "LightTracer",
    "SpanPipe",
    "child_record",
    "execute_attributes",
    "expand",
    "export_main",
    "readable",
    "steps_record",
    "wire_sender",
]
