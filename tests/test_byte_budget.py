"""--max-in-flight-bytes: requests are admitted while the bytes of the requests in flight fit the budget; past it
they answer RESOURCE_EXHAUSTED at once, and the bytes come back when a request's answer is made.

Requests stay in flight without timing: "wide" batches up to 4 rows and waits ten minutes for company, so rows
sent below 4 stay queued until the 4th arrives. One row is 256 KiB and the budget 1 MiB: four rows at most.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.server import ServerSettings
from tensorgate.server.rpc import codec
from tensorgate.server.rpc.byte_budget import request_bytes
from tests.onnx_models import add_sub_model, identity_model, write_config
from tests.pki import add_sub_request
from tests.scraping import metrics_url, scrape, value
from tests.serving import ServerThread
from tests.test_poll import wait_for

WIDTH = 65536
ROW = WIDTH * 4
"""Bytes of one FP32 row of "wide"."""
BUDGET = 4 * ROW
WIDE = "max_batch_size: 4\ndynamic_batching { max_queue_delay_microseconds: 600000000 }\n"
GAUGE = "tensorgate_inflight_request_bytes"
LABELS = {"model": "wide", "version": "1"}


def _over(size: int, held: int) -> str:
    return (
        f"model 'wide': the request's {size} bytes of tensors do not fit the {BUDGET - held} bytes left of the "
        f"server's budget for requests in flight ({BUDGET} bytes, --max-in-flight-bytes); retry later or on another "
        "replica"
    )


def _never(model: str, size: int) -> str:
    return (
        f"model '{model}': the request's {size} bytes of tensors can never fit the server's budget for requests in "
        f"flight ({BUDGET} bytes, --max-in-flight-bytes)"
    )


def wide_request(rows: int) -> pb.ModelInferRequest:
    x = np.full((rows, WIDTH), rows, dtype=np.float32)
    req = pb.ModelInferRequest(model_name="wide")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(x.tobytes())
    return req


def bytes_request(model: str, elements: int, length: int) -> pb.ModelInferRequest:
    """One row of `elements` BYTES elements of `length` bytes each, in raw_input_contents (4-byte length each)."""
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, elements])
    req.raw_input_contents.append((len(b"x" * length).to_bytes(4, "little") + b"x" * length) * elements)
    return req


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    identity_model(root / "wide" / "1" / "model.onnx", "FP32", ("batch", WIDTH))
    write_config(root, "wide", WIDE)
    add_sub_model(root / "add_sub" / "1" / "model.onnx")
    identity_model(root / "strings" / "1" / "model.onnx", "BYTES", ("batch", "n"))
    return root


@pytest.fixture
def server(repo: Path) -> Iterator[ServerThread]:
    with ServerThread(repo, max_in_flight_bytes=BUDGET) as s:
        yield s


def _held(server: ServerThread) -> float:
    return value(scrape(metrics_url(server)), GAUGE)


def _refused(server: ServerThread) -> float:
    return scrape(metrics_url(server)).get(
        ("tensorgate_inference_requests_total", frozenset({**LABELS, "code": "RESOURCE_EXHAUSTED"}.items())), 0.0
    )


def test_requests_past_the_budget_are_refused_and_the_bytes_come_back(server: ServerThread) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        queued = [stub.ModelInfer.future(wide_request(1), timeout=60) for _ in range(3)]
        wait_for("three rows in flight", lambda: _held(server) == 3 * ROW)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(wide_request(2), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details() == _over(2 * ROW, 3 * ROW)
        assert _refused(server) == 1  # counted among the model's requests, by its status code
        # Other models keep being served within what is left.
        assert stub.ModelInfer(add_sub_request(), timeout=10).model_name == "add_sub"
        # A request that fits exactly is admitted: its row completes the batch, and all four are answered.
        last = stub.ModelInfer(wide_request(1), timeout=30)
        for call in [*queued, last]:
            reply = call if isinstance(call, pb.ModelInferResponse) else call.result(timeout=30)
            assert np.frombuffer(reply.raw_output_contents[0], np.float32).shape == (WIDTH,)
        # Released when each answer was made, before it went out: free again once the callers have them.
        assert _held(server) == 0
        whole = stub.ModelInfer(wide_request(4), timeout=30)  # the whole budget, alone
        assert np.frombuffer(whole.raw_output_contents[0], np.float32).shape == (4 * WIDTH,)
        assert _held(server) == 0


def test_a_request_larger_than_the_budget_is_refused_even_on_an_idle_server(server: ServerThread) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(wide_request(5), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details() == _never("wide", 5 * ROW)
        # A large BYTES tensor is decoded (and measured) off the event loop: its elements' bytes count.
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(bytes_request("strings", 20_000, 100), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details() == _never("strings", 20_000 * (8 + 100))
        # A model the server does not have is NOT_FOUND, whatever the request's size.
        missing = wide_request(5)
        missing.model_name = "no_such_model"
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(missing, timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert _held(server) == 0


def test_a_call_past_its_deadline_gives_its_bytes_back(server: ServerThread) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(wide_request(3), timeout=1.0)  # queued until its deadline: no 4th row comes
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for("the bytes released", lambda: _held(server) == 0)
        stub.ModelInfer(wide_request(4), timeout=30)


def test_each_message_of_a_stream_is_admitted_on_its_own(server: ServerThread) -> None:
    with grpc.insecure_channel(server.address) as channel:
        sent: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
        replies = GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(sent.get, None), timeout=60)
        for _ in range(3):
            sent.put(wide_request(1))
        wait_for("three messages in flight", lambda: _held(server) == 3 * ROW)
        sent.put(wide_request(2))
        wait_for("the message refused", lambda: _refused(server) == 1)
        sent.put(wide_request(1))  # fits exactly, and completes the batch
        answers = [next(replies) for _ in range(5)]
        assert [a.error_message for a in answers] == ["", "", "", _over(2 * ROW, 3 * ROW), ""]
        assert [a.infer_response.model_name for a in answers] == ["wide"] * 5
        assert _held(server) == 0  # released as each answer was made, before it went out
        sent.put(add_sub_request())  # the stream stays open after a refusal
        assert next(replies).infer_response.model_name == "add_sub"
        sent.put(None)
        assert list(replies) == []


def test_without_a_budget_nothing_is_measured_or_shown(repo: Path) -> None:
    with ServerThread(repo) as s, grpc.insecure_channel(s.address) as channel:
        GRPCInferenceServiceStub(channel).ModelInfer(wide_request(4), timeout=30)
        assert not any(name == GAUGE for name, _ in scrape(metrics_url(s)))


def test_request_bytes_counts_the_decoded_tensors() -> None:
    assert request_bytes(codec.decode_infer_request(wide_request(3))) == 3 * ROW
    # BYTES: each element's own bytes and a pointer, not the 4-byte lengths of the wire format.
    assert request_bytes(codec.decode_infer_request(bytes_request("strings", 3, 10))) == 3 * (8 + 10)
    assert request_bytes(codec.decode_infer_request(add_sub_request())) == 2 * 16 * 4


def test_a_negative_budget_is_refused(repo: Path) -> None:
    with pytest.raises(ValueError, match="max_in_flight_bytes must be >= 0"):
        ServerSettings(model_repository=repo, max_in_flight_bytes=-1)
