"""Review 131: what a caller without any credential can make a bearer-token server spend.

grpc read and parsed a unary call's whole message before the token check at the RPC boundary ran, so callers
without a token could take the server's memory to gigabytes with requests it refused. server/rpc/token_gate.py
refuses them from their metadata, before the message is read.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos.tensors import decode_infer_response, encode_infer_request
from tensorgate.server.pipeline.types import InferResponse
from tensorgate.server.rpc import codec
from tensorgate.server.rpc.codec import LARGE_ELEMENTS
from tests.onnx_models import identity_model
from tests.pki import add_sub_request
from tests.process import ServeProcess
from tests.serving import ServerThread

TOKEN = "review-131-token"
NEEDS_TOKEN = "this server needs 'authorization: Bearer <token>' metadata"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def _policy(directory: Path, tokens: bool = True) -> Path:
    policy = {"rules": [{"identities": "scorer", "apis": ["inference", "health"], "models": ["add_sub"]}]}
    if tokens:
        policy["tokens"] = [{"sha256": hashlib.sha256(TOKEN.encode()).hexdigest(), "identity": "scorer"}]
    path = directory / "policy.json"
    path.write_text(json.dumps(policy))
    return path


def _large_request(mib: int) -> bytes:
    """A serialized add_sub request of about `mib` MiB (its shape is wrong; nothing should get to look)."""
    x = np.zeros((mib << 20) // 8, np.float32)  # two inputs of 4-byte elements: `mib` MiB in all
    request = pb.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="FP32", shape=[x.size // 16, 16])
        request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


def _calls(address: str) -> tuple[grpc.Channel, grpc.UnaryUnaryMultiCallable[bytes, bytes]]:
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)])
    return channel, channel.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's peak memory from /proc")
def test_requests_without_a_token_are_refused_before_the_server_takes_them_in(repo: Path, tmp_path: Path) -> None:
    """8 concurrent 32 MiB requests without a token took a server's peak memory up by about 400 MiB (each read,
    copied to bytes and parsed) before each was answered UNAUTHENTICATED; now none of them is read."""
    data = _large_request(32)
    args = ["--model-repository", str(repo), "--grpc-port", "0", "--auth-policy", str(_policy(tmp_path))]
    with ServeProcess(args) as server:
        server.wait_for_line("ready:")
        channel, call = _calls(server.address)
        with channel:
            before = _peak_rss_kib(server.proc.pid)
            codes: list[tuple[grpc.StatusCode, str]] = []

            def send() -> None:
                try:
                    call(data, timeout=60)
                    codes.append((grpc.StatusCode.OK, ""))
                except grpc.RpcError as exc:
                    codes.append((exc.code(), exc.details() or ""))

            senders = [threading.Thread(target=send) for _ in range(8)]
            for sender in senders:
                sender.start()
            for sender in senders:
                sender.join(90)
            grown_mib = (_peak_rss_kib(server.proc.pid) - before) / 1024
            assert codes == [(grpc.StatusCode.UNAUTHENTICATED, NEEDS_TOKEN)] * 8
            assert grown_mib < 128, f"the server's peak memory grew by {grown_mib:.0f} MiB for refused requests"
            # A caller with the token is served as before, on the same connection.
            stub = GRPCInferenceServiceStub(channel)
            reply = stub.ModelInfer(add_sub_request(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10)
            assert reply.model_name == "add_sub"
    # Counted as before; logged once (a caller could repeat it to flood the log), never the payload.
    assert server.output.count("refused a call without a bearer token") == 1, server.output


def test_a_request_over_the_size_limit_without_a_token_hears_about_the_token(repo: Path, tmp_path: Path) -> None:
    """The message is not read, so its size is never the answer: what the caller lacks is a token."""
    with ServerThread(repo, auth_policy=_policy(tmp_path), max_message_bytes=1 << 20) as s:
        channel, call = _calls(s.address)
        with channel:
            with pytest.raises(grpc.RpcError) as info:
                call(_large_request(2), timeout=10)
            assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, NEEDS_TOKEN)
            with pytest.raises(grpc.RpcError) as info:  # with the token, the size limit answers
                call(_large_request(2), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert s.app.auth.denials[("anonymous", "missing token")] == 1


def test_an_unknown_token_is_refused_unread_and_a_token_added_by_a_reload_serves(repo: Path, tmp_path: Path) -> None:
    policy = _policy(tmp_path)
    with ServerThread(repo, auth_policy=policy) as s:
        channel, call = _calls(s.address)
        stub = GRPCInferenceServiceStub(channel)
        with channel:
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(add_sub_request(), metadata=(("authorization", "Bearer wrong"),), timeout=10)
            assert (info.value.code(), info.value.details()) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "invalid bearer token",
            )
            assert s.app.auth.denials[("anonymous", "invalid token")] == 1
            # Health and metadata RPCs of the inference service need the token too; the probe services do not.
            with pytest.raises(grpc.RpcError) as info:
                stub.ServerLive(pb.ServerLiveRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            health: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/grpc.health.v1.Health/Check")
            assert health(b"", timeout=10)
            # The gate decides from the policy in force: a token a reload adds is served at once after it.
            data = json.loads(policy.read_text())
            data["tokens"].append({"sha256": hashlib.sha256(b"wrong").hexdigest(), "identity": "scorer"})
            policy.write_text(json.dumps(data))
            for _ in range(100):
                try:
                    stub.ModelInfer(add_sub_request(), metadata=(("authorization", "Bearer wrong"),), timeout=10)
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                    threading.Event().wait(0.1)
            else:
                raise AssertionError("the token the reloaded policy added was never accepted")


def test_a_policy_without_tokens_still_serves_every_caller_as_anonymous(repo: Path, tmp_path: Path) -> None:
    """No tokens in the policy: callers are `anonymous` and nothing is refused for want of one."""
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"rules": [{"identities": "anonymous", "apis": ["inference"], "models": ["add_sub"]}]}))
    with ServerThread(repo, auth_policy=path) as s, grpc.insecure_channel(s.address) as channel:
        reply = GRPCInferenceServiceStub(channel).ModelInfer(add_sub_request(), timeout=10)
        assert reply.model_name == "add_sub"


# ----- a large BYTES answer is framed off the event loop ------------------------------------------------------


@pytest.fixture
def spied_encodes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(thread name, elements of its largest output) for each response the server encodes: the thread tells
    whether other callers waited for it."""
    seen: list[tuple[str, int]] = []
    encode = codec.encode_infer_response

    def spy(resp: InferResponse, shared: Any = None) -> pb.ModelInferResponse:
        seen.append((threading.current_thread().name, max(a.size for _, _, a in resp.outputs)))
        return encode(resp, shared)

    monkeypatch.setattr(codec, "encode_infer_response", spy)
    return seen


def _text_request(count: int) -> pb.ModelInferRequest:
    values = np.array([f"{i % 100:02d}".encode() for i in range(count)], dtype=object).reshape(1, count)
    return encode_infer_request("text", [("INPUT0", values)])


def test_a_large_bytes_answer_is_framed_off_the_event_loop(
    tmp_path: Path, spied_encodes: list[tuple[str, int]]
) -> None:
    """Framing BYTES costs about 1 us an element and ran on the event loop: one request of 5 million short strings
    (32 MiB) held every other caller for 6 s. Past LARGE_ELEMENTS it runs on a worker thread, as decoding does."""
    root = tmp_path / "models"
    identity_model(root / "text" / "1" / "model.onnx", "BYTES", shape=("batch", "n"))
    large = LARGE_ELEMENTS + 1000
    with ServerThread(root) as s, grpc.insecure_channel(s.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        small = decode_infer_response(stub.ModelInfer(_text_request(8), timeout=30))["OUTPUT0"]
        assert small.reshape(-1).tolist()[:3] == [b"00", b"01", b"02"]
        reply = decode_infer_response(stub.ModelInfer(_text_request(large), timeout=60))["OUTPUT0"]
        assert reply.shape == (1, large) and reply[0, -1] == f"{(large - 1) % 100:02d}".encode()
        (streamed,) = list(stub.ModelStreamInfer(iter([_text_request(large)]), timeout=60))
        assert not streamed.error_message
        assert decode_infer_response(streamed.infer_response)["OUTPUT0"].shape == (1, large)
    loop = s._thread.name
    assert [(thread == loop, size) for thread, size in spied_encodes] == [(True, 8), (False, large), (False, large)]
