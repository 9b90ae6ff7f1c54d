"""A stop that lets sequences under way end, as Triton's sequence batcher does: once SIGTERM arrives, a request
that continues or ends a live sequence is still taken (its state lives in this process; no other replica can run
it), one that starts a sequence, or needs no sequence, is refused with UNAVAILABLE (retry elsewhere), and the
drain waits for the live sequences to end (END, or their idle time) within --shutdown-grace-s. A stream in the
middle of a sequence stays open for its next requests. Real `tensorgate serve` processes, the stateful ONNX model
of tests/onnx_models.py, unmodified tritonclient (unary and stream), and a remote sequence model on an upstream."""

from __future__ import annotations

import asyncio
import queue
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc

from tensorgate.client import AsyncInferenceClient, InferResult, StreamItemError
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.server.rpc.drain import DrainGate
from tests.onnx_models import accumulator_config, accumulator_model, slow_model, write_config
from tests.process import ServeProcess
from tests.serving import ServerThread
from tests.test_cli import _wait_ready
from tests.test_remote_sequences import _remote
from tests.test_sequence import WRAPPED, _error, _x

DRAINING = "the server is shutting down; retry on another replica"


def _repository(root: Path, idle_us: int = 60_000_000) -> Path:
    """`acc` and `acc_step` (behind the ensemble `wrapped`) keep an idle sequence for `idle_us`; `fast` needs no
    sequence."""
    for name in ("acc", "acc_step"):
        accumulator_model(root / name / "1" / "model.onnx")
        write_config(root, name, accumulator_config(name, extra=f"max_sequence_idle_microseconds: {idle_us}"))
    (root / "wrapped" / "1").mkdir(parents=True)
    write_config(root, "wrapped", WRAPPED.format(step="acc_step"))
    slow_model(root / "fast" / "1" / "model.onnx", size=8, repeats=1)
    return root


def _fast() -> list[tc.InferInput]:
    inp = tc.InferInput("INPUT0", [1, 8], "FP32")
    inp.set_data_from_numpy(np.ones((1, 8), np.float32))
    return [inp]


def _wrapped(value: float) -> list[tc.InferInput]:
    inp = tc.InferInput("X", [1, 1], "FP32")
    inp.set_data_from_numpy(np.full((1, 1), value, np.float32))
    return [inp]


def _sum(result: tc.InferResult | None, output: str = "OUTPUT") -> float:
    assert result is not None
    return float(result.as_numpy(output)[0, 0])


def test_a_sequence_under_way_at_sigterm_runs_to_its_end(tmp_path: Path) -> None:
    """Two sequences under way when SIGTERM arrives, one of them through an ensemble: their next requests and
    their END are answered with the state they built, while a new sequence and a request without one are refused;
    the process exits once both have ended, long before its grace (and their minute of idle time) is over."""
    repo = _repository(tmp_path / "models")
    args = ["--model-repository", str(repo), "--grpc-port", "0", "--shutdown-grace-s", "120"]
    with ServeProcess(args) as server:
        c = _wait_ready(server.address)
        try:
            assert _sum(c.infer("acc", _x(1.0), sequence_id=5, sequence_start=True)) == 1.0
            assert _sum(c.infer("wrapped", _wrapped(10.0), sequence_id=5, sequence_start=True), "Y") == 10.0
            server.proc.send_signal(signal.SIGTERM)
            line = server.wait_for_line("refusing new calls")
            assert "2 live sequence(s)" in line, line

            assert _sum(c.infer("acc", _x(2.0), sequence_id=5)) == 3.0
            assert _sum(c.infer("wrapped", _wrapped(20.0), sequence_id=5), "Y") == 30.0
            for model, inputs, kwargs in (
                ("acc", _x(1.0), {"sequence_id": 6, "sequence_start": True}),  # a new sequence: start it elsewhere
                ("acc", _x(1.0), {"sequence_id": 7}),  # not live here
                ("fast", _fast(), {}),
            ):
                assert DRAINING in _error(grpc.StatusCode.UNAVAILABLE, c.infer, model, inputs, **kwargs)

            assert _sum(c.infer("acc", _x(4.0), sequence_id=5, sequence_end=True)) == 7.0
            assert _sum(c.infer("wrapped", _wrapped(40.0), sequence_id=5, sequence_end=True), "Y") == 70.0
            ended = time.monotonic()
        finally:
            c.close()
        assert server.proc.wait(60) == 0
        # Not the grace (120 s) nor the sequences' idle time (60 s): the END requests ended the drain.
        assert time.monotonic() - ended < 45, time.monotonic() - ended
        assert "grace period over" not in server.output, server.output
        assert "the drain refused 3 call(s) and stream message(s)" in server.output, server.output


Answers = queue.Queue[tuple[tc.InferResult | None, object]]


def _stream_started(c: tc.InferenceServerClient, sequence_id: int) -> Answers:
    """A stream open on `c` whose sequence has started (its START answered, `acc` at 1.0): where the stream's
    answers and errors arrive."""
    answers: Answers = queue.Queue()
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    c.async_stream_infer("acc", _x(1.0), request_id="1", sequence_id=sequence_id, sequence_start=True)
    result, error = answers.get(timeout=60)
    assert error is None and _sum(result) == 1.0, error
    return answers


def test_a_stream_in_the_middle_of_a_sequence_stays_open_for_it(tmp_path: Path) -> None:
    """A client streaming a sequence when SIGTERM arrives: its next requests on that stream are answered, a
    request there that needs no sequence is refused in the stream, which goes on; once the sequence has ended the
    stream ends with UNAVAILABLE and the process exits."""
    repo = _repository(tmp_path / "models")
    args = ["--model-repository", str(repo), "--grpc-port", "0", "--shutdown-grace-s", "120"]
    with ServeProcess(args) as server:
        c = _wait_ready(server.address)
        try:
            answers = _stream_started(c, 9)
            server.proc.send_signal(signal.SIGTERM)
            server.wait_for_line("refusing new calls")

            c.async_stream_infer("acc", _x(2.0), request_id="2", sequence_id=9)
            result, error = answers.get(timeout=60)
            assert error is None and _sum(result) == 3.0, error
            c.async_stream_infer("fast", _fast(), request_id="no sequence")
            result, error = answers.get(timeout=60)
            assert result is None and DRAINING in str(error), (result, error)
            c.async_stream_infer("acc", _x(3.0), request_id="3", sequence_id=9, sequence_end=True)
            result, error = answers.get(timeout=60)
            assert error is None and _sum(result) == 6.0, error

            result, error = answers.get(timeout=60)  # the stream's end, now that its sequence has ended
            assert result is None and DRAINING in str(error), (result, error)
        finally:
            c.stop_stream()
            c.close()
        assert server.proc.wait(60) == 0
        assert "grace period over" not in server.output, server.output


def _signal_mid_sequence(server: ServeProcess, sequence_id: int) -> float:
    """Start a sequence of `acc` and leave it (a client gone, or slow to come back), then SIGTERM; when the signal
    went (time.monotonic)."""
    c = _wait_ready(server.address)
    try:
        c.infer("acc", _x(1.0), sequence_id=sequence_id, sequence_start=True)
    finally:
        c.close()
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    return signalled


def test_our_stream_client_is_told_a_drain_refusal_is_safe_to_send_elsewhere(tmp_path: Path) -> None:
    """A stream item refused by a draining server never ran: the Python client's StreamItemError says
    UNAVAILABLE and retry_safe, as a unary call's refusal does, not UNKNOWN (the stream protocol has no status
    code; the server sends it in the item's parameters)."""
    repo = _repository(tmp_path / "models")
    args = ["--model-repository", str(repo), "--grpc-port", "0", "--shutdown-grace-s", "120"]
    with ServeProcess(args) as server:
        _wait_ready(server.address).close()

        async def scenario() -> list[InferResult | StreamItemError]:
            answered = asyncio.Event()

            def acc(step: str) -> dict[str, object]:
                one = {"INPUT": np.ones((1, 1), np.float32)}
                return {"model": "acc", "inputs": one, "request_id": step, "sequence_id": 41, f"sequence_{step}": True}

            async def requests() -> AsyncIterator[dict[str, object]]:
                yield acc("start")
                await answered.wait()
                server.proc.send_signal(signal.SIGTERM)
                await asyncio.to_thread(server.wait_for_line, "refusing new calls")
                yield {"model": "fast", "inputs": {"INPUT0": np.ones((1, 8), np.float32)}, "request_id": "fast"}
                yield acc("end")

            items: list[InferResult | StreamItemError] = []
            async with AsyncInferenceClient(server.address) as client:
                async for item in client.stream_infer(requests()):
                    items.append(item)
                    answered.set()
            return items

        start, fast, end = asyncio.run(scenario())
        assert server.proc.wait(60) == 0
    assert isinstance(start, InferResult) and isinstance(end, InferResult)
    assert float(end["OUTPUT"][0, 0]) == 2.0
    assert isinstance(fast, StreamItemError) and DRAINING in fast.details
    assert fast.code == grpc.StatusCode.UNAVAILABLE and fast.retry_safe, (fast.code, fast.retry_safe)


def test_an_abandoned_sequence_holds_the_drain_only_for_its_idle_time(tmp_path: Path) -> None:
    """A client that went away mid-sequence: the sequence ends after max_sequence_idle_microseconds (1 s here),
    and the drain with it, not after the grace."""
    repo = _repository(tmp_path / "models", idle_us=1_000_000)
    args = ["--model-repository", str(repo), "--grpc-port", "0", "--shutdown-grace-s", "120"]
    with ServeProcess(args) as server:
        signalled = _signal_mid_sequence(server, 11)
        assert server.proc.wait(60) == 0
        assert time.monotonic() - signalled < 45, time.monotonic() - signalled
        assert "sequence 11 ended after 1 s without requests" in server.output, server.output
        assert "grace period over" not in server.output, server.output


def test_a_sequence_that_outlives_the_grace_is_cut_off_with_a_warning(tmp_path: Path) -> None:
    """A sequence that neither ends nor goes idle within --shutdown-grace-s: the process stops at the grace, and
    its log says a sequence did not end."""
    repo = _repository(tmp_path / "models")
    args = ["--model-repository", str(repo), "--grpc-port", "0", "--shutdown-grace-s", "1"]
    with ServeProcess(args) as server:
        _signal_mid_sequence(server, 12)
        assert server.proc.wait(60) == 0
        assert "grace period over with 0 call(s) still running and 1 sequence(s) not ended" in server.output


def test_a_stream_held_past_the_grace_is_told_its_sequence_was_cut_off(tmp_path: Path) -> None:
    """The grace ends while a stream's sequence is live: the stream ends with UNAVAILABLE naming the sequence and
    saying it must start again, not only "retry on another replica", which reads as if its next step could."""
    repo = _repository(tmp_path / "models")
    args = ["--model-repository", str(repo), "--grpc-port", "0", "--shutdown-grace-s", "1"]
    with ServeProcess(args) as server:
        c = _wait_ready(server.address)
        try:
            answers = _stream_started(c, 31)
            server.proc.send_signal(signal.SIGTERM)
            result, error = answers.get(timeout=60)
        finally:
            c.stop_stream()
            c.close()
        assert server.proc.wait(60) == 0
    assert result is None and DRAINING in str(error), (result, error)
    assert "sequence 31 of model 'acc' did not end before the server stopped: start it again there" in str(error)


def flagged_request(model: str, **flags: int | bool) -> pb.ModelInferRequest:
    """A request to `model` carrying only sequence parameters: what the drain gate judges."""
    message = pb.ModelInferRequest(model_name=model)
    for key, value in flags.items():
        if isinstance(value, bool):
            message.parameters[key].bool_param = value
        else:
            message.parameters[key].int64_param = value
    return message


def test_the_next_request_of_a_sequence_cut_off_says_so() -> None:
    """Between the drain's end and the process's (gRPC's last half second), a sequence's next request is refused
    as cut off; before the end it is taken, and a START or a request without a sequence is refused as draining."""

    async def scenario() -> list[str | None]:
        gate = DrainGate(live=lambda model, sequence_id: (model, sequence_id) == ("acc", 5), live_sequences=lambda: 1)
        asks = [
            flagged_request("acc", sequence_id=5),
            flagged_request("acc", sequence_id=6, sequence_start=True),
            flagged_request("fast"),
        ]
        drain = asyncio.ensure_future(gate.drain(0.2))
        await asyncio.sleep(0)
        during = [gate.refusal(r) for r in asks]
        assert await drain is False  # the sequence stayed live: not drained
        after = [gate.refusal(asks[0])]
        return [None if r is None else r.message for r in [*during, *after]]

    during_acc, during_start, during_fast, after_acc = asyncio.run(scenario())
    assert during_acc is None
    assert during_start == during_fast == DRAINING
    assert after_acc is not None and after_acc.startswith(DRAINING)
    assert "sequence 5 of model 'acc' did not end before the server stopped: start it again there" in after_acc


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("drain_upstream") / "models"
    accumulator_model(root / "acc" / "1" / "model.onnx")
    write_config(root, "acc", accumulator_config("acc", extra="max_sequence_idle_microseconds: 60000000"))
    with ServerThread(root) as s:
        yield s


def test_a_remote_sequence_under_way_runs_to_its_end(tmp_path: Path, upstream: ServerThread) -> None:
    """A sequence model on an upstream Triton: the draining front still forwards the next requests of a sequence
    it started there, and refuses a new one."""
    root = tmp_path / "models"
    _remote(root, "remote_acc", upstream.address, "acc")
    args = ["--model-repository", str(root), "--grpc-port", "0", "--shutdown-grace-s", "120"]
    with ServeProcess(args) as server:
        c = _wait_ready(server.address)
        try:
            assert _sum(c.infer("remote_acc", _x(1.0), sequence_id=21, sequence_start=True)) == 1.0
            server.proc.send_signal(signal.SIGTERM)
            assert "1 live sequence(s)" in server.wait_for_line("refusing new calls")
            assert _sum(c.infer("remote_acc", _x(2.0), sequence_id=21)) == 3.0
            message = _error(
                grpc.StatusCode.UNAVAILABLE, c.infer, "remote_acc", _x(1.0), sequence_id=22, sequence_start=True
            )
            assert DRAINING in message
            assert _sum(c.infer("remote_acc", _x(4.0), sequence_id=21, sequence_end=True)) == 7.0
        finally:
            c.close()
        assert server.proc.wait(60) == 0
        assert "grace period over" not in server.output, server.output
