"""What a refused unary call carries besides its code and message, now that the RPC boundary sets the status and
returns (errors.unary) instead of aborting: the pushback that stops a client's retries of a call that ran (a load
that was attempted), and none on a call that did not."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tests.onnx_models import identity_model, write_config
from tests.serving import ServerThread

PUSHBACK = ("grpc-retry-pushback-ms", "-1")


def _trailers(error: grpc.RpcError) -> set[tuple[str, str | bytes]]:
    return {(m.key, m.value) for m in error.trailing_metadata() or ()}


def test_a_failed_load_stops_retries_and_a_refusal_that_ran_nothing_does_not(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    identity_model(repo / "broken" / "1" / "model.onnx", "FP32")
    write_config(repo, "broken", 'backend: "python"\n')
    with ServerThread(repo, model_control_mode="explicit") as server, grpc.insecure_channel(server.address) as ch:
        stub = GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as failed:
            stub.RepositoryModelLoad.with_call(pb.RepositoryModelLoadRequest(model_name="broken"), timeout=30)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
        assert (failed.value.details() or "").startswith("failed to load model 'broken'")
        assert PUSHBACK in _trailers(failed.value)
        with pytest.raises(grpc.RpcError) as missing:
            stub.ModelMetadata.with_call(pb.ModelMetadataRequest(name="absent"), timeout=30)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND, missing.value.details()
        assert missing.value.details() == "model 'absent' is not found in the repository"
        assert PUSHBACK not in _trailers(missing.value)
        # The server serves on after both.
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
