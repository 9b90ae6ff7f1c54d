"""BF16 tensors end to end: held as ml_dtypes.bfloat16 (as tritonclient holds them), batched, run on ONNX Runtime
(whose Python API has no bfloat16), relayed to an upstream, captured for monitoring, and read and written by the
CLI. The model computes Y = 2X + 1 in float32 and gives it back as FP32 (Y) and BF16 (Z)."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
import tritonclient.utils.shared_memory as shm
from onnx import TensorProto, helper

from tensorgate.client import InferenceClient
from tensorgate.server.backends import bf16
from tensorgate.server.cli import main
from tensorgate.server.monitoring.drift import ReferenceProfile
from tensorgate.server.monitoring.store import DB_NAME, PredictionStore
from tests.onnx_models import OPSET, _save, bf16_model, write_config
from tests.serving import ServerThread
from tests.test_client_cli import infer
from tests.test_loadtest import bench

BF16 = np.dtype(ml_dtypes.bfloat16)


def expected(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = 2 * x.astype(np.float32) + 1
    return y, y.astype(BF16)


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 2)).astype(BF16)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("bf16") / "models"
    bf16_model(root / "bf16" / "1" / "model.onnx")
    # Three callers of 1, 2 and 3 rows meet in one batch (preferred size 6 rows; the delay only bounds a test that
    # went wrong), after a warm-up with random BF16 data.
    write_config(
        root,
        "bf16",
        """
max_batch_size: 8
dynamic_batching { preferred_batch_size: [ 6 ] max_queue_delay_microseconds: 10000000 }
model_warmup [ { name: "random" batch_size: 2
  inputs { key: "X" value: { data_type: TYPE_BF16 dims: [ 2 ] random_data: true } } } ]
""",
    )
    bf16_model(root / "plain" / "1" / "model.onnx")
    bf16_model(root / "cached" / "1" / "model.onnx")
    write_config(root, "cached", "max_batch_size: 8\nresponse_cache { enable: true }\n")
    bf16_model(root / "padded" / "1" / "model.onnx")  # every run padded to 8 rows, for one shape on CUDA
    padding = 'parameters { key: "tensorgate.pad_batches" value { string_value: "true" } }'
    write_config(root, "padded", f"max_batch_size: 8\n{padding}\n")
    # A sequence model whose implicit state is BF16: SUM = the sequence's running sum of X, kept in ACC.
    sums = helper.make_graph(
        [
            helper.make_node("Cast", ["X"], ["XF"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["ACC_IN"], ["AF"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["XF", "AF"], ["SF"]),
            helper.make_node("Cast", ["SF"], ["SUM"], to=TensorProto.BFLOAT16),
            helper.make_node("Identity", ["SUM"], ["ACC_OUT"]),
        ],
        "running_sum",
        [helper.make_tensor_value_info(n, TensorProto.BFLOAT16, ["batch", 1]) for n in ("X", "ACC_IN")],
        [helper.make_tensor_value_info(n, TensorProto.BFLOAT16, ["batch", 1]) for n in ("SUM", "ACC_OUT")],
    )
    _save(helper.make_model(sums, opset_imports=[helper.make_opsetid("", OPSET)]), root / "sums" / "1" / "model.onnx")
    write_config(
        root,
        "sums",
        """
max_batch_size: 4
input [ { name: "X" data_type: TYPE_BF16 dims: [ 1 ] } ]
output [ { name: "SUM" data_type: TYPE_BF16 dims: [ 1 ] } ]
sequence_batching {
  max_sequence_idle_microseconds: 60000000
  state [ { input_name: "ACC_IN" output_name: "ACC_OUT" data_type: TYPE_BF16 dims: [ 1 ] } ]
}
""",
    )
    # BF16 between two steps of an ensemble: OUT = Z(Z(X)).
    (root / "twice" / "1").mkdir(parents=True)
    write_config(
        root,
        "twice",
        """
platform: "ensemble"
max_batch_size: 4
input [ { name: "X" data_type: TYPE_BF16 dims: [ 2 ] } ]
output [ { name: "OUT" data_type: TYPE_BF16 dims: [ 2 ] } ]
ensemble_scheduling { step [
  { model_name: "plain" input_map { key: "X" value: "X" } output_map { key: "Z" value: "MID" } },
  { model_name: "plain" input_map { key: "X" value: "MID" } output_map { key: "Z" value: "OUT" } } ] }
""",
    )
    settings = {"data_dir": tmp_path_factory.mktemp("data"), "response_cache_bytes": 1 << 20, "shared_memory": "system"}
    with ServerThread(root, **settings) as s:
        yield s


def test_metadata_and_config_say_bf16(server: ServerThread) -> None:
    with tc.InferenceServerClient(server.address) as c:
        meta = c.get_model_metadata("plain")
        config = c.get_model_config("plain").config
    assert [(t.name, t.datatype) for t in meta.inputs] == [("X", "BF16")]
    assert [(t.name, t.datatype) for t in meta.outputs] == [("Y", "FP32"), ("Z", "BF16")]
    assert [t.data_type for t in config.input] == [tc.model_config_pb2.TYPE_BF16]


def test_requests_batch_together_and_split_back_exactly(server: ServerThread) -> None:
    """Three callers of 1, 2 and 3 rows meet in one batch of 6 (batch_stats says so), and each gets its own rows
    back: as tritonclient decodes them, BF16 and FP32 alike."""
    inputs = [rows(n, seed) for seed, n in enumerate((1, 2, 3))]
    answers: dict[int, tc.InferResult] = {}

    def call(i: int) -> None:
        x = tc.InferInput("X", list(inputs[i].shape), "BF16")
        x.set_data_from_numpy(inputs[i])
        with tc.InferenceServerClient(server.address) as c:
            answers[i] = c.infer("bf16", [x], client_timeout=30)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(answers) == [0, 1, 2]
    for i, x in enumerate(inputs):
        y, z = expected(x)
        got_z = answers[i].as_numpy("Z")
        assert got_z.dtype == BF16 and got_z.tobytes() == z.tobytes()
        np.testing.assert_array_equal(answers[i].as_numpy("Y"), y)
    with tc.InferenceServerClient(server.address) as c:
        [stats] = c.get_inference_statistics("bf16").model_stats
    assert [(b.batch_size, b.compute_infer.count) for b in stats.batch_stats] == [(6, 1)]


def test_our_client_sends_and_gets_bfloat16_arrays(server: ServerThread) -> None:
    x = np.array([[1.5, -2.0], [np.inf, 0.1]], BF16)
    with InferenceClient(server.address, timeout=10) as c:
        result = c.infer("plain", {"X": x})
    y, z = expected(x)
    assert result["Z"].dtype == BF16 and result["Z"].tobytes() == z.tobytes()
    np.testing.assert_array_equal(result["Y"], y)


def test_raw_bytes_from_a_stub_are_read_as_bfloat16(server: ServerThread) -> None:
    """Two bytes per element, the top half of the float32: 0x3FC0 is 1.5, 0xC000 is -2."""
    from tensorgate.protos import GRPCInferenceServiceStub
    from tensorgate.protos import grpc_service_pb2 as pb

    req = pb.ModelInferRequest(model_name="plain")
    req.inputs.add(name="X", datatype="BF16", shape=[1, 2])
    req.raw_input_contents.append(b"\xc0\x3f\x00\xc0")
    with grpc.insecure_channel(server.address) as channel:
        resp = GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=10)
    z = resp.raw_output_contents[[o.name for o in resp.outputs].index("Z")]
    assert np.frombuffer(z, BF16).tolist() == [4.0, -3.0]


def test_the_response_cache_keys_bf16_inputs_by_their_bytes(server: ServerThread) -> None:
    """The same BF16 request twice is one execution and one cache hit; another value is a miss."""
    x = np.array([[1.0, 2.0]], BF16)
    with InferenceClient(server.address, timeout=10) as c:
        answers = [c.infer("cached", {"X": a}) for a in (x, x, x + 1)]
        [stats] = c.statistics("cached").model_stats
    assert [a["Z"].tolist() for a in answers] == [[[3.0, 5.0]], [[3.0, 5.0]], [[5.0, 7.0]]]
    assert (stats.inference_stats.cache_hit.count, stats.inference_stats.cache_miss.count) == (1, 2)
    assert stats.execution_count == 2


def test_a_padded_model_pads_and_trims_bf16_rows(server: ServerThread) -> None:
    x = rows(3, seed=8)
    with InferenceClient(server.address, timeout=10) as c:
        result = c.infer("padded", {"X": x})
    assert result["Z"].shape == (3, 2) and result["Z"].tobytes() == expected(x)[1].tobytes()


def test_a_sequence_keeps_its_bf16_state(server: ServerThread) -> None:
    """Implicit state in BF16: zeros at the start, carried between a sequence's requests, apart per sequence."""
    steps = [(1.5, True, False), (2.0, False, False), (0.25, False, True)]
    with InferenceClient(server.address, timeout=10) as c:
        got = {
            sid: [
                c.infer(
                    "sums",
                    {"X": np.array([[v * sid]], BF16)},
                    sequence_id=sid,
                    sequence_start=start,
                    sequence_end=end,
                )["SUM"].tolist()
                for v, start, end in steps
            ]
            for sid in (1, 2)
        }
    assert got == {1: [[[1.5]], [[3.5]], [[3.75]]], 2: [[[3.0]], [[7.0]], [[7.5]]]}


def test_an_ensemble_passes_bf16_between_its_steps(server: ServerThread) -> None:
    x = rows(3, seed=5)
    with InferenceClient(server.address, timeout=10) as c:
        out = c.infer("twice", {"X": x})["OUT"]
    _, mid = expected(x)
    assert out.dtype == BF16 and out.tobytes() == expected(mid)[1].tobytes()


def test_bf16_in_and_out_of_system_shared_memory(server: ServerThread) -> None:
    """The input read from a region and the BF16 output written to one, as tritonclient's utilities lay them out."""
    x = rows(2, seed=6)
    size = x.nbytes
    keys = [f"/tg-bf16-{uuid.uuid4().hex[:12]}" for _ in range(2)]
    handles = [shm.create_shared_memory_region(k.lstrip("/"), k, size) for k in keys]
    try:
        shm.set_shared_memory_region(handles[0], [x])
        with tc.InferenceServerClient(server.address) as c:
            c.register_system_shared_memory("bf16_in", keys[0], size)
            c.register_system_shared_memory("bf16_out", keys[1], size)
            try:
                given = tc.InferInput("X", list(x.shape), "BF16")
                given.set_shared_memory("bf16_in", size)
                wanted = tc.InferRequestedOutput("Z")
                wanted.set_shared_memory("bf16_out", size)
                c.infer("plain", [given], outputs=[wanted])
            finally:
                c.unregister_system_shared_memory()
        got = shm.get_contents_as_numpy(handles[1], np.uint16, list(x.shape)).view(BF16)
        assert got.tobytes() == expected(x)[1].tobytes()
    finally:
        for handle in handles:
            shm.destroy_shared_memory_region(handle)


def test_the_cli_reads_json_and_npy_and_writes_float32_npy(server: ServerThread, tmp_path: Path) -> None:
    """JSON is cast to the declared BF16; a float32 .npy is rounded to it; BF16 outputs go to .npy as float32,
    since .npy has no bfloat16 (it would read back as raw bytes)."""
    done = infer("plain", "--input", "X=[[1.5, -2.0]]", "--server", server.address)
    assert done.returncode == 0, done.stderr
    z = json.loads(done.stdout)["outputs"]["Z"]
    assert (z["datatype"], z["data"]) == ("BF16", [[4.0, -3.0]])
    np.save(tmp_path / "x.npy", np.array([[0.5, 3.0]], np.float32))
    done = infer(
        "plain", "--input", f"X={tmp_path / 'x.npy'}", "--npy-out", tmp_path / "out", "--server", server.address
    )
    assert done.returncode == 0, done.stderr
    out = np.load(tmp_path / "out" / "Z.npy", allow_pickle=False)
    assert out.dtype == np.float32 and out.tolist() == [[2.0, 7.0]]
    np.save(tmp_path / "raw.npy", np.array([[1.5, -2.0]], BF16))  # as np.save writes bfloat16: "|V2"
    done = infer("plain", "--input", f"X={tmp_path / 'raw.npy'}", "--server", server.address)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outputs"]["Z"]["data"] == [[4.0, -3.0]]


def test_tensorgate_bench_loads_a_bf16_model(server: ServerThread, tmp_path: Path) -> None:
    """Random BF16 inputs from the model's metadata, every request answered."""
    doc = bench(tmp_path, "plain", "--server", server.address, "--concurrency", "2", "--duration", "0.5",
                "--warmup", "0.1", "--workers", "1", "--no-plots")  # fmt: skip
    [level] = doc["levels"]
    assert level["succeeded"] > 0 and level["failed"] == {}


def test_captured_bf16_is_stored_as_fp32(server: ServerThread) -> None:
    """Monitoring reads captured values as numbers: BF16 is stored as the FP32 it converts to exactly."""
    x = np.array([[0.25, 8.0]], BF16)
    with InferenceClient(server.address, timeout=10) as c:
        request_id = c.infer("plain", {"X": x}).id
    assert server.app.capture is not None and server.app.capture.flush()
    store = PredictionStore(server.settings.data_dir / DB_NAME)
    try:
        [captured] = [p for p in store.predictions("plain", None) if p.id == request_id]
    finally:
        store.close()
    assert captured.outputs["Z"].dtype == np.float32 and captured.outputs["Z"].tolist() == [[1.5, 17.0]]
    assert captured.inputs is not None  # inputs are captured by default
    assert captured.inputs["X"].dtype == np.float32 and captured.inputs["X"].tolist() == [[0.25, 8.0]]


def test_a_reference_profile_reads_bf16_as_numbers(server: ServerThread, tmp_path: Path) -> None:
    """`tensorgate profile --server` profiles a BF16 score output as a score, as it does an FP32 one (bfloat16 is
    no numpy float kind: it was profiled as categories)."""
    np.save(tmp_path / "ref.npy", np.random.default_rng(3).standard_normal((200, 2)).astype(np.float32))
    out = tmp_path / "profile.json"
    argv = ["profile", "plain", "--data", str(tmp_path / "ref.npy"), "--server", server.address, "--out", str(out)]
    assert main(argv) == 0
    profile = ReferenceProfile.from_json(out.read_text())
    assert profile.feature("Z[0]").kind == profile.feature("Y[0]").kind == "score"
    assert profile.feature("X[0]").kind == "numeric"


def test_the_binding_keeps_scalar_and_strided_inputs_as_they_are() -> None:
    """In process, on ONNX Runtime: a 0-d input stays 0-d (not made one-dimensional), and a strided view goes in as
    its own values (its contiguous copy lives until the run is over)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y"]), helper.make_node("Identity", ["S"], ["T"])],
        "identity",
        [
            helper.make_tensor_value_info("X", TensorProto.BFLOAT16, ["rows", "cols"]),
            helper.make_tensor_value_info("S", TensorProto.BFLOAT16, []),
        ],
        [
            helper.make_tensor_value_info("Y", TensorProto.BFLOAT16, ["rows", "cols"]),
            helper.make_tensor_value_info("T", TensorProto.BFLOAT16, []),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    wide = np.arange(4096, dtype=np.float32).reshape(64, 64).astype(BF16)
    for _ in range(20):  # allocations between runs would reuse freed memory
        x, scalar = wide[::3, 1::2], np.array(1.5, BF16)
        y, t = bf16.run(session, ["Y", "T"], {"X": x, "S": scalar})
        junk = [np.full(x.shape, 7.0, BF16) for _ in range(8)]
        assert y.shape == x.shape and y.tobytes() == np.ascontiguousarray(x).tobytes()
        assert t.shape == () and t.tolist() == 1.5
        del junk


def test_a_remote_model_relays_bf16(server: ServerThread, tmp_path: Path) -> None:
    """tensorgate in front of an upstream V2 server (here another tensorgate): BF16 both ways, bit for bit."""
    root = tmp_path / "front"
    (root / "remote").mkdir(parents=True)
    (root / "remote" / "config.pbtxt").write_text(
        'backend: "tensorgate_triton"\n'
        f'parameters {{ key: "tensorgate.triton.url" value {{ string_value: "{server.address}" }} }}\n'
        'parameters { key: "tensorgate.triton.model_name" value { string_value: "plain" } }\n'
    )
    x = rows(4, seed=7)
    with ServerThread(root) as front, InferenceClient(front.address, timeout=10) as c:
        result = c.infer("remote", {"X": x})
    y, z = expected(x)
    assert result["Z"].tobytes() == z.tobytes()
    np.testing.assert_array_equal(result["Y"], y)


def test_a_model_with_bf16_and_string_inputs_fails_its_load(tmp_path: Path) -> None:
    """onnxruntime takes bfloat16 only as OrtValues, which hold no strings: such a model fails alone, saying why."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y"]), helper.make_node("Identity", ["S"], ["T"])],
        "mixed",
        [
            helper.make_tensor_value_info("X", TensorProto.BFLOAT16, ["batch", 2]),
            helper.make_tensor_value_info("S", TensorProto.STRING, ["batch", 1]),
        ],
        [
            helper.make_tensor_value_info("Y", TensorProto.BFLOAT16, ["batch", 2]),
            helper.make_tensor_value_info("T", TensorProto.STRING, ["batch", 1]),
        ],
    )
    root = tmp_path / "models"
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), root / "mixed" / "1" / "model.onnx")
    bf16_model(root / "plain" / "1" / "model.onnx")
    with ServerThread(root) as s, tc.InferenceServerClient(s.address) as c:
        index = {m.name: (m.state, m.reason) for m in c.get_model_repository_index().models}
    assert index["plain"][0] == "READY"
    state, reason = index["mixed"]
    assert state == "UNAVAILABLE" and "bfloat16 tensors and string inputs" in reason and "'S'" in reason
