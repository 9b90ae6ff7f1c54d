"""Review 136: a KServe health probe refused for its token, before its message was read (rpc/token_gate.py), must
stay untraced, as every health call is at the RPC boundary (rpc/errors.py): a load balancer polling ServerReady
without a token would otherwise leave a trace every few seconds."""

from __future__ import annotations

import grpc
import pytest

from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tests import test_outcomes_review_135 as review_135
from tests.test_outcomes_review_135 import INFER_SPAN, Observed, access_lines, ident, spans_named
from tests.test_tracing import Caller

collector = review_135.collector
observed = review_135.observed
"""Review 135's server under a token policy, tracing to a real OTLP receiver, access lines on."""


def test_a_health_probe_refused_for_its_token_is_not_traced(
    observed: Observed, caplog: pytest.LogCaptureFixture
) -> None:
    server, receiver = observed.server, observed.receiver
    sampled = (("traceparent", Caller.new().traceparent),)
    with grpc.insecure_channel(server.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        probes = [
            lambda: stub.ServerLive(pb.ServerLiveRequest(), metadata=sampled, timeout=10),
            lambda: stub.ServerReady(pb.ServerReadyRequest(), metadata=sampled, timeout=10),
            lambda: stub.ModelReady(pb.ModelReadyRequest(name="ident"), metadata=sampled, timeout=10),
            # The control: an inference call refused alike has its span, so the receiver does get spans.
            lambda: stub.ModelInfer(ident("anonymous"), metadata=sampled, timeout=10),
        ]
        for probe in probes:
            with pytest.raises(grpc.RpcError) as info:
                probe()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    lines = access_lines(caplog)
    for rpc in ("ServerLive", "ServerReady", "ModelReady", "ModelInfer"):  # each has its line, once
        assert sum(line.startswith(f"{rpc} ") for line in lines) == 1, lines
    observed.stop()
    assert len(spans_named(receiver, INFER_SPAN)) == 1
    names = [s.name for s in receiver.spans()]
    assert not [name for name in names if name.endswith(("Live", "Ready"))], names
