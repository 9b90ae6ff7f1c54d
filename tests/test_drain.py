"""The drain as an orchestrator meets it: it ends within --shutdown-grace-s, and one stop sent twice is one
stop."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos.tensors import decode_infer_response, encode_infer_request
from tests.onnx_models import slow_model, write_config
from tests.process import ServeProcess
from tests.test_cli import _wait_ready


def _repository(root: Path) -> Path:
    slow_model(root / "slow" / "1" / "model.onnx", repeats=4800)  # about 10 s per call on 2 cores
    write_config(root, "slow", "max_batch_size: 256\ninstance_group [{ kind: KIND_CPU count: 1 }]\n")
    slow_model(root / "fast" / "1" / "model.onnx", size=8, repeats=1)
    return root


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_a_batch_computing_when_the_grace_ends_does_not_hold_the_exit(tmp_path: Path) -> None:
    """Kubernetes kills a pod terminationGracePeriodSeconds after SIGTERM: a process that waited past
    --shutdown-grace-s for a batch whose callers were already told (up to the repository's 30 s close grace) is
    killed with its captures and spans unflushed. The batch is cut short at its next node, as after a second
    signal."""
    repo = tmp_path / "models"
    slow_model(repo / "slow" / "1" / "model.onnx", repeats=12000)  # minutes for this batch on 2 cores
    write_config(repo, "slow", "max_batch_size: 8192\ninstance_group [{ kind: KIND_CPU count: 1 }]\n")
    with ServeProcess(["--model-repository", str(repo), "--grpc-port", "0", "--shutdown-grace-s", "1"]) as server:
        _wait_ready(server.address).close()
        with grpc.insecure_channel(server.address) as channel:
            x = np.full((8192, 512), 0.01, dtype=np.float32)
            computing = GRPCInferenceServiceStub(channel).ModelInfer.future(
                encode_infer_request("slow", [("INPUT0", x)]), timeout=120
            )
            server.wait_in_flight()
            server.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            with pytest.raises(grpc.RpcError) as cut:
                computing.result(60)
            assert server.proc.wait(60) == 0
        # Not the 30 s the repository waits for a batch at close (the minutes it would take are cut there); generous
        # against a loaded machine.
        assert time.monotonic() - signalled < 20, time.monotonic() - signalled
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "grace period over" in server.output


def test_one_stop_sent_twice_still_drains(tmp_path: Path) -> None:
    """GNU timeout signals the process and then its group: the server gets SIGTERM twice for one stop. A repeat of
    the same signal within a second is that same stop, not an operator asking to stop at once: the call in flight
    is answered. (A second signal later, or another one, still hurries: test_cli.py.)"""
    repo = _repository(tmp_path / "models")
    with ServeProcess(["--model-repository", str(repo), "--grpc-port", "0", "--shutdown-grace-s", "60"]) as server:
        _wait_ready(server.address).close()
        with grpc.insecure_channel(server.address) as channel:
            x = np.full((256, 512), 0.01, dtype=np.float32)
            running = GRPCInferenceServiceStub(channel).ModelInfer.future(
                encode_infer_request("slow", [("INPUT0", x)]), timeout=120
            )
            server.wait_in_flight()
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)  # two deliveries, not one merged pending signal
            server.proc.send_signal(signal.SIGTERM)
            out = decode_infer_response(running.result(120))
        assert out["OUTPUT0"].shape == (256, 512)
        assert server.proc.wait(60) == 0
        assert "taken as the same stop" in server.output
        assert "stopping at once" not in server.output
