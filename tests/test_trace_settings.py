"""Triton's trace_count and log_frequency through tritonclient's update_trace_settings, against a real OTLP sink:
perf_analyzer's `--trace-count` and `--log-frequency` send them, and a refusal aborted its whole run."""

from __future__ import annotations

import secrets
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.trace.v1 import trace_pb2
from tritonclient.utils import InferenceServerException

from tests.otlp_sinks import grpc_sink
from tests.serving import ServerThread

INFER_SPAN = "inference.GRPCInferenceService/ModelInfer"


class Sink:
    """The spans of every export the sink received (decoded once the server has stopped and flushed)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self._lock = threading.Lock()

    def keep(self, body: bytes, headers: dict[str, str]) -> None:
        with self._lock:
            self.bodies.append(body)

    def spans(self) -> list[trace_pb2.Span]:
        with self._lock:
            requests = [otlp.ExportTraceServiceRequest.FromString(b) for b in self.bodies]
        return [s for r in requests for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]


def _request_id(span: trace_pb2.Span) -> str:
    return next((a.value.string_value for a in span.attributes if a.key == "tensorgate.request.id"), "")


def _settings(response: object) -> dict[str, list[str]]:
    return {k: list(v.value) for k, v in response.settings.items()}  # type: ignore[attr-defined]


def _infer(client: triton.InferenceServerClient, request_id: str, traceparent: str | None = None) -> None:
    inp = triton.InferInput("INPUT0", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    headers = {"traceparent": traceparent} if traceparent is not None else None
    client.infer("identity_fp32", [inp], request_id=request_id, headers=headers)


def test_trace_count_traces_that_many_inference_requests_then_none(repo: Path) -> None:
    """trace_count 3: the next 3 inference requests are traced and TraceSetting reads back what is left (reading
    it is no inference request: it takes none); then nothing is, not even a sampled caller's request; sent
    without a value it goes back to -1 (no limit). The last request counted keeps its queue and execute spans."""
    sink = Sink()
    caller_trace = secrets.token_hex(16)
    with grpc_sink(sink.keep) as endpoint:
        with ServerThread(repo, otlp_endpoint=endpoint, otlp_insecure=True) as server:
            client = triton.InferenceServerClient(server.address)
            try:
                start = _settings(client.get_trace_settings())
                assert start["trace_count"] == ["-1"] and start["log_frequency"] == ["0"]
                changed = _settings(client.update_trace_settings(settings={"trace_count": "3", "log_frequency": "10"}))
                assert changed["trace_count"] == ["3"] and changed["log_frequency"] == ["10"]
                left = []
                for i in range(5):
                    _infer(client, f"counted-{i}")
                    left.append(_settings(client.get_trace_settings())["trace_count"][0])
                assert left == ["2", "1", "0", "0", "0"]
                _infer(client, "sampled-caller-after-the-count", f"00-{caller_trace}-{secrets.token_hex(8)}-01")
                reset = _settings(client.update_trace_settings(settings={"trace_count": None}))
                assert reset["trace_count"] == ["-1"] and reset["log_frequency"] == ["10"]
                _infer(client, "after-reset")
                assert _settings(client.get_trace_settings())["trace_count"] == ["-1"]
            finally:
                client.close()
    spans = sink.spans()
    infer_spans = {_request_id(s): s for s in spans if s.name == INFER_SPAN}
    assert set(infer_spans) == {"counted-0", "counted-1", "counted-2", "after-reset"}
    last = infer_spans["counted-2"]
    children = {s.name for s in spans if s.parent_span_id == last.span_id and s.trace_id == last.trace_id}
    assert {"queue", "execute"} <= children
    assert not [s for s in spans if s.trace_id.hex() == caller_trace]  # not even its queue and execute spans


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        pytest.param({"trace_count": "-2"}, "trace_count must be a whole number in -1..2147483647", id="count-below"),
        pytest.param({"trace_count": "2147483648"}, "trace_count must be a whole number in -1", id="count-int32"),
        pytest.param({"trace_count": "1.5"}, "trace_count must be a whole number", id="count-fraction"),
        pytest.param({"trace_count": ["1", "2"]}, "trace_count' takes one value", id="count-two"),
        pytest.param({"log_frequency": "-1"}, "log_frequency must be a whole number in 0..4294967295", id="freq-neg"),
        pytest.param({"log_frequency": "ten"}, "log_frequency must be a whole number", id="freq-text"),
    ],
)
def test_bad_trace_count_and_log_frequency_are_refused(repo: Path, settings: dict[str, object], message: str) -> None:
    with grpc_sink(lambda body, headers: None) as endpoint:
        with ServerThread(repo, otlp_endpoint=endpoint, otlp_insecure=True) as server:
            client = triton.InferenceServerClient(server.address)
            try:
                with pytest.raises(InferenceServerException) as info:
                    client.update_trace_settings(settings={"trace_rate": "5", **settings})
                assert info.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
                assert message in str(info.value.message())
                after = _settings(client.get_trace_settings())  # refused whole
                assert after["trace_rate"] == ["1"] and after["trace_count"] == ["-1"]
                assert after["log_frequency"] == ["0"]
            finally:
                client.close()


def test_calls_refused_at_the_door_take_none_of_the_trace_count(repo: Path, tmp_path: Path) -> None:
    """Anonymous calls against a policy with tokens are refused (UNAUTHENTICATED) before they run: a flood of them
    must not spend trace_count, or no request that runs would be traced."""
    import hashlib
    import json

    token = "tok-" + secrets.token_hex(8)
    policy = {
        "rules": [{"identities": "ops", "apis": ["inference", "metadata", "settings"]}],
        "tokens": [{"sha256": hashlib.sha256(token.encode()).hexdigest(), "identity": "ops"}],
    }
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    headers = {"authorization": f"Bearer {token}"}
    sink = Sink()
    with grpc_sink(sink.keep) as endpoint:
        with ServerThread(repo, otlp_endpoint=endpoint, otlp_insecure=True, auth_policy=tmp_path / "policy.json") as s:
            client = triton.InferenceServerClient(s.address)
            try:
                client.update_trace_settings(settings={"trace_count": "1"}, headers=headers)
                for i in range(3):
                    with pytest.raises(InferenceServerException) as info:
                        _infer(client, f"refused-{i}")
                    assert info.value.status() == str(grpc.StatusCode.UNAUTHENTICATED)
                assert _settings(client.get_trace_settings(headers=headers))["trace_count"] == ["1"]
                inp = triton.InferInput("INPUT0", [1, 4], "FP32")
                inp.set_data_from_numpy(np.ones((1, 4), np.float32))
                client.infer("identity_fp32", [inp], request_id="let-in", headers=headers)
                assert _settings(client.get_trace_settings(headers=headers))["trace_count"] == ["0"]
            finally:
                client.close()
    assert "let-in" in {_request_id(span) for span in sink.spans() if span.name == INFER_SPAN}
