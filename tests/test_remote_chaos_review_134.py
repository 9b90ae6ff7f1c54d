"""Review 134: a remote model's upstream going away, draining or refusing, as its callers see it. The upstream is
tests/scripted_upstream.py on loopback, scripted to refuse as a draining server does; the front is a real
tensorgate (ServerThread), its callers our stubs.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos.tensors import STATUS_CODE, encode_infer_request
from tests.scripted_upstream import ScriptedUpstream, _Servicer
from tests.serving import ServerThread
from tests.test_decoupled import _remote

DRAINING = "the server is shutting down; retry on another replica"
TRIES = 6


class _Refusing(_Servicer):
    """A decoupled upstream that refuses every stream at once, before reading its request: what a tensorgate or a
    Triton does with a stream that reaches it as it shuts down."""

    async def ModelStreamInfer(  # noqa: N802 (the protocol's name)
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        self.calls += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING)
        yield pb.ModelStreamInferResponse()  # never reached: makes this an async generator, as gRPC wants


def test_a_stream_refused_before_its_request_was_read_keeps_the_upstream_s_answer(tmp_path: Path) -> None:
    """A request larger than the HTTP/2 window the upstream grants is often still being written when the upstream
    refuses its stream (a race: hence several tries). The caller must hear the upstream's UNAVAILABLE (retryable,
    the model not at fault), not an INTERNAL "model failed during execution" made of gRPC's "Internal error from
    Core" for the unfinished write, which a client neither retries nor tells from a broken model."""
    root = tmp_path / "models"
    up = ScriptedUpstream()
    up.script = _Refusing()
    up.script.decoupled, up.script.max_batch_size = True, 0  # X [-1, 2]: any number of rows reaches it
    with up:
        _remote(root, "gen", up.url)
        with ServerThread(root) as s, grpc.insecure_channel(s.address) as channel:
            big = np.ones((200_000, 2), np.float32)  # 1.6 MB, past the window: a write the refusal cuts short
            answers = []
            for i in range(TRIES):  # whether the write is cut short, or was done first, is up to the race
                request = encode_infer_request("gen", [("X", big)], request_id=f"r{i}")
                answers += list(GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([request]), timeout=30))
            assert up.script.calls == TRIES
    expected = f"model 'gen' version 1: upstream Triton {up.url} (model 'm') answered UNAVAILABLE: {DRAINING}"
    got = [
        (a.infer_response.id, a.infer_response.parameters[STATUS_CODE].string_param, a.error_message) for a in answers
    ]
    assert got == [(f"r{i}", "UNAVAILABLE", expected) for i in range(TRIES)]


@contextmanager
def _closing_listener(url: str) -> Iterator[None]:
    """What stands on an upstream's address once it is gone but something still accepts there (a proxy or a
    Service in front of it, say): each connection is accepted and closed before a byte of HTTP/2."""
    host, port = url.rsplit(":", 1)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    listener.listen(16)
    listener.settimeout(0.1)
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                continue
            connection.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(10)
        listener.close()


def _lost(details: str) -> bool:
    """A caller's error for a call failed for want of a connection, the last one having been accepted and then
    closed ("Socket closed"; "Connection reset" when the close met the client's first bytes), not refused."""
    last = details.partition("last error:")[2].lower()
    return "connections to all backends failing" in details and ("socket closed" in last or "reset" in last)


def test_a_call_no_connection_was_up_for_is_not_marked_as_having_run(tmp_path: Path) -> None:
    """With no connection to the upstream, gRPC's round_robin fails a call before sending it, "connections to all
    backends failing; last error: ..." with the last connection's failure ("Socket closed" here, or the reset of a
    killed upstream). Nothing ran: the caller's UNAVAILABLE must not carry the retry pushback that says it may
    have, which stops a client's retries and makes `.retry_safe` False for the whole outage."""
    root = tmp_path / "models"
    with ScriptedUpstream() as up:
        _remote(root, "r", up.url)
        with ServerThread(root) as s, grpc.insecure_channel(s.address) as channel:
            infer = GRPCInferenceServiceStub(channel).ModelInfer
            request = encode_infer_request("r", [("X", np.ones((1, 2), np.float32))])
            assert infer(request, timeout=10).model_name == "r"
            up.stop()
            with _closing_listener(up.url):
                seen: list[tuple[str, str, dict[str, str]]] = []
                ends = time.monotonic() + 20
                while time.monotonic() < ends and not any(_lost(details) for _, details, _ in seen):
                    try:
                        infer(request, timeout=10)
                    except grpc.RpcError as exc:
                        trailing = {m.key: str(m.value) for m in exc.trailing_metadata() or ()}
                        seen.append((exc.code().name, exc.details() or "", trailing))
                    time.sleep(0.1)
    closed = [item for item in seen if _lost(item[1])]
    assert closed, seen
    code, details, trailing = closed[0]
    assert code == "UNAVAILABLE"
    assert details.startswith(f"model 'r' version 1 is not ready: upstream Triton {up.url} (model 'm'): "), details
    assert "grpc-retry-pushback-ms" not in trailing, (details, trailing)
