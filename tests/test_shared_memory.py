"""System shared memory (Triton's extension) with unmodified tritonclient: its own shared memory utilities make
the POSIX segments, and the server reads inputs from them and writes outputs into them."""

from __future__ import annotations

import concurrent.futures
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tests.onnx_models import add_sub_model, write_config
from tests.process import ServeProcess
from tests.serving import ServerThread

ROW_BYTES = 16 * 4


@pytest.fixture
def served(repo: Path) -> Iterator[ServerThread]:
    with ServerThread(repo, shared_memory="system") as s:
        yield s


@pytest.fixture
def client(served: ServerThread) -> Iterator[tc.InferenceServerClient]:
    c = tc.InferenceServerClient(served.address)
    yield c
    c.unregister_system_shared_memory()
    c.close()


class Segments:
    """POSIX segments made by tritonclient's utilities, destroyed after the test."""

    def __init__(self) -> None:
        self.handles: list[object] = []

    def make(self, byte_size: int) -> tuple[str, object]:
        key = f"/tg-test-{uuid.uuid4().hex[:12]}"
        handle = shm.create_shared_memory_region(key.lstrip("/"), key, byte_size)
        self.handles.append(handle)
        return key, handle

    def close(self) -> None:
        for handle in self.handles:
            shm.destroy_shared_memory_region(handle)


@pytest.fixture
def segments() -> Iterator[Segments]:
    s = Segments()
    yield s
    s.close()


def _code(exc: InferenceServerException) -> str:
    return str(exc.status())


def test_inputs_and_outputs_in_shared_memory(client: tc.InferenceServerClient, segments: Segments) -> None:
    rows = 3
    a = np.arange(rows * 16, dtype=np.float32).reshape(rows, 16)
    b = np.full((rows, 16), 0.5, np.float32)
    size = rows * ROW_BYTES
    in_key, in_handle = segments.make(2 * size)  # both inputs in one segment, at two offsets
    out_key, out_handle = segments.make(2 * size)
    shm.set_shared_memory_region(in_handle, [a, b])
    client.register_system_shared_memory("in", in_key, 2 * size)
    client.register_system_shared_memory("out", out_key, 2 * size)

    inputs = [tc.InferInput("INPUT0", [rows, 16], "FP32"), tc.InferInput("INPUT1", [rows, 16], "FP32")]
    inputs[0].set_shared_memory("in", size)
    inputs[1].set_shared_memory("in", size, offset=size)
    outputs = [tc.InferRequestedOutput("OUTPUT0"), tc.InferRequestedOutput("OUTPUT1")]
    outputs[0].set_shared_memory("out", size)
    outputs[1].set_shared_memory("out", size, offset=size)
    result = client.infer("add_sub", inputs, outputs=outputs)

    response = result.get_response()
    assert [(o.name, list(o.shape), o.datatype) for o in response.outputs] == [
        ("OUTPUT0", [rows, 16], "FP32"),
        ("OUTPUT1", [rows, 16], "FP32"),
    ]
    assert list(response.raw_output_contents) == [b"", b""]  # the bytes went to shared memory, not the wire
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_handle, np.float32, [rows, 16]), a + b)
    second = np.frombuffer(shm.get_contents_as_numpy(out_handle, np.uint8, [2 * size])[size:].tobytes(), np.float32)
    np.testing.assert_array_equal(second.reshape(rows, 16), a - b)

    status = client.get_system_shared_memory_status(as_json=True)
    assert {r["name"]: (r["key"], r.get("byte_size")) for r in status["regions"].values()} == {
        "in": (in_key, str(2 * size)),
        "out": (out_key, str(2 * size)),
    }
    client.unregister_system_shared_memory("in")
    assert set(client.get_system_shared_memory_status(as_json=True)["regions"]) == {"out"}
    with pytest.raises(InferenceServerException, match="shared memory region 'in' is not registered") as info:
        client.infer("add_sub", inputs, outputs=outputs)
    assert _code(info.value) == "StatusCode.INVALID_ARGUMENT"


def test_shared_and_raw_tensors_mix_as_in_triton(client: tc.InferenceServerClient, segments: Segments) -> None:
    """raw_input_contents then holds only the other inputs' data, and the response keeps an (empty) entry for an
    output in shared memory, so that tritonclient's as_numpy still finds the raw one by position."""
    a, b = np.arange(16, dtype=np.float32).reshape(1, 16), np.ones((1, 16), np.float32)
    key, handle = segments.make(2 * ROW_BYTES)
    shm.set_shared_memory_region(handle, [a])
    client.register_system_shared_memory("mixed", key, 2 * ROW_BYTES)
    inputs = [tc.InferInput("INPUT0", [1, 16], "FP32"), tc.InferInput("INPUT1", [1, 16], "FP32")]
    inputs[0].set_shared_memory("mixed", ROW_BYTES)
    inputs[1].set_data_from_numpy(b)  # raw_input_contents[0], though it is the second input
    outputs = [tc.InferRequestedOutput("OUTPUT0"), tc.InferRequestedOutput("OUTPUT1")]
    outputs[0].set_shared_memory("mixed", ROW_BYTES, offset=ROW_BYTES)
    result = client.infer("add_sub", inputs, outputs=outputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    raw = shm.get_contents_as_numpy(handle, np.uint8, [2 * ROW_BYTES])[ROW_BYTES:].tobytes()
    np.testing.assert_array_equal(np.frombuffer(raw, np.float32).reshape(1, 16), a + b)


def test_requests_in_shared_memory_batch_together(repo: Path, segments: Segments) -> None:
    write_config(
        repo,
        "batched",
        'backend: "onnxruntime"\nmax_batch_size: 8\n'
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] }, '
        '{ name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] }, '
        '{ name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
        "dynamic_batching { max_queue_delay_microseconds: 20000 }\n",
    )
    add_sub_model(repo / "batched" / "1" / "model.onnx")
    n = 8
    key, handle = segments.make(n * 3 * ROW_BYTES)  # per request: INPUT0, INPUT1, OUTPUT0
    data = [np.full((1, 16), i, np.float32) for i in range(n)]
    shm.set_shared_memory_region(
        handle, [x for i in range(n) for x in (data[i], data[i], np.zeros((1, 16), np.float32))]
    )
    with ServerThread(repo, shared_memory="system") as s:
        client = tc.InferenceServerClient(s.address)
        try:
            client.register_system_shared_memory("all", key, n * 3 * ROW_BYTES)

            def one(i: int) -> None:
                base = i * 3 * ROW_BYTES
                inputs = [tc.InferInput("INPUT0", [1, 16], "FP32"), tc.InferInput("INPUT1", [1, 16], "FP32")]
                inputs[0].set_shared_memory("all", ROW_BYTES, offset=base)
                inputs[1].set_shared_memory("all", ROW_BYTES, offset=base + ROW_BYTES)
                out = tc.InferRequestedOutput("OUTPUT0")
                out.set_shared_memory("all", ROW_BYTES, offset=base + 2 * ROW_BYTES)
                client.infer("batched", inputs, outputs=[out])

            with concurrent.futures.ThreadPoolExecutor(n) as pool:
                list(pool.map(one, range(n)))
            stats = client.get_inference_statistics("batched").model_stats[0]
            assert stats.inference_count == n and stats.execution_count < n, "the requests never shared a batch"
            raw = shm.get_contents_as_numpy(handle, np.float32, [n, 3, 16])
            for i in range(n):
                np.testing.assert_array_equal(raw[i, 2], np.full(16, 2.0 * i, np.float32))
        finally:
            client.unregister_system_shared_memory()
            client.close()


def test_bad_regions_and_requests_get_clear_errors(
    client: tc.InferenceServerClient, segments: Segments, served: ServerThread
) -> None:
    key, handle = segments.make(ROW_BYTES)
    client.register_system_shared_memory("r", key, ROW_BYTES)
    cases = [
        (lambda: client.register_system_shared_memory("r", key, ROW_BYTES), "ALREADY_EXISTS", "already registered"),
        (
            lambda: client.register_system_shared_memory("big", key, ROW_BYTES, offset=8),
            "INVALID_ARGUMENT",
            f"offset 8 + byte_size {ROW_BYTES} is past the end of key '{key}' ({ROW_BYTES} bytes)",
        ),
        (lambda: client.register_system_shared_memory("x", "/tg-no-such-segment", 4), "INVALID_ARGUMENT", "no such"),
        (lambda: client.register_system_shared_memory("x", "/../etc", 4), "INVALID_ARGUMENT", "not a POSIX shared"),
        (lambda: client.get_system_shared_memory_status("nope"), "NOT_FOUND", "'nope' is not registered"),
    ]
    for call, code, text in cases:
        with pytest.raises(InferenceServerException) as info:
            call()
        assert _code(info.value) == f"StatusCode.{code}" and text in info.value.message(), info.value.message()

    def infer(in_size: int, offset: int = 0, out_size: int | None = None) -> None:
        inputs = [tc.InferInput("INPUT0", [1, 16], "FP32"), tc.InferInput("INPUT1", [1, 16], "FP32")]
        inputs[0].set_shared_memory("r", in_size, offset=offset)
        inputs[1].set_data_from_numpy(np.zeros((1, 16), np.float32))
        outputs = None
        if out_size is not None:
            out = tc.InferRequestedOutput("OUTPUT0")
            out.set_shared_memory("r", out_size)
            outputs = [out]
        client.infer("add_sub", inputs, outputs=outputs)

    bad_requests = [
        (
            lambda: infer(ROW_BYTES - 4),
            "tensor 'INPUT0'",
            "shared_memory_byte_size of region 'r' is 60 but shape [1, 16]",
        ),
        (lambda: infer(ROW_BYTES, offset=4), "tensor 'INPUT0'", "is outside shared memory region 'r' (64 bytes)"),
        (
            lambda: infer(ROW_BYTES, out_size=8),
            "tensor 'OUTPUT0'",
            "takes 64 bytes, more than the 8 given in shared memory region 'r'",
        ),
    ]
    for call, tensor, text in bad_requests:
        with pytest.raises(InferenceServerException) as info:
            call()
        message = info.value.message()
        assert _code(info.value) == "StatusCode.INVALID_ARGUMENT", message
        assert "model 'add_sub'" in message and tensor in message and text in message, message
    infer(ROW_BYTES)  # the server goes on serving
    with grpc.insecure_channel(served.address) as channel:
        meta = GRPCInferenceServiceStub(channel).ServerMetadata(pb.ServerMetadataRequest(), timeout=5)
    assert "system_shared_memory" in meta.extensions


def test_off_by_default(repo: Path, segments: Segments) -> None:
    key, handle = segments.make(ROW_BYTES)
    with ServerThread(repo) as s:
        client = tc.InferenceServerClient(s.address)
        try:
            with pytest.raises(InferenceServerException) as info:
                client.register_system_shared_memory("r", key, ROW_BYTES)
            assert _code(info.value) == "StatusCode.UNIMPLEMENTED"
            assert "--shared-memory system" in info.value.message()
            inputs = [tc.InferInput("INPUT0", [1, 16], "FP32"), tc.InferInput("INPUT1", [1, 16], "FP32")]
            inputs[0].set_shared_memory("r", ROW_BYTES)
            inputs[1].set_data_from_numpy(np.zeros((1, 16), np.float32))
            with pytest.raises(InferenceServerException) as info:
                client.infer("add_sub", inputs)
            assert _code(info.value) == "StatusCode.INVALID_ARGUMENT"
            assert "tensor 'INPUT0'" in info.value.message() and "--shared-memory system" in info.value.message()
            assert "system_shared_memory" not in client.get_server_metadata().extensions
        finally:
            client.close()


def test_shared_memory_setting_is_checked(repo: Path) -> None:
    with pytest.raises(ValueError, match="shared_memory must be one of"):
        ServerThread(repo, shared_memory="cuda")
    assert os.path.isdir("/dev/shm")


def test_registering_needs_inference_on_every_model(repo: Path, tmp_path: Path, segments: Segments) -> None:
    """A region maps host memory and serves any model's requests: an identity limited to some models may not
    register one (it still names regions that others registered, under its own models' rules)."""
    import hashlib
    import json

    tokens = {"narrow": "t-narrow", "broad": "t-broad"}
    policy = {
        "rules": [
            {"identities": "narrow", "apis": ["inference"], "models": ["add_sub"]},
            {"identities": "broad", "apis": ["inference"]},
        ],
        "tokens": [{"sha256": hashlib.sha256(t.encode()).hexdigest(), "identity": i} for i, t in tokens.items()],
    }
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    key, _ = segments.make(ROW_BYTES)
    with ServerThread(repo, shared_memory="system", auth_policy=path) as s:
        client = tc.InferenceServerClient(s.address)
        try:
            with pytest.raises(InferenceServerException) as info:
                client.register_system_shared_memory("r", key, ROW_BYTES, headers={"authorization": "Bearer t-narrow"})
            assert _code(info.value) == "StatusCode.PERMISSION_DENIED"
            assert "identity 'narrow' may not call SystemSharedMemoryRegister" in info.value.message()
            client.register_system_shared_memory("r", key, ROW_BYTES, headers={"authorization": "Bearer t-broad"})
            inputs = [tc.InferInput("INPUT0", [1, 16], "FP32"), tc.InferInput("INPUT1", [1, 16], "FP32")]
            inputs[0].set_shared_memory("r", ROW_BYTES)
            inputs[1].set_data_from_numpy(np.zeros((1, 16), np.float32))
            client.infer("add_sub", inputs, headers={"authorization": "Bearer t-narrow"})
        finally:
            client.unregister_system_shared_memory(headers={"authorization": "Bearer t-broad"})
            client.close()


def test_a_segment_shrunk_by_its_client_fails_the_request_not_the_server(repo: Path, segments: Segments) -> None:
    """The client owns the segment: shrinking it after registration must cost its own request, not the server (a
    memory mapping read past the end of a shrunk file is SIGBUS, which ends the process). A real server process."""
    key, handle = segments.make(2 * ROW_BYTES)
    shm.set_shared_memory_region(handle, [np.ones((2, 16), np.float32)])
    args = ["--model-repository", str(repo), "--grpc-port", "0", "--shared-memory", "system"]
    with ServeProcess(args) as server:
        server.wait_for_line(r"\bready: \d+ model")
        client = tc.InferenceServerClient(server.address)
        try:
            client.register_system_shared_memory("r", key, 2 * ROW_BYTES)
            os.truncate(shm_path(key), 0)
            inputs = [tc.InferInput("INPUT0", [1, 16], "FP32"), tc.InferInput("INPUT1", [1, 16], "FP32")]
            inputs[0].set_shared_memory("r", ROW_BYTES, offset=ROW_BYTES)
            inputs[1].set_data_from_numpy(np.zeros((1, 16), np.float32))
            with pytest.raises(InferenceServerException) as info:
                client.infer("add_sub", inputs)
            assert _code(info.value) == "StatusCode.INVALID_ARGUMENT"
            assert "tensor 'INPUT0'" in info.value.message() and "was shrunk" in info.value.message()
            assert client.is_server_live()
        finally:
            client.close()
        assert server.terminate() == 0, server.output


def test_a_fifo_in_dev_shm_is_refused_without_blocking(client: tc.InferenceServerClient) -> None:
    key = f"/tg-test-fifo-{uuid.uuid4().hex[:12]}"
    os.mkfifo(shm_path(key))
    try:
        with pytest.raises(InferenceServerException) as info:
            client.register_system_shared_memory("fifo", key, 4, client_timeout=10)
        assert _code(info.value) == "StatusCode.INVALID_ARGUMENT"
        assert "is not a shared memory segment" in info.value.message()
    finally:
        os.unlink(shm_path(key))


def shm_path(key: str) -> str:
    return "/dev/shm/" + key.lstrip("/")


def test_region_offsets_status_and_a_stream(client: tc.InferenceServerClient, segments: Segments) -> None:
    """A region registered at an offset of its segment, as Status reports it, used over ModelStreamInfer."""
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    key, handle = segments.make(4 * ROW_BYTES)
    shm.set_shared_memory_region(handle, [a], offset=ROW_BYTES)  # the region starts one row into the segment
    client.register_system_shared_memory("late", key, 3 * ROW_BYTES, offset=ROW_BYTES)
    (region,) = client.get_system_shared_memory_status("late").regions.values()
    assert (region.key, region.offset, region.byte_size) == (key, ROW_BYTES, 3 * ROW_BYTES)
    results: list[object] = []
    client.start_stream(callback=lambda result, error: results.append(error or result))
    try:
        inputs = [tc.InferInput("INPUT0", [1, 16], "FP32"), tc.InferInput("INPUT1", [1, 16], "FP32")]
        inputs[0].set_shared_memory("late", ROW_BYTES)  # region offset 0 = segment offset ROW_BYTES
        inputs[1].set_data_from_numpy(a)
        out = tc.InferRequestedOutput("OUTPUT0")
        out.set_shared_memory("late", ROW_BYTES, offset=ROW_BYTES)
        client.async_stream_infer("add_sub", inputs, outputs=[out], request_id="s")
    finally:
        client.stop_stream()  # waits for the answer
    (result,) = results
    assert isinstance(result, tc.InferResult), result
    assert list(result.get_response().raw_output_contents) == [b""]
    doubled = shm.get_contents_as_numpy(handle, np.float32, [4, 16])[2]
    np.testing.assert_array_equal(doubled, (2 * a)[0])


def test_text_tensors_in_shared_memory(repo: Path, segments: Segments) -> None:
    from tests.onnx_models import identity_model

    identity_model(repo / "text" / "1" / "model.onnx", "BYTES")
    words = np.array([[b"a", b"", b"x\x00y", "é".encode()]], dtype=object)
    framed: bytes = tc.serialize_byte_tensor(words).item()  # tritonclient's length-prefixed BYTES
    key, handle = segments.make(2 * len(framed))
    shm.set_shared_memory_region(handle, [np.frombuffer(framed, np.uint8)])
    with ServerThread(repo, shared_memory="system") as s:
        client = tc.InferenceServerClient(s.address)
        try:
            client.register_system_shared_memory("text", key, 2 * len(framed))
            inp = tc.InferInput("INPUT0", [1, 4], "BYTES")
            inp.set_shared_memory("text", len(framed))
            out = tc.InferRequestedOutput("OUTPUT0")
            out.set_shared_memory("text", len(framed), offset=len(framed))
            client.infer("text", [inp], outputs=[out])
            back = shm.get_contents_as_numpy(handle, np.object_, [1, 4], offset=len(framed))
            assert back.tolist() == words.tolist()
        finally:
            client.unregister_system_shared_memory()
            client.close()


def _raw_request(region: str, byte_size: int, *, raw_entries: int, contents: bool = False) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="add_sub")
    first = req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    first.parameters["shared_memory_region"].string_param = region
    first.parameters["shared_memory_byte_size"].int64_param = byte_size
    if contents:
        first.contents.fp32_contents.extend([0.0] * 16)
    req.inputs.add(name="INPUT1", datatype="FP32", shape=[1, 16])
    for _ in range(raw_entries):
        req.raw_input_contents.append(np.zeros((1, 16), np.float32).tobytes())
    return req


@pytest.mark.parametrize(
    ("byte_size", "raw_entries", "contents", "text"),
    [
        pytest.param(ROW_BYTES, 2, False, "1 inputs to read from raw_input_contents but 2 entries", id="extra-raw"),
        pytest.param(ROW_BYTES, 1, True, "data given both in contents and in shared memory", id="contents-too"),
        pytest.param(-8, 1, False, "outside shared memory region 'r'", id="negative-size"),
    ],
)
def test_malformed_shared_memory_requests(
    client: tc.InferenceServerClient,
    served: ServerThread,
    segments: Segments,
    byte_size: int,
    raw_entries: int,
    contents: bool,
    text: str,
) -> None:
    key, _ = segments.make(ROW_BYTES)
    client.register_system_shared_memory("r", key, ROW_BYTES)
    with grpc.insecure_channel(served.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            GRPCInferenceServiceStub(channel).ModelInfer(
                _raw_request("r", byte_size, raw_entries=raw_entries, contents=contents), timeout=10
            )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert text in info.value.details() and "model 'add_sub'" in info.value.details(), info.value.details()


def test_an_output_into_a_shrunk_segment_fails(client: tc.InferenceServerClient, segments: Segments) -> None:
    key, _ = segments.make(2 * ROW_BYTES)
    client.register_system_shared_memory("r", key, 2 * ROW_BYTES)
    os.truncate(shm_path(key), ROW_BYTES)
    inputs = [tc.InferInput(n, [1, 16], "FP32") for n in ("INPUT0", "INPUT1")]
    for i in inputs:
        i.set_data_from_numpy(np.zeros((1, 16), np.float32))
    out = tc.InferRequestedOutput("OUTPUT0")
    out.set_shared_memory("r", ROW_BYTES, offset=ROW_BYTES)
    with pytest.raises(InferenceServerException) as info:
        client.infer("add_sub", inputs, outputs=[out])
    assert _code(info.value) == "StatusCode.INVALID_ARGUMENT" and "was shrunk" in info.value.message()
    assert os.path.getsize(shm_path(key)) == ROW_BYTES, "the segment was grown back behind its owner's back"


def test_regions_are_capped_and_share_their_segments_descriptor(
    client: tc.InferenceServerClient, segments: Segments
) -> None:
    """Each open descriptor is one a new connection cannot have: regions of one segment share one, their number
    is capped, and unregistering closes them."""
    import gc

    from tensorgate.server.rpc.shared_memory import MAX_REGIONS

    key, _ = segments.make(ROW_BYTES)
    before = len(os.listdir("/proc/self/fd"))  # the server runs in this process
    for i in range(MAX_REGIONS):
        client.register_system_shared_memory(f"r{i}", key, ROW_BYTES)
    assert len(os.listdir("/proc/self/fd")) - before < 16, "a descriptor per region"
    with pytest.raises(InferenceServerException) as info:
        client.register_system_shared_memory("one-too-many", key, ROW_BYTES)
    assert _code(info.value) == "StatusCode.RESOURCE_EXHAUSTED" and f"{MAX_REGIONS} regions" in info.value.message()
    other, _ = segments.make(ROW_BYTES)
    client.unregister_system_shared_memory()
    client.register_system_shared_memory("other", other, ROW_BYTES)
    client.unregister_system_shared_memory()
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) < before + 16


def test_refused_registrations_close_their_descriptors_at_once(
    client: tc.InferenceServerClient, segments: Segments
) -> None:
    """A refusal after the segment was opened (past its end, not a regular file) closes the descriptor at once,
    not at the next garbage collection (the refusal's traceback held it): a client retrying a bad registration
    would otherwise run the server out of descriptors. The collector is off meanwhile, as it may be for a while."""
    import gc

    key, _ = segments.make(ROW_BYTES)
    fifo = f"/tg-test-fifo-{uuid.uuid4().hex[:12]}"
    os.mkfifo(shm_path(fifo))
    before = len(os.listdir("/proc/self/fd"))  # the server runs in this process
    gc.disable()
    try:
        for i in range(50):
            for name, target, words in ((f"big{i}", key, "past the end"), (f"fifo{i}", fifo, "not a shared memory")):
                with pytest.raises(InferenceServerException) as info:
                    client.register_system_shared_memory(name, target, 2 * ROW_BYTES)
                assert _code(info.value) == "StatusCode.INVALID_ARGUMENT" and words in info.value.message()
        assert len(os.listdir("/proc/self/fd")) - before < 16, "descriptors of refused registrations stay open"
    finally:
        gc.enable()
        os.unlink(shm_path(fifo))
    client.register_system_shared_memory("good", key, ROW_BYTES)
    assert list(client.get_system_shared_memory_status(as_json=True)["regions"]) == ["good"]


def test_cuda_shared_memory_has_nothing_to_list_or_unregister(served: ServerThread) -> None:
    """perf_analyzer unregisters CUDA regions too when it exits, and printed "Unable to unregister all shared
    memory regions" after every --shared-memory run while those calls answered UNIMPLEMENTED."""
    client = tc.InferenceServerClient(served.address)
    try:
        client.unregister_cuda_shared_memory()
        client.unregister_cuda_shared_memory("never-registered")
        assert client.get_cuda_shared_memory_status(as_json=True) == {}
        with pytest.raises(InferenceServerException) as info:
            client.get_cuda_shared_memory_status("r")
        assert _code(info.value) == "StatusCode.NOT_FOUND" and "no CUDA shared memory" in info.value.message()
        with pytest.raises(InferenceServerException) as info:
            client.register_cuda_shared_memory("r", b"aGFuZGxl", 0, 16)  # base64, as cudashm gives it
        assert _code(info.value) == "StatusCode.UNIMPLEMENTED"
    finally:
        client.close()


def test_a_region_size_the_shape_cannot_take_is_refused_before_it_is_read(
    client: tc.InferenceServerClient, segments: Segments
) -> None:
    """A region can name any number of bytes: one that the tensor's shape cannot take is refused from its size,
    without reading it (a small request must not make the server read and hold hundreds of megabytes). The
    segment is shrunk after registration, so a read would fail with another message: "was shrunk"."""
    key, _ = segments.make(4 * ROW_BYTES)
    client.register_system_shared_memory("r", key, 4 * ROW_BYTES)
    os.truncate(shm_path(key), 0)
    inputs = [tc.InferInput("INPUT0", [1, 16], "FP32"), tc.InferInput("INPUT1", [1, 16], "FP32")]
    inputs[0].set_shared_memory("r", 4 * ROW_BYTES)
    inputs[1].set_data_from_numpy(np.zeros((1, 16), np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("add_sub", inputs)
    assert _code(info.value) == "StatusCode.INVALID_ARGUMENT"
    message = info.value.message()
    assert f"shared_memory_byte_size of region 'r' is {4 * ROW_BYTES} but shape [1, 16] of FP32 needs" in message
    assert "tensor 'INPUT0'" in message and "shrunk" not in message


def test_a_text_region_larger_than_its_elements_can_be_is_refused_before_it_is_read(
    repo: Path, segments: Segments
) -> None:
    """BYTES elements have no fixed size, but each is at most --max-bytes-element bytes after its 4-byte length:
    a region larger than that for the shape is refused from its size, before it is read (shrunk, as above)."""
    from tests.onnx_models import identity_model

    identity_model(repo / "text" / "1" / "model.onnx", "BYTES")
    key, _ = segments.make(4096)
    with ServerThread(repo, shared_memory="system", max_bytes_element=100) as s:
        client = tc.InferenceServerClient(s.address)
        try:
            client.register_system_shared_memory("text", key, 4096)
            os.truncate(shm_path(key), 0)
            inp = tc.InferInput("INPUT0", [1, 4], "BYTES")
            inp.set_shared_memory("text", 4 * 104 + 1)  # one byte more than 4 elements of 100 bytes take
            with pytest.raises(InferenceServerException) as info:
                client.infer("text", [inp])
            assert _code(info.value) == "StatusCode.INVALID_ARGUMENT"
            message = info.value.message()
            assert "shared_memory_byte_size of region 'text' is 417, more than shape [1, 4] can hold" in message
            assert "--max-bytes-element" in message and "shrunk" not in message
            inp.set_shared_memory("text", 4 * 104)  # within the bound: read, and the shrunk segment is found
            with pytest.raises(InferenceServerException) as info:
                client.infer("text", [inp])
            assert "was shrunk" in info.value.message()
        finally:
            client.unregister_system_shared_memory()
            client.close()


def test_a_large_input_in_shared_memory_is_checked_then_read_off_the_loop(segments: Segments) -> None:
    """The codec's rule, in process: an input over codec.LARGE_SHARED_BYTES in shared memory is checked against
    the model before it is read, and on the event loop hands the read off (DecodeOffLoop); smaller ones are read
    on the loop, as a hop to a worker thread costs about what reading a MiB does."""
    from tensorgate.server.errors import InvalidRequestError
    from tensorgate.server.rpc import codec
    from tensorgate.server.rpc.shared_memory import SystemSharedMemory

    n = codec.LARGE_SHARED_BYTES // 4 + 1
    key, handle = segments.make(4 * n)
    x = np.arange(n, dtype=np.float32).reshape(1, n)
    shm.set_shared_memory_region(handle, [x])
    registry = SystemSharedMemory(enabled=True)
    registry.register("big", key, 0, 4 * n)
    checked: list[tuple[int, ...]] = []

    def check(model: str, version: str, tensor: str, datatype: str, shape: tuple[int, ...]) -> None:
        checked.append(shape)

    def ask(count: int) -> pb.ModelInferRequest:
        req = pb.ModelInferRequest(model_name="m")
        tensor = req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, count])
        tensor.parameters["shared_memory_region"].string_param = "big"
        tensor.parameters["shared_memory_byte_size"].int64_param = 4 * count
        return req

    small = codec.decode_infer_request(ask(n - 1), shm=registry, check_input=check, on_loop=True)
    np.testing.assert_array_equal(small.inputs["INPUT0"], x[:, : n - 1])
    assert checked == []
    with pytest.raises(codec.DecodeOffLoop):
        codec.decode_infer_request(ask(n), shm=registry, check_input=check, on_loop=True)
    assert checked == [(1, n)]
    decoded = codec.decode_infer_request(ask(n), shm=registry, check_input=check)  # on the worker thread
    np.testing.assert_array_equal(decoded.inputs["INPUT0"], x)

    def refuse(model: str, version: str, tensor: str, datatype: str, shape: tuple[int, ...]) -> None:
        raise InvalidRequestError(model, version, "the model does not take it", tensor=tensor)

    os.truncate(shm_path(key), 0)  # a read would now fail with "was shrunk"
    for on_loop in (True, False):
        with pytest.raises(InvalidRequestError, match="the model does not take it"):
            codec.decode_infer_request(ask(n), shm=registry, check_input=refuse, on_loop=on_loop)


def test_a_large_shared_memory_input_the_model_cannot_take_is_refused_before_it_is_read(
    repo: Path, segments: Segments
) -> None:
    """A region of hundreds of megabytes named for a shape the model refuses was read on the event loop before
    the model said no, and every other caller waited meanwhile. Now the model's schema answers first (the
    segment is shrunk: a read would say "was shrunk"), and a large input it takes is read off the loop, exactly."""
    from tensorgate.server.rpc import codec
    from tests.onnx_models import identity_model

    identity_model(repo / "wide" / "1" / "model.onnx", "FP32", shape=("batch", "n"))
    n = codec.LARGE_SHARED_BYTES // 4 + 4
    x = np.arange(n, dtype=np.float32).reshape(1, n)
    key, handle = segments.make(4 * n)
    shm.set_shared_memory_region(handle, [x])
    with ServerThread(repo, shared_memory="system") as s:
        client = tc.InferenceServerClient(s.address)
        try:
            client.register_system_shared_memory("big", key, 4 * n)
            inp = tc.InferInput("INPUT0", [1, n], "FP32")
            inp.set_shared_memory("big", 4 * n)
            np.testing.assert_array_equal(client.infer("wide", [inp]).as_numpy("OUTPUT0"), x)
            os.truncate(shm_path(key), 0)
            rows = tc.InferInput("INPUT0", [n // 4, 4], "FP32")  # identity_fp32 batches at most 4
            rows.set_shared_memory("big", 4 * n)
            with pytest.raises(InferenceServerException) as info:
                client.infer("identity_fp32", [rows])
            assert _code(info.value) == "StatusCode.INVALID_ARGUMENT"
            message = info.value.message()
            assert "tensor 'INPUT0'" in message and "max_batch_size" in message and "shrunk" not in message
            assert client.is_server_live()
        finally:
            client.unregister_system_shared_memory()
            client.close()


def test_a_region_unregistered_while_its_request_waits_keeps_its_segment_until_the_request_ends(
    tmp_path: Path, segments: Segments
) -> None:
    """SystemSharedMemoryUnregister while a request that names the region is queued (as Triton's, where the
    region is unmapped once its in-flight requests complete): the request still writes its output into the
    segment it was given, a region registered under the same name meanwhile is left alone, and the server goes
    on. A real server process, so that a crash would show."""
    import re
    import threading

    from tests.scraping import scrape

    repo = tmp_path / "models"
    add_sub_model(repo / "paired" / "1" / "model.onnx")
    write_config(  # a request waits a minute for a second one to fill its batch of two
        repo,
        "paired",
        'backend: "onnxruntime"\nmax_batch_size: 2\n'
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] }, '
        '{ name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] }, '
        '{ name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
        "dynamic_batching { max_queue_delay_microseconds: 60000000 }\n",
    )
    sentinel = np.full((1, 16), -7.0, np.float32)
    old_key, old_handle = segments.make(ROW_BYTES)
    new_key, new_handle = segments.make(ROW_BYTES)
    shm.set_shared_memory_region(old_handle, [sentinel])
    shm.set_shared_memory_region(new_handle, [sentinel])
    a, b = np.arange(16, dtype=np.float32).reshape(1, 16), np.ones((1, 16), np.float32)
    args = ["--model-repository", str(repo), "--grpc-port", "0", "--shared-memory", "system"]
    with ServeProcess(args) as server:
        server.wait_for_line(r"\bready: \d+ model")
        metrics = re.search(r"metrics listening on \S+:(\d+)", server.wait_for_line("metrics listening on"))
        assert metrics is not None
        client = tc.InferenceServerClient(server.address)
        try:
            client.register_system_shared_memory("out", old_key, ROW_BYTES)
            inputs = [tc.InferInput(n, [1, 16], "FP32") for n in ("INPUT0", "INPUT1")]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(b)
            out = tc.InferRequestedOutput("OUTPUT0")
            out.set_shared_memory("out", ROW_BYTES)
            answers: list[object] = []
            answered = threading.Event()

            def record(result: object, error: object) -> None:
                answers.append(error or result)
                answered.set()

            client.async_infer("paired", inputs, callback=record, outputs=[out], client_timeout=60)
            depth = ("tensorgate_queue_depth", frozenset({"model": "paired", "version": "1"}.items()))
            deadline = time.monotonic() + 30
            while scrape(f"http://127.0.0.1:{metrics.group(1)}/metrics").get(depth) != 1:
                assert time.monotonic() < deadline, "the request never queued"
                time.sleep(0.05)
            client.unregister_system_shared_memory("out")
            client.register_system_shared_memory("out", new_key, ROW_BYTES)  # the name, reused elsewhere
            client.infer("paired", inputs)  # fills the batch: both run now
            assert answered.wait(30)
            (result,) = answers
            assert isinstance(result, tc.InferResult), result
            assert list(result.get_response().raw_output_contents) == [b""]
            np.testing.assert_array_equal(shm.get_contents_as_numpy(old_handle, np.float32, [1, 16]), a + b)
            np.testing.assert_array_equal(shm.get_contents_as_numpy(new_handle, np.float32, [1, 16]), sentinel)
            assert client.is_server_live()
        finally:
            client.unregister_system_shared_memory()
            client.close()
        assert server.terminate() == 0, server.output
