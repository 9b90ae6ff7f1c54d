"""Review 130 of retryable refusals (server/rpc/errors.py `refuse`): what a refused call leaves behind, and what a
remote model answers when its upstream ran the request before refusing it.

The memory tests run calls with the collector off and count what is left (as tests/test_memory_growth.py does),
but count gRPC's own call state and AbortError too, not only tensorgate's errors: those are what `refuse` keeps.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc import aio

from tensorgate.client import InferenceClient, RetryPolicy
from tensorgate.client.errors import ResourceExhausted, Unavailable
from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.server.errors import TensorgateError
from tests.onnx_models import tile_model
from tests.scripted_upstream import ScriptedUpstream
from tests.serving import ServerThread
from tests.test_decoupled import _remote
from tests.test_memory_growth import _collector_off, _request, _unary

CALLS = 60
LEFT_AT_MOST = 5
"""Objects of a kind a round of CALLS calls may leave alive: a call that ends as the count is taken, never one per
call."""


def _left(o: object) -> str | None:
    """The kind an object is counted as, or None: a refused call's error, gRPC's AbortError, its call state."""
    if isinstance(o, aio.AbortError):
        return "AbortError"
    if isinstance(o, TensorgateError):
        return "TensorgateError"
    if type(o).__name__ in ("RPCState", "_ServicerContext"):
        return type(o).__name__
    return None


def _census() -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in gc.get_objects():
        kind = _left(o)
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def _growth(calls: Callable[[], dict[grpc.StatusCode, int]]) -> tuple[dict[str, int], dict[grpc.StatusCode, int]]:
    """(objects of each kind alive after `calls` ended, minus before, where more; the calls' status codes)."""
    with _collector_off():
        before = _census()
        codes = calls()
        time.sleep(0.3)  # the server's loop finishes the calls' last steps
        after = _census()
    return {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}, codes


def _infer_all(stub: GRPCInferenceServiceStub, model: str) -> dict[grpc.StatusCode, int]:
    return _unary(stub, lambda i: _request(model))


def _repo_with_broken(repo: Path) -> Path:
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")  # UNAVAILABLE: failed to load
    return repo


def test_a_retryable_refusal_leaves_no_call_state_behind(repo: Path) -> None:
    """`refuse` cleared the AbortError's traceback from `context.add_done_callback`, whose callbacks gRPC keeps on
    the call's state bound to the context: state, context and error stayed, a cycle per refused call."""
    with ServerThread(_repo_with_broken(repo)) as s, grpc.insecure_channel(s.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        _infer_all(stub, "broken")  # warm-up
        grown, codes = _growth(lambda: _infer_all(stub, "broken"))
    assert codes == {grpc.StatusCode.UNAVAILABLE: CALLS}
    assert all(n <= LEFT_AT_MOST for n in grown.values()), f"{CALLS} refused calls left {grown}"


@contextlib.contextmanager
def _draining(server: ServerThread) -> Iterator[None]:
    """The server refuses as a stop does, without ending under the test."""

    async def turn(draining: bool) -> None:
        server.app._gate.draining = draining

    server.run(turn(True))
    try:
        yield
    finally:
        server.run(turn(False))


def test_a_draining_servers_refusal_leaves_nothing_behind(repo: Path) -> None:
    """The drain gate's refusal was held by the frame of `DrainGate.enter`, which the error's traceback holds: each
    refused call stayed whole (its request with it) until a full collection, through a drain that refuses them all."""

    with ServerThread(repo) as s, grpc.insecure_channel(s.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        with _draining(s):
            _infer_all(stub, "add_sub")  # warm-up
            grown, codes = _growth(lambda: _infer_all(stub, "add_sub"))
    assert codes == {grpc.StatusCode.UNAVAILABLE: CALLS}
    assert all(n <= LEFT_AT_MOST for n in grown.values()), f"{CALLS} refused calls left {grown}"


def _named(request: pb.ModelInferRequest, request_id: str) -> pb.ModelInferRequest:
    request.id = request_id
    return request


def test_a_call_the_drain_refuses_has_its_access_log_line(repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An operator asking why clients saw UNAVAILABLE during a deploy finds the calls the stop sent away in the
    access log, as every other refusal; they left before the line was written."""
    caplog.set_level(logging.DEBUG, logger="tensorgate.access")

    with ServerThread(repo) as s, grpc.insecure_channel(s.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        with _draining(s):
            with pytest.raises(grpc.RpcError) as unary:
                stub.ModelInfer(_named(_request("add_sub"), "drained-1"), timeout=30)
            with pytest.raises(grpc.RpcError) as stream:
                list(stub.ModelStreamInfer(iter([_request("add_sub")]), timeout=30))
            refused = s.app._gate.refused
    assert unary.value.code() == stream.value.code() == grpc.StatusCode.UNAVAILABLE
    lines = [r.getMessage() for r in caplog.records if r.name == "tensorgate.access"]
    assert any(
        line.startswith("ModelInfer model=add_sub version=- id=drained-1 status=UNAVAILABLE") for line in lines
    ), lines
    assert any(line.startswith("ModelStreamInfer model=- version=- id=- status=UNAVAILABLE") for line in lines), lines
    assert refused == 2  # for the stop's log line


def test_a_stream_message_the_drain_refuses_has_its_access_log_line(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream opened before the stop: its next message is refused in the stream, and logged as the calls are."""
    caplog.set_level(logging.DEBUG, logger="tensorgate.access")
    sent: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()

    def messages() -> Iterator[pb.ModelInferRequest]:
        for _ in range(2):  # bounded
            message = sent.get(timeout=30)
            if message is None:
                return
            yield message

    with ServerThread(repo) as s, grpc.insecure_channel(s.address) as channel:
        answers = GRPCInferenceServiceStub(channel).ModelStreamInfer(messages(), timeout=30)
        sent.put(_named(_request("add_sub"), "before"))
        assert not next(answers).error_message
        with _draining(s):
            sent.put(_named(_request("add_sub"), "after"))
            assert "retry on another replica" in next(answers).error_message
            with pytest.raises(grpc.RpcError) as ended:
                next(answers)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    lines = [r.getMessage() for r in caplog.records if r.name == "tensorgate.access"]
    assert any(
        line.startswith("ModelStreamInfer model=add_sub version=- id=after status=UNAVAILABLE") for line in lines
    ), lines


def _inference_count(server: ServerThread, model: str) -> int:
    with grpc.insecure_channel(server.address) as channel:
        stats = GRPCInferenceServiceStub(channel).ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=30)
    return stats.model_stats[0].inference_count


def test_a_remote_models_refusal_of_a_request_its_upstream_ran_is_not_retried(tmp_path: Path) -> None:
    """An upstream tensorgate refuses a response over its message limit after the model ran, with gRPC's retry
    pushback; the front answered a plain RESOURCE_EXHAUSTED, now sent so that retry policies retry it, and a
    client's RetryPolicy ran the request upstream max_attempts times."""
    upstream_root, front_root = tmp_path / "upstream", tmp_path / "front"
    tile_model(upstream_root / "m" / "1" / "model.onnx")  # 64 bytes in, 256 KiB out
    (front_root / "r").mkdir(parents=True)
    with ServerThread(upstream_root, max_message_bytes=64 * 1024) as upstream:
        (front_root / "r" / "config.pbtxt").write_text(
            'backend: "tensorgate_triton"\n'
            f'parameters {{ key: "tensorgate.triton.url" value {{ string_value: "{upstream.address}" }} }}\n'
            'parameters { key: "tensorgate.triton.model_name" value { string_value: "m" } }\n'
        )
        with ServerThread(front_root) as front, InferenceClient(front.address, retry=RetryPolicy(3)) as client:
            with pytest.raises(ResourceExhausted) as refused:
                client.infer("r", {"INPUT0": np.ones((1, 16), np.float32)}, timeout=30)
            runs = _inference_count(upstream, "m")
    assert "over the server's message limit" in refused.value.details
    assert not refused.value.retry_safe
    assert runs == 1, f"the upstream ran the request {runs} times"


@pytest.mark.parametrize(
    ("code", "runs", "retry_safe"),
    [
        pytest.param(grpc.StatusCode.UNAVAILABLE, 3, True, id="upstream-refused"),  # ran nothing: retried
        pytest.param(grpc.StatusCode.CANCELLED, 1, False, id="upstream-cancelled"),  # may have run: not again
    ],
)
def test_a_remote_model_is_retried_only_where_its_upstream_ran_nothing(
    tmp_path: Path, code: grpc.StatusCode, runs: int, retry_safe: bool
) -> None:
    """Front refusals go out so that retry policies retry them (dfaf73b): an upstream's own UNAVAILABLE ran
    nothing, but a call it cancelled, or a connection lost under it, may have run there, and a retry would run it
    again (a sequence model's step twice)."""
    root = tmp_path / "models"
    with ScriptedUpstream() as up:
        _remote(root, "r", up.url)
        up.script.error = (code, "scripted")
        with ServerThread(root) as front, InferenceClient(front.address, retry=RetryPolicy(3)) as client:
            before = up.script.calls
            with pytest.raises(Unavailable) as refused:
                client.infer("r", {"X": np.ones((1, 2), np.float32)}, timeout=30)
            assert up.script.calls - before == runs
    assert refused.value.retry_safe is retry_safe


def test_a_load_refused_for_the_servers_mode_is_not_retried(repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    """RepositoryModelLoad outside explicit mode is UNAVAILABLE for the server's whole life; sent so that retry
    policies retry it, a client's RetryPolicy sent it max_attempts times for the same answer."""
    caplog.set_level(logging.DEBUG, logger="tensorgate.access")
    with (
        ServerThread(repo) as s,
        InferenceClient(s.address, retry=RetryPolicy(3, initial_backoff_s=0.01)) as client,
    ):
        with pytest.raises(Unavailable) as refused:
            client.load("add_sub", timeout=30)
    assert "--model-control-mode explicit" in refused.value.details
    sent = [
        r for r in caplog.records if r.name == "tensorgate.access" and r.getMessage().startswith("RepositoryModelLoad")
    ]
    assert len(sent) == 1, [r.getMessage() for r in sent]
