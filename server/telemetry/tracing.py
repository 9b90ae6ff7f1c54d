"""OpenTelemetry tracing: the injected TracerProvider, W3C propagation, and the spans of the request path.

Nothing here touches OpenTelemetry's global state: the server owns one `Tracing` (or None when tracing is off, so
that the request path pays one `is None` test). The caller's `traceparent`/`tracestate`/`baggage` gRPC metadata
makes the server span a child of the caller's span; a batch span (see server/scheduling/scheduler.py) links to
every request span it served and passes its own context upstream to remote backends.

Spans carry names, ids, sizes and status codes, never tensor values or error texts that could quote them.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tensorgate.server import __version__
from tensorgate.server.settings import otlp_endpoint_given
from tensorgate.server.telemetry.span_pipe import (
    EXECUTE_SPAN,
    QUEUE_SPAN,
    SpanPipe,
    child_record,
    execute_attributes,
    steps_record,
)
from tensorgate.server.telemetry.trace_settings import TraceState

log = logging.getLogger(__name__)

OTLP_PROTOCOLS = ("grpc", "http/protobuf")
INFERENCE_SERVICE = "inference.GRPCInferenceService"
# OpenTelemetry's RPC conventions for server spans: only these codes mark the server's span as failed; the others
# (NOT_FOUND, INVALID_ARGUMENT, PERMISSION_DENIED, RESOURCE_EXHAUSTED...) are the caller's mistakes or the server
# protecting itself, recorded in rpc.response.status_code and error.type with the span status left unset.
SERVER_ERROR_CODES = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)
STATUS_NUMBERS = {c.name: c.value[0] for c in grpc.StatusCode}
_PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
_FIELDS = frozenset(_PROPAGATOR.fields)
"""The metadata keys the propagator reads: a call without any (most calls) skips extraction."""
_ROOT = otel_context.Context()
COUNTED = frozenset({"ModelInfer", "ModelStreamInfer"})
"""The RPCs whose traces TraceSetting's trace_count counts: Triton's inference requests (a stream is one trace)."""
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
"""OTEL_TRACES_SAMPLER values tensorgate honours (OpenTelemetry's built-in samplers)."""
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """Settings are read more than once at start (checked, then used): one line for each problem."""
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


@dataclass(frozen=True, slots=True)
class Sampler:
    """How new spans are sampled: TraceIdRatioBased(rate), inside ParentBased when `parent_based` (a caller's
    decision is followed; otherwise the trace id decides, whatever the caller sampled)."""

    rate: float
    parent_based: bool = True


@dataclass(slots=True)
class TracingSettings:
    """Where spans go and how many are kept; every field also has its standard OTEL_* variable."""

    otlp_endpoint: str | None = None
    """Collector address (grpc: host:port or http(s)://host:port; http/protobuf: the full /v1/traces URL)."""
    otlp_protocol: str | None = None
    """grpc (default) or http/protobuf; OTEL_EXPORTER_OTLP_PROTOCOL when not given."""
    otlp_headers: dict[str, str] = field(default_factory=dict)
    """Sent with every export (e.g. an API key for a hosted collector); OTEL_EXPORTER_OTLP_HEADERS otherwise."""
    otlp_ca: Path | None = None
    """PEM CA bundle to verify the collector's certificate."""
    otlp_insecure: bool = False
    """Plaintext gRPC to the collector (a sidecar on localhost); https:// endpoints always use TLS."""
    sample_rate: float | None = None
    """Share of new traces kept (parent-based: a sampled caller is always traced); given, it wins over
    OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG (see `sampler`)."""

    @property
    def enabled(self) -> bool:
        """On with an endpoint, from the flag or OTel's own variables; OTEL_SDK_DISABLED=true wins."""
        if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return False
        return otlp_endpoint_given(self.otlp_endpoint)

    def sampler(self) -> Sampler:
        """`sample_rate`, parent-based, when given; else OpenTelemetry's OTEL_TRACES_SAMPLER (parentbased_always_on
        when unset), its ratio samplers reading OTEL_TRACES_SAMPLER_ARG (default 1). Unset with the argument set,
        the argument alone is the parent-based ratio (as tensorgate read it before it read the sampler's name)."""
        if self.sample_rate is not None:
            return Sampler(self.sample_rate, parent_based=True)
        name = os.environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
        if name and name not in SAMPLERS:
            known = ", ".join(SAMPLERS)
            _warn_once(f"OTEL_TRACES_SAMPLER={name!r} is not one tensorgate knows ({known}); sampling as when unset")
            name = ""
        parent_based = not name or name.startswith("parentbased_")
        kind = name.removeprefix("parentbased_")
        if kind == "always_on":
            return Sampler(1.0, parent_based)
        if kind == "always_off":
            return Sampler(0.0, parent_based)
        raw = os.environ.get("OTEL_TRACES_SAMPLER_ARG")
        try:
            return Sampler(1.0 if raw is None else float(raw), parent_based)
        except ValueError:
            _warn_once(f"OTEL_TRACES_SAMPLER_ARG={raw!r} is not a number; sampling every trace")
            return Sampler(1.0, parent_based)

    def protocol(self) -> str:
        protocol = (
            self.otlp_protocol
            or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "grpc"
        )
        if protocol not in OTLP_PROTOCOLS:
            raise ValueError(f"OTLP protocol must be one of {OTLP_PROTOCOLS}, got {protocol!r}")
        return protocol


CALL_TIMEOUT: ContextVar[float | None] = ContextVar("tensorgate_call_timeout", default=None)
"""The current call's `context.time_remaining()` as it arrived, set by the RPC boundary (server/rpc/errors.py) for
`cancelled_code` where a call's failure is counted further in (RequestCounts.failed)."""

DEADLINE_SLACK_S = 0.05
DEADLINE_SLACK_SHARE = 0.02


def cancelled_code(time_remaining: float | None, timeout: float | None) -> str:
    """The status of a call whose handler gRPC cancelled, from its `context.time_remaining()` then and `timeout`
    (what it had on arrival): gRPC cancels it both when the caller goes away and when the deadline passes, and the
    second is what the caller saw as DEADLINE_EXCEEDED: a server too slow for its callers, which spans, access
    lines and /metrics must not hide among callers that hung up.

    The server's deadline falls later than the caller's, so a caller's deadline often reaches the server as its
    cancel, some time before the server's own: grpc-timeout carries three digits, rounded up (a round timeout goes
    up a unit: 1 s arrives as 1.01 s, 30 s as 30.1 s, 100 s as 101 s: 1%), and the server starts its clock when it
    reads the header, after the caller started its. Measured on loopback: 10 ms before the server's deadline for a
    1 s timeout, 100 ms for 10 s and 30 s. So a cancel within 2% of the timeout (twice the rounding) or 50 ms (a
    late read on a loaded host) of the deadline is the deadline; never more than half the timeout, so that a
    short call hung up early stays CANCELLED. A caller that hangs up deliberately that close to its own deadline
    is rare; a late clock is every call."""
    if time_remaining is None:
        return "CANCELLED"
    slack = DEADLINE_SLACK_S
    if timeout is not None:
        slack = min(max(slack, DEADLINE_SLACK_SHARE * timeout), timeout / 2)
    return "DEADLINE_EXCEEDED" if time_remaining <= slack else "CANCELLED"


def request_cut_code(deadline: float | None) -> str:
    """The status of a request cancelled under it, from its `deadline` (time.monotonic(); None without one) and its
    call's timeout (CALL_TIMEOUT): one place for /metrics (RequestCounts.failed), the access line and the span of a
    stream's message, which read CANCELLED while /metrics counted the same timed-out message DEADLINE_EXCEEDED."""
    return cancelled_code(None if deadline is None else deadline - time.monotonic(), CALL_TIMEOUT.get())


def parse_headers(text: str) -> dict[str, str]:
    """`key=value,key2=value2`, as OTEL_EXPORTER_OTLP_HEADERS writes them."""
    headers: dict[str, str] = {}
    items = [item for item in text.split(",") if item.strip()]
    for i, item in enumerate(items, 1):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            # Not echoed: header values are credentials (an API key), and this message lands in logs.
            raise ValueError(f"OTLP header {i} of {len(items)} is not key=value (the value given is not shown)")
        headers[key.strip().lower()] = value.strip()
    return headers


def build_exporter(s: TracingSettings) -> SpanExporter:
    """The SDK's OTLP exporter for these settings (gRPC or HTTP), with its retries and TLS."""
    headers = s.otlp_headers or None
    if s.protocol() == "grpc":
        import grpc
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        credentials = None
        if s.otlp_ca is not None:
            credentials = grpc.ssl_channel_credentials(s.otlp_ca.read_bytes())
        return GrpcExporter(
            endpoint=s.otlp_endpoint,
            insecure=True if s.otlp_insecure else None,
            credentials=credentials,
            headers=headers,
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(
        endpoint=s.otlp_endpoint,
        certificate_file=str(s.otlp_ca) if s.otlp_ca is not None else None,
        headers=headers,
    )


def build_resource() -> Resource:
    """`service.name`, version and host as defaults: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win (an
    operator names the deployment, the pod), as they would over any SDK default."""
    defaults = {"service.name": "tensorgate", "service.version": __version__, "host.name": socket.gethostname()}
    # Resource.create merges what it is given over the environment's: give it the environment's over ours.
    return Resource.create({**defaults, **OTELResourceDetector().detect().attributes})


def check(s: TracingSettings) -> None:
    """What would only fail in the exporter process fails here, at start, with its reason."""
    rate = s.sampler().rate
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"trace sample rate must be in 0..1, got {rate}")
    s.protocol()
    if s.otlp_ca is not None:
        s.otlp_ca.read_bytes()  # a missing or unreadable CA bundle stops the start


class Tracing:
    """The spans tensorgate makes: through an injected TracerProvider, or through a SpanPipe to an exporter process
    (what the server builds from its settings; see span_pipe.py for why)."""

    def __init__(self, provider: trace.TracerProvider | None = None, *, pipe: SpanPipe | None = None) -> None:
        if (provider is None) == (pipe is None):
            raise ValueError("Tracing needs a TracerProvider or a SpanPipe, not both")
        self.provider = provider
        self.pipe = pipe
        self.tracer: trace.Tracer = pipe.tracer if pipe is not None else provider.get_tracer("tensorgate", __version__)  # type: ignore[union-attr]
        self.log_frequency = 0
        """TraceSetting's log_frequency, read back as set: it paces Triton's trace file, not an OTLP export."""
        self.initial_sampling = self.sampling
        """How the server started: what TraceSetting resets a setting to."""

    # ----- RPC spans (event loop) --------------------------------------------------------------------------

    def start_rpc(self, method: str, metadata: Iterable[tuple[str, Any]] | None) -> tuple[Span, object]:
        """The server span of one RPC, child of the caller's span when its metadata carries one; made current
        for the rest of the call (returns the token to `end_rpc`)."""
        carrier = {k: v for k, v in metadata or () if k in _FIELDS and isinstance(v, str)}
        # Without the caller's context the span is a new trace's root, whatever is current where it starts.
        parent = _PROPAGATOR.extract(carrier) if carrier else _ROOT
        attributes: dict[str, str] = {
            "rpc.system": "grpc",
            "rpc.service": INFERENCE_SERVICE,
            "rpc.method": method,
        }
        span = self.tracer.start_span(
            f"{INFERENCE_SERVICE}/{method}", context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return span, token

    def count(self, span: Span, method: str) -> None:
        """TraceSetting's trace_count counts an inference call's trace here, once the caller is let in (identity,
        policy, in-flight cap): a refused call, an anonymous flood included, takes none of it. The RPC boundary
        calls it with no await since `start_rpc`, so two calls cannot both take the last one."""
        if self.pipe is not None and method in COUNTED:
            self.pipe.tracer.took(span)

    @staticmethod
    def set_identity(span: Span, identity: str) -> None:
        """The caller's identity, once the RPC boundary knows it (after the span started, so that a refused token
        is traced too), as a plain str: spans are pickled to the exporter process, which has no auth.Identity."""
        span.set_attribute("enduser.id", str(identity))

    @staticmethod
    def end_rpc(span: Span, token: object | None, code: str, error: BaseException | None = None) -> None:
        """Record the gRPC status (and the exception's type, never its message) and end the span; `token` is
        start_rpc's, or None when the caller already released it (a stream attaches the span step by step)."""
        # The number under the name the RPC conventions define as an int, the name under their newer string key.
        span.set_attribute("rpc.grpc.status_code", STATUS_NUMBERS.get(code, grpc.StatusCode.UNKNOWN.value[0]))
        span.set_attribute("rpc.response.status_code", code)
        if error is not None:
            span.set_attribute("error.type", type(error).__qualname__)
            if code in SERVER_ERROR_CODES:
                span.set_status(Status(StatusCode.ERROR, code))
        span.end()
        if token is not None:
            otel_context.detach(token)  # type: ignore[arg-type]

    def record_child(self, parent: Span, name: str, start_ns: int, error: BaseException | None = None) -> None:
        """A child of `parent` (sampled) that started at `start_ns` (epoch) and ends now: a step timed by its
        caller, such as validation. An `error` is recorded as the server span records it: its type in error.type,
        and status ERROR only for a server error; a caller's mistake (the usual way validation fails) left unset,
        or every trace of a bad request would read as a failed one in Jaeger or Tempo."""
        failure = None if error is None else type(error).__qualname__
        code = None if error is None else getattr(getattr(error, "code", None), "name", "INTERNAL")
        status = code if code in SERVER_ERROR_CODES else None
        if self.pipe is not None:  # the record such a span would make, without making the span
            ctx = parent.get_span_context()
            if ctx.trace_flags.sampled:  # ParentBased, as the LightTracer: no record under a parent sampled out
                self.pipe.record(child_record(ctx, name, start_ns, time.time_ns(), failure, status))
            return
        span = self.tracer.start_span(name, context=trace.set_span_in_context(parent), start_time=start_ns)
        if failure is not None:
            span.set_attribute("error.type", failure)
        if status is not None:
            span.set_status(StatusCode.ERROR, status)
        span.end()

    def start_child(self, name: str, attributes: Mapping[str, str | int] | None = None) -> Span:
        """A span under the current one (the RPC's), e.g. one request of a stream."""
        return self.tracer.start_span(name, attributes=attributes)

    @staticmethod
    def context_of(span: Span) -> SpanContext | None:
        """A request span's context, sampled or not, for the scheduler: it links its batch to the sampled ones,
        and passes an unsampled caller's decision on to a remote backend (with tracing OFF, the caller's own
        context, which the batch passes on as it came)."""
        ctx = span.get_span_context()
        return ctx if ctx.is_valid else None

    @staticmethod
    def headers(ctx: SpanContext) -> dict[str, str]:
        """W3C headers carrying `ctx` as it is (an unsampled trace stays unsampled upstream)."""
        headers: dict[str, str] = {}
        _PROPAGATOR.inject(headers, context=trace.set_span_in_context(NonRecordingSpan(ctx)))
        return headers

    @staticmethod
    def use(span: Span) -> object:
        return otel_context.attach(trace.set_span_in_context(span))

    @staticmethod
    def release(token: object) -> None:
        otel_context.detach(token)  # type: ignore[arg-type]

    # ----- batch spans (worker threads) --------------------------------------------------------------------

    def start_batch(
        self, model: str, version: int, requests: Sequence[SpanContext], rows: int, provider: str, start_ns: int
    ) -> Span:
        """One span per executed batch, a child of its first traced request, linked to every traced request."""
        parent = trace.set_span_in_context(NonRecordingSpan(requests[0]))
        return self.tracer.start_span(
            f"batch {model}",
            context=parent,
            links=[Link(ctx) for ctx in requests],
            attributes={
                "tensorgate.model.name": model,
                "tensorgate.model.version": str(version),
                "tensorgate.batch.size": rows,
                "tensorgate.batch.requests": len(requests),
                "tensorgate.execution_provider": provider,
            },
            start_time=start_ns,
        )

    def request_spans(
        self,
        request: SpanContext,
        enqueued_ns: int,
        started_ns: int,
        ended_ns: int,
        batch: SpanContext | None,
        rows: int,
        provider: str,
    ) -> None:
        """After the batch: the request's queue wait and its share of the execution, as two child spans with the
        times already measured (epoch ns), the second linked to the batch span."""
        if self.pipe is not None:  # the same two spans, made in the exporter process from one record
            # Not for the caller's own context, which OFF (or a spent trace_count) passes on in place of our span.
            tracer = self.pipe.tracer
            if tracer.enabled and (tracer.remaining != 0 or not request.is_remote):
                self.pipe.record(steps_record(request, enqueued_ns, started_ns, ended_ns, batch, rows, provider))
            return
        parent = trace.set_span_in_context(NonRecordingSpan(request))
        self.tracer.start_span(QUEUE_SPAN, context=parent, start_time=enqueued_ns).end(end_time=started_ns)
        self.tracer.start_span(
            EXECUTE_SPAN,
            context=parent,
            links=[Link(batch)] if batch is not None else None,
            attributes=execute_attributes(rows, provider),
            start_time=started_ns,
        ).end(end_time=ended_ns)

    @property
    def sampling(self) -> TraceState | None:
        """Whether tracing runs and the share of new traces kept; None when an injected TracerProvider samples
        (its sampler is its owner's, not something TraceSetting may change)."""
        if self.pipe is None:
            return None
        tracer = self.pipe.tracer
        return TraceState(tracer.enabled, tracer.rate, tracer.remaining, self.log_frequency)

    def set_sampling(self, state: TraceState) -> None:
        if self.pipe is None:
            raise ValueError("an injected TracerProvider's sampler is its owner's")
        self.pipe.tracer.rate = state.rate
        self.pipe.tracer.remaining = state.count
        self.log_frequency = state.log_frequency
        self.pipe.tracer.enabled = state.enabled

    def shutdown(self) -> None:
        """Export what is buffered: the pipe's exporter process sends it and stops; an injected provider is
        flushed and left to its owner."""
        if self.pipe is not None:
            self.pipe.close()
        elif isinstance(self.provider, TracerProvider):
            self.provider.force_flush()


def from_settings(s: TracingSettings) -> Tracing | None:
    """The server's tracing, or None when no endpoint is configured (tracing off costs nothing)."""
    if not s.enabled:
        return None
    check(s)
    return Tracing(pipe=SpanPipe(s))


__all__ = [
    "CALL_TIMEOUT",
    "OTLP_PROTOCOLS",
    "SAMPLERS",
    "Sampler",
    "Tracing",
    "TracingSettings",
    "build_exporter",
    "build_resource",
    "cancelled_code",
    "from_settings",
    "parse_headers",
]
