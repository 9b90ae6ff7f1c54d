"""Bad requests get the exact status code and a message naming what is wrong; the server keeps serving.

Every case is followed by a good request to the same server (and, for ModelStreamInfer, on the same stream), so
a failure that poisons a model, a connection or a stream shows up here.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

import tensorgate.server
from tensorgate.protos import GRPCInferenceServiceStub, tensors
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.server.rpc import codec
from tests.onnx_models import ADD_SUB_CONFIG, add_sub_model, identity_model, tile_model, write_config
from tests.serving import ServerThread

INVALID = grpc.StatusCode.INVALID_ARGUMENT
RESOURCE = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    add_sub_model(root / "add_sub" / "1" / "model.onnx")
    write_config(root, "add_sub", ADD_SUB_CONFIG)
    identity_model(root / "identity_bytes" / "1" / "model.onnx", "BYTES")
    identity_model(root / "identity_uint8" / "1" / "model.onnx", "UINT8")
    add_sub_model(root / "fixed" / "1" / "model.onnx", shape=(2, 3))
    write_config(root, "fixed", 'backend: "onnxruntime"\nmax_batch_size: 0\n')
    # Each input's second dimension is free, so shapes the schema accepts can still fail inside the model.
    add_sub_model(root / "free_dims" / "1" / "model.onnx", shape=("batch", "n"))
    identity_model(root / "text_free" / "1" / "model.onnx", "BYTES", shape=("batch", "n"))
    identity_model(root / "fp32_free" / "1" / "model.onnx", "FP32", shape=("batch", "n"))
    # On disk but failing to load: a config naming an input the model lacks, and a file that is not ONNX.
    add_sub_model(root / "bad_config" / "1" / "model.onnx")
    write_config(
        root,
        "bad_config",
        'backend: "onnxruntime"\nmax_batch_size: 8\ninput [ { name: "NOPE" data_type: TYPE_FP32 dims: [ 16 ] } ]\n',
    )
    tile_model(root / "tile" / "1" / "model.onnx", width=16, repeats=4096)  # [1, 16] in, 256 KiB out
    (root / "corrupt" / "1").mkdir(parents=True)
    (root / "corrupt" / "1" / "model.onnx").write_bytes(b"this is not an ONNX model")
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    with ServerThread(repo) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.address) as ch:
        yield GRPCInferenceServiceStub(ch)


# ----- requests ---------------------------------------------------------------------------------------------------


def _f32(*shape: int) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)


def request(model: str, *tensors: tuple[str, str, list[int], bytes], **fields) -> pb.ModelInferRequest:
    """A request with raw contents: (name, datatype, shape, bytes) per input."""
    req = pb.ModelInferRequest(model_name=model, **fields)
    for name, datatype, shape, raw in tensors:
        req.inputs.add(name=name, datatype=datatype, shape=shape)
        req.raw_input_contents.append(raw)
    return req


def add_sub(rows: int = 1, **fields) -> pb.ModelInferRequest:
    x = _f32(rows, 16)
    return request(
        "add_sub", ("INPUT0", "FP32", [rows, 16], x.tobytes()), ("INPUT1", "FP32", [rows, 16], x.tobytes()), **fields
    )


def _framed(*items: bytes) -> bytes:
    return b"".join(len(b).to_bytes(4, "little") + b for b in items)


def bytes_request(raw: bytes, shape: list[int] | None = None) -> pb.ModelInferRequest:
    return request("identity_bytes", ("INPUT0", "BYTES", shape or [1, 4], raw))


def with_outputs(req: pb.ModelInferRequest, *names: str) -> pb.ModelInferRequest:
    for name in names:
        req.outputs.add(name=name)
    return req


def _class_count_too(req: pb.ModelInferRequest) -> pb.ModelInferRequest:
    """The request's last output asked for as its top 2 classes."""
    req.outputs[-1].parameters["classification"].int64_param = 2
    return req


def contents_request(
    model: str, datatype: str, shape: list[int], field: str, values: list, *, raw: bytes | None = None
) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    tensor = req.inputs.add(name="INPUT0", datatype=datatype, shape=shape)
    getattr(tensor.contents, field).extend(values)
    if raw is not None:
        req.raw_input_contents.append(raw)
    return req


def _row_16(shape: list[int]) -> tuple[str, str, list[int], bytes]:
    return ("INPUT1", "FP32", shape, _f32(*shape).tobytes())


ELEVEN = b"x" * 10  # element payload long enough that only the framing, not the size, is wrong

# (request, code, substrings the message must contain)
BAD_ROWS = [
    pytest.param(
        pb.ModelInferRequest(model_name="no_such_model"),
        grpc.StatusCode.NOT_FOUND,
        ["no_such_model"],
        id="unknown-model",
    ),
    pytest.param(add_sub(model_version="7"), grpc.StatusCode.NOT_FOUND, ["add_sub", "7"], id="unknown-version"),
    pytest.param(
        request("add_sbu", ("INPUT0", "FP32", [1, 16], b"\0" * 31)),
        grpc.StatusCode.NOT_FOUND,
        ["add_sbu"],
        id="unknown-model-and-a-bad-tensor",
    ),
    pytest.param(
        request("add_sub", ("INPUT0", "FP32", [1, 16], b"\0" * 31), model_version="9"),
        grpc.StatusCode.NOT_FOUND,
        ["add_sub", "9"],
        id="unknown-version-and-a-bad-tensor",
    ),
    pytest.param(
        add_sub(model_version="latest"), grpc.StatusCode.NOT_FOUND, ["add_sub", "latest"], id="non-numeric-version"
    ),
    pytest.param(add_sub(model_version="01"), grpc.StatusCode.NOT_FOUND, ["add_sub", "01"], id="zero-padded-version"),
    pytest.param(add_sub(model_version="9" * 5000), grpc.StatusCode.NOT_FOUND, ["add_sub"], id="5000-digit-version"),
    # Digits to str.isdigit(), not to int() ("²", "①") or not ASCII ("١", Arabic-Indic one): not versions.
    *(
        pytest.param(add_sub(model_version=v), grpc.StatusCode.NOT_FOUND, ["add_sub", v], id=f"unicode-digit-{i}")
        for i, v in enumerate(("\u00b2", "\u2460", "1\u00b2", "\u0661"))
    ),
    pytest.param(
        pb.ModelInferRequest(model_name="bad_config"),
        grpc.StatusCode.UNAVAILABLE,
        ["bad_config", "'NOPE' is not in the model"],
        id="load-failed-config",
    ),
    pytest.param(
        pb.ModelInferRequest(model_name="bad_config", model_version="1"),
        grpc.StatusCode.UNAVAILABLE,
        ["bad_config", "'NOPE' is not in the model"],
        id="load-failed-config-v1",
    ),
    pytest.param(
        pb.ModelInferRequest(model_name="corrupt"),
        grpc.StatusCode.UNAVAILABLE,
        ["corrupt", "model.onnx", "protobuf parsing failed"],
        id="load-failed-corrupt",
    ),
    pytest.param(
        request("add_sub", ("INPUT0", "FP32", [1, 16], _f32(1, 16).tobytes())),
        INVALID,
        ["add_sub", "INPUT1", "missing"],
        id="missing-input",
    ),
    pytest.param(
        request(
            "add_sub",
            ("INPUT0", "FP32", [1, 16], _f32(1, 16).tobytes()),
            ("INPUT0", "FP32", [1, 16], _f32(1, 16).tobytes()),
            _row_16([1, 16]),
        ),
        INVALID,
        ["add_sub", "INPUT0", "more than once"],
        id="duplicate-input",
    ),
    pytest.param(
        request(
            "add_sub",
            ("INPUT0", "FP32", [1, 16], _f32(1, 16).tobytes()),
            _row_16([1, 16]),
            ("EXTRA", "FP32", [1, 16], _f32(1, 16).tobytes()),
        ),
        INVALID,
        ["add_sub", "EXTRA", "unexpected input"],
        id="unexpected-input",
    ),
    pytest.param(
        request("add_sub", ("INPUT0", "FP64", [1, 16], np.zeros((1, 16)).tobytes()), _row_16([1, 16])),
        INVALID,
        ["add_sub", "INPUT0", "FP64", "FP32"],
        id="wrong-datatype",
    ),
    pytest.param(
        request("add_sub", ("INPUT0", "FP32", [16], _f32(16).tobytes()), _row_16([1, 16])),
        INVALID,
        ["add_sub", "INPUT0", "[16]", "[-1, 16]"],
        id="wrong-rank",
    ),
    pytest.param(
        request("add_sub", ("INPUT0", "FP32", [1, 15], _f32(1, 15).tobytes()), _row_16([1, 15])),
        INVALID,
        ["add_sub", "INPUT0", "[1, 15]", "[-1, 16]"],
        id="wrong-dims",
    ),
    pytest.param(
        request(
            "fixed",
            ("INPUT0", "FP32", [1, 2, 3], _f32(1, 2, 3).tobytes()),
            ("INPUT1", "FP32", [2, 3], _f32(2, 3).tobytes()),
        ),
        INVALID,
        ["fixed", "INPUT0", "[1, 2, 3]", "[2, 3]"],
        id="wrong-dims-no-batching",
    ),
    pytest.param(
        add_sub(rows=9), INVALID, ["add_sub", "INPUT0", "batch size 9", "max_batch_size"], id="batch-above-max"
    ),
    pytest.param(
        request("add_sub", ("INPUT0", "FP32", [0, 16], b""), _row_16([0, 16])),
        INVALID,
        ["add_sub", "INPUT0", "batch size 0"],
        id="batch-zero",
    ),
    pytest.param(
        request("add_sub", ("INPUT0", "FP32", [2, 16], _f32(2, 16).tobytes()), _row_16([3, 16])),
        INVALID,
        ["add_sub", "INPUT1", "batch size 3", "2"],
        id="batch-sizes-differ",
    ),
    pytest.param(
        request("add_sub", ("INPUT0", "FP32", [1, 16], _f32(1, 16).tobytes()[:-1]), _row_16([1, 16])),
        INVALID,
        ["add_sub", "INPUT0", "63 bytes", "64"],
        id="raw-size-mismatch",
    ),
    pytest.param(
        bytes_request(_framed(ELEVEN, ELEVEN, ELEVEN) + b"\x05\x00"),
        INVALID,
        ["identity_bytes", "INPUT0", "malformed BYTES"],
        id="bytes-truncated-length-prefix",
    ),
    pytest.param(
        bytes_request(_framed(ELEVEN, ELEVEN, ELEVEN) + (100).to_bytes(4, "little") + b"abc"),
        INVALID,
        ["identity_bytes", "INPUT0", "declares 100 bytes"],
        id="bytes-length-beyond-data",
    ),
    pytest.param(
        bytes_request(_framed(b"a", b"b", b"c", b"d") + b"junk"),
        INVALID,
        ["identity_bytes", "INPUT0", "left over"],
        id="bytes-trailing-data",
    ),
    pytest.param(
        # Within --max-tensor-elements (a larger shape is RESOURCE_EXHAUSTED, tests/test_limits.py) but far more
        # elements than 16 bytes can frame: refused before anything is allocated for them.
        bytes_request(_framed(b"a", b"b", b"c", b"d"), shape=[2**20, 4]),
        INVALID,
        ["identity_bytes", "INPUT0", "batch size 1048576 is outside"],
        id="bytes-shape-far-beyond-data",
    ),
    pytest.param(
        # A shape the model takes (its second dimension is free), far beyond what 16 bytes can frame: refused
        # before anything is allocated for it, by the decode that large tensors get off the event loop.
        request("text_free", ("INPUT0", "BYTES", [1, 2**20], _framed(b"a", b"b", b"c", b"d"))),
        INVALID,
        ["text_free", "INPUT0", "malformed BYTES", "needs 1048576 elements"],
        id="bytes-free-shape-far-beyond-data",
    ),
    pytest.param(
        # Large BYTES for an FP32 input, malformed too: the model's datatype is checked first, before the work per
        # element that would find the framing wrong (seconds of the event loop at the size limits).
        request("add_sub", ("INPUT0", "BYTES", [1, 2**15], b"\0" * 2**17 + b"x"), _row_16([1, 16])),
        INVALID,
        ["add_sub", "INPUT0", "datatype BYTES does not match the model's FP32"],
        id="large-bytes-for-fp32-checked-before-decoding",
    ),
    pytest.param(
        # As above for typed contents: 2**15 values where the shape needs one more, in a shape the model refuses.
        contents_request("add_sub", "FP32", [1, 2**15], "fp32_contents", [0.0] * (2**15 - 1)),
        INVALID,
        ["add_sub", "INPUT0", "shape [1, 32768] does not match the model's"],
        id="large-contents-shape-checked-before-decoding",
    ),
    pytest.param(
        bytes_request(_framed(b"ok", b"\xff\xfe", b"", b"")),
        INVALID,
        ["identity_bytes", "INPUT0", "UTF-8"],
        id="bytes-not-utf8-for-onnx-string",
    ),
    pytest.param(
        with_outputs(add_sub(), "OUTPUT9"), INVALID, ["add_sub", "OUTPUT9", "unknown output"], id="unknown-output"
    ),
    pytest.param(
        _class_count_too(with_outputs(add_sub(), "OUTPUT0", "OUTPUT0")),
        INVALID,
        ["add_sub", "OUTPUT0", "more than once, with different parameters"],
        id="duplicate-output-asked-two-ways",
    ),
    pytest.param(
        pb.ModelInferRequest(
            model_name="add_sub",
            inputs=[
                pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=[1, 16]),
                pb.ModelInferRequest.InferInputTensor(name="INPUT1", datatype="FP32", shape=[1, 16]),
            ],
            raw_input_contents=[_f32(1, 16).tobytes()],
        ),
        INVALID,
        ["add_sub", "2 inputs", "1 raw_input_contents"],
        id="raw-count-mismatch",
    ),
    pytest.param(
        request("add_sub", ("INPUT0", "FP8", [1, 16], b"\0" * 16), _row_16([1, 16])),
        INVALID,
        ["add_sub", "INPUT0", "FP8"],
        id="unknown-datatype",
    ),
    pytest.param(
        request("add_sub", ("INPUT0", "FP32", [-1, 16], b""), _row_16([1, 16])),
        INVALID,
        ["add_sub", "INPUT0", "negative"],
        id="negative-dim",
    ),
    pytest.param(
        contents_request("identity_uint8", "UINT8", [1, 4], "uint_contents", [1, 2, 3]),
        INVALID,
        ["identity_uint8", "INPUT0", "3 elements", "4"],
        id="contents-count-mismatch",
    ),
    pytest.param(
        contents_request("identity_uint8", "UINT8", [1, 4], "uint_contents", [1, 2, 3, 300]),
        INVALID,
        ["identity_uint8", "INPUT0", "out of range", "UINT8"],
        id="contents-value-out-of-range",
    ),
    pytest.param(
        contents_request("identity_uint8", "UINT8", [1, 4], "uint_contents", [1, 2, 3, 4], raw=b"\1\2\3\4"),
        INVALID,
        ["identity_uint8", "INPUT0", "in contents, but the request carries raw_input_contents"],
        id="contents-and-raw",
    ),
    pytest.param(
        contents_request("identity_uint8", "UINT8", [1, 4], "int_contents", [1, 2, 3, 4]),
        INVALID,
        ["identity_uint8", "INPUT0", "uint_contents has 0 elements"],
        id="contents-wrong-field",
    ),
    pytest.param(
        request("add_sub", ("INPUT0", "FP32", [1] * 65, _f32(1).tobytes()), _row_16([1, 16])),
        INVALID,
        ["add_sub", "INPUT0", "65 dimensions", "64"],
        id="too-many-dimensions",
    ),
    pytest.param(
        request("add_sub", ("INPUT0", "FP32", [0, 2**62], b""), _row_16([1, 16])),
        RESOURCE,
        ["add_sub", "INPUT0", "[0, 4611686018427387904]", "--max-tensor-elements"],
        id="empty-with-a-huge-dimension-raw",
    ),
    pytest.param(
        contents_request("identity_uint8", "UINT8", [0, 2**62], "uint_contents", []),
        RESOURCE,
        ["identity_uint8", "INPUT0", "--max-tensor-elements"],
        id="empty-with-a-huge-dimension-contents",
    ),
    pytest.param(
        request("add_sub", ("INPUT0", "FP32", [0, 2**25, 2**25, 2**25], b""), _row_16([1, 16])),
        RESOURCE,
        ["add_sub", "INPUT0", "--max-tensor-elements"],
        id="empty-with-dimensions-too-big-together",
    ),
]


def good_check(stub: GRPCInferenceServiceStub) -> None:
    """The server still answers a correct request correctly."""
    resp = stub.ModelInfer(add_sub(rows=2, id="good"), timeout=10)
    assert resp.id == "good"
    x = np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(2, 16)
    np.testing.assert_array_equal(x, 2 * _f32(2, 16))


def expect_error(call, req, code: grpc.StatusCode, words: list[str]) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call(req, timeout=10)
    assert err.value.code() == code, err.value.details()
    details = err.value.details() or ""
    for word in words:
        assert word in details
    return details


# ----- ModelInfer ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("req", "code", "words"), BAD_ROWS)
def test_bad_request(
    stub: GRPCInferenceServiceStub, req: pb.ModelInferRequest, code: grpc.StatusCode, words: list[str]
) -> None:
    expect_error(stub.ModelInfer, req, code, words)
    good_check(stub)


@pytest.mark.parametrize("version", ["\u00b2", "\u2460", "1\u00b2"])
def test_unicode_digit_versions_are_not_found_on_every_rpc(stub: GRPCInferenceServiceStub, version: str) -> None:
    """str.isdigit() takes these for digits and int() refuses them: each RPC that names a version says NOT_FOUND
    (ModelReady: not ready), never INTERNAL."""
    assert not stub.ModelReady(pb.ModelReadyRequest(name="add_sub", version=version), timeout=5).ready
    for call, req in (
        (stub.ModelMetadata, pb.ModelMetadataRequest(name="add_sub", version=version)),
        (stub.ModelConfig, pb.ModelConfigRequest(name="add_sub", version=version)),
        (stub.ModelStatistics, pb.ModelStatisticsRequest(name="add_sub", version=version)),
    ):
        expect_error(call, req, grpc.StatusCode.NOT_FOUND, ["add_sub", version])
    good_check(stub)


def test_large_tensors_are_decoded_whole_off_the_event_loop(stub: GRPCInferenceServiceStub) -> None:
    """Tensors over codec.LARGE_ELEMENTS that need work per element (BYTES framing, typed contents) are decoded
    on a worker thread: their answers are exact, unary and on a stream, and the server answers others after."""
    count = codec.LARGE_ELEMENTS + 3
    words = np.array([[str(i).encode() * (i % 3) for i in range(count)]], dtype=object)
    text = request("text_free", ("INPUT0", "BYTES", [1, count], _framed(*words[0])), id="text")
    values = np.arange(count, dtype=np.float32).reshape(1, count) / 7
    typed = contents_request("fp32_free", "FP32", [1, count], "fp32_contents", values[0].tolist())
    stream = Stream(stub)
    for req in (text, typed):
        for resp in (stub.ModelInfer(req, timeout=30), stream.ask(req).infer_response):
            assert list(resp.outputs[0].shape) == [1, count]
            if req is text:
                assert tensors.decode_bytes_tensor(resp.raw_output_contents[0], count).tolist() == words[0].tolist()
            else:
                np.testing.assert_array_equal(np.frombuffer(resp.raw_output_contents[0], "<f4"), values[0])
    _stream_good(stream)
    stream.close()
    good_check(stub)


def test_load_failure_hides_server_paths(stub: GRPCInferenceServiceStub, repo: Path) -> None:
    details = expect_error(
        stub.ModelInfer, pb.ModelInferRequest(model_name="corrupt"), grpc.StatusCode.UNAVAILABLE, ["corrupt"]
    )
    assert str(repo) not in details
    assert str(repo.resolve()) not in details
    good_check(stub)


def test_broken_models_not_ready_others_are(stub: GRPCInferenceServiceStub) -> None:
    for name in ("bad_config", "corrupt"):
        assert not stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=5).ready
        expect_error(stub.ModelMetadata, pb.ModelMetadataRequest(name=name), grpc.StatusCode.UNAVAILABLE, [name])
    assert stub.ModelReady(pb.ModelReadyRequest(name="add_sub"), timeout=5).ready
    good_check(stub)


def test_model_failure_is_internal_without_internals(stub: GRPCInferenceServiceStub, repo: Path) -> None:
    """Shapes the schema allows ([1, 4] and [1, 5] for free dims) that the model's Sub node cannot broadcast."""
    req = request(
        "free_dims", ("INPUT0", "FP32", [1, 4], _f32(1, 4).tobytes()), ("INPUT1", "FP32", [1, 5], _f32(1, 5).tobytes())
    )
    details = expect_error(stub.ModelInfer, req, grpc.StatusCode.INTERNAL, ["free_dims", "version 1"])
    assert "Traceback" not in details
    assert 'File "' not in details
    assert str(Path(tensorgate.server.__file__).parent) not in details
    assert str(repo) not in details
    good_check(stub)


@pytest.mark.parametrize(
    ("req", "code", "words"),
    [
        pytest.param(add_sub(rows=9), INVALID, ["add_sub", "max_batch_size"], id="batch-above-max"),
        pytest.param(
            pb.ModelInferRequest(model_name="no_such_model"),
            grpc.StatusCode.NOT_FOUND,
            ["no_such_model"],
            id="unknown-model",
        ),
        pytest.param(
            pb.ModelInferRequest(model_name="corrupt"), grpc.StatusCode.UNAVAILABLE, ["corrupt"], id="load-failed"
        ),
    ],
)
def test_bad_request_tritonclient(
    server: ServerThread,
    stub: GRPCInferenceServiceStub,
    req: pb.ModelInferRequest,
    code: grpc.StatusCode,
    words: list[str],
) -> None:
    """tritonclient turns the status into InferenceServerException: the code and message survive unmodified."""
    client = tc.InferenceServerClient(server.address)
    try:
        inputs = []
        for tensor, raw in zip(req.inputs, req.raw_input_contents, strict=True):
            inp = tc.InferInput(tensor.name, list(tensor.shape), tensor.datatype)
            inp.set_data_from_numpy(np.frombuffer(raw, dtype=np.float32).reshape(tuple(tensor.shape)))
            inputs.append(inp)
        with pytest.raises(InferenceServerException) as err:
            client.infer(req.model_name, inputs)
        assert err.value.status() == str(code)
        for word in words:
            assert word in err.value.message()
        x = _f32(1, 16)
        ok = [tc.InferInput(n, [1, 16], "FP32") for n in ("INPUT0", "INPUT1")]
        for inp in ok:
            inp.set_data_from_numpy(x)
        np.testing.assert_array_equal(client.infer("add_sub", ok).as_numpy("OUTPUT0"), 2 * x)
    finally:
        client.close()


# ----- ModelStreamInfer -------------------------------------------------------------------------------------------


class Stream:
    """One open ModelStreamInfer call driven request by request from a blocking test."""

    def __init__(self, stub: GRPCInferenceServiceStub) -> None:
        self._requests: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
        self._responses = stub.ModelStreamInfer(iter(self._requests.get, None), timeout=30)

    def ask(self, req: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
        self._requests.put(req)
        return next(self._responses)

    def close(self) -> None:
        self._requests.put(None)
        assert list(self._responses) == []


def _stream_good(stream: Stream) -> None:
    resp = stream.ask(add_sub(rows=2, id="good"))
    assert resp.error_message == ""
    assert resp.infer_response.id == "good"
    x = np.frombuffer(resp.infer_response.raw_output_contents[0], dtype="<f4").reshape(2, 16)
    np.testing.assert_array_equal(x, 2 * _f32(2, 16))


@pytest.mark.parametrize(("req", "code", "words"), BAD_ROWS)
def test_bad_request_in_stream(
    stub: GRPCInferenceServiceStub, req: pb.ModelInferRequest, code: grpc.StatusCode, words: list[str]
) -> None:
    stream = Stream(stub)
    bad = pb.ModelInferRequest()
    bad.CopyFrom(req)
    bad.id = "bad-1"
    resp = stream.ask(bad)
    for word in words:
        assert word in resp.error_message
    assert resp.infer_response.id == "bad-1"  # lets tritonclient match the error to its request
    assert resp.infer_response.model_name == req.model_name
    assert len(resp.infer_response.outputs) == 0
    _stream_good(stream)
    bad.id = "bad-2"
    assert stream.ask(bad).error_message == resp.error_message
    _stream_good(stream)
    stream.close()


def test_stream_survives_every_bad_row(stub: GRPCInferenceServiceStub) -> None:
    stream = Stream(stub)
    for param in BAD_ROWS:
        req, _, words = param.values
        assert isinstance(req, pb.ModelInferRequest)
        resp = stream.ask(req)
        assert resp.error_message, param.id
        assert all(w in resp.error_message for w in words), param.id
        _stream_good(stream)
    stream.close()


def test_stream_errors_reach_tritonclient_callback(server: ServerThread) -> None:
    answers: queue.Queue = queue.Queue()
    client = tc.InferenceServerClient(server.address)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        bad = tc.InferInput("INPUT0", [9, 16], "FP32")
        bad.set_data_from_numpy(_f32(9, 16))
        client.async_stream_infer("add_sub", [bad], request_id="bad")
        result, error = answers.get(timeout=10)
        assert result is None
        assert isinstance(error, InferenceServerException)
        assert "add_sub" in error.message()
        good = [tc.InferInput(n, [1, 16], "FP32") for n in ("INPUT0", "INPUT1")]
        for inp in good:
            inp.set_data_from_numpy(_f32(1, 16))
        client.async_stream_infer("add_sub", good, request_id="good")
        result, error = answers.get(timeout=10)
        assert error is None
        assert result.get_response().id == "good"
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * _f32(1, 16))
    finally:
        client.stop_stream()
        client.close()


# ----- other RPCs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rpc", "req"),
    [
        pytest.param("SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest(), id="SystemSharedMemoryStatus"),
        pytest.param(
            "SystemSharedMemoryRegister",
            pb.SystemSharedMemoryRegisterRequest(name="r", key="/k", byte_size=16),
            id="SystemSharedMemoryRegister",
        ),
        pytest.param(
            "CudaSharedMemoryRegister",
            pb.CudaSharedMemoryRegisterRequest(name="r", raw_handle=b"h", byte_size=16),
            id="CudaSharedMemoryRegister",
        ),
    ],
)
def test_unimplemented_rpc(stub: GRPCInferenceServiceStub, rpc: str, req) -> None:
    expect_error(getattr(stub, rpc), req, grpc.StatusCode.UNIMPLEMENTED, [rpc])
    good_check(stub)


def test_unimplemented_rpc_tritonclient(server: ServerThread, stub: GRPCInferenceServiceStub) -> None:
    client = tc.InferenceServerClient(server.address)
    try:
        with pytest.raises(InferenceServerException) as err:
            client.get_system_shared_memory_status()
        assert err.value.status() == str(grpc.StatusCode.UNIMPLEMENTED)
    finally:
        client.close()
    good_check(stub)


@pytest.mark.parametrize(
    ("rpc", "req"),
    [
        pytest.param("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="add_sub"), id="load"),
        pytest.param("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="add_sub"), id="unload"),
    ],
)
def test_model_control_off(stub: GRPCInferenceServiceStub, rpc: str, req) -> None:
    expect_error(getattr(stub, rpc), req, grpc.StatusCode.UNAVAILABLE, [rpc, "explicit", "'none'"])
    assert stub.ModelReady(pb.ModelReadyRequest(name="add_sub"), timeout=5).ready
    good_check(stub)


def test_model_control_off_tritonclient(server: ServerThread, stub: GRPCInferenceServiceStub) -> None:
    client = tc.InferenceServerClient(server.address)
    try:
        with pytest.raises(InferenceServerException) as err:
            client.load_model("add_sub")
        assert err.value.status() == str(grpc.StatusCode.UNAVAILABLE)
    finally:
        client.close()
    good_check(stub)


# ----- message size limit -----------------------------------------------------------------------------------------

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def small_server(repo: Path) -> Iterator[ServerThread]:
    with ServerThread(repo, max_message_bytes=LIMIT) as s:
        yield s


def test_message_over_limit(small_server: ServerThread) -> None:
    rows = 8
    big = request(
        "identity_bytes",
        ("INPUT0", "BYTES", [rows, 4], _framed(*[b"y" * (LIMIT // 16)] * (rows * 4))),
    )
    assert big.ByteSize() > LIMIT
    with grpc.insecure_channel(small_server.address) as ch:
        small_stub = GRPCInferenceServiceStub(ch)
        # The limit is enforced by gRPC before the message is decoded: the model is not known yet, so the message
        # states the sizes only.
        expect_error(small_stub.ModelInfer, big, grpc.StatusCode.RESOURCE_EXHAUSTED, [str(LIMIT)])
        good_check(small_stub)


def test_message_over_limit_tritonclient(small_server: ServerThread) -> None:
    client = tc.InferenceServerClient(small_server.address)
    try:
        x = np.zeros((8, 16), np.float32)
        inputs = [tc.InferInput(n, [8, 16], "FP32") for n in ("INPUT0", "INPUT1")]
        for inp in inputs:
            inp.set_data_from_numpy(x)
        big = tc.InferInput("INPUT0", [8, 4], "BYTES")
        big.set_data_from_numpy(np.array([b"z" * (LIMIT // 16)] * 32, dtype=object).reshape(8, 4))
        with pytest.raises(InferenceServerException) as err:
            client.infer("identity_bytes", [big])
        assert err.value.status() == str(grpc.StatusCode.RESOURCE_EXHAUSTED)
        np.testing.assert_array_equal(client.infer("add_sub", inputs).as_numpy("OUTPUT1"), x)
    finally:
        client.close()


def _tile_request(request_id: str = "") -> pb.ModelInferRequest:
    return request("tile", ("INPUT0", "FP32", [1, 16], _f32(1, 16).tobytes()), id=request_id)


def test_response_over_limit(small_server: ServerThread) -> None:
    with grpc.insecure_channel(small_server.address) as ch:
        small_stub = GRPCInferenceServiceStub(ch)
        expect_error(small_stub.ModelInfer, _tile_request(), grpc.StatusCode.RESOURCE_EXHAUSTED, ["tile", str(LIMIT)])
        good_check(small_stub)


def test_response_over_limit_in_stream(small_server: ServerThread) -> None:
    """One oversized answer is that request's error; the stream and the other requests on it go on."""
    with grpc.insecure_channel(small_server.address) as ch:
        stream = Stream(GRPCInferenceServiceStub(ch))
        resp = stream.ask(_tile_request("big"))
        assert resp.infer_response.id == "big"
        assert "tile" in resp.error_message and str(LIMIT) in resp.error_message
        _stream_good(stream)
        stream.close()


def test_response_within_default_limit(stub: GRPCInferenceServiceStub) -> None:
    resp = stub.ModelInfer(_tile_request(), timeout=10)
    out = np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(1, 16 * 4096)
    np.testing.assert_array_equal(out, np.tile(_f32(1, 16), (1, 4096)))


def test_only_large_tensors_that_need_work_per_element_leave_the_loop() -> None:
    """The codec's rule, in process: over LARGE_ELEMENTS, BYTES and typed contents are checked against the model
    first and (on the loop) handed off; fixed-size raw tensors of any size are views and stay."""
    seen: list[tuple[str, str, tuple[int, ...]]] = []

    def check(model: str, version: str, tensor: str, datatype: str, shape: tuple[int, ...]) -> None:
        seen.append((tensor, datatype, shape))

    n = codec.LARGE_ELEMENTS
    small_text = request("m", ("T", "BYTES", [1, n], _framed(*[b"x"] * n)))
    large_text = request("m", ("T", "BYTES", [1, n + 1], _framed(*[b"x"] * (n + 1))))
    large_raw = request("m", ("F", "FP32", [1, 4 * n], b"\0" * 16 * n))
    large_typed = contents_request("m", "FP32", [1, n + 1], "fp32_contents", [1.0] * (n + 1))
    for req in (small_text, large_raw):
        codec.decode_infer_request(req, check_input=check, on_loop=True)
    assert seen == []
    for req, name, datatype in ((large_text, "T", "BYTES"), (large_typed, "INPUT0", "FP32")):
        with pytest.raises(codec.DecodeOffLoop):
            codec.decode_infer_request(req, check_input=check, on_loop=True)
        decoded = codec.decode_infer_request(req, check_input=check)
        assert decoded.inputs[name].shape == (1, n + 1)
        assert seen[-2:] == [(name, datatype, (1, n + 1))] * 2


def test_health_follows_readiness_from_the_start(repo: Path) -> None:
    """A server whose models did not all load is up but not ready from its first answer: grpc.health.v1 for the
    inference service said SERVING until the readiness poll (0.5 s) caught up, and a readiness probe put it in
    rotation meanwhile. The whole server ("") serves."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tensorgate.protos import SERVICE_NAME

    with ServerThread(repo) as s, grpc.insecure_channel(s.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not GRPCInferenceServiceStub(ch).ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        )
