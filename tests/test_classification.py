"""Triton's classification extension: an output asked for with a class count comes back as its top classes.

tritonclient asks with `InferRequestedOutput(name, class_count=k)` (the output parameter `classification`); Triton
answers with BYTES "value:index[:label]" per class, best first, shape [rows, k] (or [k] for a model that does not
batch), labels read from the output's `label_filename` in the model directory. The end-to-end tests run a real
server and unmodified tritonclient; the expected strings are written out by hand, not computed with the code under
test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from tensorgate.client import InferenceClient
from tensorgate.client.errors import InvalidArgument
from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.server.pipeline.classify import top_k
from tests.onnx_models import identity_model, write_config
from tests.serving import ServerThread
from tests.test_infer import triton_inputs

LABELS = "cat\ndog\r\n\nbird\n"  # a CRLF line, an empty label (index 2) and a final newline
ANIMALS_CONFIG = """
name: "animals"
backend: "onnxruntime"
max_batch_size: 4
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 5 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 5 ] label_filename: "labels.txt" } ]
"""


def _fp32_input(x: np.ndarray) -> tc.InferInput:
    (inp,) = triton_inputs({"INPUT0": x})
    return inp


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServerThread]:
    root = tmp_path / "models"
    identity_model(root / "animals" / "1" / "model.onnx", "FP32", ("batch", 5))
    write_config(root, "animals", ANIMALS_CONFIG)
    (root / "animals" / "labels.txt").write_bytes(LABELS.encode())
    identity_model(root / "flat" / "1" / "model.onnx", "INT32", (6,))
    write_config(root, "flat", 'name: "flat"\nbackend: "onnxruntime"\nmax_batch_size: 0\n')
    identity_model(root / "half" / "1" / "model.onnx", "FP16")
    with ServerThread(root) as s:
        yield s


def test_top_classes_per_row_with_labels_through_tritonclient(served: ServerThread) -> None:
    x = np.array([[0.1, 0.7, 0.05, 0.15, 0.0], [0.2, 0.2, 0.5, -1.0, 0.1]], dtype=np.float32)
    c = tc.InferenceServerClient(served.address)
    try:
        result = c.infer("animals", [_fp32_input(x)], outputs=[tc.InferRequestedOutput("OUTPUT0", class_count=3)])
        out = result.get_output("OUTPUT0")
        assert out.datatype == "BYTES"
        assert list(out.shape) == [2, 3]
        # Index 2's label line is empty and index 4 has no line: neither gets a label. The CR of "dog" is dropped.
        assert result.as_numpy("OUTPUT0").tolist() == [
            [b"0.700000:1:dog", b"0.150000:3:bird", b"0.100000:0:cat"],
            [b"0.500000:2", b"0.200000:0:cat", b"0.200000:1:dog"],
        ]
        # A count over the number of classes gives every class; without a count the tensor comes back as it is.
        all_five = c.infer("animals", [_fp32_input(x[:1])], outputs=[tc.InferRequestedOutput("OUTPUT0", class_count=9)])
        assert all_five.as_numpy("OUTPUT0").shape == (1, 5)
        assert all_five.as_numpy("OUTPUT0")[0, -1] == b"0.000000:4"
        plain = c.infer("animals", [_fp32_input(x)])
        np.testing.assert_array_equal(plain.as_numpy("OUTPUT0"), x)
    finally:
        c.close()


def test_a_model_that_does_not_batch_ranks_the_whole_tensor(served: ServerThread) -> None:
    x = np.array([3, -7, 12, 12, 0, 2**31 - 1], dtype=np.int32)
    c = tc.InferenceServerClient(served.address)
    try:
        inp = tc.InferInput("INPUT0", [6], "INT32")
        inp.set_data_from_numpy(x)
        result = c.infer("flat", [inp], outputs=[tc.InferRequestedOutput("OUTPUT0", class_count=4)])
        assert result.as_numpy("OUTPUT0").tolist() == [b"2147483647:5", b"12:2", b"12:3", b"3:0"]
    finally:
        c.close()


def test_classes_over_a_stream_and_from_our_client(served: ServerThread) -> None:
    x = np.array([[0.0, 0.0, 0.0, 2.0, 1.0]], dtype=np.float32)
    answers: list[object] = []
    c = tc.InferenceServerClient(served.address)
    try:
        c.start_stream(callback=lambda result, error: answers.append(error or result))
        c.async_stream_infer("animals", [_fp32_input(x)], outputs=[tc.InferRequestedOutput("OUTPUT0", class_count=2)])
        c.stop_stream()
    finally:
        c.close()
    assert len(answers) == 1
    assert isinstance(answers[0], tc.InferResult)
    assert answers[0].as_numpy("OUTPUT0").tolist() == [[b"2.000000:3:bird", b"1.000000:4"]]

    with InferenceClient(served.address) as ours:
        result = ours.infer("animals", {"INPUT0": x}, class_counts={"OUTPUT0": 1})
        assert result["OUTPUT0"].tolist() == [[b"2.000000:3:bird"]]
        with pytest.raises(InvalidArgument, match="FP16"):
            ours.infer("half", {"INPUT0": np.ones((1, 4), np.float16)}, class_counts={"OUTPUT0": 1})
        with pytest.raises(ValueError, match="class count must be a positive integer"):
            ours.infer("animals", {"INPUT0": x}, class_counts={"OUTPUT0": 0})


def _raw_error(served: ServerThread, request: pb.ModelInferRequest) -> grpc.RpcError:
    with grpc.insecure_channel(served.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    return info.value


def test_bad_classification_requests_are_refused_before_the_model_runs(served: ServerThread) -> None:
    c = tc.InferenceServerClient(served.address)
    try:
        with pytest.raises(InferenceServerException) as info:
            inp = tc.InferInput("INPUT0", [1, 4], "FP16")
            inp.set_data_from_numpy(np.ones((1, 4), np.float16))
            c.infer("half", [inp], outputs=[tc.InferRequestedOutput("OUTPUT0", class_count=2)])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        message = info.value.message()
        assert "'half'" in message and "'OUTPUT0'" in message and "datatype FP16" in message
        stats = c.get_inference_statistics("half").model_stats[0]
        assert stats.inference_count == 0 and stats.execution_count == 0
    finally:
        c.close()

    x = np.ones((1, 5), np.float32)
    request = pb.ModelInferRequest(model_name="animals", raw_input_contents=[x.tobytes()])
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 5])
    out = request.outputs.add(name="OUTPUT0")
    out.parameters["classification"].string_param = "3"
    error = _raw_error(served, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'classification' must be a non-negative integer" in (error.details() or "")
    out.parameters["classification"].int64_param = -1
    assert _raw_error(served, request).code() == grpc.StatusCode.INVALID_ARGUMENT
    out.parameters["classification"].int64_param = 2
    out.parameters["shared_memory_region"].string_param = "region"
    error = _raw_error(served, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot be written to shared memory" in (error.details() or "")


@pytest.mark.parametrize(
    ("filename", "fragment"),
    [("missing.txt", "cannot be read"), ("../outside.txt", "outside the model directory")],
)
def test_a_label_file_that_cannot_be_used_fails_the_load(tmp_path: Path, filename: str, fragment: str) -> None:
    root = tmp_path / "models"
    identity_model(root / "animals" / "1" / "model.onnx", "FP32", ("batch", 5))
    write_config(root, "animals", ANIMALS_CONFIG.replace("labels.txt", filename))
    (root / "outside.txt").write_text("cat\n")
    identity_model(root / "other" / "1" / "model.onnx", "FP32")
    with ServerThread(root) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            rows = {m.name: m for m in c.get_model_repository_index().models}
            assert rows["animals"].state == "UNAVAILABLE"
            assert fragment in rows["animals"].reason and "OUTPUT0" in rows["animals"].reason
            assert c.is_model_ready("other")
        finally:
            c.close()


# ----- the ranking itself ------------------------------------------------------------------------------------


def test_ties_keep_index_order_and_nan_ranks_last() -> None:
    x = np.array([[np.nan, 1.0, 1.0, -np.inf, 0.5]], dtype=np.float64)
    assert top_k(x, 5, (), batched=True).tolist() == [
        [b"1.000000:1", b"1.000000:2", b"0.500000:4", b"-inf:3", b"nan:0"]
    ]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint64, np.int8, np.int64])
def test_integers_rank_without_wrapping(dtype: type) -> None:
    info = np.iinfo(dtype)
    x: np.ndarray = np.array([[info.min, info.max, 0, info.max, 1]], dtype=dtype)
    expected = [f"{info.max}:1", f"{info.max}:3", "1:4", "0:2", f"{info.min}:0"]
    if info.min == 0:
        expected[3:] = ["0:0", "0:2"]
    assert [v.decode() for v in top_k(x, 5, (), batched=True)[0]] == expected


def test_rows_are_ranked_apart_and_extra_dims_flatten() -> None:
    x = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    x[1] = -x[1]
    assert top_k(x, 2, ("a", "b"), batched=True).tolist() == [
        [b"5.000000:5", b"4.000000:4"],
        [b"-6.000000:0:a", b"-7.000000:1:b"],
    ]


def test_an_edited_label_file_is_read_again_when_the_model_reloads(tmp_path: Path) -> None:
    root = tmp_path / "models"
    identity_model(root / "animals" / "1" / "model.onnx", "FP32", ("batch", 5))
    write_config(root, "animals", ANIMALS_CONFIG)
    (root / "animals" / "labels.txt").write_text(LABELS)
    with ServerThread(root, model_control_mode="explicit", load_model=["animals"]) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            x = np.array([[0.0, 9.0, 0.0, 0.0, 0.0]], dtype=np.float32)
            top = [tc.InferRequestedOutput("OUTPUT0", class_count=1)]
            assert c.infer("animals", [_fp32_input(x)], outputs=top).as_numpy("OUTPUT0").tolist() == [
                [b"9.000000:1:dog"]
            ]
            (root / "animals" / "labels.txt").write_text(LABELS.upper())
            c.load_model("animals")
            assert c.infer("animals", [_fp32_input(x)], outputs=top).as_numpy("OUTPUT0").tolist() == [
                [b"9.000000:1:DOG"]
            ]
        finally:
            c.close()
