"""One load process: its own event loop and grpc.aio channel, driving one load level at a time for the parent.

The parent (``runner``) starts the processes with the "spawn" method and talks to each over a pipe: it sends a
``Target`` once, then a ``Level`` per step of the sweep, and receives a ``Samples`` per level. Progress goes
through shared counters; a shared event asks every loop to stop early (Ctrl-C in the parent).
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import SynchronizedArray
from multiprocessing.synchronize import Event
from typing import Any, Literal

import grpc
import grpc.aio
import numpy as np

from tensorgate.client import TLSConfig
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
    asyncio.run(_serve(index, target, conn, counters, stop))


async def _serve(index: int, target: Target, conn: Connection, counters: Any, stop: Event) -> None:
    settings = ChannelSettings(tls=target.tls, keepalive_time_s=None)
    options = settings.options()
    if target.tls is None:
        channel = grpc.aio.insecure_channel(target.server, options=options)
    else:
        channel = grpc.aio.secure_channel(target.server, target.tls.credentials(), options=options)
    loop = asyncio.get_running_loop()
    async with channel:
        stub = GRPCInferenceServiceStub(channel)
        # Unary calls send the request serialized once and leave the response undecoded: the load process spends
        # its CPU on calls, not on protobuf work whose result it would throw away (errors come as the status).
        raw_infer: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/{SERVICE_NAME}/ModelInfer")
        request = target.request()
        conn.send("ready")
        while True:
            level: Level | None = await loop.run_in_executor(None, conn.recv)
            if level is None:
                return
            run = _LevelRun(index, target, level, stub, raw_infer, request, counters, stop)
            conn.send(await run.run())


class _LevelRun:
    def __init__(
        self,
        index: int,
        target: Target,
        level: Level,
        stub: GRPCInferenceServiceStub,
        raw_infer: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes],
        request: pb.ModelInferRequest,
        counters: Any,
        stop: Event,
    ) -> None:
        self.raw_infer = raw_infer
        self.raw_request = request.SerializeToString()
        self.target = target
        self.level = level
        self.stub = stub
        self.request = request
        self.counters = counters
        self.base = index * COUNTERS
        self.stop_event = stop
        self.stopped = False
        self.budget = level.max_requests
        self.send_s: list[float] = []
        self.latency_us: list[float] = []
        self.failed: dict[str, int] = {}
        self.sent = 0
        self.dropped = 0
        self.last_done = level.window_start
        self.tasks: set[asyncio.Task[None]] = set()

    # ----- bookkeeping -------------------------------------------------------------------------------------

    def _take(self, t: float) -> bool:
        """Whether a request meant for time ``t`` may go; counts it as sent when it is measured."""
        if t < self.level.window_start:
            return True
        if self.budget is not None:
            if self.budget <= 0:
                return False
            self.budget -= 1
        self.sent += 1
        self.counters[self.base] += 1
        return True

    def _record(self, t: float, done: float, code: str | None) -> None:
        if t < self.level.window_start:
            return
        self.last_done = max(self.last_done, done)
        if code is None:
            self.send_s.append(t - self.level.window_start)
            self.latency_us.append((done - t) * 1e6)
            self.counters[self.base + 1] += 1
        else:
            self.failed[code] = self.failed.get(code, 0) + 1
            self.counters[self.base + 2] += 1

    def _more(self, now: float) -> bool:
        if self.stopped or now >= self.level.end:
            return False
        return self.budget is None or self.budget > 0 or now < self.level.window_start

    async def _watch_stop(self) -> None:
        while not self.stop_event.is_set():
            await asyncio.sleep(0.05)
        self.stopped = True

    # ----- the level -----------------------------------------------------------------------------------------

    async def run(self) -> Samples:
        cpu0 = time.process_time()
        watcher = asyncio.create_task(self._watch_stop())
        delay = self.level.start - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            if self.level.mode == "closed":
                loops = [
                    (self._closed_stream if self.target.streaming else self._closed_unary)()
                    for _ in range(self.level.concurrency)
                ]
                await self._finish(asyncio.gather(*loops))
            elif self.target.streaming:
                await self._finish(self._open_stream())
            else:
                await self._finish(self._open_unary())
        finally:
            watcher.cancel()
        return Samples(
            send_s=np.asarray(self.send_s, np.float64),
            latency_us=np.asarray(self.latency_us, np.float64),
            sent=self.sent,
            failed=dict(sorted(self.failed.items())),
            dropped=self.dropped,
            window_s=max(0.0, self.last_done - self.level.window_start),
            cpu_s=time.process_time() - cpu0,
        )

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
        try:
            await self.raw_infer(self.raw_request, timeout=self.target.deadline_s)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        except asyncio.CancelledError:
            self._record(t, time.monotonic(), "CANCELLED")
            raise
        self._record(t, time.monotonic(), code)

    async def _closed_unary(self) -> None:
        while True:
            t = time.monotonic()
            if not self._more(t) or not self._take(t):
                return
            await self._unary(t)

    async def _closed_stream(self) -> None:
        while True:
            call = self.stub.ModelStreamInfer(timeout=self.level.end - time.monotonic() + self.target.deadline_s)
            try:
                while True:
                    t = time.monotonic()
                    if not self._more(t) or not self._take(t):
                        await call.done_writing()
                        return
                    try:
                        await call.write(self.request)
                        reply = await call.read()
                    except asyncio.CancelledError:
                        self._record(t, time.monotonic(), "CANCELLED")
                        raise
                    except grpc.aio.AioRpcError as exc:
                        self._record(t, time.monotonic(), exc.code().name)
                        break  # a new stream
                    if reply is grpc.aio.EOF:
                        self._record(t, time.monotonic(), "UNKNOWN")
                        break
                    self._record(t, time.monotonic(), STREAM_ERROR if reply.error_message else None)
            finally:
                call.cancel()

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
        while True:
            now = time.monotonic()
            if t > now:
                await asyncio.sleep(t - now)
            if not self._more(t) or not self._take(t):
                break
            if len(self.tasks) >= cap:
                if t >= self.level.window_start:
                    self.dropped += 1
                    self.counters[self.base + 3] += 1
            else:
                task = asyncio.create_task(self._unary(t))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            t += gap()
        if self.tasks:
            await asyncio.gather(*list(self.tasks))

    async def _open_stream(self) -> None:
        """Open loop over one ModelStreamInfer stream; responses are matched to their intended time by id."""
        gap = self._arrivals()
        t = self.level.start + self.level.phase_s
        cap = max(1, self.level.max_in_flight)
        pending: dict[str, float] = {}
        ids = itertools.count()
        call = self.stub.ModelStreamInfer(timeout=self.level.end - time.monotonic() + self.target.deadline_s)

        async def reader() -> None:
            try:
                async for response in call:
                    sent_at = pending.pop(response.infer_response.id, None)
                    if sent_at is not None:
                        self._record(sent_at, time.monotonic(), STREAM_ERROR if response.error_message else None)
            except grpc.aio.AioRpcError as exc:
                for sent_at in pending.values():
                    self._record(sent_at, time.monotonic(), exc.code().name)
                pending.clear()
            except asyncio.CancelledError:
                for sent_at in pending.values():
                    self._record(sent_at, time.monotonic(), "CANCELLED")
                pending.clear()
                raise

        read_task = asyncio.create_task(reader())
        try:
            while not read_task.done():
                now = time.monotonic()
                if t > now:
                    await asyncio.sleep(t - now)
                if not self._more(t) or not self._take(t):
                    break
                if len(pending) >= cap:
                    if t >= self.level.window_start:
                        self.dropped += 1
                        self.counters[self.base + 3] += 1
                else:
                    message = pb.ModelInferRequest()
                    message.CopyFrom(self.request)
                    message.id = str(next(ids))
                    pending[message.id] = t
                    try:
                        await call.write(message)
                    except grpc.aio.AioRpcError:
                        break  # the reader counts what was pending with the stream's status
                t += gap()
            await call.done_writing()
            await read_task
        finally:
            read_task.cancel()
            call.cancel()
