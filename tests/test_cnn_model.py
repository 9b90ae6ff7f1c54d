"""The GPU benchmark's CNN (benchmarks/cnn.py), served on the CPU: its config loads as written, and 4-D image
batches go through dynamic batching and come back row for row as in-process ONNX Runtime computes them.

The benchmark itself runs where a GPU is lent; this keeps its model and config honest everywhere else.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc

from benchmarks.cnn import INPUT, OUTPUT, build_resnet_model, resnet_config
from tensorgate.server.backends.onnx import CPU, preload_cuda_libraries
from tests.serving import ServerThread

IMAGE = 8


def _repository(root: Path) -> Path:
    model = build_resnet_model(image=IMAGE, width=8, blocks=2)
    onnx.checker.check_model(model, full_check=True)
    (root / "cnn" / "1").mkdir(parents=True)
    onnx.save(model, root / "cnn" / "1" / "model.onnx")
    (root / "cnn" / "config.pbtxt").write_text(resnet_config("cnn", image=IMAGE, kind="KIND_CPU", max_batch=16))
    return root


def test_cnn_batches_serve_row_for_row_as_in_process(tmp_path: Path) -> None:
    repo = _repository(tmp_path)
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


def test_cuda_preload_is_silent_where_there_is_no_cuda_build(capsys: pytest.CaptureFixture[str]) -> None:
    """The server calls it before a GPU session; on this CPU build it must neither fail nor write to stdout."""
    preload_cuda_libraries.cache_clear()
    preload_cuda_libraries()
    assert capsys.readouterr().out == ""
