"""One load process: its own event loop and channels, driving one load level at a time for the parent.

The parent (``runner``) starts the processes with the "spawn" method and talks to each over a pipe: it sends a
``Target`` once, then a ``Level`` per step of the sweep, and receives a ``Samples`` per level. Progress goes
through shared counters; a shared event asks every loop to stop early (Ctrl-C in the parent).

Closed-loop unary load, the mode compared with perf_analyzer, runs on a sync grpc channel driven by completion
callbacks: each answer's callback (on grpc's own completion thread) records it and sends the next request, with
no event loop, task or thread switch per request. Measured against ``benchmarks/bare_server.py --mode noop``
on 2 cores at c=32 it costs the load process ~100 us of CPU per request, against ~130-145 us for the same loop
on grpc.aio with pre-serialized bytes; on a machine where the load generator and the server share the cores,
that CPU is what the server loses. Open loop and streaming stay on grpc.aio, which they need for timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import SynchronizedArray
from multiprocessing.synchronize import Event
from typing import Any, Literal

import grpc
import grpc.aio
import numpy as np

from tensorgate.client import TLSConfig
from tensorgate.client import _stream_writer as stream_writer
from tensorgate.client.config import ChannelSettings
from tensorgate.loadtest.samples import Samples
from tensorgate.protos import GRPCInferenceServiceStub, tensors
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos.service import SERVICE_NAME

__all__ = ["COUNTERS", "Level", "Target", "worker_main"]

COUNTERS = 4
"""Shared counters per worker, in this order: measured requests sent, succeeded, failed, dropped."""

STREAM_ERROR = "STREAM_ERROR"
"""The code counted for a ModelStreamInfer response carrying an error_message (the protocol has no status)."""

STREAM_ENDED = "the server ended the stream without answering"
CANCELLED_BY_STOP = "cancelled by tensorgate bench: a stop request (Ctrl-C) or the end of the level"

TIMER_SLACK_S = 0.001
"""How early an open-loop sleep ends before its arrival is due: asyncio's own lateness, at most (see _wait_for)."""

BACKOFF_S = (0.05, 1.0)
"""First and longest wait (doubling in between) before an open-loop stream is reopened after it broke, and before
a closed-loop slot sends again after UNAVAILABLE."""

RECONNECT_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
"""A load generator should find a restarted server within a second, not after grpc's default backoff (up to 2
minutes): the requests due meanwhile are counted as failures either way."""


class _Backoff:
    """The wait after a failure that comes back at once (a server gone, refusing or draining): BACKOFF_S, doubling
    from the first to the longest, reset by an answer. Without it a closed-loop slot retries as fast as the refusals
    come back (28,000 UNAVAILABLE a second, every core busy) and a broken stream is reopened in a tight loop."""

    def __init__(self) -> None:
        self.wait_s = 0.0

    def failed(self) -> float:
        """Another failure: the seconds to wait before the next try."""
        self.wait_s = min(2 * self.wait_s, BACKOFF_S[1]) if self.wait_s else BACKOFF_S[0]
        return self.wait_s

    def answered(self) -> None:
        self.wait_s = 0.0


@dataclass(frozen=True)
class Target:
    """What every level of the sweep sends, and where."""

    server: str
    model: str
    version: str
    inputs: dict[str, np.ndarray]
    streaming: bool = False
    priority: int | None = None
    timeout_param_us: int | None = None
    deadline_s: float = 30.0
    tls: TLSConfig | None = None
    headers: tuple[tuple[str, str], ...] = ()
    """Metadata on every call (a bearer token)."""
    nice: int = 0
    """Added to the load process's niceness, so that where it shares cores with the server, the server wins."""
    sequence_length: int = 0
    """Against a sequence model: requests per sequence (closed loop only); 0 for requests in no sequence."""
    sequence_ids: str = "int64"
    """The kind of ID the model's CORRID takes (ModelShape.sequence_ids)."""

    def request(self) -> pb.ModelInferRequest:
        params: dict[str, tensors.ParamValue] = {}
        if self.priority is not None:
            params["priority"] = self.priority
        if self.timeout_param_us is not None:
            params["timeout"] = self.timeout_param_us
        return tensors.encode_infer_request(self.model, self.inputs.items(), version=self.version, parameters=params)


@dataclass(frozen=True)
class Level:
    """This worker's share of one load level. Times are ``time.monotonic()`` values (one clock on the host)."""

    mode: Literal["closed", "open"]
    start: float
    warmup_s: float
    duration_s: float
    max_requests: int | None
    concurrency: int = 0
    rate: float = 0.0
    arrival: Literal["poisson", "constant"] = "poisson"
    phase_s: float = 0.0
    max_in_flight: int = 1000
    seed: int = 0

    @property
    def window_start(self) -> float:
        return self.start + self.warmup_s

    @property
    def end(self) -> float:
        return self.window_start + self.duration_s


def worker_main(index: int, conn: Connection, counters: SynchronizedArray[int], stop: Event) -> None:
    """Process entry point (importable, for "spawn")."""
    # Ctrl-C reaches the whole process group; the parent alone decides, and tells the workers through `stop`.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    target: Target = conn.recv()
    if target.nice:
        os.nice(target.nice)
    asyncio.run(_serve(index, target, conn, counters, stop))


async def _serve(index: int, target: Target, conn: Connection, counters: Any, stop: Event) -> None:
    settings = ChannelSettings(tls=target.tls, keepalive_time_s=None)
    options = settings.options() + RECONNECT_OPTIONS
    if target.tls is None:
        channel = grpc.aio.insecure_channel(target.server, options=options)
        sync_channel = grpc.insecure_channel(target.server, options=options)
    else:
        channel = grpc.aio.secure_channel(target.server, target.tls.credentials(), options=options)
        sync_channel = grpc.secure_channel(target.server, target.tls.credentials(), options=options)
    loop = asyncio.get_running_loop()
    method = f"/{SERVICE_NAME}/ModelInfer"
    try:
        async with channel:
            stub = GRPCInferenceServiceStub(channel)
            # Unary calls send the request serialized once and leave the response undecoded: the load process
            # spends its CPU on calls, not on protobuf work whose result it would throw away (errors come as
            # the status).
            calls = _RawInfer(channel.unary_unary(method), sync_channel.unary_unary(method))
            request = target.request()
            ids = _sequence_ids(index, target.sequence_ids)
            conn.send("ready")
            while True:
                try:
                    level: Level | None = await loop.run_in_executor(None, conn.recv)
                except (EOFError, OSError):  # the parent is gone: nobody to load for
                    return
                if level is None:
                    return
                sequences = _Sequences(request, target.sequence_length, ids) if target.sequence_length else None
                run = _LevelRun(index, target, level, stub, calls, request, counters, stop, sequences)
                samples = await run.run()
                try:
                    conn.send(samples)
                except OSError:  # the parent is gone (its level stopped when it went)
                    return
    finally:
        sync_channel.close()


class _Sequences:
    """Closed-loop sequences for a sequence (stateful) model: each request in flight (a slot) runs sequences of
    `length` requests one after another, as perf_analyzer does. IDs are this process's own (a random prefix and its
    worker index), so that runs and workers do not share one (for a 32-bit CORRID, up to 32 load processes). A
    request refused as INVALID_ARGUMENT (its sequence is not active: it went idle, or its server restarted) ends its
    sequence, and so does a START that failed: the slot's next request starts a new one. A START refused by a
    draining server (UNAVAILABLE) began nothing, and the sequence's next requests would each fail after it, the
    first counted as INVALID_ARGUMENT once the server is back, a failure the server never caused."""

    def __init__(self, request: pb.ModelInferRequest, length: int, ids: Iterator[int | str]) -> None:
        self._request = request
        self._length = length
        self._ids = ids
        self._at: dict[int, tuple[int | str, int]] = {}
        """slot -> (its sequence's ID, the position of its next request)."""

    def next(self, slot: int) -> pb.ModelInferRequest:
        sequence_id, position = self._at.get(slot) or (next(self._ids), 0)
        end = position + 1 >= self._length
        if end:
            self._at.pop(slot, None)
        else:
            self._at[slot] = (sequence_id, position + 1)
        return self._message(sequence_id, position == 0, end)

    def open(self, slot: int) -> bool:
        """Whether the slot's sequence has started and not ended."""
        return slot in self._at

    def failed(self, slot: int, code: str) -> None:
        """The slot's last request failed with `code`: its sequence ends when it is not active or never began (a
        START past its deadline may have run: its sequence goes on, and INVALID_ARGUMENT says if it did not)."""
        start = self._at.get(slot, (None, 0))[1] == 1  # the last request sent was the START
        if code == "INVALID_ARGUMENT" or (start and code != "DEADLINE_EXCEEDED"):
            self._at.pop(slot, None)

    def closing(self, slot: int) -> pb.ModelInferRequest:
        """The END of the slot's open sequence, sent unmeasured when the level is over: an open sequence would
        hold one of the model's slots until it went idle, and the next level would wait for it."""
        sequence_id, _ = self._at.pop(slot)
        return self._message(sequence_id, False, True)

    def _message(self, sequence_id: int | str, start: bool, end: bool) -> pb.ModelInferRequest:
        message = pb.ModelInferRequest()
        message.CopyFrom(self._request)
        if isinstance(sequence_id, str):
            message.parameters["sequence_id"].string_param = sequence_id
        else:
            message.parameters["sequence_id"].int64_param = sequence_id
        message.parameters["sequence_start"].bool_param = start
        message.parameters["sequence_end"].bool_param = end
        return message


def _sequence_ids(index: int, kind: str) -> Iterator[int | str]:
    """IDs for load process `index`, of the kind the model's CORRID takes: a random prefix (so that two runs do
    not share IDs) and the process index, then a count; 32-bit IDs stay below 2**31 (up to 32 processes)."""
    prefix = random.getrandbits(20)
    if kind == "string":
        return (f"bench-{prefix:05x}-{index}-{n}" for n in itertools.count(1))
    if kind in ("int32", "uint32"):
        return itertools.count(((index % 32) << 26) | prefix)
    return itertools.count((prefix << 42) | (index << 32))  # < 2**63: an int64 parameter


def _not_in_sequence(error: str) -> bool:
    """A stream's error carries no status code: whether its text says the sequence is not active (tensorgate's
    words, or Triton's)."""
    return "is not active" in error or "must specify the START flag" in error


@dataclass(frozen=True)
class _RawInfer:
    """ModelInfer taking and returning serialized bytes, on the aio channel and on the sync channel."""

    aio: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]
    sync: grpc.UnaryUnaryMultiCallable[bytes, bytes]


class _LevelRun:
    def __init__(
        self,
        index: int,
        target: Target,
        level: Level,
        stub: GRPCInferenceServiceStub,
        calls: _RawInfer,
        request: pb.ModelInferRequest,
        counters: Any,
        stop: Event,
        sequences: _Sequences | None = None,
    ) -> None:
        self.sequences = sequences
        self.raw_infer = calls.aio
        self.sync_infer = calls.sync
        self.raw_request = request.SerializeToString()
        self.metadata = target.headers or None
        self.target = target
        self.level = level
        self.stub = stub
        self.request = request
        self.counters = counters
        self.base = index * COUNTERS
        self.stop_event = stop
        self.parent = os.getppid()
        """The sweep's process: when it is gone (killed by a CI timeout, SIGTERM or SIGKILL, with no chance to set
        ``stop``), the level stops too, instead of loading the server for the rest of its --duration."""
        self.stopped = False
        self.budget = level.max_requests
        self.send_s: list[float] = []
        self.latency_us: list[float] = []
        self.failed: dict[str, int] = {}
        self.messages: dict[str, str] = {}
        """The first message of each failure code."""
        self.sent = 0
        self.dropped = 0
        self.last_done = level.window_start
        # A closed-loop process with no call in flight at this level (c=1 over 2 processes) sends nothing: counted
        # to the level's end, its window was the one kept by the merge, and a --max-requests level that took 0.7 s
        # read as its requests over the whole --duration (100 req/s instead of 700).
        idle = level.mode == "closed" and level.concurrency == 0
        self.sending_until = level.window_start if idle else level.end
        """When this level stopped sending: its end, unless its request budget ran out or a stop came first."""
        self.tasks: set[asyncio.Task[None]] = set()

    # ----- bookkeeping -------------------------------------------------------------------------------------

    def _take(self, t: float) -> bool:
        """Whether a request meant for time ``t`` may go; counts it as sent when it is measured."""
        if t < self.level.window_start:
            return True
        if self.budget is not None:
            if self.budget <= 0:
                self._stopped_sending(t)
                return False
            self.budget -= 1
        self.sent += 1
        self.counters[self.base] += 1
        return True

    def _record(self, t: float, done: float, code: str | None, message: str = "") -> None:
        if t < self.level.window_start:
            return
        if code is None:
            # Only answers mark the end of the window: one request that fails at its deadline, long after the
            # level ended, would otherwise stretch the window and divide the throughput by it.
            self.last_done = max(self.last_done, done)
            self.send_s.append(t - self.level.window_start)
            self.latency_us.append((done - t) * 1e6)
            self.counters[self.base + 1] += 1
        else:
            self.failed[code] = self.failed.get(code, 0) + 1
            self.messages.setdefault(code, message)
            self.counters[self.base + 2] += 1

    def _more(self, now: float) -> bool:
        if self.stopped or now >= self.level.end:
            self._stopped_sending(now)
            return False
        if self.budget is None or self.budget > 0 or now < self.level.window_start:
            return True
        self._stopped_sending(now)
        return False

    def _stopped_sending(self, now: float) -> None:
        self.sending_until = min(self.sending_until, now)

    async def _watch_stop(self) -> None:
        while not self.stop_event.is_set() and os.getppid() == self.parent:
            await asyncio.sleep(0.05)
        self._stopped_sending(time.monotonic())
        self.stopped = True

    async def _wait_for(self, t: float) -> float | None:
        """Open loop: sleep until the arrival due at ``t``; the time to count it from (its window and latency), or
        None when it is not to be sent. An arrival past the level's end ends the level without the sleep, which at a
        low rate could be hours (one arrival gap).

        The sleep ends up to TIMER_SLACK_S early, and a request sent early counts from when it was sent: asyncio
        wakes up to 1 ms late (epoll's timeout is rounded up to the millisecond), and counted from ``t`` that
        lateness read as the server's latency (p50 1.73 ms at 300/s where perf_analyzer measured 0.94 ms).

        A process behind its schedule (a rate it cannot send) still yields to the loop at each arrival, so that
        answers are read as they come, and stops at the level's end: the arrivals it had no time for count as
        dropped. Without either, --rate 1e6 read no answer until its schedule caught up with the clock (1,000 of
        500,000 requests answered, 1.6 s p50) and --rate 1e9 ran for minutes past a 0.5 s level."""
        if not self._more(t):
            return None
        now = time.monotonic()
        if t - TIMER_SLACK_S > now:
            await asyncio.sleep(t - TIMER_SLACK_S - now)
        elif now >= self.level.end:
            self._drop_unsent(t)
            return None
        else:
            await asyncio.sleep(0)
        sent_at = min(t, time.monotonic())
        if t >= self.level.window_start:  # measured as due, if sent early: not taken for a warm-up request
            sent_at = max(sent_at, self.level.window_start)
        return sent_at if self._more(sent_at) and self._take(sent_at) else None

    def _drop_unsent(self, t: float) -> None:
        """Count as dropped the measured arrivals due from ``t`` to the level's end, which a process behind its
        schedule had no time to send."""
        self._drop_many(t, self.level.end, at_least_one=True)

    def _drop(self, t: float, sent_at: float, gap: Callable[[], float]) -> float:
        """The arrival due at ``t`` (counted from ``sent_at``) found the in-flight cap full: dropped (counted when
        measured); returns the next arrival. A process behind its schedule drops with it every arrival due until
        now, in one step, since the cap is as full for them: one by one, at 1e6/s it never caught up with the
        clock, and its warm-up ran past the level's end."""
        if sent_at >= self.level.window_start:
            self.dropped += 1
            self.counters[self.base + 3] += 1
        behind = int((min(time.monotonic(), self.level.end) - t) * self.level.rate)  # arrivals due since t
        if behind < 1:
            return t + gap()
        skipped_to = t + behind / self.level.rate
        self._drop_many(t, skipped_to)
        return skipped_to + gap()

    def _drop_many(self, t: float, until: float, at_least_one: bool = False) -> None:
        """Count the measured arrivals due after ``t`` until ``until`` as sent and dropped: as many as the rate
        gives, within the request budget."""
        n = round((until - max(t, self.level.window_start)) * self.level.rate) if until > self.level.window_start else 0
        if at_least_one and t >= self.level.window_start:
            n = max(1, n)  # the arrival due at t
        if self.budget is not None:
            n = min(n, max(0, self.budget))
            self.budget -= n
        self.sent += n
        self.dropped += n
        self.counters[self.base] += n
        self.counters[self.base + 3] += n

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, but not past the level's end."""
        await asyncio.sleep(max(0.0, min(seconds, self.level.end - time.monotonic())))

    # ----- the level -----------------------------------------------------------------------------------------

    async def run(self) -> Samples:
        # CPU from the start of the measurement window, so that client cores = cpu_s / window_s.
        cpu0 = [time.process_time()]
        at_window = asyncio.get_running_loop().call_later(
            max(0.0, self.level.window_start - time.monotonic()), lambda: cpu0.__setitem__(0, time.process_time())
        )
        watcher = asyncio.create_task(self._watch_stop())
        delay = self.level.start - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            if self.level.mode == "closed" and not self.target.streaming:
                await asyncio.to_thread(self._closed_unary_callbacks)
            elif self.level.mode == "closed":
                loops = [self._closed_stream(slot) for slot in range(self.level.concurrency)]
                await self._finish(asyncio.gather(*loops))
            elif self.target.streaming:
                await self._finish(self._open_stream())
            else:
                await self._finish(self._open_unary())
        finally:
            watcher.cancel()
            at_window.cancel()
        return Samples(
            send_s=np.asarray(self.send_s, np.float64),
            latency_us=np.asarray(self.latency_us, np.float64),
            sent=self.sent,
            failed=dict(sorted(self.failed.items())),
            messages=dict(sorted(self.messages.items())),
            dropped=self.dropped,
            window_s=self._window_s(),
            cpu_s=time.process_time() - cpu0[0],
        )

    def _window_s(self) -> float:
        """To the last answer, and at least to when the level stopped sending: its end, the moment its request
        budget ran out (in open loop, the arrival that found it spent) or a stop request.

        To the last answer alone, a level whose last seconds failed (a server killed or hung) divided its answers
        by the seconds before the failures (702 answers in 4 s read as 1,733/s), and in open loop a few requests
        answered fast read as more than the rate offered. The schedule's own span, not requests sent over the
        nominal rate, so that a Poisson schedule that happened to send more than the rate reads as it ran."""
        end = max(self.last_done, min(self.sending_until, self.level.end))
        return max(0.0, end - self.level.window_start)

    async def _finish(self, work: Any) -> None:
        """Run the level; after a stop request, give calls in flight a moment, then cancel them (CANCELLED)."""
        main = asyncio.ensure_future(work)
        while not main.done():
            await asyncio.wait([main], timeout=0.1)
            if self.stopped and not main.done():
                await asyncio.wait([main], timeout=1.0)
                main.cancel()
                await asyncio.gather(main, return_exceptions=True)
        error = None if main.cancelled() else main.exception()
        if error is not None:
            raise error

    async def _unary(self, t: float) -> None:
        code: str | None = None
        message = ""
        try:
            await self.raw_infer(self.raw_request, timeout=self.target.deadline_s, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            code, message = exc.code().name, exc.details() or ""
        except asyncio.CancelledError:
            self._record(t, time.monotonic(), "CANCELLED", CANCELLED_BY_STOP)
            raise
        self._record(t, time.monotonic(), code, message)

    def _closed_unary_callbacks(self) -> None:
        """Closed loop over the sync channel: ``concurrency`` calls in flight, each answer's callback records it
        and sends the next. Runs in a thread of its own; returns when the last call has answered.

        A slot whose call failed UNAVAILABLE waits out its backoff before the next; this thread sends it then."""
        # The first calls go from this thread while callbacks may already run on grpc's; reentrant in case grpc
        # runs a callback inline (a call that is over before its callback is added).
        lock = threading.RLock()
        idle = threading.Event()
        in_flight: set[grpc.Future[bytes]] = set()
        waiting: list[tuple[float, int]] = []
        """Heap of (when, slot): the slots backing off after UNAVAILABLE."""
        backoffs = [_Backoff() for _ in range(self.level.concurrency)]
        deadline = self.target.deadline_s
        sequences = self.sequences

        def send(slot: int) -> None:
            """Under ``lock``: the slot's next call, unless the level is over (then its open sequence's END)."""
            t = time.monotonic()
            if not self._more(t) or not self._take(t):
                if sequences is not None and sequences.open(slot) and not self.stopped:
                    end = self.sync_infer.future(
                        sequences.closing(slot).SerializeToString(), timeout=deadline, metadata=self.metadata
                    )
                    in_flight.add(end)
                    end.add_done_callback(closed)
                elif not in_flight and not waiting:
                    idle.set()
                return
            raw = self.raw_request if sequences is None else sequences.next(slot).SerializeToString()
            future = self.sync_infer.future(raw, timeout=deadline, metadata=self.metadata)
            in_flight.add(future)
            future.add_done_callback(lambda f: answered(f, t, slot))

        def answered(future: grpc.Future[bytes], t: float, slot: int) -> None:
            done = time.monotonic()
            code = future.code()  # type: ignore[attr-defined]  # a call future is also a grpc.Call
            ok = code is grpc.StatusCode.OK
            message = "" if ok or code.name in self.messages else future.details() or ""  # type: ignore[attr-defined]
            with lock:
                in_flight.discard(future)
                self._record(t, done, None if ok else code.name, message)
                if sequences is not None and not ok:
                    sequences.failed(slot, code.name)
                if code is grpc.StatusCode.UNAVAILABLE and self._more(done):
                    heapq.heappush(waiting, (done + backoffs[slot].failed(), slot))
                    return
                if ok:
                    backoffs[slot].answered()
                send(slot)

        def closed(future: grpc.Future[bytes]) -> None:
            with lock:
                in_flight.discard(future)
                if not in_flight and not waiting:
                    idle.set()

        with lock:
            for slot in range(self.level.concurrency):
                send(slot)
            if not in_flight and not waiting:
                idle.set()
        while True:
            with lock:
                now = time.monotonic()
                while waiting and (waiting[0][0] <= now or self.stopped or now >= self.level.end):
                    send(heapq.heappop(waiting)[1])
                pause = min(0.1, waiting[0][0] - now) if waiting else 0.1
            if idle.wait(max(0.0, pause)):
                return
            if self.stopped and not waiting:
                # Calls still running after a stop request get a moment, then are cancelled (CANCELLED).
                if not idle.wait(1.0):
                    with lock:
                        pending = list(in_flight)
                    for future in pending:
                        future.cancel()
                    idle.wait(10.0)
                return

    async def _closed_stream(self, slot: int = 0) -> None:
        sequences = self.sequences
        backoff = _Backoff()
        while True:
            call = self.stub.ModelStreamInfer(
                timeout=self.level.end - time.monotonic() + self.target.deadline_s, metadata=self.metadata
            )
            broke = ""
            try:
                while True:
                    t = time.monotonic()
                    if not self._more(t) or not self._take(t):
                        # A stream the server already broke (it went away) fails here with grpc's
                        # ExecuteBatchError, not an AioRpcError: its failure is already counted.
                        with contextlib.suppress(Exception):
                            if sequences is not None and sequences.open(slot) and not self.stopped:
                                if await stream_writer.write(call, sequences.closing(slot)):  # unmeasured END
                                    await call.read()
                            await call.done_writing()
                        return
                    message = self.request if sequences is None else sequences.next(slot)
                    try:
                        if await stream_writer.write(call, message):
                            reply = await call.read()
                        else:  # the server ended the stream: its status, not grpc.aio's INTERNAL
                            broke = (await call.code()).name
                            self._record(t, time.monotonic(), broke, await call.details() or "")
                            break
                    except asyncio.CancelledError:
                        self._record(t, time.monotonic(), "CANCELLED", CANCELLED_BY_STOP)
                        raise
                    except grpc.aio.AioRpcError as exc:
                        broke = exc.code().name
                        self._record(t, time.monotonic(), broke, exc.details() or "")
                        break  # a new stream
                    if reply is grpc.aio.EOF:
                        broke = "UNKNOWN"
                        self._record(t, time.monotonic(), broke, STREAM_ENDED)
                        break
                    error = reply.error_message
                    self._record(t, time.monotonic(), STREAM_ERROR if error else None, error)
                    if sequences is not None and error:
                        sequences.failed(slot, "INVALID_ARGUMENT" if _not_in_sequence(error) else STREAM_ERROR)
                    if not error:
                        backoff.answered()
            finally:
                call.cancel()
            if sequences is not None and broke:
                sequences.failed(slot, broke)
            if broke == "UNAVAILABLE":
                await self._pause(backoff.failed())

    def _arrivals(self) -> Callable[[], float]:
        level = self.level
        if level.rate <= 0:
            raise ValueError("open loop needs a positive rate")
        if level.arrival == "constant":
            return lambda: 1.0 / level.rate
        rng = np.random.default_rng(level.seed)
        return lambda: float(rng.exponential(1.0 / level.rate))

    async def _open_unary(self) -> None:
        """Send at the intended times whatever the responses; latency counts from the intended time."""
        gap = self._arrivals()
        t = self.level.start + self.level.phase_s
        cap = max(1, self.level.max_in_flight)
        while (sent_at := await self._wait_for(t)) is not None:
            if len(self.tasks) >= cap:
                t = self._drop(t, sent_at, gap)
                continue
            task = asyncio.create_task(self._unary(sent_at))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            t += gap()
        if self.tasks:
            await asyncio.gather(*list(self.tasks))

    async def _open_stream(self) -> None:
        """Open loop over ModelStreamInfer; responses are matched to their intended time by id.

        When the stream breaks (server restart, GOAWAY, deadline), the requests pending on it fail with its
        status, and a new stream is opened after a backoff (BACKOFF_S, reset by an answer). Requests due while no
        stream is open fail with the same code: the schedule never waits for the server.
        """
        gap = self._arrivals()
        t = self.level.start + self.level.phase_s
        cap = max(1, self.level.max_in_flight)
        ids = itertools.count()
        stream: _Stream | None = None
        down = ("UNAVAILABLE", "")
        reopen_at = 0.0
        backoff = _Backoff()
        try:
            while (sent_at := await self._wait_for(t)) is not None:
                if stream is not None and stream.broken:
                    down = await stream.close()
                    if stream.answered:
                        backoff.answered()
                    reopen_at = time.monotonic() + backoff.failed()
                    stream = None
                if stream is None and time.monotonic() >= reopen_at:
                    stream = _Stream(self, self.level.end - time.monotonic() + self.target.deadline_s)
                if stream is None:
                    self._record(sent_at, time.monotonic(), *down)
                elif len(stream.pending) >= cap:
                    t = self._drop(t, sent_at, gap)
                    continue
                else:
                    message = pb.ModelInferRequest()
                    message.CopyFrom(self.request)
                    message.id = str(next(ids))
                    await stream.send(message, sent_at)
                t += gap()
            if stream is not None:
                await stream.finish()
        finally:
            if stream is not None:
                await stream.close()


class _Stream:
    """One ModelStreamInfer call of the open loop and the requests pending on it (id -> intended send time)."""

    def __init__(self, run: _LevelRun, timeout: float) -> None:
        self.run = run
        self.call = run.stub.ModelStreamInfer(timeout=timeout, metadata=run.metadata)
        self.pending: dict[str, float] = {}
        self.code = "UNKNOWN"
        """Why the stream ended: a status code name; UNKNOWN for requests the server closed without answering."""
        self.message = STREAM_ENDED
        self.answered = False
        self.reader = asyncio.create_task(self._read())

    @property
    def broken(self) -> bool:
        return self.reader.done()

    async def _read(self) -> None:
        try:
            async for response in self.call:
                sent_at = self.pending.pop(response.infer_response.id, None)
                if sent_at is not None:
                    self.answered = True
                    error = STREAM_ERROR if response.error_message else None
                    self.run._record(sent_at, time.monotonic(), error, response.error_message)
        except grpc.aio.AioRpcError as exc:
            self.code, self.message = exc.code().name, exc.details() or ""
        self._fail_pending()

    def _fail_pending(self) -> None:
        now = time.monotonic()
        for sent_at in self.pending.values():
            self.run._record(sent_at, now, self.code, self.message)
        self.pending.clear()

    async def send(self, message: pb.ModelInferRequest, t: float) -> None:
        self.pending[message.id] = t
        try:
            # False once the stream is over: the reader counts what was pending with the server's status.
            await stream_writer.write(self.call, message)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass

    async def finish(self) -> None:
        """No more requests: wait for the answers still due (bounded by the call's deadline)."""
        if not self.broken:
            # A stream the server already ended fails here with grpc's ExecuteBatchError too: the reader counts it.
            with contextlib.suppress(Exception):
                await self.call.done_writing()
        await asyncio.wait([self.reader])

    async def close(self) -> tuple[str, str]:
        """Cancel the call if it still runs and count whatever was pending; returns why the stream ended (its code
        and message)."""
        if not self.broken:
            self.code, self.message = "CANCELLED", CANCELLED_BY_STOP
        self.call.cancel()
        try:
            await asyncio.wait([self.reader])
        finally:
            if not self.reader.done():  # this task was cancelled while waiting
                self.reader.cancel()
            self._fail_pending()
        return self.code, self.message
