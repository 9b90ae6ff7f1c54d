"""The compute limit: ONNX Runtime in-process, no server, rows per second per batch size."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server.backends.onnx import CPU, Provider, preload_cuda_libraries, provider_name, session_options


def ort_session(
    model: Path, threads: int | None = None, providers: Sequence[Provider] = (CPU,)
) -> ort.InferenceSession:
    """A session with the options tensorgate gives a model whose config sets none (threads, no spinning, graph
    optimisation), so that the comparison with the server is like for like; `threads` 0 means onnxruntime's own
    default (all cores). Read `get_providers()` on the result: ONNX Runtime drops a provider it cannot start."""
    opts = session_options(mc.ModelConfig(name="in-process"))
    if threads is not None:
        opts.intra_op_num_threads = threads
    if any(provider_name(p) != CPU for p in providers):
        preload_cuda_libraries()
    return ort.InferenceSession(str(model), opts, providers=list(providers))


def ort_rows_per_s(
    model: Path,
    batch: int | Sequence[int],
    threads: int | None = None,
    seconds: float = 1.0,
    repeats: int = 3,
    session: ort.InferenceSession | None = None,
    sessions: Sequence[ort.InferenceSession] | None = None,
) -> float:
    """Median over `repeats` of rows/s running random FP32 inputs (shaped as the model's inputs) back to back
    for `seconds` (bounded), after a warm-up that also lets a GPU provider pick its kernels for each batch size.

    `batch` may be several sizes, run in turn (e.g. (1, 31)): a dynamic batcher's batches change size from one
    call to the next, and a runtime that prepares work per input shape pays for that only when sizes alternate.
    `session` defaults to a CPU one from `ort_session(model, threads)`; `sessions`, one per size, runs each size on
    its own session instead (as `tensorgate.pad_batches` with several sizes does).
    """
    sizes = [batch] if isinstance(batch, int) else list(batch)
    if sessions is None:
        sessions = [session or ort_session(model, threads)] * len(sizes)
    if len(sessions) != len(sizes):
        raise ValueError(f"{len(sessions)} sessions for {len(sizes)} batch sizes")
    rng = np.random.default_rng(0)
    feeds = [
        ({i.name: rng.random((size, *i.shape[1:]), dtype=np.float32) for i in run.get_inputs()}, size, run)
        for size, run in zip(sizes, sessions, strict=True)
    ]
    for _ in range(10):
        for feed, _size, run in feeds:
            run.run(None, feed)
    rates = []
    for _ in range(repeats):
        rows = 0
        n = 0
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds and n < 1_000_000:
            feed, size, run = feeds[n % len(feeds)]
            run.run(None, feed)
            rows += size
            n += 1
        rates.append(rows / elapsed)
    return statistics.median(rates)
