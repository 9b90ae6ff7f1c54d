"""Per model-version scheduler: runs requests on the model's own worker threads, never on the event loop.

Each model version owns a thread pool sized by its `instance_group` count, so a busy model never blocks another
one. Requests whose deadline passes while they wait are dropped before they reach the model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tensorgate.server.backends.base import Backend
from tensorgate.server.errors import DeadlineExceededError, ServerUnavailableError, model_ref
from tensorgate.server.telemetry.statistics import ExecutionTimes, ModelStats


class Scheduler:
    """Runs one request per model execution, up to `instances` at a time."""

    def __init__(self, model: str, version: int, backend: Backend, stats: ModelStats, instances: int) -> None:
        if instances < 1:
            raise ValueError(f"instances must be >= 1, got {instances}")
        self._model = model
        self._version = version
        self._backend = backend
        self._stats = stats
        self._pool = ThreadPoolExecutor(max_workers=instances, thread_name_prefix=f"tg-{model}-{version}")
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    def _run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], enqueued: int, deadline: float | None
    ) -> tuple[dict[str, np.ndarray], ExecutionTimes]:
        start = time.perf_counter_ns()
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceededError(
                f"{model_ref(self._model, self._version)}: deadline passed while the request was queued"
            )
        result = self._backend.execute(inputs, outputs)
        done = time.perf_counter_ns()
        return result, ExecutionTimes(
            queue_ns=start - enqueued, compute_input_ns=0, compute_infer_ns=done - start, compute_output_ns=0
        )

    async def submit(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        rows: int,
        deadline: float | None = None,
    ) -> tuple[dict[str, np.ndarray], ExecutionTimes]:
        """Execute once; raises the backend's error, DeadlineExceededError, or ServerUnavailableError when closed."""
        if self._closed:
            raise ServerUnavailableError(f"{model_ref(self._model, self._version)} is being unloaded")
        self._in_flight += 1
        self._idle.clear()
        try:
            loop = asyncio.get_running_loop()
            result, times = await loop.run_in_executor(
                self._pool, self._run, inputs, outputs, time.perf_counter_ns(), deadline
            )
            self._stats.record_execution(rows, times)
            return result, times
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def close(self, grace: float | None = None) -> None:
        """Refuse new work, let running requests finish (up to `grace` seconds), then stop the threads."""
        self._closed = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            pass
        self._pool.shutdown(wait=False, cancel_futures=True)
