"""The compute limit: ONNX Runtime in-process on the example MLP, no server, rows per second per batch size."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tensorgate.server.backends.onnx import default_intra_op_threads


def ort_rows_per_s(
    model: Path, batch: int, threads: int | None = None, seconds: float = 1.0, repeats: int = 3
) -> float:
    """Median over `repeats` of rows/s running `batch`-row inputs back to back for `seconds` (bounded).

    `threads` defaults to what tensorgate gives a model whose config sets none, so that the comparison with the
    server is like for like; 0 means onnxruntime's own default (all cores).
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = default_intra_op_threads() if threads is None else threads
    session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((batch, 256), dtype=np.float32)
    for _ in range(10):
        session.run(None, {"INPUT0": x})
    rates = []
    for _ in range(repeats):
        n = 0
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds and n < 1_000_000:
            session.run(None, {"INPUT0": x})
            n += 1
        rates.append(n * batch / elapsed)
    return statistics.median(rates)
