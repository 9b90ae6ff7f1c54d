"""Inference end to end: a real server on a loopback port, real ONNX models, real clients.

Every answer is checked as the caller sees it: tritonclient (sync, asyncio and streaming, unmodified), our raw
stubs from tensorgate.protos, and the standard health and reflection stubs. Model outputs are compared with
ONNX Runtime run in-process on the same model file and the same input.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from google.protobuf import descriptor_pb2, text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import model_config_pb2 as triton_mc
from tritonclient.utils import (
    InferenceServerException,
    deserialize_bytes_tensor,
    np_to_triton_dtype,
    triton_to_np_dtype,
)

from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import model_config_pb2 as mc
from tensorgate.protos.tensors import encode_infer_request
from tensorgate.server.rpc import servicer
from tests.onnx_models import (
    ADD_SUB_CONFIG,
    FLOAT_SUFFIX,
    add_sub_model,
    identity_model,
    scale_model,
    tile_model,
    with_float_io,
    write_config,
)
from tests.serving import ServerThread

DATATYPES = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
    "BF16",
]
# The typed `contents` field of each V2 datatype (FP16 and BF16 have none in the protocol).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
# Models the module's server loads, one directory each.
MODELS = [*(f"identity_{dt.lower()}" for dt in DATATYPES), "add_sub", "fixed", "scale", "stats"]


def _identity(dt: str) -> str:
    return f"identity_{dt.lower()}"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for dt in DATATYPES:  # no config.pbtxt: everything is auto-completed from the ONNX file
        identity_model(root / _identity(dt) / "1" / "model.onnx", dt)
    add_sub_model(root / "add_sub" / "1" / "model.onnx")
    write_config(root, "add_sub", ADD_SUB_CONFIG)
    add_sub_model(root / "stats" / "1" / "model.onnx")  # only the statistics test calls it
    write_config(root, "stats", ADD_SUB_CONFIG)
    add_sub_model(root / "fixed" / "1" / "model.onnx", shape=(2, 3))
    write_config(root, "fixed", 'backend: "onnxruntime"\nmax_batch_size: 0\n')
    scale_model(root / "scale" / "1" / "model.onnx", 1.0)
    scale_model(root / "scale" / "2" / "model.onnx", 2.0)
    write_config(root, "scale", 'backend: "onnxruntime"\nversion_policy: { all: {} }\n')
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    with ServerThread(repo) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[tc.InferenceServerClient]:
    c = tc.InferenceServerClient(server.address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> GRPCInferenceServiceStub:
    return GRPCInferenceServiceStub(channel)


# ----- helpers -------------------------------------------------------------------------------------------------


def sample(dt: str, shape: tuple[int, ...] = (2, 4), seed: int = 0) -> np.ndarray:
    """Input data that reaches the edges of each type: extremes, NaN/inf/-0.0, non-ASCII and empty strings."""
    rng = np.random.default_rng(seed)
    count = math.prod(shape)
    if dt == "BYTES":
        pool = ["", "tensorgate", "naïve café", "日本語", "🙂 emoji", "a\x00b", "x" * 300, " "]
        return np.array([pool[i % len(pool)].encode("utf-8") for i in range(count)], dtype=object).reshape(shape)
    np_dtype = np.dtype(triton_to_np_dtype(dt))
    if dt == "BF16":  # ml_dtypes.bfloat16 (tritonclient's type for it), not a numpy float kind
        special = np.array([np.nan, np.inf, -np.inf, -0.0, ml_dtypes.finfo(np_dtype).max], dtype=np_dtype)
        values = rng.standard_normal(count).astype(np_dtype)
        values[: min(count, len(special))] = special[: min(count, len(special))]
        return values.reshape(shape)
    if dt == "BOOL":
        return rng.integers(0, 2, count).astype(bool).reshape(shape)
    if np_dtype.kind == "f":
        special = np.array([np.nan, np.inf, -np.inf, -0.0, np.finfo(np_dtype).max], dtype=np_dtype)
        values = rng.standard_normal(count).astype(np_dtype)
        values[: min(count, len(special))] = special[: min(count, len(special))]
        return values.reshape(shape)
    info = np.iinfo(np_dtype)
    values = rng.integers(info.min, info.max, count, dtype=np_dtype, endpoint=True)
    values[0], values[-1] = info.min, info.max
    return values.reshape(shape)


def assert_array_equal(actual: np.ndarray, desired: np.ndarray) -> None:
    """numpy's, which reads no NaN in a bfloat16 array: BF16 is compared as the FP32 it converts to exactly."""
    bf16 = np.dtype(ml_dtypes.bfloat16)
    assert (np.asarray(actual).dtype == bf16) == (np.asarray(desired).dtype == bf16)
    if np.asarray(actual).dtype == bf16:
        actual, desired = np.asarray(actual).astype(np.float32), np.asarray(desired).astype(np.float32)
    np.testing.assert_array_equal(actual, desired)


def ort_reference(repo: Path, model: str, feed: dict[str, np.ndarray], version: int = 1) -> dict[str, np.ndarray]:
    """What ONNX Runtime computes in-process for the same model file; strings come back as UTF-8 bytes. BF16
    tensors go in and come out as FP32 around the same graph (`with_float_io`; exact both ways)."""
    path = repo / model / str(version) / "model.onnx"
    bf16 = np.dtype(ml_dtypes.bfloat16)
    proto = onnx.load(str(path))
    values = [*proto.graph.input, *proto.graph.output]
    has_bf16 = any(v.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16 for v in values)
    source = with_float_io(proto).SerializeToString() if has_bf16 else str(path)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    ort_feed = {}
    for k, v in feed.items():
        if v.dtype == object:
            ort_feed[k] = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(v)
        elif v.dtype == bf16:
            ort_feed[k + FLOAT_SUFFIX] = v.astype(np.float32)
        else:
            ort_feed[k] = v
    names = [o.name for o in session.get_outputs()]
    out: dict[str, np.ndarray] = {}
    for name, value in zip(names, session.run(names, ort_feed), strict=True):
        if value.dtype == object:
            value = np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])(value)
        if name.endswith(FLOAT_SUFFIX):
            name, value = name.removesuffix(FLOAT_SUFFIX), value.astype(bf16)
        out[name] = value
    return out


def triton_inputs(arrays: dict[str, np.ndarray]) -> list[tc.InferInput]:
    inputs = []
    for name, array in arrays.items():
        dt = "BYTES" if array.dtype == object else tc_dtype(array.dtype)
        inp = tc.InferInput(name, list(array.shape), dt)
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    return inputs


def tc_dtype(dtype: np.dtype) -> str:
    return str(np_to_triton_dtype(dtype))


def raw_request(model: str, arrays: dict[str, np.ndarray], **fields) -> pb.ModelInferRequest:
    """A ModelInferRequest built by hand: raw little-endian bytes, BYTES with 4-byte length prefixes."""
    req = pb.ModelInferRequest(model_name=model, **fields)
    for name, array in arrays.items():
        if array.dtype == object:
            req.inputs.add(name=name, datatype="BYTES", shape=array.shape)
            req.raw_input_contents.append(b"".join(len(b).to_bytes(4, "little") + b for b in array.reshape(-1)))
        else:
            req.inputs.add(name=name, datatype=tc_dtype(array.dtype), shape=array.shape)
            req.raw_input_contents.append(array.astype(array.dtype.newbyteorder("<")).tobytes())
    return req


def decode_outputs(resp: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """The response's tensors decoded with tritonclient's helpers, independently of the server's codec."""
    assert len(resp.raw_output_contents) == len(resp.outputs)
    out = {}
    for tensor, raw in zip(resp.outputs, resp.raw_output_contents, strict=True):
        if tensor.datatype == "BYTES":
            array = deserialize_bytes_tensor(raw)
        else:
            array = np.frombuffer(raw, dtype=np.dtype(triton_to_np_dtype(tensor.datatype)).newbyteorder("<"))
        out[tensor.name] = array.reshape(tuple(tensor.shape))
    return out


def add_sub_inputs(rows: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "INPUT0": rng.standard_normal((rows, 16)).astype(np.float32),
        "INPUT1": rng.standard_normal((rows, 16)).astype(np.float32),
    }


# ----- every datatype, every client ------------------------------------------------------------------------------


@pytest.mark.parametrize("dt", [pytest.param(dt, id=dt) for dt in DATATYPES])
def test_identity_tritonclient_sync(client: tc.InferenceServerClient, repo: Path, dt: str) -> None:
    data = sample(dt)
    result = client.infer(_identity(dt), triton_inputs({"INPUT0": data}))
    out = result.as_numpy("OUTPUT0")
    assert result.get_output("OUTPUT0").datatype == dt
    expected = ort_reference(repo, _identity(dt), {"INPUT0": data})["OUTPUT0"]
    assert_array_equal(out, expected)
    assert_array_equal(out, data)


@pytest.mark.parametrize("dt", [pytest.param(dt, id=dt) for dt in DATATYPES])
async def test_identity_tritonclient_aio(server: ServerThread, repo: Path, dt: str) -> None:
    data = sample(dt, seed=1)
    async with tca.InferenceServerClient(server.address) as client:
        result = await client.infer(_identity(dt), triton_inputs({"INPUT0": data}))
    out = result.as_numpy("OUTPUT0")
    assert_array_equal(out, ort_reference(repo, _identity(dt), {"INPUT0": data})["OUTPUT0"])


def _stream(
    client: tc.InferenceServerClient, requests: list[dict], **start_kwargs
) -> dict[str, tc.InferResult | InferenceServerException]:
    """Send `requests` (kwargs of async_stream_infer, each with a distinct request_id) on one stream."""
    answers: queue.Queue[tuple[tc.InferResult | None, InferenceServerException | None]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), **start_kwargs)
    try:
        for kwargs in requests:
            client.async_stream_infer(**kwargs)
        got: dict[str, tc.InferResult | InferenceServerException] = {}
        for _ in requests:
            result, error = answers.get(timeout=10)
            if error is not None:
                # tritonclient puts the failed request's id nowhere in the error; there is one error at most.
                got[f"error-{len(got)}"] = error
            else:
                assert result is not None
                got[result.get_response().id] = result
    finally:
        client.stop_stream()
    return got


@pytest.mark.parametrize("dt", [pytest.param(dt, id=dt) for dt in DATATYPES])
def test_identity_tritonclient_stream(server: ServerThread, repo: Path, dt: str) -> None:
    data = [sample(dt, seed=s) for s in range(3)]
    client = tc.InferenceServerClient(server.address)
    try:
        got = _stream(
            client,
            [
                {"model_name": _identity(dt), "inputs": triton_inputs({"INPUT0": d}), "request_id": f"r{i}"}
                for i, d in enumerate(data)
            ],
        )
    finally:
        client.close()
    assert sorted(got) == ["r0", "r1", "r2"]
    for i, d in enumerate(data):
        result = got[f"r{i}"]
        assert isinstance(result, tc.InferResult)
        expected = ort_reference(repo, _identity(dt), {"INPUT0": d})["OUTPUT0"]
        assert_array_equal(result.as_numpy("OUTPUT0"), expected)


@pytest.mark.parametrize("dt", [pytest.param(dt, id=dt) for dt in DATATYPES])
def test_identity_raw_stub(stub: GRPCInferenceServiceStub, repo: Path, dt: str) -> None:
    data = sample(dt, seed=2)
    resp = stub.ModelInfer(raw_request(_identity(dt), {"INPUT0": data}), timeout=10)
    assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [("OUTPUT0", dt, [2, 4])]
    out = decode_outputs(resp)["OUTPUT0"]
    assert_array_equal(out, ort_reference(repo, _identity(dt), {"INPUT0": data})["OUTPUT0"])


@pytest.mark.parametrize("dt", [pytest.param(dt, id=dt) for dt in CONTENTS_FIELD])
def test_identity_typed_contents(stub: GRPCInferenceServiceStub, repo: Path, dt: str) -> None:
    data = sample(dt, seed=3)
    req = pb.ModelInferRequest(model_name=_identity(dt))
    tensor = req.inputs.add(name="INPUT0", datatype=dt, shape=data.shape)
    getattr(tensor.contents, CONTENTS_FIELD[dt]).extend(data.reshape(-1).tolist())
    resp = stub.ModelInfer(req, timeout=10)
    assert len(resp.raw_output_contents) == 1  # outputs always travel raw
    out = decode_outputs(resp)["OUTPUT0"]
    assert_array_equal(out, ort_reference(repo, _identity(dt), {"INPUT0": data})["OUTPUT0"])
    assert_array_equal(out, data)


@pytest.mark.parametrize("dt", ["FP16", "BF16"])
def test_typed_contents_refused_for_types_without_a_field(stub: GRPCInferenceServiceStub, dt: str) -> None:
    req = pb.ModelInferRequest(model_name=_identity(dt))
    tensor = req.inputs.add(name="INPUT0", datatype=dt, shape=[1, 4])
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    assert _identity(dt) in details and "INPUT0" in details
    assert dt in details and "raw_input_contents" in details


# ----- response fields -----------------------------------------------------------------------------------------


def test_response_fields(stub: GRPCInferenceServiceStub, repo: Path) -> None:
    arrays = add_sub_inputs(rows=2)
    resp = stub.ModelInfer(raw_request("add_sub", arrays, id="req-42"), timeout=10)
    assert resp.id == "req-42"
    assert resp.model_name == "add_sub"
    assert resp.model_version == "1"
    assert [o.name for o in resp.outputs] == ["OUTPUT0", "OUTPUT1"]
    assert [list(o.shape) for o in resp.outputs] == [[2, 16], [2, 16]]
    assert len(resp.raw_output_contents) == 2
    expected = ort_reference(repo, "add_sub", arrays)
    for name, value in decode_outputs(resp).items():
        assert_array_equal(value, expected[name])


def test_tritonclient_sees_id_and_version(client: tc.InferenceServerClient) -> None:
    result = client.infer("add_sub", triton_inputs(add_sub_inputs()), request_id="abc")
    resp = result.get_response()
    assert (resp.id, resp.model_name, resp.model_version) == ("abc", "add_sub", "1")


def test_only_requested_output(stub: GRPCInferenceServiceStub, client: tc.InferenceServerClient) -> None:
    arrays = add_sub_inputs(rows=3)
    req = raw_request("add_sub", arrays)
    req.outputs.add(name="OUTPUT1")
    resp = stub.ModelInfer(req, timeout=10)
    assert [o.name for o in resp.outputs] == ["OUTPUT1"]
    assert len(resp.raw_output_contents) == 1
    assert_array_equal(decode_outputs(resp)["OUTPUT1"], arrays["INPUT0"] - arrays["INPUT1"])

    result = client.infer("add_sub", triton_inputs(arrays), outputs=[tc.InferRequestedOutput("OUTPUT1")])
    assert [o.name for o in result.get_response().outputs] == ["OUTPUT1"]
    assert result.as_numpy("OUTPUT0") is None


def test_an_output_asked_for_twice_the_same_way_is_answered_once(client: tc.InferenceServerClient) -> None:
    """As Triton 2.51 answers tritonclient (seen side by side): it was INVALID_ARGUMENT here."""
    arrays = add_sub_inputs(rows=2)
    twice = [tc.InferRequestedOutput("OUTPUT1"), tc.InferRequestedOutput("OUTPUT1")]
    result = client.infer("add_sub", triton_inputs(arrays), outputs=twice)
    assert [o.name for o in result.get_response().outputs] == ["OUTPUT1"]
    assert_array_equal(result.as_numpy("OUTPUT1"), arrays["INPUT0"] - arrays["INPUT1"])


def test_output_order_follows_request(stub: GRPCInferenceServiceStub) -> None:
    arrays = add_sub_inputs(rows=2)
    req = raw_request("add_sub", arrays)
    req.outputs.add(name="OUTPUT1")
    req.outputs.add(name="OUTPUT0")
    resp = stub.ModelInfer(req, timeout=10)
    assert [o.name for o in resp.outputs] == ["OUTPUT1", "OUTPUT0"]
    out = decode_outputs(resp)
    assert_array_equal(out["OUTPUT1"], arrays["INPUT0"] - arrays["INPUT1"])
    assert_array_equal(out["OUTPUT0"], arrays["INPUT0"] + arrays["INPUT1"])


# ----- request parameters and compression ------------------------------------------------------------------------


def _param(**kw) -> pb.InferParameter:
    return pb.InferParameter(**kw)


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"triton_enable_empty_final_response": _param(bool_param=True)}, id="empty-final-response"),
        pytest.param({"priority": _param(uint64_param=3)}, id="priority-uint64"),
        pytest.param({"priority": _param(int64_param=2)}, id="priority-int64"),
        pytest.param({"my.custom.double": _param(double_param=0.25)}, id="custom-double"),
        pytest.param({"my-custom-string": _param(string_param="héllo")}, id="custom-string"),
        pytest.param(
            {
                "priority": _param(uint64_param=1),
                "x": _param(double_param=-1.5),
                "y": _param(string_param=""),
                "z": _param(bool_param=False),
            },
            id="several",
        ),
    ],
)
def test_unknown_parameters_accepted(stub: GRPCInferenceServiceStub, params: dict[str, pb.InferParameter]) -> None:
    arrays = add_sub_inputs()
    req = raw_request("add_sub", arrays, id="p")
    for key, value in params.items():
        req.parameters[key].CopyFrom(value)
    resp = stub.ModelInfer(req, timeout=10)
    assert resp.id == "p"
    assert_array_equal(decode_outputs(resp)["OUTPUT0"], arrays["INPUT0"] + arrays["INPUT1"])


def test_unknown_parameters_over_stream(stub: GRPCInferenceServiceStub) -> None:
    arrays = add_sub_inputs()
    req = raw_request("add_sub", arrays, id="s")
    req.parameters["triton_enable_empty_final_response"].bool_param = True
    req.parameters["priority"].int64_param = 5
    plain = raw_request("add_sub", arrays, id="plain")
    responses = {r.infer_response.id: r for r in stub.ModelStreamInfer(iter([req, plain]), timeout=10)}
    assert len(responses) == 2
    assert responses["s"].error_message == ""
    # Every response is its request's final one, and says so as Triton's do, asked (the flag above) or not.
    assert responses["s"].infer_response.parameters["triton_final_response"].bool_param is True
    assert responses["plain"].infer_response.parameters["triton_final_response"].bool_param is True


def test_tritonclient_parameters(client: tc.InferenceServerClient, server: ServerThread) -> None:
    arrays = add_sub_inputs()
    result = client.infer(
        "add_sub",
        triton_inputs(arrays),
        priority=7,
        parameters={"custom_double": 0.5, "custom_string": "abc", "custom_int": -3, "custom_bool": True},
    )
    assert_array_equal(result.as_numpy("OUTPUT1"), arrays["INPUT0"] - arrays["INPUT1"])
    got = _stream(
        client,
        [
            {
                "model_name": "add_sub",
                "inputs": triton_inputs(arrays),
                "request_id": "e",
                "enable_empty_final_response": True,
                "priority": 2,
                "parameters": {"custom_double": 1.25},
            }
        ],
    )
    result = got["e"]
    assert isinstance(result, tc.InferResult)
    assert_array_equal(result.as_numpy("OUTPUT0"), arrays["INPUT0"] + arrays["INPUT1"])


@pytest.mark.parametrize("algorithm", [pytest.param("gzip", id="gzip"), pytest.param("deflate", id="deflate")])
def test_tritonclient_compression(client: tc.InferenceServerClient, algorithm: str) -> None:
    arrays = add_sub_inputs(rows=8)
    result = client.infer("add_sub", triton_inputs(arrays), compression_algorithm=algorithm)
    assert_array_equal(result.as_numpy("OUTPUT0"), arrays["INPUT0"] + arrays["INPUT1"])


@pytest.mark.parametrize(
    "compression",
    [pytest.param(grpc.Compression.Gzip, id="gzip"), pytest.param(grpc.Compression.Deflate, id="deflate")],
)
async def test_channel_compression(server: ServerThread, compression: grpc.Compression) -> None:
    arrays = {"INPUT0": np.zeros((4, 16), np.float32), "INPUT1": np.ones((4, 16), np.float32)}
    async with grpc.aio.insecure_channel(server.address, compression=compression) as ch:
        resp = await GRPCInferenceServiceStub(ch).ModelInfer(raw_request("add_sub", arrays), timeout=10)
    assert_array_equal(decode_outputs(resp)["OUTPUT1"], -np.ones((4, 16), np.float32))


# ----- batching and shapes --------------------------------------------------------------------------------------


def test_multi_row_batch(client: tc.InferenceServerClient, repo: Path) -> None:
    arrays = add_sub_inputs(rows=8, seed=5)
    result = client.infer("add_sub", triton_inputs(arrays))
    expected = ort_reference(repo, "add_sub", arrays)
    for name in ("OUTPUT0", "OUTPUT1"):
        assert result.as_numpy(name).shape == (8, 16)
        assert_array_equal(result.as_numpy(name), expected[name])


def test_no_batch_dimension(client: tc.InferenceServerClient, repo: Path) -> None:
    meta = client.get_model_metadata("fixed")
    assert [list(i.shape) for i in meta.inputs] == [[2, 3], [2, 3]]
    config = client.get_model_config("fixed").config
    assert config.max_batch_size == 0
    arrays = {
        "INPUT0": np.arange(6, dtype=np.float32).reshape(2, 3),
        "INPUT1": np.full((2, 3), 0.5, np.float32),
    }
    result = client.infer("fixed", triton_inputs(arrays))
    expected = ort_reference(repo, "fixed", arrays)
    assert_array_equal(result.as_numpy("OUTPUT0"), expected["OUTPUT0"])
    assert_array_equal(result.as_numpy("OUTPUT1"), expected["OUTPUT1"])


# ----- versions -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "served", "factor"),
    [
        pytest.param("", "2", 2.0, id="latest"),
        pytest.param("1", "1", 1.0, id="v1"),
        pytest.param("2", "2", 2.0, id="v2"),
    ],
)
def test_versions_serve(client: tc.InferenceServerClient, version: str, served: str, factor: float) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    result = client.infer("scale", triton_inputs({"INPUT0": x}), model_version=version)
    assert result.get_response().model_version == served
    assert_array_equal(result.as_numpy("OUTPUT0"), x * np.float32(factor))


def test_versions_metadata_and_ready(client: tc.InferenceServerClient) -> None:
    assert list(client.get_model_metadata("scale").versions) == ["1", "2"]
    assert client.is_model_ready("scale", "1")
    assert client.is_model_ready("scale", "2")
    assert client.is_model_ready("scale")
    assert not client.is_model_ready("scale", "3")
    assert not client.is_model_ready("no_such_model")


# ----- server and model metadata ---------------------------------------------------------------------------------


def test_server_metadata(client: tc.InferenceServerClient, stub: GRPCInferenceServiceStub) -> None:
    meta = client.get_server_metadata()
    assert meta.name == "tensorgate"
    assert meta.version
    # Triton 2.51's list, less binary_tensor_data (HTTP), cuda_shared_memory and system_shared_memory (off here).
    assert sorted(meta.extensions) == [
        "classification",
        "logging",
        "model_configuration",
        "model_repository",
        "model_repository(unload_dependents)",
        "parameters",
        "schedule_policy",
        "sequence",
        "statistics",
        "trace",
    ]
    assert client.is_server_live()
    assert client.is_server_ready()
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live


@pytest.mark.parametrize(
    ("model", "inputs", "outputs"),
    [
        pytest.param(
            "add_sub",
            [("INPUT0", "FP32", [-1, 16]), ("INPUT1", "FP32", [-1, 16])],
            [("OUTPUT0", "FP32", [-1, 16]), ("OUTPUT1", "FP32", [-1, 16])],
            id="batching",
        ),
        pytest.param(
            "identity_bytes", [("INPUT0", "BYTES", [-1, 4])], [("OUTPUT0", "BYTES", [-1, 4])], id="auto-bytes"
        ),
        pytest.param(
            "fixed",
            [("INPUT0", "FP32", [2, 3]), ("INPUT1", "FP32", [2, 3])],
            [("OUTPUT0", "FP32", [2, 3]), ("OUTPUT1", "FP32", [2, 3])],
            id="no-batching",
        ),
    ],
)
def test_model_metadata(stub: GRPCInferenceServiceStub, model: str, inputs: list, outputs: list) -> None:
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=5)
    assert meta.name == model
    assert list(meta.versions) == ["1"]
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == inputs
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == outputs


def test_model_config_autocompleted(stub: GRPCInferenceServiceStub, client: tc.InferenceServerClient) -> None:
    resp = stub.ModelConfig(pb.ModelConfigRequest(name="identity_fp32"), timeout=5)
    # Parse the wire bytes with tritonclient's own ModelConfig: field numbers must match Triton's.
    config = triton_mc.ModelConfig.FromString(resp.config.SerializeToString())
    assert config.name == "identity_fp32"
    assert config.backend == "onnxruntime"
    assert config.max_batch_size == 4
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("INPUT0", triton_mc.TYPE_FP32, [4])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("OUTPUT0", triton_mc.TYPE_FP32, [4])]
    # KIND_AUTO is resolved to where the model really runs: the GPU when this onnxruntime build has CUDA.
    on_gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    provider = config.parameters["tensorgate.execution_provider"].string_value
    assert provider == ("CUDAExecutionProvider" if on_gpu else "CPUExecutionProvider")
    kind = triton_mc.ModelInstanceGroup.KIND_GPU if on_gpu else triton_mc.ModelInstanceGroup.KIND_CPU
    assert [(g.kind, g.count) for g in config.instance_group] == [(kind, 1)]
    # The text form round-trips through our own ModelConfig too, and tritonclient sees the same thing.
    assert text_format.Parse(text_format.MessageToString(resp.config), mc.ModelConfig()) == resp.config
    assert client.get_model_config("identity_fp32").config == config


# ----- statistics -----------------------------------------------------------------------------------------------


def test_model_statistics(client: tc.InferenceServerClient) -> None:
    batch_sizes = [1, 1, 3, 8, 3]
    for i, rows in enumerate(batch_sizes):
        client.infer("stats", triton_inputs(add_sub_inputs(rows=rows, seed=i)))
    stats = client.get_inference_statistics("stats").model_stats
    assert len(stats) == 1
    s = stats[0]
    n = len(batch_sizes)
    assert (s.name, s.version) == ("stats", "1")
    assert s.inference_count == sum(batch_sizes)
    assert s.execution_count == n
    assert s.last_inference > 0
    assert s.inference_stats.success.count == n
    assert s.inference_stats.fail.count == 0
    assert s.inference_stats.queue.count == n
    assert s.inference_stats.compute_infer.count == n
    assert s.inference_stats.compute_infer.ns > 0
    assert {b.batch_size: b.compute_infer.count for b in s.batch_stats} == {1: 2, 3: 2, 8: 1}


def test_model_statistics_all_models(client: tc.InferenceServerClient) -> None:
    stats = client.get_inference_statistics("").model_stats
    listed = {(s.name, s.version) for s in stats}
    expected = {(m, "1") for m in MODELS} | {("scale", "2")}
    assert listed == expected
    assert all(s.version.isdigit() for s in stats)
    assert [s.version for s in client.get_inference_statistics("scale").model_stats] == ["1", "2"]
    assert [s.version for s in client.get_inference_statistics("scale", "1").model_stats] == ["1"]


# ----- health and reflection ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "service", [pytest.param("", id="server"), pytest.param("inference.GRPCInferenceService", id="inference")]
)
def test_health_check(channel: grpc.Channel, service: str) -> None:
    resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def _reflect(channel: grpc.Channel, **request) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (resp,) = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=5))
    return resp


def test_reflection_lists_services(channel: grpc.Channel) -> None:
    resp = _reflect(channel, list_services="")
    names = {s.name for s in resp.list_services_response.service}
    assert names == {
        "inference.GRPCInferenceService",
        "tensorgate.v1.Rollout",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


def test_reflection_file_containing_symbol(channel: grpc.Channel) -> None:
    resp = _reflect(channel, file_containing_symbol="inference.GRPCInferenceService")
    assert resp.WhichOneof("message_response") == "file_descriptor_response"
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b) for b in resp.file_descriptor_response.file_descriptor_proto
    ]
    services = {(f.package, s.name): [m.name for m in s.method] for f in files for s in f.service}
    methods = services[("inference", "GRPCInferenceService")]
    assert {"ModelInfer", "ModelStreamInfer", "ModelConfig", "ModelStatistics"} <= set(methods)


# ----- concurrency -----------------------------------------------------------------------------------------------


async def test_many_concurrent_requests(server: ServerThread) -> None:
    """add_sub has no dynamic_batching in its config: each request runs on its own."""
    limit = asyncio.Semaphore(32)

    async def one(client: tca.InferenceServerClient, i: int) -> None:
        arrays = add_sub_inputs(rows=1 + i % 8, seed=i)
        async with limit:
            result = await client.infer("add_sub", triton_inputs(arrays), request_id=str(i))
        assert result.get_response().id == str(i)
        assert_array_equal(result.as_numpy("OUTPUT0"), arrays["INPUT0"] + arrays["INPUT1"])
        assert_array_equal(result.as_numpy("OUTPUT1"), arrays["INPUT0"] - arrays["INPUT1"])

    async with tca.InferenceServerClient(server.address) as client:
        await asyncio.gather(*(one(client, i) for i in range(64)))


async def test_many_concurrent_requests_dynamic_batching(server: ServerThread) -> None:
    """The auto-completed identity model gets dynamic_batching: requests may share an execution, and each
    caller must still get back exactly its own rows."""
    limit = asyncio.Semaphore(32)

    async def one(client: tca.InferenceServerClient, i: int) -> None:
        rows = 1 + i % 4
        data = (np.arange(rows * 4, dtype=np.int64) + 1000 * i).reshape(rows, 4)
        async with limit:
            result = await client.infer("identity_int64", triton_inputs({"INPUT0": data}), request_id=str(i))
        assert result.get_response().id == str(i)
        assert_array_equal(result.as_numpy("OUTPUT0"), data)

    async with tca.InferenceServerClient(server.address) as client:
        await asyncio.gather(*(one(client, i) for i in range(64)))


async def test_a_stream_whose_client_stops_reading_stops_being_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream holds at most STREAM_WINDOW requests read and not answered: a client that stops taking answers
    stops the server reading its stream, instead of making it run every request and hold every answer (1 MiB
    each here). Nothing is lost: once the client reads, every answer comes, in order."""
    monkeypatch.setattr(servicer, "STREAM_WINDOW", 8)  # read when the stream starts
    repo = tmp_path / "models"
    tile_model(repo / "tile" / "1" / "model.onnx", width=4, repeats=65536)
    sent = 64

    async def executed(stub: GRPCInferenceServiceStub) -> int:
        stats = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="tile"), timeout=10)
        return stats.model_stats[0].inference_stats.success.count

    with ServerThread(repo) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = GRPCInferenceServiceStub(channel)
            stream = stub.ModelStreamInfer(timeout=120)
            for i in range(sent):
                await stream.write(
                    encode_infer_request("tile", [("INPUT0", np.full((1, 4), i, np.float32))], request_id=str(i))
                )
            counts = [await executed(stub)]
            while len(counts) < 4 or len(set(counts[-4:])) > 1:  # settled: the same over 1.5 s
                assert len(counts) < 120, counts
                await asyncio.sleep(0.5)
                counts.append(await executed(stub))
            assert counts[-1] < sent // 2, counts  # the window and what gRPC's buffers took, not all of them
            answers = [await stream.read() for _ in range(sent)]
            await stream.done_writing()
    assert [a.infer_response.id for a in answers] == [str(i) for i in range(sent)]
    assert [a.error_message for a in answers] == [""] * sent


@pytest.mark.parametrize("turns", [0, 1, 2] * 2)  # twice: which turn the message lands in varies
def test_a_stream_open_when_the_drain_starts_ends_unavailable(tmp_path: Path, turns: int) -> None:
    """The client keeps its stream open and sends a message just as the drain starts (`turns` loop turns after the
    message reached the server): whether the message was refused or answered, the stream ends with UNAVAILABLE,
    so the client knows what it sends next is not read. When the stream read the message in the same turn the
    drain started (turns=1 here), it ended with OK."""
    root = tmp_path / "models"
    identity_model(root / "identity_fp32" / "1" / "model.onnx", "FP32")
    release: queue.Queue[None] = queue.Queue()

    def messages() -> Iterator[pb.ModelInferRequest]:
        for i in range(2):
            yield encode_infer_request("identity_fp32", [("INPUT0", np.ones((1, 4), np.float32))], request_id=f"m{i}")
            release.get(timeout=60)  # the second: the client keeps the stream open

    with ServerThread(root) as server, grpc.insecure_channel(server.address) as channel:
        loop = server._loop
        stream = GRPCInferenceServiceStub(channel).ModelStreamInfer(messages(), timeout=30)
        assert next(stream).infer_response.id == "m0"
        blocking = threading.Event()

        def drain_after(n: int) -> None:
            if n:
                loop.call_soon(drain_after, n - 1)
            else:
                gate = server.app._gate
                assert gate is not None
                loop.create_task(gate.drain(5))

        def hold_the_loop() -> None:  # while the client's next message reaches the server
            blocking.set()
            time.sleep(0.3)
            drain_after(turns)

        loop.call_soon_threadsafe(hold_the_loop)
        assert blocking.wait(10)
        release.put(None)
        with pytest.raises(grpc.RpcError) as ended:
            for reply in stream:
                assert reply.infer_response.id == "m1"
        release.put(None)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
