"""The remote Triton backend against a real Triton Inference Server on loopback (PyTriton's bundled tritonserver,
run from `.venv-triton` by tests/pytriton_upstream.py): what callers get through tensorgate equals what Triton
answers directly; config auto-completion; upstream errors, deadlines, restarts; mTLS in front; streaming.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.trace import SpanContext, TraceFlags
from tritonclient.utils import InferenceServerException

from tensorgate.protos import SERVICE_NAME, GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import model_config_pb2 as mc
from tensorgate.protos.tensors import decode_infer_response, encode_infer_request
from tensorgate.server.backends.base import BatchContext
from tensorgate.server.backends.triton import TritonBackend, UpstreamModel, complete_config
from tensorgate.server.errors import DeadlineExceededError, ModelLoadError
from tensorgate.server.repository.config import TensorInfo
from tests.pki import Pki, secure_channel
from tests.pytriton_upstream import TOKEN, TOKEN_HEADER, Upstream, unavailable_reason
from tests.scripted_upstream import ScriptedUpstream
from tests.serving import ServerThread

_REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"PyTriton cannot run here: {_REASON}")


def remote_config(url: str, *extra: str) -> str:
    """The config.pbtxt of a model fronting `url`; `extra` adds lines (more parameters, tensors...)."""
    lines = [
        'backend: "tensorgate_triton"',
        f'parameters {{ key: "tensorgate.triton.url" value {{ string_value: "{url}" }} }}',
        *extra,
    ]
    return "\n".join(lines) + "\n"


def write_remote(root: Path, name: str, url: str, *extra: str) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "config.pbtxt").write_text(remote_config(url, *extra))


LOOSE_ADD_SUB = (
    'parameters { key: "tensorgate.triton.model_name" value { string_value: "add_sub" } }',
    "max_batch_size: 16",
    'input [{ name: "INPUT0" data_type: TYPE_FP32 dims: [-1] }, { name: "INPUT1" data_type: TYPE_FP32 dims: [-1] }]',
)
"""A model that lets any row length through tensorgate's own checks, so that the upstream is the one to refuse."""


BATCH_WAIT = "dynamic_batching { max_queue_delay_microseconds: 300000 }"
"""Long enough for the concurrent callers of a test to meet in one batch."""


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    with Upstream(tmp_path_factory.mktemp("pytriton")) as u:
        yield u


@pytest.fixture(scope="module")
def front(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """tensorgate fronting every upstream model with a one-line config (plus the access token header)."""
    root = tmp_path_factory.mktemp("remote-models")
    token = f'parameters {{ key: "tensorgate.triton.header.{TOKEN_HEADER}" value {{ string_value: "{TOKEN}" }} }}'
    for name in ("add_sub", "int_ops", "bytes_op", "slow", "countdown"):
        write_remote(root, name, upstream.url, token)
    write_remote(root, "add_sub_loose", upstream.url, *LOOSE_ADD_SUB)
    write_remote(root, "add_sub_batched", upstream.url, LOOSE_ADD_SUB[0], BATCH_WAIT)
    with ServerThread(root) as s:
        yield s


def infer_both(
    front: ServerThread, upstream: Upstream, model: str, arrays: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The same request to tensorgate and straight to Triton, with tritonclient; outputs of each."""
    results = []
    for url in (front.address, upstream.url):
        with tc.InferenceServerClient(url) as client:
            inputs = []
            for name, array in arrays.items():
                item = tc.InferInput(name, list(array.shape), tc.np_to_triton_dtype(array.dtype))
                item.set_data_from_numpy(array)
                inputs.append(item)
            result = client.infer(model, inputs, client_timeout=30)
            response = result.get_response()
            results.append({o.name: result.as_numpy(o.name) for o in response.outputs})
    return results[0], results[1]


CASES = [
    pytest.param(
        "add_sub",
        {
            "INPUT0": np.arange(12, dtype=np.float32).reshape(3, 4),
            "INPUT1": np.full((3, 4), 0.5, dtype=np.float32),
        },
        id="fp32",
    ),
    pytest.param(
        "int_ops",
        {
            "A": np.array([[1, -2, 3], [2**30, 0, -7]], dtype=np.int32),
            "B": np.array([[2**40, -1, 0], [5, 6, 7]], dtype=np.int64),
        },
        id="int32-int64",
    ),
    pytest.param(
        "bytes_op",
        {"TEXT": np.array([[b"hello"], [b""], [b"\xff\x00bin"]], dtype=object)},
        id="bytes-with-non-utf8",
    ),
]


@pytest.mark.parametrize(("model", "arrays"), CASES)
def test_inference_through_tensorgate_equals_triton(
    front: ServerThread, upstream: Upstream, model: str, arrays: dict[str, np.ndarray]
) -> None:
    through, direct = infer_both(front, upstream, model, arrays)
    assert set(through) == set(direct)
    for name in direct:
        assert through[name].dtype == direct[name].dtype, name
        np.testing.assert_array_equal(through[name], direct[name])


def test_config_is_completed_from_the_upstream(front: ServerThread, upstream: Upstream) -> None:
    with tc.InferenceServerClient(front.address) as client:
        config = client.get_model_config("add_sub", as_json=True)["config"]
        meta = client.get_model_metadata("bytes_op", as_json=True)
        assert client.is_model_ready("add_sub")
    assert config["max_batch_size"] == 16  # the upstream's, not tensorgate's default
    assert "dynamic_batching" in config
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
        ("INPUT0", "TYPE_FP32", ["4"]),
        ("INPUT1", "TYPE_FP32", ["4"]),
    ]
    assert config["instance_group"][0]["kind"] == "KIND_MODEL"
    assert config["parameters"]["tensorgate.execution_provider"]["string_value"] == f"triton:{upstream.url}"
    # The access token is a credential: the served config does not show it.
    assert config["parameters"][f"tensorgate.triton.header.{TOKEN_HEADER}"]["string_value"] == "<redacted>"
    assert meta["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [("TEXT", "BYTES", ["-1", "1"])]
    assert [(t["name"], t["datatype"]) for t in meta["outputs"]] == [("UPPER", "BYTES"), ("LEN", "INT32")]


def _stats(url: str, model: str, headers: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(inference_count, execution_count, successful requests) of a model, as ModelStatistics reports them."""
    with tc.InferenceServerClient(url) as client:
        (stats,) = client.get_inference_statistics(model, headers=headers, as_json=True)["model_stats"]
    success = stats.get("inference_stats", {}).get("success", {}).get("count", 0)
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0)), int(success)


def test_each_batch_is_one_upstream_request(front: ServerThread, upstream: Upstream) -> None:
    token = {TOKEN_HEADER: TOKEN}  # PyTriton restricts statistics to holders of its access token
    up0, tg0 = _stats(upstream.url, "add_sub", token), _stats(front.address, "add_sub_batched")
    x = np.ones((1, 4), dtype=np.float32)
    request = encode_infer_request("add_sub_batched", [("INPUT0", x), ("INPUT1", x)])
    with grpc.insecure_channel(front.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        calls = [stub.ModelInfer.future(request, timeout=30) for _ in range(6)]
        for call in calls:
            np.testing.assert_array_equal(decode_infer_response(call.result())["OUTPUT0"], x * 2)
    up1, tg1 = _stats(upstream.url, "add_sub", token), _stats(front.address, "add_sub_batched")
    tg_rows, tg_batches = tg1[0] - tg0[0], tg1[1] - tg0[1]
    assert tg_rows == 6 and up1[0] - up0[0] == 6  # every row reached the upstream once
    assert up1[2] - up0[2] == tg_batches  # one upstream request per batch tensorgate ran
    assert tg_batches < 6  # the callers were batched (they all wait up to 300 ms for each other)


def test_upstream_invalid_argument_reaches_the_caller(front: ServerThread) -> None:
    x = np.ones((1, 3), dtype=np.float32)  # the upstream wants 4 per row; tensorgate's config lets any through
    request = encode_infer_request("add_sub_loose", [("INPUT0", x), ("INPUT1", x)])
    with grpc.insecure_channel(front.address) as channel, pytest.raises(grpc.RpcError) as info:
        GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model 'add_sub_loose' version 1: upstream Triton" in info.value.details()
    assert "unexpected shape for input" in info.value.details()  # Triton's own words


def test_deadline_shorter_than_the_upstream_is_deadline_exceeded(front: ServerThread) -> None:
    request = encode_infer_request("slow", [("X", np.ones((1, 1), dtype=np.float32))])
    with grpc.insecure_channel(front.address) as channel, pytest.raises(grpc.RpcError) as info:
        GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=0.3)  # the upstream takes 1 s
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_backend_sends_the_deadline_upstream(upstream: Upstream, tmp_path: Path) -> None:
    """Without tensorgate's own timer in the way: the upstream call itself ends at the batch's deadline."""
    config = mc.ModelConfig(name="slow", backend="tensorgate_triton")
    config.parameters["tensorgate.triton.url"].string_value = upstream.url
    backend = TritonBackend(config, tmp_path)
    try:
        batch_span = SpanContext(0x1111, 0x2222, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
        context = BatchContext(deadline=time.monotonic() + 0.2, trace=batch_span)
        with pytest.raises(DeadlineExceededError, match="upstream Triton .* did not answer within"):
            backend.execute({"X": np.ones((1, 1), dtype=np.float32)}, ["Y"], context)
        out = backend.execute({"X": np.full((2, 1), 3.0, dtype=np.float32)}, ["Y"])  # no deadline: waits
        np.testing.assert_array_equal(out["Y"], np.full((2, 1), 3.0, dtype=np.float32))
    finally:
        backend.close()


def test_stream_infer_through_tensorgate(front: ServerThread) -> None:
    requests = []
    for i in range(4):
        x = np.full((1, 4), float(i), dtype=np.float32)
        req = encode_infer_request("add_sub", [("INPUT0", x), ("INPUT1", x)], request_id=f"r{i}")
        requests.append(req)
    with grpc.insecure_channel(front.address) as channel:
        replies = list(GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests), timeout=30))
    assert [r.error_message for r in replies] == [""] * 4
    by_id = {r.infer_response.id: decode_infer_response(r.infer_response) for r in replies}
    for i in range(4):
        np.testing.assert_array_equal(by_id[f"r{i}"]["OUTPUT0"], np.full((1, 4), 2.0 * i, dtype=np.float32))
        np.testing.assert_array_equal(by_id[f"r{i}"]["OUTPUT1"], np.zeros((1, 4), dtype=np.float32))


def _stream_replies(address: str, requests: list[pb.ModelInferRequest]) -> list[pb.ModelStreamInferResponse]:
    with grpc.insecure_channel(address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        metadata = ((TOKEN_HEADER, TOKEN),)  # Triton direct restricts nothing for inference; harmless for us
        return list(stub.ModelStreamInfer(iter(requests), timeout=30, metadata=metadata))


def test_a_decoupled_model_streams_through_tensorgate_as_triton_streams_it(
    front: ServerThread, upstream: Upstream
) -> None:
    """PyTriton's decoupled `countdown`: over ModelStreamInfer, tensorgate relays exactly what Triton sends, final
    flags included (the empty final response only when asked for); over ModelInfer both refuse with
    UNIMPLEMENTED; the served config says the model is decoupled."""
    with tc.InferenceServerClient(front.address) as c:
        assert c.get_model_config("countdown").config.model_transaction_policy.decoupled
    requests = []
    for n, empty in ((3, False), (2, True)):
        req = encode_infer_request("countdown", [("X", np.full((1,), float(n), np.float32))], request_id=f"n{n}")
        if empty:
            req.parameters["triton_enable_empty_final_response"].bool_param = True
        requests.append(req)
    seen = []
    for address in (front.address, upstream.url):
        replies = _stream_replies(address, requests)
        assert [r.error_message for r in replies] == [""] * len(replies)
        per_request: dict[str, list[tuple[list[float] | None, bool]]] = {}
        for r in replies:
            response = r.infer_response
            y = decode_infer_response(response)["Y"].reshape(-1).tolist() if response.outputs else None
            final = response.parameters["triton_final_response"].bool_param
            per_request.setdefault(response.id, []).append((y, final))
        seen.append(per_request)
    assert seen[0] == seen[1]
    assert seen[0] == {
        "n3": [([3.0], False), ([6.0], False), ([9.0], False)],
        "n2": [([2.0], False), ([4.0], False), (None, True)],
    }
    for address in (front.address, upstream.url):
        with tc.InferenceServerClient(address) as c, pytest.raises(InferenceServerException) as info:
            x = tc.InferInput("X", [1], "FP32")
            x.set_data_from_numpy(np.ones((1,), np.float32))
            c.infer("countdown", [x])
        assert info.value.status() == str(grpc.StatusCode.UNIMPLEMENTED)


def test_mtls_in_front_of_a_plaintext_upstream(upstream: Upstream, tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    root = tmp_path / "models"
    write_remote(root, "add_sub", upstream.url)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    request = encode_infer_request("add_sub", [("INPUT0", x), ("INPUT1", x)])
    with ServerThread(root, **pki.server_settings()) as s:
        with secure_channel(s.address, pki.ca_path, pki.client("scorer")) as channel:
            reply = GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        np.testing.assert_array_equal(decode_infer_response(reply)["OUTPUT0"], x * 2)
        with secure_channel(s.address, pki.ca_path, None) as channel, pytest.raises(grpc.RpcError) as info:
            GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # no client certificate: no handshake


def test_upstream_down_is_unavailable_then_recovers(tmp_path: Path) -> None:
    own = Upstream(tmp_path / "pytriton")
    own.start()
    try:
        root = tmp_path / "models"
        write_remote(
            root,
            "add_sub",
            own.url,
            'parameters { key: "tensorgate.triton.health_interval_s" value { string_value: "0.2" } }',
        )
        x = np.ones((1, 4), dtype=np.float32)
        request = encode_infer_request("add_sub", [("INPUT0", x), ("INPUT1", x)])
        with ServerThread(root) as s, grpc.insecure_channel(s.address) as channel:
            stub = GRPCInferenceServiceStub(channel)
            ready = lambda: stub.ModelReady(pb.ModelReadyRequest(name="add_sub"), timeout=10).ready  # noqa: E731
            server_ready = lambda: stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready  # noqa: E731
            health = health_pb2_grpc.HealthStub(channel)

            def serving(service: str) -> bool:
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

            assert ready() and server_ready() and serving(SERVICE_NAME)
            stub.ModelInfer(request, timeout=30)
            own.stop()
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, timeout=20)  # a slow failure would be DEADLINE_EXCEEDED
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "model 'add_sub' version 1 is not ready: upstream Triton" in info.value.details()
            wait_for("ModelReady false", lambda: not ready())
            assert not server_ready()
            # Readiness probes on the inference service see it; liveness on the whole server ("") does not.
            wait_for("health of the inference service NOT_SERVING", lambda: not serving(SERVICE_NAME))
            assert serving("")
            own.start()
            wait_for("ModelReady true after the upstream restarted", ready)
            reply = stub.ModelInfer(request, timeout=30)
            np.testing.assert_array_equal(decode_infer_response(reply)["OUTPUT0"], x * 2)
            assert server_ready()
            wait_for("health of the inference service SERVING again", lambda: serving(SERVICE_NAME))
    finally:
        own.stop()


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        pytest.param(("url", ""), "must be the upstream's gRPC host:port", id="no-url"),
        pytest.param(
            ("connections", "0"), "'tensorgate.triton.connections' must be a number in 1..64", id="connections"
        ),
        pytest.param(  # not read as 0, which would mean no limit
            ("max_streams", "0.5"),
            "'tensorgate.triton.max_streams' must be a whole number in 0..1000000",
            id="fraction",
        ),
        pytest.param(("colour", "red"), "unknown parameter 'tensorgate.triton.colour'", id="unknown-parameter"),
        pytest.param(("ca_file", "missing.pem"), "missing.pem is not a readable file", id="missing-ca"),
    ],
)
def test_bad_parameters_fail_the_load_with_the_reason(tmp_path: Path, extra: tuple[str, str], reason: str) -> None:
    config = mc.ModelConfig(name="m", backend="tensorgate_triton")
    config.parameters["tensorgate.triton.url"].string_value = "127.0.0.1:1"
    config.parameters[f"tensorgate.triton.{extra[0]}"].string_value = extra[1]
    with pytest.raises(ModelLoadError, match=reason.replace("(", r"\(").replace(".", r"\.")):
        TritonBackend(config, tmp_path)


def test_upstream_started_after_tensorgate_is_picked_up(tmp_path: Path) -> None:
    """Start order does not matter: a remote model whose upstream is down at start loads once it comes up."""
    own = Upstream(tmp_path / "pytriton")
    try:
        root = tmp_path / "models"
        write_remote(root, "add_sub", own.url)
        x = np.ones((1, 4), dtype=np.float32)
        request = encode_infer_request("add_sub", [("INPUT0", x), ("INPUT1", x)])
        with ServerThread(root) as s, grpc.insecure_channel(s.address) as channel:
            stub = GRPCInferenceServiceStub(channel)
            assert not stub.ModelReady(pb.ModelReadyRequest(name="add_sub"), timeout=10).ready
            own.start()
            wait_for(
                "the remote model to load after its upstream started",
                lambda: stub.ModelReady(pb.ModelReadyRequest(name="add_sub"), timeout=10).ready,
                timeout=120,
            )
            reply = stub.ModelInfer(request, timeout=30)
            np.testing.assert_array_equal(decode_infer_response(reply)["OUTPUT0"], x * 2)
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    finally:
        own.stop()


def test_unreachable_upstream_fails_the_load(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_remote(root, "add_sub", "127.0.0.1:1")
    with ServerThread(root) as s, tc.InferenceServerClient(s.address) as client:
        index = client.get_model_repository_index(as_json=True)["models"]
        assert index[0]["state"] == "UNAVAILABLE"
        assert "upstream Triton 127.0.0.1:1 (model 'add_sub')" in index[0]["reason"]


# ----- what a real Triton can answer, scripted (tests/scripted_upstream.py) -------------------------------------


def _scripted_front(root: Path, url: str, *extra: str) -> None:
    write_remote(
        root, "front", url, 'parameters { key: "tensorgate.triton.model_name" value { string_value: "m" } }', *extra
    )


def test_an_upstream_with_a_full_queue_leaves_the_model_ready(tmp_path: Path) -> None:
    """Triton answers UNAVAILABLE when its queue is full; the upstream is there, so tensorgate must not report the
    model (and the server) not ready, which would make load balancers pull the replica under load."""
    x = np.ones((1, 2), np.float32)
    with ScriptedUpstream() as up:
        _scripted_front(tmp_path / "models", up.url)
        with ServerThread(tmp_path / "models") as s:
            client = tc.InferenceServerClient(s.address)
            try:
                up.script.error = (grpc.StatusCode.UNAVAILABLE, "Exceeds maximum queue size")
                with pytest.raises(InferenceServerException) as info:
                    client.infer("front", [_input(x)])
                assert info.value.status() == str(grpc.StatusCode.UNAVAILABLE)
                assert "Exceeds maximum queue size" in str(info.value.message())
                assert client.is_model_ready("front") and client.is_server_ready()
            finally:
                client.close()


def test_an_upstream_that_restricts_model_config_serves_without_batching(tmp_path: Path) -> None:
    """Triton with `--grpc-restricted-protocol=model-config:...` answers ModelConfig UNAVAILABLE "This protocol is
    restricted"; the metadata still describes the tensors, so the model loads unbatched (a warning says why and
    how to batch), where the load used to fail."""
    x = np.ones((1, 2), np.float32)
    with ScriptedUpstream() as up:
        up.script.config_error = (
            grpc.StatusCode.UNAVAILABLE,
            "This protocol is restricted, expecting header 'triton-grpc-protocol-admin-key'",
        )
        _scripted_front(tmp_path / "models", up.url)
        with ServerThread(tmp_path / "models") as s:
            client = tc.InferenceServerClient(s.address)
            try:
                assert client.is_model_ready("front")
                assert client.get_model_config("front").config.max_batch_size == 0
                np.testing.assert_array_equal(client.infer("front", [_input(x)]).as_numpy("Y"), x)
            finally:
                client.close()


def test_only_loads_that_failed_on_the_upstream_are_retried(tmp_path: Path) -> None:
    """A remote model whose upstream could not serve it yet (here: would not describe the model) loads once the
    upstream answers, unasked. One whose config.pbtxt contradicts the upstream, or whose upstream refused its
    credentials or its restricted protocol's header, is not loaded again and again for the same refusal (the
    upstream sees no more of its loads)."""
    root = tmp_path / "models"
    named = 'parameters { key: "tensorgate.triton.model_name" value { string_value: "m" } }'
    with ScriptedUpstream() as up, ScriptedUpstream() as guarded, ScriptedUpstream() as restricted:
        up.script.config_error = (grpc.StatusCode.UNAVAILABLE, "the model is not ready")
        guarded.script.metadata_error = (grpc.StatusCode.UNAUTHENTICATED, "no valid access token")
        # Triton's refusal of a restricted protocol without its header: UNAVAILABLE, and no less final for it.
        restricted.script.metadata_error = (
            grpc.StatusCode.UNAVAILABLE,
            "This protocol is restricted, expecting header 'triton-grpc-protocol-admin-key'",
        )
        write_remote(root, "refused", guarded.url, named)
        write_remote(root, "restricted", restricted.url, named)
        _scripted_front(root, up.url)
        write_remote(
            root,
            "contradicts",
            up.url,
            'parameters { key: "tensorgate.triton.model_name" value { string_value: "m" } }',
            "sequence_batching { }",
        )
        with ServerThread(root) as s:
            with tc.InferenceServerClient(s.address) as client:
                assert not client.is_model_ready("front") and not client.is_model_ready("contradicts")
            up.script.config_error = None
            with tc.InferenceServerClient(s.address) as client:
                wait_for("the server's retries to load the model", lambda: client.is_model_ready("front"), 30)
                loads, refusals = up.script.described, guarded.script.described
                restrictions = restricted.script.described
                assert s.run(s.app.repository.retry_remote()) == []
                assert up.script.described == loads  # "contradicts" was not tried again
                assert guarded.script.described == refusals  # nor "refused"
                assert restricted.script.described == restrictions  # nor "restricted"
                [row] = [m for m in client.get_model_repository_index().models if m.name == "contradicts"]
                assert "the upstream model is not a sequence model" in row.reason


def test_a_load_with_its_own_config_is_not_retried_from_the_disk(tmp_path: Path) -> None:
    """A RepositoryModelLoad that brought its own config and failed on the upstream is the caller's to repeat:
    retrying it unasked would load the config on disk instead (here, one that batches at most 2 rows)."""
    root = tmp_path / "models"
    with ScriptedUpstream() as up:
        up.script.config_error = (grpc.StatusCode.UNAVAILABLE, "the model is not ready")
        _scripted_front(root, up.url, "max_batch_size: 2")
        config = json.dumps(
            {
                "backend": "tensorgate_triton",
                "parameters": {
                    "tensorgate.triton.url": {"string_value": up.url},
                    "tensorgate.triton.model_name": {"string_value": "m"},
                },
            }
        )
        with ServerThread(root, model_control_mode="explicit") as s, tc.InferenceServerClient(s.address) as client:
            with pytest.raises(InferenceServerException, match="the model is not ready"):
                client.load_model("front", config=config)
            up.script.config_error = None
            assert s.run(s.app.repository.retry_remote()) == []
            assert not client.is_model_ready("front")
            client.load_model("front", config=config)  # the caller's retry
            assert client.get_model_config("front").config.max_batch_size == 8  # the upstream's, not the disk's


def test_batching_in_front_of_an_upstream_that_does_not(tmp_path: Path) -> None:
    """An upstream with max_batch_size 0 whose tensors have a variable first dimension takes the rows of a batch
    made here; one whose first dimension is fixed could not, and max_batch_size is refused with why."""
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    with ScriptedUpstream() as up:
        up.script.max_batch_size = 0
        _scripted_front(tmp_path / "models", up.url, "max_batch_size: 4", "dynamic_batching { }")
        with ServerThread(tmp_path / "models") as s, tc.InferenceServerClient(s.address) as client:
            np.testing.assert_array_equal(client.infer("front", [_input(x)]).as_numpy("Y"), x)
    fixed = UpstreamModel([TensorInfo("X", mc.TYPE_FP32, (3, 2))], [TensorInfo("Y", mc.TYPE_FP32, (3, 2))], 0)
    config = mc.ModelConfig(name="front", max_batch_size=4)
    with pytest.raises(ModelLoadError, match=r"does not batch, and its tensor 'X' has shape \[3, 2\]"):
        complete_config(config, fixed, max_batch_size_given=True)


def test_a_callers_deadline_longer_than_timeout_s_is_honoured(tmp_path: Path) -> None:
    """tensorgate.triton.timeout_s limits calls without a deadline; a caller that allows longer gets longer."""
    x = np.ones((1, 2), np.float32)
    with ScriptedUpstream() as up:
        _scripted_front(
            tmp_path / "models",
            up.url,
            'parameters { key: "tensorgate.triton.timeout_s" value { string_value: "0.5" } }',
        )
        with ServerThread(tmp_path / "models") as s:
            client = tc.InferenceServerClient(s.address)
            try:
                up.script.delay_s = 1.0
                result = client.infer("front", [_input(x)], client_timeout=10)
                np.testing.assert_array_equal(result.as_numpy("Y"), x)
            finally:
                client.close()


def _input(x: np.ndarray) -> tc.InferInput:
    item = tc.InferInput("X", list(x.shape), "FP32")
    item.set_data_from_numpy(x)
    return item
