"""The process as a supervisor or a terminal meets it: SIGHUP (a closed terminal, supervisors that send it to stop)
drains like SIGTERM instead of killing the process with calls in flight, and the startup log names the address a
client can use, also for `--grpc-port 0` on an IPv6 host."""

from __future__ import annotations

import re
import signal
import socket
from pathlib import Path

import grpc
import numpy as np
import pytest

from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos.tensors import decode_infer_response, encode_infer_request
from tests.onnx_models import identity_model, slow_model, write_config
from tests.process import ServeProcess
from tests.test_cli import _wait_ready


def test_sighup_drains_a_call_in_flight_and_exits_zero(tmp_path: Path) -> None:
    """SIGHUP used to take Python's default action: the process died at once, the accepted call with it."""
    repo = tmp_path / "models"
    slow_model(repo / "slow" / "1" / "model.onnx", repeats=2400)  # seconds per call on 2 cores
    write_config(repo, "slow", "max_batch_size: 256\ninstance_group [{ kind: KIND_CPU count: 1 }]\n")
    with ServeProcess(["--model-repository", str(repo), "--grpc-port", "0", "--shutdown-grace-s", "60"]) as server:
        _wait_ready(server.address).close()
        with grpc.insecure_channel(server.address) as channel:
            x = np.full((256, 512), 0.01, dtype=np.float32)
            running = GRPCInferenceServiceStub(channel).ModelInfer.future(
                encode_infer_request("slow", [("INPUT0", x)]), timeout=120
            )
            server.wait_in_flight()
            server.proc.send_signal(signal.SIGHUP)
            out = decode_infer_response(running.result(120))
        assert out["OUTPUT0"].shape == (256, 512)
        assert server.proc.wait(60) == 0, server.output
    assert "shutting down on signal (SIGHUP)" in server.output
    assert "draining 1 in-flight call(s)" in server.output
    assert "stopped" in server.output


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    "host",
    [
        pytest.param("127.0.0.1", id="ipv4"),
        pytest.param("::1", id="ipv6", marks=pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")),
    ],
)
def test_the_logged_address_of_port_zero_is_the_one_to_call(tmp_path: Path, host: str) -> None:
    """At the default log level the listening lines give the port the OS chose, written as a client takes it: an
    IPv6 host used to be logged as `::1:PORT`, itself an IPv6 address with no port, which no client could use."""
    repo = tmp_path / "models"
    identity_model(repo / "identity" / "1" / "model.onnx", "FP32")
    with ServeProcess(["--model-repository", str(repo), "--host", host, "--grpc-port", "0"]) as server:
        line = server.wait_for_line(r"(?<!metrics )listening on ")
        logged = re.search(r"listening on (\S+) \(gRPC", line)
        assert logged is not None, line
        address = logged.group(1)
        assert not address.endswith(":0"), line
        with grpc.insecure_channel(address) as channel:
            reply = GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=30)
        assert reply.live
        metrics = re.search(r"metrics listening on (\S+) \(http\)", server.wait_for_line("metrics listening on"))
        assert metrics is not None
        bracketed = f"[{host}]" if ":" in host else host
        assert re.fullmatch(re.escape(bracketed) + r":[1-9]\d*", metrics.group(1)), metrics.group(1)
        assert server.terminate() == 0
