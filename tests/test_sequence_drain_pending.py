"""A sequence's request taken while one read before it is still on its way to the sequence: its large tensor is
decoded on a worker thread (codec.LARGE_ELEMENTS) while the event loop reads on (server/rpc/drain.py OnTheirWay).
The requests behind it wait for it, so that the sequence takes them in the order they came; and a START on its way
when a drain begins counts as live: its stream stays open, its next requests are taken (stream or unary), and the
drain waits for it, unless it fails.

A real server on its own loop, a stateful ONNX model with a large input, and grpc.aio streams and calls of our own
messages. The worker threads that decode large tensors are the server loop's default executor: the tests hold
their work (`_HeldDecodes`) until the requests behind are read, so that no timing decides the order."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tensorgate.client._common import infer_request
from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos.tensors import STATUS_CODE
from tensorgate.server.rpc import codec
from tensorgate.server.rpc.drain import DRAINING, DrainGate
from tests.onnx_models import accumulator_config, accumulator_model, write_config
from tests.serving import ServerThread
from tests.test_sequence_drain import flagged_request
from tests.test_sequence_drain_review import Stream, _ended_with, _on, _until_draining

LARGE = codec.LARGE_ELEMENTS + 1
"""Elements of a START's input: decoded on a worker thread."""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    accumulator_model(root / "sacc" / "1" / "model.onnx", summing=True)  # a START as large as a test needs
    write_config(root, "sacc", accumulator_config("sacc", extra="max_sequence_idle_microseconds: 60000000"))
    return root


class _HeldDecodes(ThreadPoolExecutor):
    """The server loop's default executor, where it decodes large tensors (asyncio.to_thread): the work given to
    it waits, on its worker thread, until `release`. `holding` is set once some does: the server has read the
    request and is decoding it."""

    def __init__(self) -> None:
        super().__init__(max_workers=4, thread_name_prefix="held-decode")
        self.holding = threading.Event()
        self._released = threading.Event()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        def held() -> Any:
            self.holding.set()
            self._released.wait(60)
            return fn(*args, **kwargs)

        return super().submit(held)

    def release(self) -> None:
        self._released.set()


class _Made:
    """The tasks made on the server's loop from the moment it is installed there, by their coroutine's name."""

    def __init__(self, server: ServerThread) -> None:
        self.tasks: list[tuple[str, asyncio.Task[Any]]] = []
        self._loop = server._loop

    async def install(self) -> None:
        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
            task = asyncio.Task(coro, loop=loop, **kwargs)
            self.tasks.append((getattr(coro, "__qualname__", ""), task))
            return task

        self._loop.set_task_factory(factory)

    def named(self, suffix: str) -> list[asyncio.Task[Any]]:
        return [task for name, task in self.tasks if name.endswith(suffix)]


@pytest.fixture
def held(repo: Path) -> Iterator[tuple[ServerThread, _HeldDecodes, _Made]]:
    """A server whose large tensors' decodes wait for `release`, and the tasks its loop makes."""
    executor = _HeldDecodes()

    async def install() -> None:
        asyncio.get_running_loop().set_default_executor(executor)

    try:
        with ServerThread(repo, shutdown_grace_s=60.0) as server:
            server.run(install())
            made = _Made(server)
            server.run(made.install())
            yield server, executor, made
            executor.release()
    finally:
        executor.release()
        executor.shutdown(wait=False)


def _on_server(server: ServerThread, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
    """`coro` run on the server's loop, awaited from the test's."""
    return asyncio.wrap_future(_on(server, coro))


async def _settled(server: ServerThread) -> None:
    """Until the server's loop has run what was ready on it: a task made there has taken its first step."""
    for _ in range(3):
        await _on_server(server, asyncio.sleep(0))


async def _read(server: ServerThread, made: _Made, messages: int) -> None:
    """Until the server has read `messages` messages of the stream (a task each), or stopped reading it (its
    reader is gone); then until the tasks made have taken their first step."""
    deadline = time.monotonic() + 30
    while len(made.named("._stream_one")) < messages and any(not t.done() for t in made.named(".read")):
        assert time.monotonic() < deadline, "the server did not read the stream's messages"
        await asyncio.sleep(0.01)
    await _settled(server)


async def _held_decoding(executor: _HeldDecodes) -> None:
    assert await asyncio.to_thread(executor.holding.wait, 30), "the START's large tensor was not decoded off the loop"


def _large(sequence_id: int, start: bool = True, count: int = LARGE) -> pb.ModelInferRequest:
    """A request of `sacc` whose row of LARGE ones goes in typed contents (work per element: decoded off the
    loop); `count` values, so that fewer than the shape's fail its decode."""
    request = infer_request("sacc", {"INPUT": np.ones((1, 1), np.float32)}, sequence_id=sequence_id)
    if start:
        request.parameters["sequence_start"].bool_param = True
    del request.raw_input_contents[:]
    tensor = request.inputs[0]
    del tensor.shape[:]
    tensor.shape.extend([1, LARGE])
    tensor.contents.fp32_contents.extend([1.0] * count)
    return request


def _step(sequence_id: int, value: float, end: bool = False) -> pb.ModelInferRequest:
    return infer_request(
        "sacc", {"INPUT": np.full((1, 1), value, np.float32)}, sequence_id=sequence_id, sequence_end=end
    )


def _sum(response: pb.ModelStreamInferResponse | pb.ModelInferResponse) -> float:
    if isinstance(response, pb.ModelStreamInferResponse):
        assert not response.error_message, response.error_message
        response = response.infer_response
    return float(np.frombuffer(response.raw_output_contents[0], np.float32)[0])


async def _next(stream: Stream) -> pb.ModelStreamInferResponse:
    response = await asyncio.wait_for(stream.read(), 60)
    assert isinstance(response, pb.ModelStreamInferResponse), response
    return response


def test_a_sequences_requests_behind_a_large_start_reach_it_after_the_start(
    held: tuple[ServerThread, _HeldDecodes, _Made],
) -> None:
    """START with a large input, then a step and END pipelined on the stream: the small ones, decoded at once on
    the loop, reached the sequence before the START, decoded on a worker thread, and failed as "not active"."""
    server, executor, made = held

    async def run() -> list[float]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stream: Stream = GRPCInferenceServiceStub(channel).ModelStreamInfer()
            await stream.write(_large(3))
            await _held_decoding(executor)
            await stream.write(_step(3, 2.0))
            await stream.write(_step(3, 3.0, end=True))
            await _read(server, made, 3)
            executor.release()
            sums = [_sum(await _next(stream)) for _ in range(3)]
            await stream.done_writing()
            assert await asyncio.wait_for(stream.read(), 60) == grpc.aio.EOF
            return sums

    assert asyncio.run(run()) == [LARGE, LARGE + 2.0, LARGE + 5.0]


def test_a_stream_whose_start_is_on_its_way_at_the_drain_stays_open_for_its_sequence(
    held: tuple[ServerThread, _HeldDecodes, _Made],
) -> None:
    """The drain begins while the stream's START (taken before it) is decoded: its sequence is not live yet, and
    the stream was ended at once (UNAVAILABLE), its next requests unread, while the START went on to start a
    sequence that nobody could end, which held the drain for its idle time. Now the stream stays open: the step
    and END are answered, then the stream ends, and the drain with it."""
    server, executor, made = held

    async def run() -> None:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stream: Stream = GRPCInferenceServiceStub(channel).ModelStreamInfer()
            await stream.write(_large(5))
            await _held_decoding(executor)
            stopped = asyncio.wrap_future(_on(server, server.app.stop(grace=60)))
            await asyncio.to_thread(_until_draining, server)
            await _settled(server)  # the stream's look at the drain
            with contextlib.suppress(grpc.aio.AioRpcError):  # (a stream ended at once refuses writes: read why)
                await stream.write(_step(5, 2.0))
                await stream.write(_step(5, 3.0, end=True))
            await _read(server, made, 3)
            executor.release()
            assert _sum(await _next(stream)) == LARGE
            assert _sum(await _next(stream)) == LARGE + 2.0
            assert _sum(await _next(stream)) == LARGE + 5.0
            assert await _ended_with(stream) == (grpc.StatusCode.UNAVAILABLE, DRAINING)
            await asyncio.wait_for(stopped, 30)  # not the grace (60 s), nor the sequence's idle time (60 s)
            assert not server.app._gate.on_their_way.ways

    asyncio.run(run())


def test_a_unary_step_behind_a_start_on_its_way_at_the_drain_is_taken(
    held: tuple[ServerThread, _HeldDecodes, _Made],
) -> None:
    """Unary calls: the START (taken before the drain) is decoded when the drain begins and the sequence's next
    call comes. That call was refused with "retry on another replica", where the sequence does not exist, while
    the START then started it here. Now it is taken, runs after the START, and END ends the sequence and the
    drain."""
    server, executor, _ = held

    async def run() -> list[float]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = GRPCInferenceServiceStub(channel)
            start = asyncio.ensure_future(stub.ModelInfer(_large(7), timeout=60))
            await _held_decoding(executor)
            stopped = asyncio.wrap_future(_on(server, server.app.stop(grace=60)))
            await asyncio.to_thread(_until_draining, server)
            step = asyncio.ensure_future(stub.ModelInfer(_step(7, 2.0), timeout=60))
            deadline = time.monotonic() + 30
            while server.app._gate.in_flight < 2 and not step.done():  # taken, or refused
                assert time.monotonic() < deadline, "the server neither took nor refused the call"
                await asyncio.sleep(0.01)
            await _settled(server)
            executor.release()
            sums = [_sum(await start), _sum(await step)]
            sums.append(_sum(await stub.ModelInfer(_step(7, 3.0, end=True), timeout=60)))
            await asyncio.wait_for(stopped, 30)
            return sums

    assert asyncio.run(run()) == [LARGE, LARGE + 2.0, LARGE + 5.0]


def test_a_start_that_fails_on_its_way_does_not_hold_the_drain(
    held: tuple[ServerThread, _HeldDecodes, _Made],
) -> None:
    """A START on its way holds its stream open at the drain only until it fails (here, a tensor with fewer values
    than its shape): the stream answers its error, then ends, and the drain with it, long before the grace."""
    server, executor, _ = held

    async def run() -> None:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stream: Stream = GRPCInferenceServiceStub(channel).ModelStreamInfer()
            await stream.write(_large(9, count=LARGE - 1))
            await _held_decoding(executor)
            stopped = asyncio.wrap_future(_on(server, server.app.stop(grace=60)))
            await asyncio.to_thread(_until_draining, server)
            executor.release()
            failed = await _next(stream)
            assert "model 'sacc'" in failed.error_message and "'INPUT'" in failed.error_message, failed
            assert failed.infer_response.parameters[STATUS_CODE].string_param == "INVALID_ARGUMENT", failed
            assert await _ended_with(stream) == (grpc.StatusCode.UNAVAILABLE, DRAINING)
            await asyncio.wait_for(stopped, 30)

    asyncio.run(run())


def test_the_gate_counts_a_start_on_its_way_as_live() -> None:
    """The gate's rule on its own: while a START of ('acc', 5) is on its way, a request without START for it is
    taken, a stream that sent into it is kept, and the drain is not over; once it has arrived (here, failed: the
    sequence is not live), that request is refused again and nothing holds the drain."""

    async def scenario() -> None:
        gate = DrainGate()
        previous, mine = gate.on_their_way.join(("acc", 5), True)
        assert previous is None
        drain = asyncio.ensure_future(gate.drain(5))
        await asyncio.sleep(0)
        assert gate.refusal(flagged_request("acc", sequence_id=5)) is None
        refused = gate.refusal(flagged_request("acc", sequence_id=6))
        assert refused is not None and refused.message == DRAINING
        assert gate.keep_live({("acc", 5)}) and not gate.drained
        gate.on_their_way.arrived(("acc", 5), True, mine)
        refused = gate.refusal(flagged_request("acc", sequence_id=5))
        assert refused is not None and refused.message == DRAINING
        assert not gate.keep_live({("acc", 5)}) and gate.drained
        assert await asyncio.wait_for(drain, 5) is True

    asyncio.run(scenario())
