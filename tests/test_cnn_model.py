"""The GPU benchmark's CNN (benchmarks/cnn.py), served on the CPU: its config loads as written, and 4-D image
requests of several sizes, through whatever batches the dynamic batcher forms, come back row for row as
in-process ONNX Runtime computes them. Also the CUDA library preload that GPU sessions run first.

The benchmark itself runs where a GPU is lent; this keeps its model and config honest everywhere else.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc

from benchmarks.cnn import INPUT, OUTPUT, build_resnet_model, resnet_config
from tensorgate.server.backends import onnx as onnx_backend
from tensorgate.server.backends.onnx import CPU, preload_cuda_libraries
from tests.serving import ServerThread

IMAGE = 8


def _repository(root: Path, pad: str | None = None) -> Path:
    model = build_resnet_model(image=IMAGE, width=8, blocks=2)
    onnx.checker.check_model(model, full_check=True)
    (root / "cnn" / "1").mkdir(parents=True)
    onnx.save(model, root / "cnn" / "1" / "model.onnx")
    (root / "cnn" / "config.pbtxt").write_text(
        resnet_config("cnn", image=IMAGE, kind="KIND_CPU", max_batch=16, pad=pad)
    )
    return root


@pytest.mark.parametrize("pad", [None, "true", "1,4,8"])
def test_cnn_batches_serve_row_for_row_as_in_process(tmp_path: Path, pad: str | None) -> None:
    """Batched, and padded to one size or to the next of several, each row's answer is the one it gets alone."""
    repo = _repository(tmp_path, pad)
    session = ort.InferenceSession(str(repo / "cnn" / "1" / "model.onnx"), providers=[CPU])
    rng = np.random.default_rng(1)
    requests = [rng.standard_normal((rows, 3, IMAGE, IMAGE)).astype(np.float32) for rows in (1, 3, 2, 5, 1, 4) * 4]

    with ServerThread(repo) as server:
        client = tc.InferenceServerClient(server.address)

        def infer(x: np.ndarray) -> np.ndarray:
            inp = tc.InferInput(INPUT, list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            result = client.infer("cnn", [inp], outputs=[tc.InferRequestedOutput(OUTPUT)])
            out = result.as_numpy(OUTPUT)
            assert out is not None
            return out

        with ThreadPoolExecutor(8) as pool:
            served = list(pool.map(infer, requests))
        stats = client.get_inference_statistics("cnn", as_json=True)
        client.close()

    for x, y in zip(requests, served, strict=True):
        (expected,) = session.run([OUTPUT], {INPUT: x})
        assert y.shape == (x.shape[0], 10)
        assert np.all(np.isfinite(y))
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    executed = stats["model_stats"][0]["batch_stats"]
    assert sum(int(b["batch_size"]) * int(b["compute_infer"]["count"]) for b in executed) == sum(
        x.shape[0] for x in requests
    )


@pytest.fixture
def fresh_preload(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees a process that has not preloaded yet."""
    monkeypatch.setattr(onnx_backend, "_preloaded", False)


def test_cuda_preload_logs_what_onnxruntime_prints(
    fresh_preload: None, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """preload_dlls reports on stdout; the server's stdout stays clean and the log gets it, failures as warnings."""

    def preload() -> None:
        print("Failed to load libcudart.so.13: cannot open shared object file")
        print("loaded libcudnn.so.9")

    caplog.set_level(logging.INFO, logger=onnx_backend.__name__)
    preload_cuda_libraries(preload)
    assert capsys.readouterr().out == ""
    levels = {r.getMessage(): r.levelno for r in caplog.records}
    assert levels["CUDA libraries: Failed to load libcudart.so.13: cannot open shared object file"] == logging.WARNING
    assert levels["CUDA libraries: loaded libcudnn.so.9"] == logging.INFO


def test_a_failing_cuda_preload_is_logged_not_raised(fresh_preload: None, caplog: pytest.LogCaptureFixture) -> None:
    def preload() -> None:
        raise RuntimeError("no driver")

    preload_cuda_libraries(preload)
    assert any("preload_dlls failed: no driver" in r.getMessage() for r in caplog.records)


def test_cuda_preload_runs_once_across_loading_threads(fresh_preload: None) -> None:
    """Models load on several threads at once; stdout is swapped process-wide while preloading, so only one
    thread may do it, once, and stdout must be the original afterwards."""
    calls: list[int] = []
    original = sys.stdout

    def preload() -> None:
        calls.append(1)
        time.sleep(0.05)
        print("slow preload")

    start = threading.Barrier(8)

    def load() -> None:
        start.wait()
        preload_cuda_libraries(preload)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert calls == [1]
    assert sys.stdout is original
