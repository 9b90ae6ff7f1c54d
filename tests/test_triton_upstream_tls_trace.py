"""The remote Triton backend's TLS/mTLS to the upstream, trace context and deadline propagation, with a second
tensorgate server as the upstream (it speaks Triton's protocol): PyTriton exposes neither TLS nor the request
headers it receives, so tests/test_triton_backend.py cannot check these against it.

Both servers run in this process with their own injected TracerProvider, so each side's spans are read apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc import aio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tensorgate.protos import GRPCInferenceServiceStub, add_GRPCInferenceServiceServicer_to_server
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos.tensors import decode_infer_response, encode_infer_request
from tensorgate.server import TensorgateServer
from tensorgate.server.auth import certs
from tensorgate.server.pipeline.types import InferRequest, InferResponse
from tests.onnx_models import ADD_SUB_CONFIG, add_sub_model, slow_model, write_config
from tests.otlp_sinks import grpc_sink
from tests.pki import Pki, add_sub_request
from tests.scripted_upstream import _Servicer
from tests.serving import ServerThread
from tests.test_tracing import Collector
from tests.test_triton_backend import wait_for, write_remote

RPC_SPAN = "inference.GRPCInferenceService/ModelInfer"
UPSTREAM_QUEUE_S = 3.0
"""How long the upstream's `slow` model holds a lone request in its queue: longer than any caller here waits."""


def param(key: str, value: str | Path) -> str:
    """One `tensorgate.triton.<key>` parameter line of a remote model's config.pbtxt."""
    return f'parameters {{ key: "tensorgate.triton.{key}" value {{ string_value: "{value}" }} }}'


def traced(server: ServerThread) -> InMemorySpanExporter:
    """Give the (not yet started) server its own provider; returns the exporter that keeps its spans."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server.app = TensorgateServer(server.settings, tracer_provider=provider)
    return exporter


@pytest.fixture(scope="module")
def upstream_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`add_sub` (FP32 [-1, 16]) and `slow`, which waits UPSTREAM_QUEUE_S in its batcher before running."""
    root = tmp_path_factory.mktemp("upstream-models")
    add_sub_model(root / "add_sub" / "1" / "model.onnx")
    write_config(root, "add_sub", 'name: "add_sub"\n' + ADD_SUB_CONFIG)
    slow_model(root / "slow" / "1" / "model.onnx", size=16, repeats=2)
    delay_us = int(UPSTREAM_QUEUE_S * 1e6)
    write_config(
        root,
        "slow",
        'name: "slow"\nbackend: "onnxruntime"\nmax_batch_size: 8\n'
        f"dynamic_batching {{ preferred_batch_size: [8] max_queue_delay_microseconds: {delay_us} }}\n",
    )
    return root


def front_infer(front: ServerThread, model: str = "add_sub", **call: Any) -> dict[str, np.ndarray]:
    with grpc.insecure_channel(front.address) as channel:
        reply = GRPCInferenceServiceStub(channel).ModelInfer(add_sub_request(model, rows=3), timeout=30, **call)
    return decode_infer_response(reply)


def index_row(server: ServerThread, model: str) -> dict[str, str]:
    with tc.InferenceServerClient(server.address) as client:
        rows = client.get_model_repository_index(as_json=True)["models"]
    (row,) = [r for r in rows if r["name"] == model]
    return dict(row)


# ----- TLS and mutual TLS to the upstream ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["tls", "mtls", "server-name"])
def test_inference_over_tls_equals_the_upstreams_own_answer(upstream_repo: Path, tmp_path: Path, mode: str) -> None:
    pki = Pki(tmp_path / "pki")
    mutual = mode == "mtls"
    client = pki.client("tensorgate-front") if mutual else None
    extra = [param("ca_file", pki.ca_path)]
    direct_options: list[tuple[str, Any]] = []
    if mode == "server-name":  # the upstream's certificate does not name the address the front dials
        certs.make_server_cert(pki.ca, names=("upstream.internal",)).write(pki.server_cert, pki.server_key)
        extra.append(param("server_name", "upstream.internal"))
        direct_options.append(("grpc.ssl_target_name_override", "upstream.internal"))
    with ServerThread(upstream_repo, **pki.server_settings(mutual=mutual)) as upstream:
        root = tmp_path / "front-models"
        if client is not None:
            extra += [param("cert_file", client[0]), param("key_file", client[1].name)]  # relative: model dir
            (root / "add_sub").mkdir(parents=True)
            (root / "add_sub" / client[1].name).write_bytes(client[1].read_bytes())
        write_remote(root, "add_sub", upstream.address, *extra)
        with ServerThread(root) as front:
            through = front_infer(front)
            creds = grpc.ssl_channel_credentials(
                pki.ca_path.read_bytes(),
                client[1].read_bytes() if client else None,
                client[0].read_bytes() if client else None,
            )
            with grpc.secure_channel(upstream.address, creds, options=direct_options) as channel:
                direct = decode_infer_response(
                    GRPCInferenceServiceStub(channel).ModelInfer(add_sub_request("add_sub", rows=3), timeout=30)
                )
            row = index_row(front, "add_sub")
    assert row["state"] == "READY"
    assert set(through) == set(direct) == {"OUTPUT0", "OUTPUT1"}
    for name in direct:
        assert through[name].dtype == direct[name].dtype
        np.testing.assert_array_equal(through[name], direct[name])
    x = np.arange(48, dtype=np.float32).reshape(3, 16)
    np.testing.assert_array_equal(through["OUTPUT0"], x * 2)


FAILURES = {
    # case: (what the upstream serves, what the front's model sets, words the load's reason must hold)
    "wrong-ca": ("mtls", ("ca_file:other", "cert_file", "key_file"), "CERTIFICATE_VERIFY_FAILED"),
    "wrong-server-name": ("tls", ("ca_file", "server_name:elsewhere.internal"), "Hostname Verification Check failed"),
    "no-client-cert": ("mtls", ("ca_file",), "set 'tensorgate.triton.cert_file' and 'tensorgate.triton.key_file'"),
    "untrusted-client-cert": (
        "mtls",
        ("ca_file", "cert_file:other", "key_file:other"),
        "does the upstream trust the certificate in 'tensorgate.triton.cert_file'",
    ),
    "plaintext-to-tls": ("tls", (), "set 'tensorgate.triton.tls' or 'tensorgate.triton.ca_file'"),
    "tls-to-plaintext": ("plaintext", ("ca_file",), "WRONG_VERSION_NUMBER"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_a_failed_handshake_fails_the_load_with_the_reason(upstream_repo: Path, tmp_path: Path, case: str) -> None:
    serves, settings, reason = FAILURES[case]
    pki, other = Pki(tmp_path / "pki"), Pki(tmp_path / "other-pki", ca_name="some other CA")
    mine, theirs = pki.client("tensorgate-front"), other.client("tensorgate-front")
    files = {
        "ca_file": pki.ca_path,
        "ca_file:other": other.ca_path,
        "cert_file": mine[0],
        "key_file": mine[1],
        "cert_file:other": theirs[0],
        "key_file:other": theirs[1],
    }
    extra = [param(k.split(":")[0], files.get(k) or k.split(":")[1]) for k in settings]
    upstream_tls = {} if serves == "plaintext" else pki.server_settings(mutual=serves == "mtls")
    with ServerThread(upstream_repo, **upstream_tls) as upstream:
        root = tmp_path / "front-models"
        write_remote(root, "add_sub", upstream.address, param("timeout_s", "20"), *extra)
        started = time.monotonic()
        with ServerThread(root) as front:
            elapsed = time.monotonic() - started
            row = index_row(front, "add_sub")
            with grpc.insecure_channel(front.address) as channel, pytest.raises(grpc.RpcError) as info:
                GRPCInferenceServiceStub(channel).ModelInfer(add_sub_request("add_sub"), timeout=10)
    assert row["state"] == "UNAVAILABLE"
    assert f"upstream Triton {upstream.address} (model 'add_sub')" in row["reason"]
    assert reason in row["reason"]
    assert elapsed < 15  # a handshake failure is answered at once, not after the 20 s call limit
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


# ----- trace context and deadline --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(upstream_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A plaintext upstream and a front fronting its `add_sub` and `slow`, each with its own span exporter; the
    upstream records the deadline of each request it decodes (`deadlines`, as time.monotonic() of this process)."""
    upstream = ServerThread(upstream_repo)
    upstream_spans = traced(upstream)
    deadlines: list[tuple[str, float | None]] = []
    handler = upstream.app._handler  # a spy on what the upstream decoded: it still serves every call
    infer = handler.infer

    async def spy(req: InferRequest) -> InferResponse:
        deadlines.append((req.model, req.deadline))
        return await infer(req)

    with upstream:
        handler.infer = spy  # type: ignore[method-assign]
        root = tmp_path_factory.mktemp("front-models")
        write_remote(root, "add_sub", upstream.address)
        write_remote(root, "slow", upstream.address)
        front = ServerThread(root)
        front_spans = traced(front)
        with front:
            yield {
                "upstream": upstream,
                "front": front,
                "upstream_spans": upstream_spans,
                "front_spans": front_spans,
                "deadlines": deadlines,
            }


def spans_of(exporter: InMemorySpanExporter, trace_id: int, name: str) -> list[ReadableSpan]:
    return [
        s
        for s in exporter.get_finished_spans()
        if s.name == name and s.context is not None and s.context.trace_id == trace_id
    ]


def test_upstream_span_is_a_child_of_the_fronts_batch_span(pair: dict[str, Any]) -> None:
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    caller = [("traceparent", f"00-{trace_id}-{caller_span}-01"), ("tracestate", "caller=k1")]
    out = front_infer(pair["front"], metadata=caller)
    x = np.arange(48, dtype=np.float32).reshape(3, 16)
    np.testing.assert_array_equal(out["OUTPUT0"], x * 2)
    tid = int(trace_id, 16)
    front, upstream = pair["front_spans"], pair["upstream_spans"]
    wait_for("the upstream's server span", lambda: bool(spans_of(upstream, tid, RPC_SPAN)), timeout=10)
    wait_for("the front's batch span", lambda: bool(spans_of(front, tid, "batch add_sub")), timeout=10)

    (request,) = spans_of(front, tid, RPC_SPAN)
    assert request.parent is not None and request.parent.is_remote
    assert request.parent.span_id == int(caller_span, 16)  # the front's request span: child of the caller

    (batch,) = spans_of(front, tid, "batch add_sub")
    assert batch.context is not None and request.context is not None
    assert batch.parent is not None and batch.parent.span_id == request.context.span_id

    (served,) = spans_of(upstream, tid, RPC_SPAN)  # same trace id: the upstream joined the caller's trace
    assert served.parent is not None and served.parent.is_remote
    assert served.parent.span_id == batch.context.span_id  # ... under the front's batch span
    assert served.context is not None and served.context.trace_state.get("caller") == "k1"  # tracestate too
    assert served.attributes is not None and served.attributes["rpc.response.status_code"] == "OK"
    (upstream_batch,) = spans_of(upstream, tid, "batch add_sub")
    assert served.context is not None and upstream_batch.parent is not None
    assert upstream_batch.parent.span_id == served.context.span_id


def test_the_callers_deadline_reaches_the_upstream(pair: dict[str, Any]) -> None:
    deadlines: list[tuple[str, float | None]] = pair["deadlines"]
    deadlines.clear()
    timeout = 0.5
    request = encode_infer_request("slow", [("INPUT0", np.ones((1, 16), dtype=np.float32))])
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        with grpc.insecure_channel(pair["front"].address) as channel:
            GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=timeout)
    elapsed = time.monotonic() - started
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < timeout + 1.0  # not the upstream's UPSTREAM_QUEUE_S
    (model, upstream_deadline), *_ = deadlines
    assert model == "slow"
    # The upstream's gRPC layer saw the caller's deadline, less the front's margin (5 ms by default).
    assert upstream_deadline is not None
    # (Within a loaded machine's scheduling delays: without it the upstream would get the 60 s timeout_s.)
    assert abs(upstream_deadline - (started + timeout)) < 0.25


@pytest.mark.parametrize("rpc", ["ModelInfer", "ModelStreamInfer"])
def test_an_unsampled_callers_decision_reaches_the_upstream(pair: dict[str, Any], rpc: str) -> None:
    """Unsampled, the front records nothing and tells the upstream so; over a stream, the front makes no
    per-request span at all, and the stream's own context carries the decision."""
    before = {s.context.trace_id for s in pair["upstream_spans"].get_finished_spans() if s.context is not None}
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    metadata = [("traceparent", f"00-{trace_id}-{caller_span}-00")]
    if rpc == "ModelInfer":
        front_infer(pair["front"], metadata=metadata)
    else:
        with grpc.insecure_channel(pair["front"].address) as channel:
            stream = GRPCInferenceServiceStub(channel).ModelStreamInfer(
                iter([add_sub_request("add_sub", rows=3)] * 2), timeout=30, metadata=metadata
            )
            assert [r.error_message for r in stream] == ["", ""]
    time.sleep(0.5)  # the upstream's span, if any, ends just after the reply
    assert not spans_of(pair["front_spans"], int(trace_id, 16), RPC_SPAN)  # the front honours the caller
    new = [
        s
        for s in pair["upstream_spans"].get_finished_spans()
        if s.name == "batch add_sub" and s.context is not None and s.context.trace_id not in before
    ]
    assert new == []  # the upstream records nothing either


@pytest.mark.parametrize("rpc", ["ModelInfer", "ModelStreamInfer"])
def test_with_tracing_off_a_sampled_callers_context_reaches_the_upstream_as_it_came(
    upstream_repo: Path, tmp_path: Path, rpc: str
) -> None:
    """TraceSetting's trace_level OFF: the front traces nothing, and passes the caller's traceparent and tracestate
    upstream unchanged, so that the upstream joins the caller's trace under the caller's span. (It sent them with
    the sampled flag cleared, and the upstream, sampling parent-based, dropped the caller's trace.)"""
    upstream = ServerThread(upstream_repo)
    upstream_spans = traced(upstream)
    exported = Collector()
    with upstream, grpc_sink(lambda body, h: exported.keep(ExportTraceServiceRequest.FromString(body), h)) as collector:
        root = tmp_path / "front-models"
        write_remote(root, "add_sub", upstream.address)
        with ServerThread(root, otlp_endpoint=collector, otlp_insecure=True) as front:
            with tc.InferenceServerClient(front.address) as client:
                client.update_trace_settings(settings={"trace_level": "OFF"})
            trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
            metadata = [("traceparent", f"00-{trace_id}-{caller_span}-01"), ("tracestate", "caller=k1")]
            if rpc == "ModelInfer":
                front_infer(front, metadata=metadata)
            else:
                with grpc.insecure_channel(front.address) as channel:
                    stream = GRPCInferenceServiceStub(channel).ModelStreamInfer(
                        iter([add_sub_request("add_sub", rows=3)] * 2), timeout=30, metadata=metadata
                    )
                    assert [r.error_message for r in stream] == ["", ""]
            tid = int(trace_id, 16)
            wait_for("the upstream's server span", lambda: bool(spans_of(upstream_spans, tid, RPC_SPAN)), timeout=10)
    served = spans_of(upstream_spans, tid, RPC_SPAN)
    for span in served:  # one per batch the front sent (the stream's two requests may share one)
        assert span.parent is not None and span.parent.is_remote
        assert span.parent.span_id == int(caller_span, 16)  # under the caller's own span
        assert span.context is not None and span.context.trace_state.get("caller") == "k1"
    assert [s.name for s in exported.spans() if s.trace_id.hex() == trace_id] == []  # the front traced nothing


# ----- a decoupled model over TLS, loaded with its upstream CA as an uploaded file --------------------------


@contextlib.contextmanager
def tls_decoupled_upstream(pki: Pki) -> Iterator[str]:
    """tests/scripted_upstream.py's decoupled model "m" behind TLS (its ScriptedUpstream serves plaintext only);
    yields its address."""
    script = _Servicer()
    script.decoupled = True
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="tls-upstream", daemon=True)
    thread.start()

    async def start() -> tuple[aio.Server, int]:
        server = aio.server()
        add_GRPCInferenceServiceServicer_to_server(script, server)
        creds = grpc.ssl_server_credentials([(pki.server_key.read_bytes(), pki.server_cert.read_bytes())])
        port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_a_decoupled_stream_needs_no_upstream_tls_file_after_the_load(tmp_path: Path) -> None:
    """RepositoryModelLoad's uploaded files live only for the load; the stream channel, made on the first stream
    request, uses the CA as it was read then. (The override keeps the upstream and model the repository's
    config.pbtxt names: it may not name others unless --allowed-upstreams allows it.)"""
    pki = Pki(tmp_path / "pki")
    root = tmp_path / "front"
    root.mkdir()
    with tls_decoupled_upstream(pki) as url, ServerThread(root, model_control_mode="explicit") as front:
        (root / "remote").mkdir()
        url_parameter = f'parameters {{ key: "tensorgate.triton.url" value {{ string_value: "{url}" }} }}'
        name_parameter = 'parameters { key: "tensorgate.triton.model_name" value { string_value: "m" } }'
        (root / "remote" / "config.pbtxt").write_text(
            f'backend: "tensorgate_triton"\n{url_parameter}\n{name_parameter}\n'
        )
        config = {
            "name": "remote",
            "backend": "tensorgate_triton",
            "parameters": {
                "tensorgate.triton.url": {"string_value": url},
                "tensorgate.triton.model_name": {"string_value": "m"},
                "tensorgate.triton.ca_file": {"string_value": "upstream-ca.pem"},
            },
        }
        load = pb.RepositoryModelLoadRequest(model_name="remote")
        load.parameters["config"].string_param = json.dumps(config)
        load.parameters["file:upstream-ca.pem"].bytes_param = pki.ca_path.read_bytes()
        x = np.array([[2.0, 0.0]], np.float32)
        request = pb.ModelInferRequest(model_name="remote", id="r1")
        request.inputs.add(name="X", datatype="FP32", shape=[1, 2])
        request.raw_input_contents.append(x.tobytes())
        with grpc.insecure_channel(front.address) as channel:
            stub = GRPCInferenceServiceStub(channel)
            stub.RepositoryModelLoad(load, timeout=30)
            replies = list(stub.ModelStreamInfer(iter([request]), timeout=30))
    assert [r.error_message for r in replies] == ["", ""]
    for i, reply in enumerate(replies, start=1):  # n = 2 responses, Y = X * i
        np.testing.assert_array_equal(np.frombuffer(reply.infer_response.raw_output_contents[0], np.float32), x[0] * i)
