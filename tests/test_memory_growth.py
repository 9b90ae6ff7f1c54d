"""Memory that a call leaves behind once it has ended (found with benchmarks/soak.py).

A failed call whose error is held by a frame that the error's own traceback holds is a reference cycle: its request
and tensors stay until a full garbage collection, which a server with many long-lived objects may not run for
thousands of calls, so a stream of refused or timed-out large requests grows the heap. These tests run calls with
the collector off and count what is left: an error that outlives its call is in such a cycle.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest

from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.server.errors import TensorgateError
from tests.onnx_models import paced_model, write_config
from tests.otlp_sinks import grpc_sink
from tests.serving import ServerThread

CALLS = 60
LEFT_AT_MOST = 5
"""Errors a round of CALLS calls may leave alive: a call that ends as the count is taken, never one per call."""

PACED = """max_batch_size: 1
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""


def _request(model: str, width: int = 16, rows: int = 1, datatype: str = "FP32") -> pb.ModelInferRequest:
    data = np.ones((rows, width), np.float32 if datatype == "FP32" else np.int32)
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=[rows, width])
            for name in ("INPUT0", "INPUT1")
        ],
        raw_input_contents=[data.tobytes(), data.tobytes()],
    )


def _slow_request() -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="paced",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=[1, 1])],
        raw_input_contents=[np.array([[0.5]], np.float32).tobytes()],
    )


def _live(kind: type[BaseException]) -> int:
    """Objects of `kind` the collector tracks, unreachable ones included (with it off, nothing collects them)."""
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


@contextmanager
def _collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


def _left_behind(calls: Callable[[], dict[grpc.StatusCode, int]], kind: type[BaseException]) -> tuple[int, dict]:
    """(errors of `kind` alive after `calls` ended, minus before; the calls' status codes)."""
    with _collector_off():
        before = _live(kind)
        codes = calls()
        time.sleep(0.2)  # the server's loop finishes the calls' last steps
        return _live(kind) - before, codes


def _unary(stub: GRPCInferenceServiceStub, make: Callable[[int], pb.ModelInferRequest]) -> dict[grpc.StatusCode, int]:
    codes: dict[grpc.StatusCode, int] = {}
    for i in range(CALLS):
        try:
            stub.ModelInfer(make(i), timeout=30)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
        codes[code] = codes.get(code, 0) + 1
    return codes


@pytest.fixture
def paced_repo(repo: Path) -> Path:
    paced_model(repo / "paced" / "1" / "model.onnx")
    write_config(repo, "paced", 'name: "paced"\n' + PACED)
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")  # UNAVAILABLE: failed to load
    return repo


@pytest.fixture
def limited(paced_repo: Path) -> Iterator[ServerThread]:
    with ServerThread(paced_repo, max_tensor_elements=64) as s:
        yield s


REFUSALS = {
    "not-found": (lambda i: _request(f"nope-{i}"), grpc.StatusCode.NOT_FOUND),
    "bad-shape": (lambda i: _request("add_sub", width=15), grpc.StatusCode.INVALID_ARGUMENT),
    "bad-datatype": (lambda i: _request("add_sub", datatype="INT32"), grpc.StatusCode.INVALID_ARGUMENT),
    "too-large": (lambda i: _request("add_sub", rows=5), grpc.StatusCode.RESOURCE_EXHAUSTED),
    # Refused without a response message (Trailers-Only), so that retry policies retry it: by `context.abort`.
    "not-loaded": (lambda i: _request("broken"), grpc.StatusCode.UNAVAILABLE),
}


@pytest.mark.parametrize("refusal", REFUSALS, ids=list(REFUSALS))
def test_a_refused_call_leaves_nothing_behind(limited: ServerThread, refusal: str) -> None:
    """The RPC boundary used to answer with `context.abort`, whose AbortError gRPC keeps on the call's state while
    its traceback holds that state, and to keep the error in its own frame: each refused call stayed whole."""
    make, expected = REFUSALS[refusal]
    with grpc.insecure_channel(limited.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        _unary(stub, make)  # warm-up: first-call caches
        left, codes = _left_behind(lambda: _unary(stub, make), TensorgateError)
    assert codes == {expected: CALLS}
    assert left <= LEFT_AT_MOST, f"{left} errors of {CALLS} {refusal} calls are still alive"


def test_a_call_whose_deadline_passes_in_the_queue_leaves_nothing_behind(limited: ServerThread) -> None:
    """The scheduler's future held the DeadlineExceededError raised in the frame that holds the future."""
    with grpc.insecure_channel(limited.address) as channel:
        stub = GRPCInferenceServiceStub(channel)

        def burst() -> dict[grpc.StatusCode, int]:
            codes: dict[grpc.StatusCode, int] = {}
            with futures.ThreadPoolExecutor(8) as pool:
                calls = [pool.submit(stub.ModelInfer, _slow_request(), timeout=0.02) for _ in range(CALLS)]
                for call in calls:
                    exc = call.exception()
                    code = grpc.StatusCode.OK if exc is None else exc.code()  # type: ignore[attr-defined]
                    codes[code] = codes.get(code, 0) + 1
            return codes

        burst()
        left, codes = _left_behind(burst, TensorgateError)
    assert codes.get(grpc.StatusCode.DEADLINE_EXCEEDED, 0) >= 5, codes  # some waited in the queue past 20 ms
    assert left <= LEFT_AT_MOST, f"{left} errors of {codes} calls are still alive"


def test_a_call_its_caller_cancels_leaves_nothing_behind(limited: ServerThread) -> None:
    """The RPC boundary kept the CancelledError in its frame, which the error's traceback holds."""
    with grpc.insecure_channel(limited.address) as channel:
        stub = GRPCInferenceServiceStub(channel)

        def cancel_all() -> dict[grpc.StatusCode, int]:
            codes: dict[grpc.StatusCode, int] = {}
            for i in range(CALLS):
                call = stub.ModelInfer.future(_slow_request(), timeout=30)
                time.sleep(0.002 * (i % 3))  # just sent, queued or running
                call.cancel()
                try:
                    call.result()
                    code = grpc.StatusCode.OK
                except grpc.FutureCancelledError:
                    code = grpc.StatusCode.CANCELLED
                codes[code] = codes.get(code, 0) + 1
            return codes

        cancel_all()
        time.sleep(0.5)  # the server sees the last cancels
        left, codes = _left_behind(cancel_all, asyncio.CancelledError)
    assert codes.get(grpc.StatusCode.CANCELLED, 0) >= CALLS // 2, codes
    assert left <= LEFT_AT_MOST, f"{left} CancelledErrors of {codes} calls are still alive"


def test_a_refused_call_leaves_nothing_behind_when_traced(repo: Path) -> None:
    """With tracing on, validation's span kept the error in the frame that its traceback holds."""
    with (
        grpc_sink(lambda body, headers: None) as endpoint,
        ServerThread(repo, otlp_endpoint=endpoint, otlp_insecure=True, trace_sample_rate=1.0) as s,
        grpc.insecure_channel(s.address) as channel,
    ):
        stub = GRPCInferenceServiceStub(channel)
        make, _ = REFUSALS["bad-shape"]
        _unary(stub, make)
        left, codes = _left_behind(lambda: _unary(stub, make), TensorgateError)
    assert codes == {grpc.StatusCode.INVALID_ARGUMENT: CALLS}
    assert left <= LEFT_AT_MOST, f"{left} errors of {CALLS} traced calls are still alive"


def test_unknown_names_mint_no_series_nor_entries(server: ServerThread) -> None:
    """Names a caller makes up (a typo, a scan) are folded into one "" series and own no repository entry."""
    app = server.app
    assert app.metrics is not None
    with grpc.insecure_channel(server.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        before = (len(app.metrics.requests.counts), len(app.repository._entries), len(app.repository._locks))
        codes = _unary(stub, lambda i: _request(f"nope-{i}"))
        for i in range(CALLS):
            assert not stub.ModelReady(pb.ModelReadyRequest(name=f"gone-{i}"), timeout=30).ready
            with pytest.raises(grpc.RpcError):
                stub.ModelStatistics(pb.ModelStatisticsRequest(name=f"gone-{i}"), timeout=30)
        after = (len(app.metrics.requests.counts), len(app.repository._entries), len(app.repository._locks))
    assert codes == {grpc.StatusCode.NOT_FOUND: CALLS}
    assert after[0] <= before[0] + 1  # the one ("", "", "NOT_FOUND") series
    assert after[1:] == before[1:]
