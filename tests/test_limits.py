"""Size limits checked while decoding: elements per tensor and bytes per BYTES element -> RESOURCE_EXHAUSTED,
before memory is spent on the data, and the server keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos.tensors import encode_bytes_tensor, encode_infer_request
from tensorgate.server import ServerSettings
from tests.onnx_models import identity_model
from tests.serving import ServerThread

MAX_ELEMENTS = 1000
MAX_BYTES = 8


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GRPCInferenceServiceStub]:
    repo = tmp_path_factory.mktemp("limits") / "models"
    identity_model(repo / "fp32" / "1" / "model.onnx", "FP32", ("batch", 4))
    identity_model(repo / "text" / "1" / "model.onnx", "BYTES", ("batch", 4))
    (repo / "fp32" / "config.pbtxt").write_text("max_batch_size: 1024\n")
    with ServerThread(repo, max_tensor_elements=MAX_ELEMENTS, max_bytes_element=MAX_BYTES) as server:
        with grpc.insecure_channel(server.address) as channel:
            yield GRPCInferenceServiceStub(channel)


def _good(stub: GRPCInferenceServiceStub) -> None:
    x = np.ones((1, 4), np.float32)
    reply = stub.ModelInfer(encode_infer_request("fp32", [("INPUT0", x)]), timeout=10)
    assert reply.model_name == "fp32"


def _text(elements: list[bytes], raw: bool = True) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="text")
    tensor = request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, len(elements)])
    if raw:
        request.raw_input_contents.append(encode_bytes_tensor(np.array(elements, dtype=object)))
    else:
        tensor.contents.bytes_contents.extend(elements)
    return request


def _huge_declared_shape() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="text")
    request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1 << 40, 4])
    request.raw_input_contents.append(b"\x00" * 16)
    return request


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        pytest.param(
            encode_infer_request("fp32", [("INPUT0", np.zeros((300, 4), np.float32))]),
            ["model 'fp32'", "tensor 'INPUT0'", "1200 elements", str(MAX_ELEMENTS), "--max-tensor-elements"],
            id="too-many-elements",
        ),
        pytest.param(
            _huge_declared_shape(),
            ["model 'text'", "tensor 'INPUT0'", "--max-tensor-elements"],
            id="huge-declared-shape-tiny-data",
        ),
        pytest.param(
            _text([b"ok", b"123456789", b"", b"x"]),
            ["model 'text'", "tensor 'INPUT0'", "9 bytes", "--max-bytes-element"],
            id="long-bytes-element-raw",
        ),
        pytest.param(
            _text([b"ok", b"123456789", b"", b"x"], raw=False),
            ["model 'text'", "tensor 'INPUT0'", "9 bytes", "--max-bytes-element"],
            id="long-bytes-element-contents",
        ),
    ],
)
def test_limits_answer_resource_exhausted_and_the_server_keeps_serving(
    stub: GRPCInferenceServiceStub, request_: pb.ModelInferRequest, words: list[str]
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request_, timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = info.value.details() or ""
    for word in words:
        assert word in details
    _good(stub)


def test_within_the_limits_passes(stub: GRPCInferenceServiceStub) -> None:
    reply = stub.ModelInfer(_text([b"12345678", b"", b"a", b"bc"]), timeout=10)
    assert reply.outputs[0].shape == [1, 4]
    x = np.zeros((250, 4), np.float32)  # exactly MAX_ELEMENTS
    assert stub.ModelInfer(encode_infer_request("fp32", [("INPUT0", x)]), timeout=10).outputs[0].shape == [250, 4]


def test_a_limit_on_a_stream_fails_only_that_request(stub: GRPCInferenceServiceStub) -> None:
    good = _text([b"a", b"b", b"c", b"d"])
    good.id = "good"
    bad = _text([b"a", b"123456789", b"c", b"d"])
    bad.id = "bad"
    replies = list(stub.ModelStreamInfer(iter([bad, good]), timeout=10))
    by_id = {r.infer_response.id: r for r in replies}
    assert "--max-bytes-element" in by_id["bad"].error_message
    assert by_id["good"].error_message == ""


SMALL = 8192


def test_a_stream_message_over_the_size_limit_ends_that_stream_only(tmp_path: Path) -> None:
    """gRPC refuses a message over --max-message-bytes from its length prefix, before holding it: on
    ModelStreamInfer that ends the stream (RESOURCE_EXHAUSTED, naming the sizes), a documented exception to
    per-message errors, kept so that no caller can make the server hold more than the limit. Other streams and
    calls go on."""
    repo = tmp_path / "models"
    identity_model(repo / "fp32" / "1" / "model.onnx", "FP32", ("batch", 4))
    (repo / "fp32" / "config.pbtxt").write_text("max_batch_size: 2048\n")
    big = encode_infer_request("fp32", [("INPUT0", np.ones((600, 4), np.float32))])
    small = encode_infer_request("fp32", [("INPUT0", np.ones((1, 4), np.float32))])
    assert big.ByteSize() > SMALL
    with ServerThread(repo, max_message_bytes=SMALL) as server, grpc.insecure_channel(server.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as ended:
            list(stub.ModelStreamInfer(iter([big]), timeout=30))
        assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"{big.ByteSize()} vs. {SMALL}" in (ended.value.details() or "")
        replies = list(stub.ModelStreamInfer(iter([small, small]), timeout=30))
        assert [r.error_message for r in replies] == ["", ""]
        _good(stub)


@pytest.mark.parametrize(
    "kwargs",
    [pytest.param({"max_tensor_elements": 0}, id="elements"), pytest.param({"max_bytes_element": -1}, id="bytes")],
)
def test_settings_refuse_nonsense_limits(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="max_tensor_elements"):
        ServerSettings(model_repository=tmp_path, **kwargs)
