"""Per model-version scheduler and dynamic batcher, with Triton's `dynamic_batching` semantics.

All queue work happens on the event loop, in plain callbacks (no task per request or per batch): a request is
queued, `_dispatch` forms batches while an instance is free, and each batch runs on the model's own thread pool,
where the inputs are stacked, the model runs and the outputs are split. The loop only resolves futures.

A request leaves the queue without running when its caller cancels or its gRPC deadline passes (it never takes a
batch slot), when its queue timeout passes with timeout_action REJECT, or when the queue is closed.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
from opentelemetry.trace import SpanContext, StatusCode

from tensorgate.protos.tensors import ParamValue
from tensorgate.server.backends.base import (
    NO_CONTEXT,
    Backend,
    BatchContext,
    RunsRemotely,
    SequenceFlags,
    upstream_parameters,
)
from tensorgate.server.errors import (
    BackendError,
    DeadlineExceededError,
    ResourceExhaustedError,
    ServerUnavailableError,
    model_ref,
)
from tensorgate.server.scheduling.batch import plan_batch, split_outputs, stack_inputs
from tensorgate.server.scheduling.policy import SchedulingPolicy
from tensorgate.server.telemetry.statistics import ExecutionTimes, ModelStats
from tensorgate.server.telemetry.tracing import Tracing

Outputs = dict[str, np.ndarray]


@dataclass(slots=True, eq=False)
class _Pending:
    """One queued request, carrying its own future."""

    inputs: Mapping[str, np.ndarray]
    outputs: Sequence[str]
    rows: int
    shape_key: tuple[tuple[str, tuple[int, ...]], ...]
    future: asyncio.Future[tuple[Outputs, ExecutionTimes]]
    enqueued_ns: int
    deadline: float | None
    """Absolute time.monotonic() when the caller stops waiting (gRPC deadline)."""
    queue_deadline: float | None
    """Absolute time.monotonic() when the queue policy's timeout passes."""
    level: int
    delayed: bool = False
    span: SpanContext | None = None
    """The request's span when tracing is on (sampled or not): the batch span links the sampled ones."""
    sequence: SequenceFlags | None = None
    """A remote sequence model's request: its flags go upstream with it (such a model never batches requests)."""
    settled: asyncio.Future[None] | None = None
    """A remote sequence model's request: resolved when its batch is over, even after its caller left, so that the
    next request of its sequence does not go upstream while this one may still be on its way."""
    batch: _Batch | None = None
    """The batch it runs in, while that batch is handed to an instance, for a remote backend, which stops
    abandoned batches (`Scheduler._left`); cleared when the batch is over, so that the two do not keep each other
    alive."""
    request_id: str = ""
    parameters: Mapping[str, ParamValue] | None = None
    """A remote backend's request: its id and parameters, which go upstream with its batch (BatchContext)."""
    parameters_key: tuple[tuple[str, str, ParamValue], ...] = ()
    """`parameters` comparable: only requests with equal keys batch together (each key's type counts too, so
    that true and 1 differ)."""


@dataclass(slots=True)
class _Batch:
    requests: list[_Pending]
    started_ns: int = 0
    times: ExecutionTimes | None = None
    results: list[Outputs] = field(default_factory=list)
    outputs: Outputs = field(default_factory=dict)
    error: BaseException | None = None
    expired: list[_Pending] = field(default_factory=list)
    """Requests of a staged batch whose caller left or whose deadline passed before an instance took the batch:
    never computed, failed (or dropped) by `_finish` on the event loop."""
    abandoned: Future[None] | None = None
    """BatchContext.abandoned: resolved on the event loop once no caller of the batch waits (`Scheduler._left`)."""


def _drop_expired(batch: _Batch) -> None:
    """On the worker, as it takes a staged batch: requests whose caller left (their future is done; reading that
    flag from this thread is safe) or whose deadline passed are not computed."""
    now = time.monotonic()
    live = []
    for p in batch.requests:
        if p.future.done() or (p.deadline is not None and now >= p.deadline):
            batch.expired.append(p)
        else:
            live.append(p)
    batch.requests = live


def _shape_key(inputs: Mapping[str, np.ndarray], batching: bool) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Requests batch together only when their inputs match in name and per-row shape."""
    if not batching:
        return ()
    return tuple((name, a.shape[1:]) for name, a in inputs.items())


def _context(requests: Sequence[_Pending], abandoned: Future[None] | None) -> BatchContext:
    """The batch is worth finishing until its most patient caller gives up: the latest deadline, and whether a
    caller without one waits too (a remote backend then allows the longer of its own limit and that deadline).
    A remote sequence model's batch is one request, whose sequence flags go with it; a remote model's batch
    carries its requests' parameters (alike in every request of it), and a lone request's id."""
    deadlines = [p.deadline for p in requests if p.deadline is not None]
    first = requests[0]
    if not deadlines and first.sequence is None and abandoned is None and first.parameters is None:
        return NO_CONTEXT
    return BatchContext(
        deadline=max(deadlines) if deadlines else None,
        open_ended=len(deadlines) < len(requests),
        sequence=first.sequence,
        abandoned=abandoned,
        request_id=first.request_id if len(requests) == 1 else "",
        parameters=first.parameters,
    )


def _cancel_timers(timers: list[asyncio.TimerHandle], _done: object) -> None:
    for timer in timers:
        timer.cancel()


LANES_KEPT = 32
"""Empty lanes are kept while there are no more than this (a model's few levels: no deque made and dropped per
request); past it, only those with requests waiting."""


class Scheduler:
    """Queues requests for one model version and runs them, batched when the config asks for it."""

    def __init__(
        self,
        model: str,
        version: int,
        backend: Backend,
        stats: ModelStats,
        instances: int,
        policy: SchedulingPolicy,
        tracing: Tracing | None = None,
    ) -> None:
        if instances < 1:
            raise ValueError(f"instances must be >= 1, got {instances}")
        self._model = model
        self._version = version
        self._backend = backend
        self._stats = stats
        self._policy = policy
        self._tracing = tracing
        self._loop = asyncio.get_running_loop()
        # One thread per instance, fed by one queue: a batch costs a queue put and a call_soon_threadsafe, not the
        # futures and callbacks of run_in_executor (measured: the hand-off, not the model, bounds 1-row serving).
        self._work: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._worker, name=f"tg-{model}-{version}-{i}", daemon=True)
            for i in range(instances)
        ]
        try:
            for thread in self._threads:
                thread.start()
        except BaseException:
            # Out of threads part way: those started would wait on the queue for the life of the process.
            for thread in self._threads:
                if thread.ident is not None:
                    self._work.put(None)
            raise
        self._instances = instances
        self._free = instances
        """Instances not running a batch; down to -instances while full batches wait staged for busy instances."""
        # Two FIFOs per priority level, in service order: its queue, then its requests delayed by timeout_action
        # DELAY (as Triton's: behind their own level, ahead of lower levels). Level L's are at 2L-2 and 2L-1,
        # made when a request first waits there and dropped once empty: priority_levels may be up to 2^64-1.
        self._lanes: dict[int, collections.deque[_Pending]] = {}
        self._queued = 0
        self._running = 0
        self._timer: asyncio.TimerHandle | None = None
        self._dispatch_soon = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._holders = 0
        self._unheld = asyncio.Event()
        self._unheld.set()
        self._settles = False
        """Some request carried `settled` (a remote sequence model's): batches resolve them when over."""
        self._handed: dict[int, _Batch] = {}
        """Batches put on the instances' queue that no instance has taken yet (staged ones), by id."""
        self._remote = isinstance(backend, RunsRemotely) and backend.runs_remotely
        """The backend runs batches upstream: each batch gets BatchContext.abandoned (a future), and its requests'
        ids and parameters, which only requests with equal parameters share a batch to carry."""
        self._ref = model_ref(model, version)

    @property
    def queued(self) -> int:
        """Requests waiting for a batch slot (not those running); read on the event loop."""
        return self._queued

    # ----- intake ------------------------------------------------------------------------------------------

    def _level(self, priority: int | None) -> int:
        """As in Triton: 0, a missing priority or one beyond priority_levels means the default level."""
        if priority is None or not 1 <= priority <= self._policy.priority_levels:
            return self._policy.default_priority
        return priority

    async def submit(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        rows: int,
        deadline: float | None = None,
        *,
        priority: int | None = None,
        timeout_us: int | None = None,
        span: SpanContext | None = None,
        sequence: SequenceFlags | None = None,
        request_id: str = "",
        parameters: Mapping[str, ParamValue] | None = None,
    ) -> tuple[Outputs, ExecutionTimes]:
        """Queue one request and wait for its outputs.

        `span` is the request span's context (`Tracing.context_of`), for the batch span's links and a remote
        backend; `sequence` the flags of a request to a remote sequence model (scheduling/remote_sequences.py),
        for its backend; `request_id` and `parameters` the request's, which a remote backend sends upstream (those
        of its parameters the server does not consume itself: `upstream_parameters`; ignored for a local one,
        whose batches they would only split). Raises RESOURCE_EXHAUSTED when its
        priority level's queue is full, DEADLINE_EXCEEDED when a timeout passes while it is queued, UNAVAILABLE
        when the model is being unloaded, and the backend's own errors.
        """
        if self._closed:
            raise ServerUnavailableError(f"{self._ref} is being unloaded")
        level = self._level(priority)
        qp = self._policy.queue_policy(level)
        if qp.max_queue_size and self._waiting(level) >= qp.max_queue_size:
            raise ResourceExhaustedError(
                f"{self._ref}: queue for priority level {level} is full (max_queue_size {qp.max_queue_size})"
            )
        timeout_ns = qp.timeout_ns
        if timeout_us is not None and timeout_us > 0 and qp.allow_timeout_override:
            timeout_ns = min(timeout_ns, timeout_us * 1000) if timeout_ns else timeout_us * 1000
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        pending = _Pending(
            inputs=inputs,
            outputs=outputs,
            rows=rows,
            shape_key=_shape_key(inputs, self._policy.batching),
            future=loop.create_future(),
            enqueued_ns=time.perf_counter_ns(),
            deadline=deadline,
            queue_deadline=now + timeout_ns / 1e9 if timeout_ns else None,
            level=level,
            span=span,
            sequence=sequence,
            settled=None if sequence is None else loop.create_future(),
        )
        if self._remote:
            pending.request_id = request_id
            forwarded = upstream_parameters(parameters)  # the key holds only what goes upstream, not `timeout`
            if forwarded:
                pending.parameters = forwarded
                pending.parameters_key = tuple(sorted((k, type(v).__name__, v) for k, v in forwarded.items()))
        if sequence is not None:
            self._settles = True
        self._lane(pending).append(pending)
        self._queued += 1
        self._idle.clear()
        timers: list[asyncio.TimerHandle] = []
        if pending.queue_deadline is not None:
            timers.append(loop.call_later(timeout_ns / 1e9, self._queue_timeout, pending))
        if deadline is not None:
            # Answer at the deadline itself, not when an instance frees up and the dispatcher looks again.
            timers.append(loop.call_later(max(deadline - now, 0.0), self._deadline_passed, pending))
        if timers:
            # A long queue timeout must not keep a served request's inputs alive until it fires.
            pending.future.add_done_callback(functools.partial(_cancel_timers, timers))
        if not self._dispatch_soon:
            # Batches form once the requests that arrived in this loop iteration are all queued, not on the first:
            # gRPC hands the loop several requests at a time, and a batch per request would pay the thread hand-off
            # (the cost that bounds 1-row serving) per request. No timer: the batch leaves in this iteration.
            self._dispatch_soon = True
            loop.call_soon(self._dispatch_queued)
        try:
            return await pending.future
        except asyncio.CancelledError:
            # The caller went away: leave the queue now, so the request frees its place under max_queue_size and
            # the head of the queue (and with it the batch timer) is recomputed. In a batch, it just gets no result.
            pending.future.cancel()
            if self._remove(pending):
                self._fail_queued(pending, asyncio.CancelledError())
                self._dispatch()
            elif pending.batch is not None:
                self._left(pending.batch)
            elif pending.settled is not None:
                await asyncio.shield(pending.settled)  # in a batch already: it may still reach the upstream
            raise
        finally:
            # An error set on the future (a deadline, a backend's failure) is raised here with this frame in its
            # traceback, and the future holds it: without this, a cycle that keeps the request's inputs until a
            # full garbage collection, which a busy server may not run for thousands of calls.
            del pending

    @staticmethod
    def _left(batch: _Batch) -> None:
        """A caller of a batch handed to an instance left: once none waits (each future is done: cancelled, or
        failed at its deadline), tell the backend, which stops the work nobody will read (a remote one cancels
        its upstream call). On the event loop, the only place that resolves `abandoned` and the callers' futures;
        `requests` and `expired` together always hold every request of the batch, whichever the worker moved."""
        abandoned = batch.abandoned
        if abandoned is not None and not abandoned.done():
            if all(p.future.done() for p in (*batch.requests, *batch.expired)):
                abandoned.set_result(None)

    def _waiting(self, level: int) -> int:
        lanes = self._lanes
        return len(lanes.get(2 * level - 2, ())) + len(lanes.get(2 * level - 1, ()))

    def _lane(self, pending: _Pending) -> collections.deque[_Pending]:
        """The FIFO a queued request waits in. Both of its level's count toward that level's max_queue_size: a
        request delayed by timeout_action DELAY still waits in its level's queue, as Triton counts it."""
        index = 2 * pending.level - 2 + pending.delayed
        lane = self._lanes.get(index)
        if lane is None:
            lane = self._lanes[index] = collections.deque()
        return lane

    def _remove(self, pending: _Pending) -> bool:
        """Take a request out of its lane; False when it already left the queue (it is in a batch)."""
        try:
            self._lane(pending).remove(pending)
        except ValueError:
            return False
        self._queued -= 1
        return True

    def _deadline_passed(self, pending: _Pending) -> None:
        self._reject(pending, "the call's deadline")

    def _queue_timeout(self, pending: _Pending) -> None:
        if pending.future.done() or pending.delayed:
            return
        qp = self._policy.queue_policy(pending.level)
        if qp.delay_on_timeout:
            if self._remove(pending):
                pending.delayed = True
                self._lane(pending).append(pending)
                self._queued += 1
            return
        self._reject(pending, "queue timeout")

    def _reject(self, pending: _Pending, why: str) -> None:
        """Fail a request that is still queued; one already in a batch runs to the end (its timeout was for the
        queue, and failing it now would report DEADLINE_EXCEEDED for work that is being done anyway)."""
        if pending.future.done():
            return
        error = DeadlineExceededError(f"{self._ref}: {why} passed while the request was queued")
        if self._remove(pending):
            self._fail_queued(pending, error)
        elif self._staged(pending):
            pending.future.set_exception(error)  # the instance drops it, and `_finish` settles it
        else:
            return
        self._dispatch()

    @staticmethod
    def _fail_queued(pending: _Pending, error: BaseException) -> None:
        """Fail a request taken out of its queue before any batch had it (unless its caller left already). It
        never runs, so it is settled too: a remote sequence's next request, and this one's caller if it leaves
        now, wait for `settled`, which only a batch's end would resolve otherwise."""
        if not pending.future.done():
            pending.future.set_exception(error)
        if pending.settled is not None and not pending.settled.done():
            pending.settled.set_result(None)

    def _deadline_error(self) -> DeadlineExceededError:
        """For a request found past its gRPC deadline before it ran (in the queue, or in a staged batch)."""
        return DeadlineExceededError(f"{self._ref}: the call's deadline passed while it was queued")

    def _staged(self, pending: _Pending) -> bool:
        """Whether the request waits in a staged batch that no instance has taken yet (the instance skips it)."""
        return any(pending in batch.requests for batch in list(self._handed.values()))

    # ----- batch formation (event loop) --------------------------------------------------------------------

    def _candidates(self, now: float) -> list[_Pending]:
        """Live queued requests in service order; drops cancelled and expired ones on the way."""
        out: list[_Pending] = []
        for index in sorted(self._lanes):
            lane = self._lanes[index]
            for p in list(lane):
                if p.future.done() or (p.deadline is not None and now >= p.deadline):
                    lane.remove(p)
                    self._queued -= 1
                    self._fail_queued(p, self._deadline_error())
                else:
                    out.append(p)
            if not lane and len(self._lanes) > LANES_KEPT:  # requests may name any of 2^64-1 levels
                del self._lanes[index]
        return out

    def _dispatch(self) -> None:
        """Send batches while an instance is free; arm a timer when the batch should wait for more requests.

        While every instance is busy, a batch that can no longer grow (max_batch_size rows) is staged: it waits in
        the instances' queue, one per instance at most, so that an instance that finishes starts it at once
        instead of waiting for the event loop to hand it one (with large requests that wait idled the model about
        a third of the time). See `_may_stage` for which batches qualify."""
        policy = self._policy
        while self._queued > 0 and self._free > -self._instances:
            busy = self._free <= 0
            if busy and not policy.batching:
                break
            now = time.monotonic()
            queue = self._candidates(now)
            if not queue:
                break
            first = queue[0]
            if policy.batching:
                # As Triton's: the batch is the run of requests shaped as the first; one of another shape ends it
                # (it goes next, in its turn, rather than being overtaken by later requests of the first's shape).
                same: list[_Pending] = []
                for p in queue:
                    if p.shape_key != first.shape_key or p.parameters_key != first.parameters_key:
                        break
                    same.append(p)
                # The delay counts from the oldest request that could go (as Triton's does): a later request of
                # higher priority at the front must not restart the clock of one that has waited longer.
                waited = time.perf_counter_ns() - min(p.enqueued_ns for p in same)
                count = plan_batch(
                    [p.rows for p in same],
                    policy.max_batch_size,
                    policy.preferred_batch_sizes,
                    waited >= policy.max_queue_delay_ns,
                    has_delay=policy.max_queue_delay_ns > 0,
                    closed=len(same) < len(queue),
                )
                if busy and not self._may_stage(same[:count]):
                    break
                if count == 0:
                    self._arm_timer((policy.max_queue_delay_ns - waited) / 1e9)
                    break
                chosen = same[:count]
            else:
                chosen = [first]
            for p in chosen:
                self._lane(p).remove(p)
                self._queued -= 1
            self._start(_Batch(chosen))
        self._maybe_idle()

    def _may_stage(self, chosen: list[_Pending]) -> bool:
        """Only where staging cannot change what is served: a full batch (it cannot grow), one priority level (no
        later request could overtake it), and no queue timeout on its requests (none could be rejected or delayed
        by one while staged). The caller's gRPC deadline still holds: the instance drops expired requests."""
        return (
            bool(chosen)
            and self._policy.priority_levels == 1
            and sum(p.rows for p in chosen) >= self._policy.max_batch_size
            and all(p.queue_deadline is None for p in chosen)
        )

    def _dispatch_queued(self) -> None:
        self._dispatch_soon = False
        self._dispatch()

    def _arm_timer(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(max(delay, 0.0), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    # ----- execution (worker thread) -----------------------------------------------------------------------

    def _start(self, batch: _Batch) -> None:
        if self._remote and batch.requests[0].sequence is None:
            # Not for a sequence's request: cancelled upstream, it may still have run there or not, and the next
            # request of its sequence must not go before that is settled (`settled`).
            batch.abandoned = Future()
            for p in batch.requests:
                p.batch = batch
        self._free -= 1
        self._running += 1
        self._handed[id(batch)] = batch
        self._work.put(batch)

    def _worker(self) -> None:
        """An instance: runs batches until it takes None, and hands each one back to the event loop."""
        while (batch := self._work.get()) is not None:
            batch.started_ns = time.perf_counter_ns()
            self._handed.pop(id(batch), None)
            _drop_expired(batch)
            try:
                if batch.requests:
                    self._execute(batch)
            except BaseException as exc:  # noqa: BLE001 - every error goes back to the batch's callers
                if isinstance(exc, Exception) and not isinstance(exc, StopIteration | StopAsyncIteration):
                    batch.error = exc
                else:
                    # SystemExit, KeyboardInterrupt... from model code would stop the event loop once raised in a
                    # caller's task, and a future refuses StopIteration (the batch would go unanswered): the
                    # callers get an error that names the model instead.
                    batch.error = BackendError(self._model, self._version, f"the model raised {type(exc).__name__}")
            try:
                self._loop.call_soon_threadsafe(self._finish, batch)
            except RuntimeError:  # the loop is closed: the server is gone, nobody waits for this batch
                return

    def _execute(self, batch: _Batch) -> None:
        """Stack, run, split: everything that touches tensors happens here, off the event loop."""
        t0 = time.perf_counter_ns()
        requests = batch.requests
        wanted: list[str] = []
        for p in requests:
            for name in p.outputs:
                if name not in wanted:
                    wanted.append(name)
        inputs = stack_inputs([p.inputs for p in requests])
        t1 = time.perf_counter_ns()
        context = _context(requests, batch.abandoned)
        traced = None
        if self._tracing is not None:
            traced = [p for p in requests if p.span is not None and p.span.trace_flags.sampled]
            if not traced and requests[0].span is not None:
                # Nobody in the batch is sampled: a remote backend still hears that, and records nothing either.
                context = dataclasses.replace(context, trace=requests[0].span)
        if traced:
            self._execute_traced(batch, inputs, wanted, context, traced)
        else:
            batch.outputs = self._backend.execute(inputs, wanted, context)
        t2 = time.perf_counter_ns()
        try:
            batch.results = split_outputs(
                batch.outputs,
                [p.rows for p in requests],
                [p.outputs for p in requests],
                self._policy.batch_dimension,
            )
        except ValueError as exc:
            raise BackendError(
                self._model,
                self._version,
                f"batched output is malformed: {exc}; a model whose outputs do not have the batch dimension first "
                "needs max_batch_size: 0 in config.pbtxt",
            ) from exc
        batch.outputs = {}
        t3 = time.perf_counter_ns()
        batch.times = ExecutionTimes(0, t1 - t0, t2 - t1, t3 - t2, sum(p.rows for p in requests))

    def _execute_traced(
        self,
        batch: _Batch,
        inputs: Mapping[str, np.ndarray],
        wanted: list[str],
        context: BatchContext,
        traced: list[_Pending],
    ) -> None:
        """The model run inside a batch span that links every traced request; then each request's queue and
        execute spans, with the times already measured."""
        assert self._tracing is not None
        rows = sum(p.rows for p in batch.requests)
        provider = self._backend.execution_provider
        offset = time.time_ns() - time.perf_counter_ns()  # perf_counter stamps -> epoch ns
        spans = [p.span for p in traced if p.span is not None]
        span = self._tracing.start_batch(self._model, self._version, spans, rows, provider, batch.started_ns + offset)
        # Current on this worker thread while the backend runs: its log records carry the batch's trace ids.
        token = self._tracing.use(span)
        try:
            batch.outputs = self._backend.execute(
                inputs, wanted, dataclasses.replace(context, trace=span.get_span_context())
            )
        except BaseException as exc:
            span.set_status(StatusCode.ERROR, type(exc).__qualname__)
            raise
        finally:
            Tracing.release(token)
            span.end()
            ended = time.perf_counter_ns() + offset
            batch_ctx = span.get_span_context()
            for p in traced:
                assert p.span is not None
                self._tracing.request_spans(
                    p.span, p.enqueued_ns + offset, batch.started_ns + offset, ended, batch_ctx, rows, provider
                )

    def _finish(self, batch: _Batch) -> None:
        self._free += 1
        self._running -= 1
        if batch.abandoned is not None:
            for p in (*batch.expired, *batch.requests):
                p.batch = None
        for p in batch.expired:
            if not p.future.done():
                p.future.set_exception(self._deadline_error())
        if self._settles:
            for p in (*batch.expired, *batch.requests):
                if p.settled is not None and not p.settled.done():
                    p.settled.set_result(None)
        exc = batch.error
        if exc is None and batch.times is not None:
            rows = sum(p.rows for p in batch.requests)
            self._stats.record_execution(rows, batch.times)
            t = batch.times
            for p, result in zip(batch.requests, batch.results, strict=True):
                if not p.future.done():
                    times = ExecutionTimes(
                        batch.started_ns - p.enqueued_ns,
                        t.compute_input_ns,
                        t.compute_infer_ns,
                        t.compute_output_ns,
                        t.batch_rows,
                    )
                    p.future.set_result((result, times))
        else:
            for p in batch.requests:
                if not p.future.done():
                    p.future.set_exception(exc if exc is not None else RuntimeError("batch produced no result"))
        self._dispatch()

    # ----- lifecycle ---------------------------------------------------------------------------------------

    def _maybe_idle(self) -> None:
        if self._queued == 0 and self._running == 0:
            self._idle.set()

    def reject_waiting(self, why: str) -> None:
        """Fail every request that has not started, queued or staged in a batch no instance has taken yet, with
        UNAVAILABLE "<model> <why>": none of them ran, so their callers may send them again elsewhere. A staged
        batch drops them when an instance takes it (their futures are done)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        message = f"{self._ref} {why}"
        for batch in list(self._handed.values()):
            for p in batch.requests:
                if not p.future.done():
                    p.future.set_exception(ServerUnavailableError(message))
        for lane in self._lanes.values():
            for p in lane:
                self._fail_queued(p, ServerUnavailableError(message))
        self._lanes.clear()
        self._queued = 0
        self._maybe_idle()  # a second close() returns at once instead of waiting out its grace

    def hold(self) -> None:
        """An ensemble request that will send this model a step: until `release`, closing waits before it refuses
        new work, as Triton keeps an ensemble's models for the lifetime of each of its requests (a step must not
        fail because its model was unloaded after the request started)."""
        self._holders += 1
        self._unheld.clear()

    def release(self) -> None:
        self._holders -= 1
        if self._holders == 0:
            self._unheld.set()

    async def close(self, grace: float | None = None) -> None:
        """Refuse new work, let queued and running requests finish (up to `grace` seconds), then stop the threads.
        Ensemble requests that hold this model may still send it their steps until they let go (within `grace`)."""
        deadline = None if grace is None else time.monotonic() + grace
        try:
            await asyncio.wait_for(self._unheld.wait(), grace)
        except TimeoutError:
            pass
        self._closed = True
        try:
            await asyncio.wait_for(
                self._idle.wait(), None if deadline is None else max(0.0, deadline - time.monotonic())
            )
        except TimeoutError:
            pass
        self.reject_waiting("was unloaded before the request ran")
        for _ in self._threads:
            self._work.put(None)  # each instance finishes its running batch, if any, then exits
