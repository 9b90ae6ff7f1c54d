"""`tensorgate serve` raises its open-file limit to the hard limit: started as a shell or systemd starts services
(a soft limit far below the hard one), it would refuse connections once it held that many descriptors."""

from __future__ import annotations

import resource
import subprocess
import time
from pathlib import Path

import pytest

from tensorgate.client import InferenceClient
from tests.onnx_models import scale_model, write_config
from tests.process import TENSORGATE, free_port

_, HARD = resource.getrlimit(resource.RLIMIT_NOFILE)


def _soft_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no open-file limit in /proc/{pid}/limits")


@pytest.mark.skipif(HARD != resource.RLIM_INFINITY and HARD < 256, reason="the hard limit leaves nothing to raise")
def test_serve_raises_its_soft_open_file_limit_to_the_hard_one(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    scale_model(repo / "m" / "1" / "model.onnx", 2.0)
    write_config(repo, "m", 'name: "m" max_batch_size: 8')
    port = free_port()
    serve = [TENSORGATE, "serve", "--model-repository", str(repo), "--grpc-port", str(port), "--metrics-port", "-1"]
    # As a shell starts it (preexec_fn is not safe in a process with threads): exec keeps the shell's pid.
    server = subprocess.Popen(
        ["sh", "-c", 'ulimit -Sn 64 && exec "$@"', "sh", *serve],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with InferenceClient(f"127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if client.ready():
                        break
                except Exception:  # noqa: BLE001 - still starting
                    pass
                time.sleep(0.2)
            assert client.ready()
        expected = HARD if HARD != resource.RLIM_INFINITY else 1 << 20
        assert _soft_limit(server.pid) == expected
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=30)
    assert f"open file limit raised from 64 to {expected}: a descriptor per connection" in out, out
    # And which CPU count the thread pools follow (server/cpus.py), so that an operator can check a pod's limit.
    assert "ONNX Runtime's intra-op threads default to" in out and "less one for the event loop" in out, out
