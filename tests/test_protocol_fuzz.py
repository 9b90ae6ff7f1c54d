"""The wire protocol under generated bad input: every answer is OK or a clear status naming the problem, never
UNKNOWN or INTERNAL, a traceback or an ERROR log line; the server (and a stream) keeps serving afterwards.

Requests are valid ones mutated by hypothesis (datatypes, shapes, raw and typed contents, BYTES framing, parameters
of every type, outputs, names, versions), sent unary and over ModelStreamInfer; raw bytes go to every unary RPC.
Derandomized, so that CI runs the same examples every time. The findings the fuzzing made are explicit tests at the
end, each failing on the code before its fix.
"""

from __future__ import annotations

import logging
import queue
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorgate.protos import GRPCInferenceServiceStub, tensors
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import monitoring_pb2 as mpb
from tests.onnx_models import (
    ADD_SUB_CONFIG,
    accumulator_config,
    accumulator_model,
    add_sub_model,
    identity_model,
    write_config,
)
from tests.serving import ServerThread

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CLEAR = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
LEAKS = re.compile(r"Traceback|File \"|object at 0x|<class |internal error|Error\(")
MAX_BATCH = 4
MODELS = ["add_sub", "ens", "identity_bytes", "identity_int8", "identity_fp16", "identity_bool", "acc"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    add_sub_model(root / "add_sub" / "1" / "model.onnx")
    write_config(root, "add_sub", ADD_SUB_CONFIG + "dynamic_batching { max_queue_delay_microseconds: 100 }\n")
    for datatype in ("BYTES", "INT8", "FP16", "BOOL"):
        identity_model(root / f"identity_{datatype.lower()}" / "1" / "model.onnx", datatype)
    identity_model(root / "ident16" / "1" / "model.onnx", "FP32", shape=("batch", 16))
    accumulator_model(root / "acc" / "1" / "model.onnx")
    write_config(root, "acc", accumulator_config("acc"))
    (root / "ens" / "1").mkdir(parents=True)
    write_config(
        root,
        "ens",
        f"""
platform: "ensemble"
max_batch_size: {MAX_BATCH}
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] }}, {{ name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] }} ]
output [ {{ name: "OUT" data_type: TYPE_FP32 dims: [ 16 ] }} ]
ensemble_scheduling {{ step [
  {{ model_name: "add_sub" input_map {{ key: "INPUT0" value: "INPUT0" }} input_map {{ key: "INPUT1" value: "INPUT1" }}
    output_map {{ key: "OUTPUT0" value: "MID" }} }},
  {{ model_name: "ident16" input_map {{ key: "INPUT0" value: "MID" }} output_map {{ key: "OUTPUT0" value: "OUT" }} }}
] }}
""",
    )
    return root


class _Errors(logging.Handler):
    """ERROR lines of the server (it runs in this process): a caller's mistake must not make one."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    with ServerThread(repo, shared_memory="system") as s:
        yield s


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> GRPCInferenceServiceStub:
    return GRPCInferenceServiceStub(channel)


@pytest.fixture
def error_log() -> Iterator[_Errors]:
    handler = _Errors()
    logging.getLogger().addHandler(handler)
    try:
        yield handler
    finally:
        logging.getLogger().removeHandler(handler)


# ----- requests ---------------------------------------------------------------------------------------------------


def framed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def valid(model: str) -> pb.ModelInferRequest:
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    if model in ("add_sub", "ens"):
        return tensors.encode_infer_request(model, [("INPUT0", x), ("INPUT1", x)])
    if model == "acc":
        one = np.ones((1, 1), np.float32)
        return tensors.encode_infer_request(
            model, [("INPUT", one)], parameters={"sequence_id": 7, "sequence_start": True}
        )
    datatype = model.removeprefix("identity_").upper()
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="INPUT0", datatype=datatype, shape=[1, 4])
    if datatype == "BYTES":
        req.raw_input_contents.append(framed(b"a", b"bc", b"", b"def"))
    else:
        req.raw_input_contents.append(np.ones((1, 4), tensors.BY_NAME[datatype].np_dtype).tobytes())
    return req


DATATYPES = [*tensors.BY_NAME, *(n.lower() for n in tensors.BY_NAME), "", "FP8", "STRING", "TYPE_FP32", "FP32 "]
NAMES = st.one_of(
    st.sampled_from(["", "INPUT0", "INPUT1", "OUTPUT0", "OUT", "NOPE", " INPUT0", "INPUT0\x00", "\n", "\u202eX"]),
    st.text(max_size=8),
)
INT64 = st.one_of(st.integers(-3, 20), st.sampled_from([2**31, 2**32, 2**62, 2**63 - 1, -(2**63)]))
UINT64 = st.one_of(st.integers(0, 20), st.sampled_from([2**63, 2**64 - 1]))
PARAM_KEYS = [
    "priority",
    "timeout",
    "sequence_id",
    "sequence_start",
    "sequence_end",
    "binary_data_size",
    "shared_memory_region",
    "shared_memory_offset",
    "shared_memory_byte_size",
    "classification",
    "",
    "\x00",
]
SHAPES = st.one_of(
    st.lists(st.one_of(st.integers(-2, 20), INT64), max_size=5),
    st.sampled_from([[2**62, 2**62], [0, 2**63 - 1], [1] * 65, [0] * 65, [1, 0], [], [9, 16], [1, 16, 1]]),
)
CONTENTS = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": INT64,
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": UINT64,
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=6),
}


@st.composite
def set_param(draw: st.DrawFn, target: pb.InferParameter) -> None:
    kind = draw(st.sampled_from(["bool", "int64", "uint64", "string", "double", "unset"]))
    if kind == "bool":
        target.bool_param = draw(st.booleans())
    elif kind == "int64":
        target.int64_param = draw(INT64)
    elif kind == "uint64":
        target.uint64_param = draw(UINT64)
    elif kind == "string":
        target.string_param = draw(st.one_of(st.sampled_from(["", "-1", "1", "nan"]), st.text(max_size=6)))
    elif kind == "double":
        target.double_param = draw(st.floats())
    else:
        target.SetInParent()  # present, with no value


@st.composite
def mutated(draw: st.DrawFn) -> pb.ModelInferRequest:
    """A valid request with one to three mutations."""
    req = valid(draw(st.sampled_from(MODELS)))
    for _ in range(draw(st.integers(1, 3))):
        inputs, raw = req.inputs, req.raw_input_contents
        i = draw(st.integers(0, max(len(inputs) - 1, 0)))
        kind = draw(
            st.sampled_from(
                ["datatype", "shape", "raw", "contents", "framing", "param", "output", "name", "version", "dup"]
            )
        )
        if kind == "datatype" and len(inputs):
            inputs[i].datatype = draw(st.sampled_from(DATATYPES))
        elif kind == "shape" and len(inputs):
            del inputs[i].shape[:]
            inputs[i].shape.extend(draw(SHAPES))
        elif kind == "raw":
            op = draw(st.sampled_from(["drop", "extra", "cut", "random"]))
            j = draw(st.integers(0, max(len(raw) - 1, 0)))
            if op == "extra":
                raw.append(draw(st.binary(max_size=40)))
            elif op == "drop" and len(raw):
                del raw[j]
            elif op == "cut" and len(raw):
                raw[j] = raw[j][: draw(st.integers(0, max(len(raw[j]) - 1, 0)))]
            elif len(raw):
                raw[j] = draw(st.binary(max_size=70))
        elif kind == "contents" and len(inputs):
            if draw(st.booleans()):
                del raw[:]
            field = draw(st.sampled_from(sorted(CONTENTS)))
            getattr(inputs[i].contents, field).extend(draw(st.lists(CONTENTS[field], max_size=20)))
        elif kind == "framing" and len(raw):
            data = framed(*draw(st.lists(st.binary(max_size=6), max_size=5)))
            data = draw(st.sampled_from([data, data + b"\x01", data[:-1] or b"\x00", data + struct.pack("<I", 2**30)]))
            raw[draw(st.integers(0, len(raw) - 1))] = data
        elif kind == "param":
            where = draw(st.sampled_from(["request", "input", "output"]))
            if where == "request" or not len(inputs):
                params = req.parameters
            elif where == "input":
                params = inputs[i].parameters
            else:
                params = req.outputs.add(name=draw(NAMES)).parameters
            draw(set_param(params[draw(st.sampled_from(PARAM_KEYS))]))
        elif kind == "output":
            for name in draw(st.lists(NAMES, min_size=1, max_size=3)):
                req.outputs.add(name=name)
        elif kind == "name" and len(inputs):
            inputs[i].name = draw(NAMES)
        elif kind == "version":
            versions = st.sampled_from(["", "-1", "0", "01", "1e3", " 1", "9" * 30, "\u0661", "\u00b2", "\x00"])
            req.model_version = draw(st.one_of(versions, st.text(max_size=4)))
        elif kind == "dup" and len(inputs):
            inputs.add().CopyFrom(inputs[i])
            if len(raw) and draw(st.booleans()):
                raw.append(raw[min(i, len(raw) - 1)])
    return req


# ----- invariants -------------------------------------------------------------------------------------------------


def check_answer(resp: pb.ModelInferResponse) -> None:
    """An OK answer's outputs: one raw entry each, its length what datatype and shape say."""
    raw = resp.raw_output_contents
    assert len(raw) == len(resp.outputs)
    for data, out in zip(raw, resp.outputs, strict=True):
        count = int(np.prod(out.shape))
        if out.datatype == "BYTES":
            assert tensors.decode_bytes_tensor(data, count).size == count
        else:
            assert len(data) == count * tensors.BY_NAME[out.datatype].itemsize, (out.name, out.datatype, out.shape)


def check_refusal(req: pb.ModelInferRequest, code: grpc.StatusCode, message: str) -> None:
    assert code in CLEAR, (code, message)
    assert not LEAKS.search(message), message
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert f"model '{req.model_name}'" in message, message


def good(stub: GRPCInferenceServiceStub) -> None:
    check_answer(stub.ModelInfer(valid("add_sub"), timeout=20))


# ----- fuzzing ----------------------------------------------------------------------------------------------------


@FUZZ
@given(req=mutated())
def test_mutated_requests_get_a_clear_answer(
    stub: GRPCInferenceServiceStub, error_log: _Errors, req: pb.ModelInferRequest
) -> None:
    try:
        check_answer(stub.ModelInfer(req, timeout=20))
    except grpc.RpcError as err:
        check_refusal(req, err.code(), err.details() or "")
    good(stub)
    assert not error_log.lines


@pytest.fixture(scope="module")
def stream(stub: GRPCInferenceServiceStub) -> Iterator[tuple[queue.Queue[pb.ModelInferRequest | None], Iterator]]:
    """One ModelStreamInfer stream for every example: it must outlive every bad message."""
    requests: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
    responses = stub.ModelStreamInfer(iter(requests.get, None), timeout=120)
    yield requests, responses
    requests.put(None)
    assert list(responses) == []


@FUZZ
@given(req=mutated())
def test_mutated_requests_on_one_stream_leave_it_serving(
    stream: tuple[queue.Queue[pb.ModelInferRequest | None], Iterator], error_log: _Errors, req: pb.ModelInferRequest
) -> None:
    requests, responses = stream
    requests.put(req)
    answer = next(responses)
    if answer.error_message:
        assert not LEAKS.search(answer.error_message), answer.error_message
    else:
        check_answer(answer.infer_response)
    requests.put(valid("add_sub"))
    answer = next(responses)
    assert answer.error_message == ""
    check_answer(answer.infer_response)
    assert not error_log.lines


UNARY_RPCS = [
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
]


@FUZZ
@given(rpc=st.sampled_from(UNARY_RPCS), data=st.binary(max_size=64))
def test_raw_bytes_as_a_request_get_a_clear_answer(
    channel: grpc.Channel, stub: GRPCInferenceServiceStub, error_log: _Errors, rpc: str, data: bytes
) -> None:
    """Most random bytes do not parse; those that do are some request, answered as it says."""
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/inference.GRPCInferenceService/{rpc}")
    try:
        call(data, timeout=20)
    except grpc.RpcError as err:
        assert err.code() in CLEAR, (err.code(), err.details())
        assert not LEAKS.search(err.details() or ""), err.details()
    good(stub)
    assert not error_log.lines


# ----- what the fuzzing found -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rpc", "message_type"),
    [
        ("ModelInfer", "inference.ModelInferRequest"),
        ("ModelMetadata", "inference.ModelMetadataRequest"),
        ("RepositoryModelLoad", "inference.RepositoryModelLoadRequest"),
        ("SystemSharedMemoryRegister", "inference.SystemSharedMemoryRegisterRequest"),
        ("ServerLive", "inference.ServerLiveRequest"),
    ],
)
def test_bytes_that_do_not_parse_are_invalid_argument(
    channel: grpc.Channel, stub: GRPCInferenceServiceStub, error_log: _Errors, rpc: str, message_type: str
) -> None:
    """b"\\xff" is no protobuf message (a field tag with no end). grpc's own handling of the parse failure answered
    UNKNOWN "Unexpected <class 'google.protobuf.message.DecodeError'>: ..." and logged an ERROR with a traceback."""
    with pytest.raises(grpc.RpcError) as info:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/inference.GRPCInferenceService/{rpc}")
        call(b"\xff", timeout=20)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details() == f"{rpc}: the request is not a valid {message_type} message (it does not parse)"
    assert not error_log.lines
    good(stub)


def test_a_message_that_does_not_parse_fails_alone_on_its_stream(channel: grpc.Channel, error_log: _Errors) -> None:
    """It ended the whole stream INTERNAL (with an ERROR log line); now it is answered in its turn, as any bad
    message is, and the stream goes on."""
    call: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer"
    )
    first, last = valid("add_sub"), valid("add_sub")
    first.id, last.id = "first", "last"
    answers = [
        pb.ModelStreamInferResponse.FromString(a)
        for a in call(iter([first.SerializeToString(), b"\xff", last.SerializeToString()]), timeout=20)
    ]
    assert [a.infer_response.id for a in answers] == ["first", "", "last"]
    assert answers[0].error_message == answers[2].error_message == ""
    assert answers[1].error_message == (
        "ModelStreamInfer: the request is not a valid inference.ModelInferRequest message (it does not parse)"
    )
    assert answers[1].infer_response.parameters[tensors.FINAL_RESPONSE].bool_param
    assert not error_log.lines


def test_a_bytes_length_beyond_the_data_is_malformed_not_over_a_limit(stub: GRPCInferenceServiceStub) -> None:
    """A 4-byte length of 2**30 followed by 3 bytes was RESOURCE_EXHAUSTED "element has 1073741824 bytes, over the
    limit" (--max-bytes-element): a limit the caller would raise in vain, for bytes that are not there."""
    req = valid("identity_bytes")
    req.raw_input_contents[0] = framed(b"a", b"b", b"c") + struct.pack("<I", 2**30) + b"abc"
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req, timeout=20)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "model 'identity_bytes', tensor 'INPUT0': malformed BYTES data: element 3 declares 1073741824 bytes" in (
        info.value.details() or ""
    )


def _long(req: pb.ModelInferRequest, where: str, text: str) -> pb.ModelInferRequest:
    if where == "model":
        req.model_name = text
    elif where == "version":
        req.model_version = text
    elif where == "input":
        req.inputs[0].name = text
    elif where == "output":
        req.outputs.add(name=text)
    elif where == "datatype":
        req.inputs[0].datatype = text
    else:  # a shared memory region's name, quoted in its own message
        req.inputs[0].parameters["shared_memory_region"].string_param = text
        req.inputs[0].parameters["shared_memory_byte_size"].int64_param = 64
    return req


@pytest.mark.parametrize(
    ("where", "code", "words"),
    [
        ("model", grpc.StatusCode.NOT_FOUND, ["model 'xxxx", "... (20000 characters)' is not found"]),
        ("version", grpc.StatusCode.NOT_FOUND, ["version xxxx", "... (20000 characters) of model 'add_sub'"]),
        ("input", grpc.StatusCode.INVALID_ARGUMENT, ["tensor 'xxxx", "... (20000 characters)': unexpected input"]),
        ("output", grpc.StatusCode.INVALID_ARGUMENT, ["... (20000 characters)': unknown output requested"]),
        ("datatype", grpc.StatusCode.INVALID_ARGUMENT, ["model 'add_sub'", "unknown datatype 'xxxx", "message cut"]),
        ("region", grpc.StatusCode.INVALID_ARGUMENT, ["model 'add_sub'", "shared memory region 'xxxx", "message cut"]),
    ],
)
def test_a_long_name_is_cut_in_the_message(
    stub: GRPCInferenceServiceStub, where: str, code: grpc.StatusCode, words: list[str]
) -> None:
    """Quoted whole, a 20000-character name made a status header over the client's metadata limit: the caller got
    RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" instead of the error."""
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(_long(valid("add_sub"), where, "x" * 20000), timeout=20)
    details = info.value.details() or ""
    assert info.value.code() == code, details
    assert len(details) < 4200
    for word in words:
        assert word in details
    good(stub)


def test_a_long_message_is_cut_to_fit_once_encoded(stub: GRPCInferenceServiceStub) -> None:
    """gRPC sends each byte of a non-ASCII character as three ("%F0%9F%98%80"): 2000 emoji are 24000 bytes in the
    header, refused by the client as above, though the message counts only 2000 characters."""
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(_long(valid("add_sub"), "datatype", "\U0001f600" * 2000), timeout=20)
    details = info.value.details() or ""
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith("model 'add_sub', tensor 'INPUT0': unknown datatype '\U0001f600")
    assert details.endswith("... (message cut, 2053 characters)")
    assert sum(1 if 0x20 <= b < 0x7F and b != 0x25 else 3 for b in details.encode()) <= 4096
    good(stub)


_FORGED = "x\n2026-11-30 00:00:00 ERROR tensorgate: forged\r\x1b[31mred\x00\u2028\x9b1m\u202egnp.exe"
"""A name that, quoted raw, would start a line of its own in the client's log, recolour its terminal (an ESC
sequence, or the one-byte CSI 0x9B) and show its end reversed (a bidirectional override)."""


@pytest.mark.parametrize("where", ["model", "version", "input", "output", "datatype", "region"])
def test_control_characters_in_a_name_are_escaped_in_the_message(stub: GRPCInferenceServiceStub, where: str) -> None:
    """The status message quoted them as sent: a client that logs it wrote a forged line, and an escape sequence
    reached the terminal of whoever read it. Over a stream, the error message travels in the response."""
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(_long(valid("add_sub"), where, _FORGED), timeout=20)
    details = info.value.details() or ""
    assert info.value.code() != grpc.StatusCode.OK
    assert details.isprintable(), details
    assert "x\\n2026-11-30 00:00:00 ERROR tensorgate: forged\\r\\x1b[31mred\\x00\\u2028\\x9b1m\\u202egnp.exe" in details
    answers = list(stub.ModelStreamInfer(iter([_long(valid("add_sub"), where, _FORGED)]), timeout=20))
    assert len(answers) == 1
    assert answers[0].error_message.isprintable()
    assert "\\x1b[31mred" in answers[0].error_message
    good(stub)


@pytest.mark.parametrize("data", [b"\x02\x00\x01\x01", b"\x00\x01\x01\xff"])
def test_a_bool_byte_other_than_0_or_1_is_refused(stub: GRPCInferenceServiceStub, data: bytes) -> None:
    """It was answered OK: ONNX Runtime reads such a byte as neither value (its Not of the byte 2 is 3, still
    true), so a model computing on it answers wrong without a word."""
    req = valid("identity_bool")
    req.raw_input_contents[0] = data
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req, timeout=20)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    i = next(i for i, b in enumerate(data) if b > 1)
    assert info.value.details() == (
        f"model 'identity_bool', tensor 'INPUT0': BOOL element {i} is the byte {data[i]}; a BOOL element is one byte, "
        "0 or 1"
    )
    req.raw_input_contents[0] = b"\x00\x01\x01\x00"
    assert stub.ModelInfer(req, timeout=20).raw_output_contents[0] == b"\x00\x01\x01\x00"


def test_monitoring_rpcs_refuse_bytes_that_do_not_parse(repo: Path, tmp_path: Path, error_log: _Errors) -> None:
    """The monitoring service's RPCs (on with a data directory) answered as the inference service's did: UNKNOWN
    with protobuf's exception, and for SubmitFeedbackStream an INTERNAL end of the stream."""
    with ServerThread(repo, data_dir=tmp_path / "data") as s, grpc.insecure_channel(s.address) as ch:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary("/tensorgate.v1.Monitoring/ListAlerts")
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff", timeout=20)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert "not a valid tensorgate.v1.ListAlertsRequest message" in (info.value.details() or "")
        stream: grpc.StreamStreamMultiCallable[bytes, bytes] = ch.stream_stream(
            "/tensorgate.v1.Monitoring/SubmitFeedbackStream"
        )
        (status,) = [mpb.FeedbackStatus.FromString(a) for a in stream(iter([b"\xff"]), timeout=20)]
        assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert status.message == (
            "SubmitFeedbackStream: the request is not a valid tensorgate.v1.SubmitFeedbackRequest message (it does "
            "not parse)"
        )
    assert not error_log.lines
