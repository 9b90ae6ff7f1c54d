"""Prometheus metrics on `--metrics-port` (`/metrics`, text format), on a registry the server owns.

    registry = CollectorRegistry()
    metrics = Metrics(registry, repository, gate=gate, auth=auth, loop=asyncio.get_running_loop())
    server = MetricsServer(registry, "127.0.0.1", 0, tls=None)
    port = server.start()   # a thread serves /metrics; server.stop() closes it

Nothing here touches prometheus_client on the request path. Requests add to plain dicts and histograms that live
on the event loop (RequestCounts, statistics.LatencyHistograms), as ModelStatistics' counters already do, so a
request pays a dict update and three `bisect`s and no lock. A scrape asks the loop for a snapshot of those
counters, the repository, the drain gate and the authorizer (one callback on the loop, so nothing is read while
it changes), then builds the metric families on the HTTP thread.

Besides tensorgate_*: prometheus_client's process and platform collectors (CPU, memory, fds, Python version) and,
when NVML can read a GPU this process can use, the tensorgate_gpu_* families (gpu.py), all on the same injected
registry. `reference()` lists every family /metrics can show; README's metrics table is generated from it
(`reference_markdown()`), and tests check both against a real scrape.

With TLS the port speaks HTTPS with the gRPC port's certificate and key (and requires a client certificate when
the gRPC port does); the files are re-read when they change, with the gRPC port's checks and retries (the same
`TlsReloader`). /metrics is not under the authorization policy: see README's Security section.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from tensorgate.server import __version__
from tensorgate.server.auth.policy import SEQUENCE_OWNER
from tensorgate.server.auth.tls import TlsFiles, TlsReloader, ssl_server_context
from tensorgate.server.backends.base import backend_ready
from tensorgate.server.errors import TensorgateError
from tensorgate.server.log_limit import Sparse
from tensorgate.server.repository.manager import is_unloaded
from tensorgate.server.repository.rollout import ROUTED_VERSION
from tensorgate.server.scheduling.sequencer import SequenceOwnerError
from tensorgate.server.telemetry.gpu import (
    GPU_FAMILIES,
    GPU_LABELS,
    TRITON_GPU_FAMILIES,
    TRITON_GPU_LABELS,
    NvmlReader,
    open_gpu_metrics,
)
from tensorgate.server.telemetry.statistics import Histogram
from tensorgate.server.telemetry.tracing import request_cut_code

if TYPE_CHECKING:
    from tensorgate.server.auth.policy import Authorizer
    from tensorgate.server.pipeline.cache import ResponseCache
    from tensorgate.server.repository.manager import ModelRepository
    from tensorgate.server.rpc.byte_budget import ByteBudget
    from tensorgate.server.rpc.drain import DrainGate
    from tensorgate.server.telemetry.tracing import Tracing

log = logging.getLogger(__name__)

# Executed batch sizes (rows per model execution).
BATCH_SIZE_BOUNDS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Repository states as the model state gauge names them; not_ready: loaded, but ModelReady says false (a remote
# model whose upstream is down or not serving it), so that /metrics shows what a readiness probe sees.
MODEL_STATES = ("loading", "ready", "not_ready", "failed", "unloaded")
SNAPSHOT_TIMEOUT_S = 5.0
DENIAL_REASONS = {
    "invalid token": "invalid_token",
    "missing token": "missing_token",
    "in-flight limit": "in_flight_limit",
    "revoked token": "revoked_token",
    "expired certificate": "expired_certificate",
    SEQUENCE_OWNER: "sequence_owner",
}
"""The authorizer's denial keys that are not an RPC name, as the reason label spells them; any other key is the
RPC that the policy refused (reason policy)."""

RequestKey = tuple[str, str, str]


class RequestCounts:
    """Inference requests per (model, version, status code name); updated on the event loop only.

    A request refused because its sequence belongs to another identity is an authorization refusal made past the
    RPC boundary (where the sequence is known): it is counted in `denials` too, the authorizer's counter of every
    other refusal, so that tensorgate_auth_denials_total shows them all."""

    __slots__ = ("counts", "_repository", "_denials")

    def __init__(self, repository: ModelRepository, denials: Counter[tuple[str, str]] | None = None) -> None:
        self.counts: dict[RequestKey, int] = {}
        self._repository = repository
        self._denials = denials

    def ok(self, model: str, version: str) -> None:
        """A request that succeeded on the served `model`/`version` (from the response: bounded by construction)."""
        key = (model, version, "OK")
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1

    def failed(self, model: str, version: str, exc: BaseException, deadline: float | None = None) -> None:
        """A request that failed; the names are the request's, so unknown ones are folded into "" labels.
        `deadline` (time.monotonic(), as the servicer keeps it) and the call's timeout (CALL_TIMEOUT, set by the
        RPC boundary) tell a call cancelled by its deadline from one whose caller went away."""
        if isinstance(exc, TensorgateError):
            code = exc.code.name
            if isinstance(exc, SequenceOwnerError) and self._denials is not None:
                self._denials[(exc.identity, SEQUENCE_OWNER)] += 1
        elif isinstance(exc, asyncio.CancelledError):
            code = request_cut_code(deadline)
        else:
            code = "INTERNAL"
        if not version:  # the version it was sent to (a split or the version policy): counted under it
            version = ROUTED_VERSION.get() or ""
        key = (*self._repository.metric_labels(model, version), code)
        self.counts[key] = self.counts.get(key, 0) + 1

    def retain(self, versions: set[tuple[str, str]]) -> None:
        """Forget the series of model versions not in `versions` (those the repository serves or failed to load):
        an unloaded version's requests go with its histograms and gauges, as Triton's per-model metrics go with
        the model, and a later load starts from zero. Series without a version (names only) stay."""
        for key in [k for k in self.counts if k[1] and (k[0], k[1]) not in versions]:
            del self.counts[key]


@dataclass(slots=True)
class _HistogramCopy:
    counts: list[int]
    sum: float

    @classmethod
    def of(cls, h: Histogram) -> _HistogramCopy:
        return cls(list(h.counts), h.sum_ns / 1e9)


@dataclass(slots=True)
class _ModelSnapshot:
    model: str
    version: str
    queued: int
    load_seconds: float
    batches: dict[int, int]
    latency: tuple[_HistogramCopy, _HistogramCopy, _HistogramCopy] | None
    cache: tuple[int, int] = (0, 0)
    """Response cache hits and misses."""
    sequences: tuple[int, int] | None = None
    """A sequence model's active sequences and those of them waiting for a slot."""
    responses: tuple[_HistogramCopy, _HistogramCopy] | None = None
    """A decoupled model's waits for the first response and between responses."""


@dataclass(slots=True)
class Snapshot:
    """What one scrape exports, copied on the event loop."""

    requests: dict[RequestKey, int]
    models: list[_ModelSnapshot]
    states: list[tuple[str, str, str]]
    in_flight: int
    denials: dict[tuple[str, str], int]
    spans_dropped: int | None = None
    """Spans the exporter process could not take (None: tracing off, or through an injected provider)."""
    cache: tuple[int, int] | None = None
    """The response cache's bytes held and evictions (None: no cache)."""
    certificates: dict[str, float] = field(default_factory=dict)
    """When the certificate each TLS port serves expires (Unix seconds), by port label."""
    canary_shares: list[tuple[str, str, float]] = field(default_factory=list)
    """(model, canary version, its share now in percent) of each model with a canary split."""
    rolled_back: list[tuple[str, str, str, bool]] = field(default_factory=list)
    """(model, canary version, reason: alert or errors, whether it holds the canary back now)."""
    shadow_runs: dict[tuple[str, str, str], int] = field(default_factory=dict)
    """Shadow runs by (model, shadow version, outcome)."""
    bytes_in_flight: int | None = None
    """Bytes the byte budget holds for running requests (None: no budget)."""


def _state_name(state: str, reason: str) -> str:
    if state == "READY":
        return "ready"
    if state == "LOADING":
        return "loading"
    return "unloaded" if is_unloaded(reason) else "failed"


def _buckets(bounds: Iterable[float], counts: list[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip(bounds, counts, strict=False):
        running += count
        out.append((repr(float(bound)), running))
    out.append(("+Inf", sum(counts)))
    return out


_LATENCY_BOUNDS_S = tuple(ns / 1e9 for ns in Histogram().bounds_ns)


@dataclass(frozen=True, slots=True)
class FamilySpec:
    """One metric family as /metrics exposes it (counters with their `_total`); the collector builds its families
    from these and README's table is generated from them, so names, labels and meanings have one source."""

    name: str
    type: str
    labels: tuple[str, ...]
    help: str

    def family(self) -> Any:
        """An empty family to add samples to (Any: each family type's add_metric takes different values)."""
        cls = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}
        return cls[self.type](self.name, self.help, labels=list(self.labels))


_MV = ("model", "version")
BUILD_INFO = FamilySpec("tensorgate_build_info", "gauge", ("version",), "tensorgate's version (always 1)")
REQUESTS = FamilySpec(
    "tensorgate_inference_requests_total",
    "counter",
    (*_MV, "code"),
    "Inference requests (ModelInfer calls and ModelStreamInfer messages) by model, version and gRPC status code "
    'name; names the server does not know are counted under model="" or version=""',
)
REQUEST_DURATION = FamilySpec(
    "tensorgate_request_duration_seconds",
    "histogram",
    _MV,
    "Successful requests: time from model lookup to response, in the server (buckets 100 us to 10 s)",
)
QUEUE_DURATION = FamilySpec(
    "tensorgate_queue_duration_seconds",
    "histogram",
    _MV,
    "Successful requests: time spent queued before their batch started (buckets 100 us to 10 s)",
)
COMPUTE_DURATION = FamilySpec(
    "tensorgate_compute_duration_seconds",
    "histogram",
    _MV,
    "Successful requests: compute time (input, infer, output) of the execution they ran in (buckets 100 us to 10 s)",
)
FIRST_RESPONSE = FamilySpec(
    "tensorgate_first_response_seconds",
    "histogram",
    _MV,
    "Decoupled models: time from a request's arrival to its first response, which for a model streaming tokens "
    "is the time to first token (buckets 100 us to 10 s)",
)
RESPONSE_GAP = FamilySpec(
    "tensorgate_response_gap_seconds",
    "histogram",
    _MV,
    "Decoupled models: time between one response of a request and the next, the time between tokens of a model "
    "streaming them (buckets 100 us to 10 s)",
)
BATCH_SIZE = FamilySpec(
    "tensorgate_batch_size",
    "histogram",
    _MV,
    "Rows per model execution (executed batch size, buckets 1 to 1024); _count is ModelStatistics' execution_count",
)
QUEUE_DEPTH = FamilySpec(
    "tensorgate_queue_depth",
    "gauge",
    _MV,
    "Requests waiting in the model's queue (a sequence model's: also those behind an earlier request of their "
    "sequence, and a local one's waiting for a slot)",
)
SEQUENCES_ACTIVE = FamilySpec(
    "tensorgate_sequences_active",
    "gauge",
    _MV,
    "Sequences of a sequence (stateful) model started and not yet ended, those waiting for a slot included",
)
SEQUENCE_BACKLOG = FamilySpec(
    "tensorgate_sequence_backlog",
    "gauge",
    _MV,
    "Sequences of a sequence model waiting for a slot (all held: raise max_candidate_sequences, or max_batch_size "
    "with the direct strategy, or the instance count)",
)
CACHE_LOOKUPS = FamilySpec(
    "tensorgate_response_cache_lookups_total",
    "counter",
    (*_MV, "result"),
    "Response cache lookups of models with response_cache enabled: result hit (answered without running the model) "
    "or miss",
)
LOAD_DURATION = FamilySpec(
    "tensorgate_model_load_duration_seconds",
    "gauge",
    _MV,
    "How long loading the served version took (read, build session, warm up)",
)
MODEL_STATE = FamilySpec(
    "tensorgate_model_state",
    "gauge",
    (*_MV, "state"),
    "1 for the state each model version is in (loading, ready, not_ready, failed, unloaded), 0 for the others; "
    "not_ready: loaded, but ModelReady is false (a remote model whose upstream is down or not serving it); "
    'version="" when a whole model is loading, failed or unloaded',
)
IN_FLIGHT = FamilySpec(
    "tensorgate_inflight_requests",
    "gauge",
    (),
    "Inference-service RPCs running now (an open ModelStreamInfer counts as one)",
)
IN_FLIGHT_BYTES = FamilySpec(
    "tensorgate_inflight_request_bytes",
    "gauge",
    (),
    "Bytes of input tensors held by the requests running now, out of --max-in-flight-bytes (with a budget only)",
)
AUTH_DENIALS = FamilySpec(
    "tensorgate_auth_denials_total",
    "counter",
    ("identity", "reason", "rpc"),
    "Calls refused by authorization: reason policy (rpc names the RPC), missing_token, invalid_token, revoked_token "
    "(a stream whose bearer token a policy reload revoked), expired_certificate (a resumed TLS session whose client "
    "certificate has expired since), in_flight_limit or sequence_owner (a request into a sequence that another "
    "identity started)",
)
TLS_EXPIRY = FamilySpec(
    "tensorgate_tls_certificate_expiry_timestamp_seconds",
    "gauge",
    ("port",),
    "When the certificate a TLS port (grpc, metrics) serves expires: its not_after in Unix seconds, updated by the "
    "port's first connection after a rotation (TLS on only); alert when it minus time() is under 7 days",
)
SPANS_DROPPED = FamilySpec(
    "tensorgate_trace_spans_dropped_total",
    "counter",
    (),
    "Finished spans dropped because the span exporter process was behind or not running, or because their export "
    "failed: the collector refused it or did not answer within the exporter's retries (tracing on only)",
)
CACHE_BYTES = FamilySpec(
    "tensorgate_response_cache_bytes",
    "gauge",
    (),
    "Bytes of answers held by the response cache, out of --response-cache-bytes (with the cache on only)",
)
CACHE_EVICTIONS = FamilySpec(
    "tensorgate_response_cache_evictions_total",
    "counter",
    (),
    "Answers the response cache dropped to make room (with the cache on only): many, and the cache is too small",
)
CANARY_SHARE = FamilySpec(
    "tensorgate_rollout_canary_share",
    "gauge",
    _MV,
    "Percent of the requests that name no version going to the canary version now (tensorgate.rollout.*): its "
    "canary_percent or the ramp's step, 0 while rolled back (an alert fires on it, or its failures went over "
    "max_error_percent) or while it is not served",
)
CANARY_ROLLED_BACK = FamilySpec(
    "tensorgate_rollout_canary_rolled_back",
    "gauge",
    (*_MV, "reason"),
    "1 while the canary version gets no share because an alert fires on it (reason alert, with rollback_on_alert) "
    "or its failures went over max_error_percent (reason errors), else 0: what tells a rollback from a share "
    "of 0 that the config asks for",
)
SHADOW_RUNS = FamilySpec(
    "tensorgate_rollout_shadow_runs_total",
    "counter",
    (*_MV, "outcome"),
    "Requests answered by the stable version and run again on the shadow version (version), by outcome: ok, "
    "failed, or dropped (too many shadow runs of the model at once)",
)
SERVER_FAMILIES: tuple[FamilySpec, ...] = (
    REQUESTS,
    REQUEST_DURATION,
    QUEUE_DURATION,
    COMPUTE_DURATION,
    FIRST_RESPONSE,
    RESPONSE_GAP,
    BATCH_SIZE,
    QUEUE_DEPTH,
    SEQUENCES_ACTIVE,
    SEQUENCE_BACKLOG,
    CACHE_LOOKUPS,
    CACHE_BYTES,
    CACHE_EVICTIONS,
    IN_FLIGHT,
    IN_FLIGHT_BYTES,
    MODEL_STATE,
    LOAD_DURATION,
    AUTH_DENIALS,
    TLS_EXPIRY,
    SPANS_DROPPED,
    CANARY_SHARE,
    CANARY_ROLLED_BACK,
    SHADOW_RUNS,
    BUILD_INFO,
)


def reference() -> list[FamilySpec]:
    """Every family /metrics can show: tensorgate's, the GPU's (only where a GPU is read), then those of
    prometheus_client's process and platform collectors, read from the collectors so the text is theirs."""
    specs = list(SERVER_FAMILIES)
    specs += [FamilySpec(name, "gauge", GPU_LABELS, text) for name, text in GPU_FAMILIES.items()]
    specs += [FamilySpec(name, "gauge", TRITON_GPU_LABELS, text) for name, text in TRITON_GPU_FAMILIES.items()]
    for collector in (ProcessCollector(registry=None), PlatformCollector(registry=None)):
        for f in collector.collect():
            labels = tuple(sorted({k for sample in f.samples for k in sample.labels}))
            specs.append(
                FamilySpec(f.name + "_total" if f.type == "counter" else f.name, f.type, labels, f.documentation)
            )
    return specs


def markdown_table(specs: Iterable[FamilySpec]) -> str:
    """A README table of metric families: name, type, labels, meaning."""
    rows = ["| Name | Type | Labels | Meaning |", "|---|---|---|---|"]
    rows += [f"| `{s.name}` | {s.type} | {', '.join(s.labels)} | {s.help.rstrip('.')}. |" for s in specs]
    return "\n".join(rows) + "\n"


def reference_markdown() -> str:
    """README's metrics table; regenerate it with
    `python -c 'from tensorgate.server.telemetry.metrics import reference_markdown as r; print(r())'`.
    The monitoring families (--data-dir) have their own table in README's monitoring section, generated by
    `tensorgate.server.monitoring.monitor.reference_markdown()`."""
    return markdown_table(reference())


class _ServerCollector(Collector):
    """Builds the tensorgate_* families from a snapshot taken on the event loop."""

    def __init__(self, snapshot: Callable[[], Snapshot], loop: asyncio.AbstractEventLoop) -> None:
        self._snapshot = snapshot
        self._loop = loop

    def _take(self) -> Snapshot | None:
        future: concurrent.futures.Future[Snapshot] = concurrent.futures.Future()

        def take() -> None:
            try:
                future.set_result(self._snapshot())
            except BaseException as exc:  # noqa: BLE001 - handed to the scraping thread
                future.set_exception(exc)

        try:
            self._loop.call_soon_threadsafe(take)
            return future.result(SNAPSHOT_TIMEOUT_S)
        except RuntimeError:  # the loop is closed: the server is stopping
            return None
        except concurrent.futures.TimeoutError:
            log.warning(
                "metrics: the event loop did not answer within %.0fs; scrape without server metrics", SNAPSHOT_TIMEOUT_S
            )
            return None

    def collect(self) -> Iterable[Metric]:
        info = BUILD_INFO.family()
        info.add_metric([__version__], 1)
        yield info
        snap = self._take()
        if snap is None:
            return
        requests = REQUESTS.family()
        for (model, version, code), n in sorted(snap.requests.items()):
            requests.add_metric([model, version, code], n)
        yield requests
        histograms = [REQUEST_DURATION.family(), QUEUE_DURATION.family(), COMPUTE_DURATION.family()]
        responses = [FIRST_RESPONSE.family(), RESPONSE_GAP.family()]
        batch = BATCH_SIZE.family()
        depth = QUEUE_DEPTH.family()
        active, backlog = SEQUENCES_ACTIVE.family(), SEQUENCE_BACKLOG.family()
        load = LOAD_DURATION.family()
        lookups = CACHE_LOOKUPS.family()
        for m in snap.models:
            key = [m.model, m.version]
            if m.latency is not None:
                for family, h in zip(histograms, m.latency, strict=True):
                    family.add_metric(key, _buckets(_LATENCY_BOUNDS_S, h.counts), h.sum)
            if m.responses is not None:
                for family, h in zip(responses, m.responses, strict=True):
                    family.add_metric(key, _buckets(_LATENCY_BOUNDS_S, h.counts), h.sum)
            per_bucket = [0] * (len(BATCH_SIZE_BOUNDS) + 1)
            for size, n in m.batches.items():
                per_bucket[next((i for i, b in enumerate(BATCH_SIZE_BOUNDS) if size <= b), -1)] += n
            batch.add_metric(
                key, _buckets(BATCH_SIZE_BOUNDS, per_bucket), sum(size * n for size, n in m.batches.items())
            )
            depth.add_metric(key, m.queued)
            if m.sequences is not None:
                active.add_metric(key, m.sequences[0])
                backlog.add_metric(key, m.sequences[1])
            load.add_metric(key, m.load_seconds)
            if m.cache != (0, 0):
                lookups.add_metric([*key, "hit"], m.cache[0])
                lookups.add_metric([*key, "miss"], m.cache[1])
        yield from histograms
        yield from responses
        yield batch
        yield depth
        yield active
        yield backlog
        yield lookups
        yield load
        states = MODEL_STATE.family()
        for model, version, state in snap.states:
            for name in MODEL_STATES:
                states.add_metric([model, version, name], 1 if name == state else 0)
        yield states
        in_flight = IN_FLIGHT.family()
        in_flight.add_metric([], snap.in_flight)
        yield in_flight
        if snap.bytes_in_flight is not None:
            in_flight_bytes = IN_FLIGHT_BYTES.family()
            in_flight_bytes.add_metric([], snap.bytes_in_flight)
            yield in_flight_bytes
        denials = AUTH_DENIALS.family()
        for (identity, what), n in sorted(snap.denials.items()):
            reason = DENIAL_REASONS.get(what)
            denials.add_metric([identity, "policy", what] if reason is None else [identity, reason, ""], n)
        yield denials
        expiry = TLS_EXPIRY.family()
        for port, not_after in sorted(snap.certificates.items()):
            expiry.add_metric([port], not_after)
        yield expiry
        shares, shadows = CANARY_SHARE.family(), SHADOW_RUNS.family()
        for model, version, share in snap.canary_shares:
            shares.add_metric([model, version], share)
        rolled_back = CANARY_ROLLED_BACK.family()
        for model, version, reason, held in snap.rolled_back:
            rolled_back.add_metric([model, version, reason], 1.0 if held else 0.0)
        for (model, version, outcome), n in sorted(snap.shadow_runs.items()):
            shadows.add_metric([model, version, outcome], n)
        yield shares
        yield rolled_back
        yield shadows
        if snap.spans_dropped is not None:
            dropped = SPANS_DROPPED.family()
            dropped.add_metric([], snap.spans_dropped)
            yield dropped
        if snap.cache is not None:
            held, evictions = CACHE_BYTES.family(), CACHE_EVICTIONS.family()
            held.add_metric([], snap.cache[0])
            evictions.add_metric([], snap.cache[1])
            yield held
            yield evictions


class Metrics:
    """The server's metrics on an injected registry: `requests` is counted by the servicer, the rest is read
    from the repository, the drain gate, the authorizer, the process and the GPUs when Prometheus scrapes.
    `close()` releases NVML."""

    def __init__(
        self,
        registry: CollectorRegistry,
        repository: ModelRepository,
        *,
        gate: DrainGate,
        auth: Authorizer,
        loop: asyncio.AbstractEventLoop,
        tracing: Tracing | None = None,
        cache: ResponseCache | None = None,
        budget: ByteBudget | None = None,
    ) -> None:
        self.registry = registry
        self._tracing = tracing
        self._cache = cache
        self._budget = budget
        self.requests = RequestCounts(repository, auth.denials)
        self._repository = repository
        self._gate = gate
        self._auth = auth
        self.certificates: dict[str, TlsReloader[Any]] = {}
        """The TLS ports by port label (grpc, metrics), added by the app once each is set up."""
        ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        PlatformCollector(registry=registry)  # python_info
        registry.register(_ServerCollector(self.snapshot, loop))
        # NVML starts in well under a second, once, before the gRPC port serves anything.
        self._gpu: NvmlReader | None = open_gpu_metrics(registry)

    def close(self) -> None:
        """Release NVML (the GPU families then come back empty)."""
        if self._gpu is not None:
            self._gpu.close()
            self._gpu = None

    def snapshot(self) -> Snapshot:
        """Copy everything a scrape exports; call on the event loop."""
        models = []
        not_ready: set[tuple[str, str]] = set()
        for m in self._repository.loaded():
            if not backend_ready(m.backend):
                not_ready.add((m.name, str(m.version)))
            latency = m.stats.latency
            models.append(
                _ModelSnapshot(
                    m.name,
                    str(m.version),
                    (0 if m.scheduler is None else m.scheduler.queued)  # an ensemble's steps queue elsewhere
                    + (0 if m.remote_sequences is None else m.remote_sequences.waiting)
                    + (0 if m.sequencer is None else m.sequencer.waiting),
                    m.load_seconds,
                    {size: b.compute_infer.count for size, b in m.stats.batch.items()},
                    None
                    if latency is None
                    else (
                        _HistogramCopy.of(latency.total),
                        _HistogramCopy.of(latency.queue),
                        _HistogramCopy.of(latency.compute),
                    ),
                    (m.stats.cache_hit.count, m.stats.cache_miss.count),
                    None if m.sequencer is None else (m.sequencer.active, m.sequencer.backlog),
                    None
                    if latency is None or not m.config.model_transaction_policy.decoupled
                    else (_HistogramCopy.of(latency.first_response), _HistogramCopy.of(latency.response_gap)),
                )
            )
        rows = self._repository.states()
        rollouts = self._repository.rollouts()
        shares = [(r.model, str(r.spec.canary), r.share) for r in rollouts if r.spec.canary is not None]
        self.requests.retain({(r.name, r.version) for r in rows if r.version})
        return Snapshot(
            requests=dict(self.requests.counts),
            models=sorted(models, key=lambda s: (s.model, int(s.version))),
            states=sorted(
                (r.name, r.version, "not_ready" if (r.name, r.version) in not_ready else _state_name(r.state, r.reason))
                for r in rows
            ),
            in_flight=self._gate.in_flight,
            denials=dict(self._auth.denials),
            spans_dropped=None if self._tracing is None or self._tracing.pipe is None else self._tracing.pipe.dropped,
            cache=None if self._cache is None else (self._cache.used, self._cache.evictions),
            bytes_in_flight=None if self._budget is None else self._budget.held,
            certificates={port: reloader.not_after for port, reloader in self.certificates.items()},
            canary_shares=sorted(shares),
            rolled_back=sorted(
                (r.model, str(r.spec.canary), reason, held)
                for r in rollouts
                if r.spec.canary is not None
                for reason, held in (("alert", bool(r.held) and r.spec.rollback_on_alert), ("errors", r.tripped))
            ),
            shadow_runs={
                (r.model, version, outcome): n for r in rollouts for (version, outcome), n in r.shadow_runs.items()
            },
        )


# ----- the HTTP(S) endpoint ------------------------------------------------------------------------------------


class _Handler(WSGIRequestHandler):
    # A client that connects and goes quiet holds one thread for this long, not forever.
    timeout = 10.0

    def setup(self) -> None:
        self.request.settimeout(self.timeout)
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()  # on this connection's thread, so a slow handshake blocks no other scrape
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        """Scrapes are not logged."""


MAX_CONNECTIONS = 64
"""Connections the metrics port serves at once, each on a thread of its own; more are closed at once. A scraper
needs one or two: without a bound, anyone who can reach the port could make the server start a thread per idle
connection (each held for _Handler.timeout), taking memory from the models."""


MAX_CONNECTION_S = 30.0
"""The longest a metrics connection may stay open, whatever it sends: the read timeout (_Handler.timeout) alone
let a client that sends a byte every few seconds hold a slot for good, and MAX_CONNECTIONS of them every slot. A
scrape takes milliseconds (Prometheus gives up after its scrape_timeout, 10 s by default)."""


ACCEPT_RETRY_S = 0.5
"""How long the metrics port waits before accepting again when the process is out of file descriptors."""


class _HttpServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    tls: TlsReloader[ssl.SSLContext] | None = None
    max_connections = MAX_CONNECTIONS
    max_connection_s = MAX_CONNECTION_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._refused_log, self._emfile_log = Sparse(), Sparse()
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._open: dict[int, tuple[Any, float]] = {}
        """The connections being served, by id, with when each opened: `service_actions` ends those open too long."""
        super().__init__(*args, **kwargs)

    def service_actions(self) -> None:
        """Called by serve_forever at every poll (0.1 s): shut the connections open past max_connection_s, which
        wakes their threads' reads with an end of file."""
        if not self._open:
            return
        cutoff = time.monotonic() - self.max_connection_s
        for key, (request, opened) in list(self._open.items()):
            if opened < cutoff and self._open.pop(key, None) is not None:
                log.debug("metrics: closing a connection open for over %g s", self.max_connection_s)
                with contextlib.suppress(OSError):
                    request.shutdown(socket.SHUT_RDWR)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            held = self._refused_log.due()
            if held is not None:
                log.warning(
                    "metrics: %d connections are open, the most the port serves at once: closed one from %s "
                    "(said at most once a minute)%s",
                    self.max_connections,
                    client_address[0] if client_address else "?",
                    Sparse.since(held),
                )
            self.shutdown_request(request)
            return
        self._open[id(request)] = (request, time.monotonic())
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._open.pop(id(request), None)
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._open.pop(id(request), None)
            self._slots.release()

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            sock, address = self.socket.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self._out_of_descriptors(exc)
            raise  # serve_forever drops it and polls again
        if self.tls is None:
            return sock, address
        try:
            wrapped = self.tls.latest().wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError):
            sock.close()
            raise OSError("TLS setup failed") from None
        return wrapped, address

    def _out_of_descriptors(self, exc: OSError) -> None:
        """The connection waits in the listen queue, so the socket stays readable: without a pause, serve_forever
        would poll and fail to accept it again at once, a core's worth of CPU (and the GIL) until a descriptor is
        free. Paused as gRPC's own listener does; said at most once a minute."""
        held = self._emfile_log.due()
        if held is not None:
            log.warning(
                "metrics: cannot accept a connection: %s (the process is at its file descriptor limit, ulimit -n); "
                "trying again every %g s (said at most once a minute)%s",
                exc.strerror,
                ACCEPT_RETRY_S,
                Sparse.since(held),
            )
        time.sleep(ACCEPT_RETRY_S)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Failed handshakes (plaintext clients, wrong certificates) and dropped connections: nothing to act on.
        log.debug("metrics: connection from %s failed", client_address, exc_info=True)


class MetricsServer:
    """`/metrics` over HTTP, or HTTPS with `tls`; `start()` binds and returns the port, `stop()` closes it."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        tls: TlsFiles | None = None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        max_connection_s: float = MAX_CONNECTION_S,
    ) -> None:
        self._registry = registry
        self._max_connections = max_connections
        self._max_connection_s = max_connection_s
        self._host = host
        self._port = port
        # The gRPC port's checks and retries (auth/tls.py), per connection: a bad set at start is an error.
        self._tls = None if tls is None else TlsReloader(tls, lambda _: ssl_server_context(tls), "metrics port", log)
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def scheme(self) -> str:
        return "http" if self._tls is None else "https"

    @property
    def tls(self) -> TlsReloader[ssl.SSLContext] | None:
        """What the port serves with TLS (None: plain HTTP); it polls the files itself, per connection."""
        return self._tls

    def start(self) -> int:
        family, *_, sockaddr = socket.getaddrinfo(
            self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        server_class = type(
            "_BoundHttpServer",
            (_HttpServer,),
            {
                "address_family": family,
                "tls": self._tls,
                "max_connections": self._max_connections,
                "max_connection_s": self._max_connection_s,
            },
        )
        httpd: WSGIServer = make_server(
            str(sockaddr[0]), self._port, make_wsgi_app(self._registry), server_class, _Handler
        )
        self._httpd = httpd
        self.port = int(httpd.server_address[1])
        # serve_forever notices shutdown() once per poll interval: 0.1 s keeps stop() quick for ten idle wake-ups
        # a second.
        self._thread = threading.Thread(target=httpd.serve_forever, args=(0.1,), name="tensorgate-metrics", daemon=True)
        self._thread.start()
        return self.port

    def stop(self) -> None:
        """Blocking: stop accepting, close the socket; scrapes in progress end on their own threads."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._httpd = None


__all__ = [
    "BATCH_SIZE_BOUNDS",
    "MODEL_STATES",
    "SERVER_FAMILIES",
    "FamilySpec",
    "Metrics",
    "MetricsServer",
    "RequestCounts",
    "Snapshot",
    "reference",
    "markdown_table",
    "reference_markdown",
]
