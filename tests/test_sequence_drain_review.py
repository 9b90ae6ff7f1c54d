"""Streams held open by a draining server for their sequences (server/rpc/drain.py, ModelStreamInfer): what such a
stream costs the event loop while it waits, what it remembers of the sequences it sent, and an END that fails
before it reaches its sequence. A real server on its own loop, the stateful ONNX model of tests/onnx_models.py,
and grpc.aio streams of our own messages."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tensorgate.client._common import infer_request
from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.server.rpc.drain import DRAINING
from tests.onnx_models import accumulator_config, accumulator_model, slow_model, write_config
from tests.serving import ServerThread

STREAMS = 40
"""Streams held open for a live sequence each (every one holds a slot: max_candidate_sequences is above it)."""

Stream = grpc.aio.StreamStreamCall[pb.ModelInferRequest, pb.ModelStreamInferResponse]


def _repository(root: Path) -> Path:
    accumulator_model(root / "acc" / "1" / "model.onnx")
    extra = "oldest { max_candidate_sequences: 64 } max_sequence_idle_microseconds: 60000000"
    write_config(root, "acc", accumulator_config("acc", extra=extra))
    slow_model(root / "plain" / "1" / "model.onnx", size=8, repeats=1)
    return root


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return _repository(tmp_path / "models")


def _step(
    sequence_id: int, value: float, start: bool = False, end: bool = False, dtype: type = np.float32
) -> pb.ModelInferRequest:
    return infer_request(
        "acc",
        {"INPUT": np.full((1, 1), value, dtype)},
        sequence_id=sequence_id,
        sequence_start=start,
        sequence_end=end,
    )


def _sum(response: pb.ModelStreamInferResponse) -> float:
    assert not response.error_message, response.error_message
    return float(np.frombuffer(response.infer_response.raw_output_contents[0], np.float32)[0])


async def _answer(stream: Stream, request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
    await stream.write(request)
    response = await asyncio.wait_for(stream.read(), 60)
    assert isinstance(response, pb.ModelStreamInferResponse), response
    return response


async def _ended_with(stream: Stream) -> tuple[grpc.StatusCode, str]:
    """How a stream ended once the server has ended it: its status code and details."""
    with pytest.raises(grpc.aio.AioRpcError):
        while True:  # bounded by the reads' timeout
            assert await asyncio.wait_for(stream.read(), 60) != grpc.aio.EOF
    return await stream.code(), await stream.details() or ""


def _on(server: ServerThread, coro: Coroutine[Any, Any, Any]) -> Future[Any]:
    """`coro` run on the server's loop, not waited for (a stop that drains while the test talks to the server)."""
    return asyncio.run_coroutine_threadsafe(coro, server._loop)


def _until_draining(server: ServerThread) -> None:
    deadline = time.monotonic() + 60
    while not server.app._gate.draining:
        assert time.monotonic() < deadline, "the stop did not start draining"
        time.sleep(0.01)


class _Counted:
    """Counts the tasks made on the server's loop, from the moment it is installed there."""

    def __init__(self, server: ServerThread) -> None:
        self.made = 0
        self._loop = server._loop
        server.run(self._install())

    async def _install(self) -> None:
        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
            self.made += 1
            return asyncio.Task(coro, loop=loop, **kwargs)

        self._loop.set_task_factory(factory)


def test_streams_held_for_their_sequences_make_no_task_per_look(repo: Path) -> None:
    """STREAMS streams in the middle of a sequence when the stop starts: each stays open for its sequence while the
    drain looks at the sequences every SEQUENCE_POLL_S. Each stream's own look made a task (its wait on an Event)
    20 times a second: 1,000 held streams took about 40% of a core of the loop that serves the very sequences the
    drain waits for. Their END then ends each stream with UNAVAILABLE, and the stop."""
    with ServerThread(repo) as server:

        async def run() -> None:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = GRPCInferenceServiceStub(channel)
                streams = [stub.ModelStreamInfer() for _ in range(STREAMS)]
                for i, stream in enumerate(streams, 1):
                    assert _sum(await _answer(stream, _step(i, 1.0, start=True))) == 1.0
                stopped = _on(server, server.app.stop(grace=60))
                _until_draining(server)
                await asyncio.sleep(0.3)  # the streams settle into their wait
                counted = _Counted(server)
                await asyncio.sleep(1.5)
                made = counted.made
                for i, stream in enumerate(streams, 1):
                    assert _sum(await _answer(stream, _step(i, 2.0, end=True))) == 3.0
                    assert await _ended_with(stream) == (grpc.StatusCode.UNAVAILABLE, DRAINING)
                await asyncio.wrap_future(stopped)
                # About 60 with the streams sharing the drain's look; STREAMS * 30 when each made its own.
                assert made < 5 * STREAMS, made

        asyncio.run(run())


def _sets_of_keys(model: str) -> list[set[object]]:
    """Sets of (model, sequence ID) keys naming `model`: a stream's record of the sequences it sent into."""
    return [
        o
        for o in gc.get_objects()
        if isinstance(o, set) and o and all(isinstance(k, tuple) and len(k) == 2 and k[0] == model for k in o)
    ]


def test_a_long_stream_forgets_the_sequences_that_are_over(repo: Path) -> None:
    """A stream that lives on while many sequences come and go: one that never sends END (its sequence goes idle;
    here, a stateless model given sequence IDs, which it ignores) kept a key per ID for the stream's whole life."""
    with ServerThread(repo) as server:

        async def run() -> None:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stream = GRPCInferenceServiceStub(channel).ModelStreamInfer()
                inputs = {"INPUT0": np.ones((1, 8), np.float32)}
                for i in range(1, 301):
                    response = await _answer(stream, infer_request("plain", inputs, sequence_id=i))
                    assert not response.error_message, response.error_message
                kept = max((len(keys) for keys in _sets_of_keys("plain")), default=0)
                await stream.done_writing()
                assert await asyncio.wait_for(stream.code(), 60) == grpc.StatusCode.OK
                assert kept <= 100, kept

        asyncio.run(run())


def test_a_stream_whose_end_failed_stays_open_for_another(repo: Path) -> None:
    """During the drain, a stream's END that fails before it reaches its sequence (INT32 input where FP32 is due:
    INVALID_ARGUMENT) leaves the sequence live, holding the drain: the stream stays open, so that its client can
    send the END again there, and ends once that one has ended the sequence. It ended at the failed END, leaving
    the client no stream to end its sequence on."""
    with ServerThread(repo) as server:

        async def run() -> None:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stream = GRPCInferenceServiceStub(channel).ModelStreamInfer()
                assert _sum(await _answer(stream, _step(7, 1.0, start=True))) == 1.0
                stopped = _on(server, server.app.stop(grace=60))
                _until_draining(server)
                failed = await _answer(stream, _step(7, 2.0, end=True, dtype=np.int32))
                assert "INPUT" in failed.error_message and "INT32" in failed.error_message, failed.error_message
                await asyncio.sleep(0.5)  # a client that takes its time to send it again (the drain looks meanwhile)
                assert _sum(await _answer(stream, _step(7, 2.0, end=True))) == 3.0
                assert await _ended_with(stream) == (grpc.StatusCode.UNAVAILABLE, DRAINING)
                assert await asyncio.wrap_future(stopped) is None

        asyncio.run(run())
