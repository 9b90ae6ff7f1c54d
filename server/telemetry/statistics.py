"""Per model-version counters with Triton's ModelStatistics semantics.

Counts are per request except `execution_count` and `batch_stats`, which count model executions. Durations are
cumulative nanoseconds. All updates happen on the event loop thread, so no locking is needed.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

# Upper bounds of the latency histograms, in nanoseconds: 100 us to 10 s, about three per decade.
LATENCY_BOUNDS_NS: tuple[int, ...] = tuple(
    int(ms * 1_000_000) for ms in (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
)


@dataclass(slots=True)
class Histogram:
    """Cumulative-at-read histogram of nanosecond values: one `bisect` and two additions per observation.

    Updated on the event loop only (no lock); /metrics copies it on the loop too. `counts` has one slot per bound
    plus the +Inf slot; they are per bucket, not cumulative (the exporter sums them).
    """

    bounds_ns: tuple[int, ...] = LATENCY_BOUNDS_NS
    counts: list[int] = field(default_factory=list)
    sum_ns: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds_ns) + 1)

    def observe(self, ns: int) -> None:
        self.counts[bisect.bisect_left(self.bounds_ns, ns)] += 1
        self.sum_ns += ns


@dataclass(slots=True)
class LatencyHistograms:
    """Per model version, for successful requests: end to end in the pipeline, queue wait, and compute; for a
    decoupled model's responses, the wait for the first and between the rest (time to first token, and between
    tokens, for a model streaming them)."""

    total: Histogram = field(default_factory=Histogram)
    queue: Histogram = field(default_factory=Histogram)
    compute: Histogram = field(default_factory=Histogram)
    first_response: Histogram = field(default_factory=Histogram)
    response_gap: Histogram = field(default_factory=Histogram)


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass(slots=True)
class BatchDurations:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ResponseDurations:
    """The responses at one index (0 the first) of a decoupled model's requests: Triton's
    InferResponseStatistics. Their compute_infer is the wait since the response before (since the request
    arrived, for the first), so index 0 is the time to the first response and the rest the gaps between them."""

    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    empty_response: Duration = field(default_factory=Duration)
    cancel: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ExecutionTimes:
    """What one model execution cost, measured on the worker thread."""

    queue_ns: int
    compute_input_ns: int
    compute_infer_ns: int
    compute_output_ns: int
    batch_rows: int = 0
    """Rows of the whole batch the request ran in (its own rows included)."""


@dataclass(slots=True)
class ModelStats:
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    cache_hit: Duration = field(default_factory=Duration)
    cache_miss: Duration = field(default_factory=Duration)
    batch: dict[int, BatchDurations] = field(default_factory=dict)
    responses: dict[int, ResponseDurations] = field(default_factory=dict)
    """Decoupled models only, by response index (`record_response`)."""
    latency: LatencyHistograms | None = None
    """Kept only when the server exports metrics; None costs one attribute test per request."""

    def record_execution(self, batch_size: int, t: ExecutionTimes) -> None:
        """One model execution of `batch_size` rows."""
        self.execution_count += 1
        b = self.batch.get(batch_size)
        if b is None:
            b = self.batch[batch_size] = BatchDurations()
        b.compute_input.add(t.compute_input_ns)
        b.compute_infer.add(t.compute_infer_ns)
        b.compute_output.add(t.compute_output_ns)

    def record_request(self, rows: int, total_ns: int, t: ExecutionTimes) -> None:
        """A request that reached the model and succeeded; its share of the execution it ran in."""
        self.inference_count += rows
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.success.add(total_ns)
        self.queue.add(t.queue_ns)
        self.compute_input.add(t.compute_input_ns)
        self.compute_infer.add(t.compute_infer_ns)
        self.compute_output.add(t.compute_output_ns)
        latency = self.latency
        if latency is not None:
            latency.total.observe(total_ns)
            latency.queue.observe(t.queue_ns)
            latency.compute.observe(t.compute_input_ns + t.compute_infer_ns + t.compute_output_ns)

    def record_cache_hit(self, total_ns: int, lookup_ns: int) -> None:
        """A request answered from the response cache, as Triton counts it: a success, with no inference or
        compute. It counts in `queue` (without time): Triton's queue count is its success count, and perf_analyzer
        finds the model's version by the queue count that grew during a measurement (with every request a hit,
        it found none and stopped)."""
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.success.add(total_ns)
        self.queue.add(0)
        self.cache_hit.add(lookup_ns)
        latency = self.latency
        if latency is not None:
            latency.total.observe(total_ns)

    def record_cache_miss(self, ns: int) -> None:
        """A lookup that missed: its time, and the insertion's after the model answered. Counted whatever the
        model then did (with the lookup's time alone when it failed), as Triton counts a miss even when nothing
        could be inserted, so that hits and misses add up to the lookups."""
        self.cache_miss.add(ns)

    def record_failure(self, total_ns: int) -> None:
        """A request that was queued (or past validation) and got no answer; `last_inference` stays, as Triton
        moves it only for inferences that ran."""
        self.fail.add(total_ns)

    def record_response(self, index: int, ns: int, *, empty: bool) -> None:
        """Response `index` of a decoupled model's request came `ns` after the one before it. An empty one (the
        final flag alone) counts apart, as Triton counts it: it carries no outputs."""
        r = self._response(index)
        r.compute_infer.add(ns)
        if empty:
            r.empty_response.add(ns)
            return
        r.compute_output.add(0)  # relayed as it came: no output tensors to extract
        r.success.add(ns)
        latency = self.latency
        if latency is not None:
            (latency.response_gap if index else latency.first_response).observe(ns)

    def record_response_failure(self, index: int, ns: int, *, cancelled: bool) -> None:
        """A decoupled model's request ended `ns` after its response `index - 1` (after it came, for index 0)
        without response `index`: it failed, or its caller went away (a cancellation)."""
        r = self._response(index)
        if cancelled:
            r.cancel.add(ns)
            return
        r.compute_infer.add(ns)
        r.fail.add(ns)

    def _response(self, index: int) -> ResponseDurations:
        r = self.responses.get(index)
        if r is None:
            r = self.responses[index] = ResponseDurations()
        return r
