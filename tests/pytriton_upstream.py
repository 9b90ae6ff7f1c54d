"""A real Triton Inference Server (PyTriton's bundled `tritonserver`) serving small Python models, as the upstream
of tensorgate's remote Triton backend in tests/test_triton_backend.py and benchmarks/triton_front.py.

It runs with the interpreter of `.venv-triton` (PyTriton's pins stay out of the project's environment), prints
"UPSTREAM READY" once every model is loaded and serves until SIGTERM/SIGINT. Models (all batch on dim 0):

    add_sub   FP32 INPUT0, INPUT1 [4]  -> OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1
    int_ops   INT32 A [3], INT64 B [3] -> A2 = A * 2 (INT32), B1 = B + 1 (INT64)
    bytes_op  BYTES TEXT [1]           -> UPPER = TEXT upper-cased, LEN = byte length (INT32)
    slow      FP32 X [1]               -> Y = X, after `--slow-seconds`
    countdown FP32 X [1]               -> decoupled, not batching: n = X responses, Y = X * i for i = 1..n (then
                                          the final flag, on its own)

Usage: python tests/pytriton_upstream.py --grpc-port P --http-port Q --metrics-port R --workspace DIR
(or `Upstream(workspace)` below, from the project's environment).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv-triton" / "bin" / "python"
"""PyTriton's own environment, made by `make .venv-triton/.installed-stamp` (part of `make test`)."""
TOKEN = "tensorgate-tests"
"""Access token for the RPCs PyTriton restricts (statistics, repository, ...), sent as TOKEN_HEADER."""
TOKEN_HEADER = "triton-grpc-protocol-triton-access-token"
READY_LINE = "UPSTREAM READY"


def unavailable_reason() -> str | None:
    """Why PyTriton cannot run here (to skip on), or None."""
    if sys.platform != "linux":
        return f"PyTriton's tritonserver runs on Linux only, not {sys.platform}"
    if not PYTHON.exists():
        return f"{PYTHON.relative_to(ROOT)} is missing: `make test` (or `make .venv-triton/.installed-stamp`) makes it"
    probe = subprocess.run([str(PYTHON), "-c", "import pytriton"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        return f"nvidia-pytriton is not installed in {PYTHON.parent.parent.name}: {probe.stderr.strip()[-300:]}"
    return None


def _free_port() -> int:
    # tritonserver takes fixed ports only: bind, read, release (a race with other tests is possible, not likely).
    # Its own copy of tests.process.free_port: this file also runs as a script in PyTriton's environment.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Upstream:
    """This script as a child process: `start()` waits for READY_LINE, `stop()` ends it; `start()` again reuses
    the same ports (a restarted upstream, as tensorgate sees one). `url` is the gRPC endpoint."""

    def __init__(self, workspace: Path, *, slow_seconds: float = 1.0, token: str = TOKEN) -> None:
        """`token=""` restricts nothing (perf_analyzer reads statistics, which Triton restricts by default)."""
        self.workspace = workspace
        self.token = token
        self.slow_seconds = slow_seconds
        self.ports = (_free_port(), _free_port(), _free_port())
        self.url = f"127.0.0.1:{self.ports[0]}"
        self.lines: list[str] = []
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._runs = 0

    def start(self, timeout: float = 240.0) -> None:
        self._runs += 1
        grpc_port, http_port, metrics_port = self.ports
        # fmt: off
        command = [
            str(PYTHON), __file__, "--grpc-port", str(grpc_port), "--http-port", str(http_port),
            "--metrics-port", str(metrics_port), "--workspace", str(self.workspace / f"run-{self._runs}"),
            "--token", self.token, "--slow-seconds", str(self.slow_seconds),
        ]
        # fmt: on
        # A session of its own: tritonserver's Python backend stubs can outlive it, and stop() ends the group.
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self._proc = proc
        ready = threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.lines.append(line)
                if READY_LINE in line:
                    ready.set()
            ready.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not ready.wait(timeout) or proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"PyTriton did not start within {timeout}s:\n{''.join(self.lines[-60:])}")

    def stop(self, timeout: float = 60.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of tritonserver is left (its stubs)
        except ProcessLookupError:
            pass
        if self._reader is not None:
            self._reader.join(10)
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> Upstream:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--token", default=TOKEN, help='access token of Triton\'s restricted RPCs; "": none')
    parser.add_argument("--slow-seconds", type=float, default=1.0)
    parser.add_argument("--max-batch-size", type=int, default=16)
    args = parser.parse_args()

    # The Python backend stub links Debian's libpython 3.11.2; this interpreter's own libpython must win, or the
    # stub fails with "'_thread.RLock' object has no attribute '_recursion_count'" on another 3.11 patch release.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p)

    from pytriton.decorators import batch
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    @batch  # type: ignore[untyped-decorator]  # PyTriton is untyped
    def add_sub(INPUT0: np.ndarray, INPUT1: np.ndarray) -> dict[str, np.ndarray]:  # noqa: N803 - tensor names
        return {"OUTPUT0": INPUT0 + INPUT1, "OUTPUT1": INPUT0 - INPUT1}

    @batch  # type: ignore[untyped-decorator]  # PyTriton is untyped
    def int_ops(A: np.ndarray, B: np.ndarray) -> dict[str, np.ndarray]:  # noqa: N803
        return {"A2": (A * 2).astype(np.int32), "B1": (B + 1).astype(np.int64)}

    @batch  # type: ignore[untyped-decorator]  # PyTriton is untyped
    def bytes_op(TEXT: np.ndarray) -> dict[str, np.ndarray]:  # noqa: N803
        upper = np.array([[bytes(t).upper() for t in row] for row in TEXT], dtype=np.object_)
        lengths = np.array([[len(bytes(t)) for t in row] for row in TEXT], dtype=np.int32)
        return {"UPPER": upper, "LEN": lengths}

    @batch  # type: ignore[untyped-decorator]  # PyTriton is untyped
    def slow(X: np.ndarray) -> dict[str, np.ndarray]:  # noqa: N803
        time.sleep(args.slow_seconds)
        return {"Y": X}

    def countdown(requests: list[dict[str, np.ndarray]]) -> Iterator[list[dict[str, np.ndarray]]]:
        # Decoupled: each yield is one response per request (one request: the model does not batch); PyTriton
        # sends the final flag on its own afterwards.
        n = int(requests[0]["X"].reshape(-1)[0])
        for i in range(1, n + 1):
            yield [{"Y": (r["X"] * i).astype(np.float32)} for r in requests]

    config = TritonConfig(
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        allow_gpu_metrics=False,
        exit_timeout_secs=2,
    )
    security = TritonSecurityConfig(access_token=args.token or None, restricted_endpoints=None if args.token else [])
    mbs = ModelConfig(max_batch_size=args.max_batch_size)
    with Triton(config=config, workspace=args.workspace, security_config=security) as triton:
        triton.bind(
            "add_sub",
            add_sub,
            inputs=[
                Tensor(name="INPUT0", dtype=np.float32, shape=(4,)),
                Tensor(name="INPUT1", dtype=np.float32, shape=(4,)),
            ],
            outputs=[
                Tensor(name="OUTPUT0", dtype=np.float32, shape=(4,)),
                Tensor(name="OUTPUT1", dtype=np.float32, shape=(4,)),
            ],
            config=mbs,
        )
        triton.bind(
            "int_ops",
            int_ops,
            inputs=[Tensor(name="A", dtype=np.int32, shape=(3,)), Tensor(name="B", dtype=np.int64, shape=(3,))],
            outputs=[Tensor(name="A2", dtype=np.int32, shape=(3,)), Tensor(name="B1", dtype=np.int64, shape=(3,))],
            config=mbs,
        )
        triton.bind(
            "bytes_op",
            bytes_op,
            inputs=[Tensor(name="TEXT", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name="UPPER", dtype=bytes, shape=(1,)), Tensor(name="LEN", dtype=np.int32, shape=(1,))],
            config=mbs,
        )
        triton.bind(
            "slow",
            slow,
            inputs=[Tensor(name="X", dtype=np.float32, shape=(1,))],
            outputs=[Tensor(name="Y", dtype=np.float32, shape=(1,))],
            config=mbs,
        )
        triton.bind(
            "countdown",
            countdown,
            inputs=[Tensor(name="X", dtype=np.float32, shape=(1,))],
            outputs=[Tensor(name="Y", dtype=np.float32, shape=(1,))],
            config=ModelConfig(batching=False, decoupled=True),
        )
        triton.run()
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        print("UPSTREAM READY", flush=True)
        while not stop.wait(0.5) and triton.is_alive():
            pass
    print("UPSTREAM STOPPED", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
