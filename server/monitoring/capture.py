"""Prediction capture: the request path hands answered requests to a bounded queue; one thread writes them.

    capture = Capture(store, queue_size=10_000)
    capture.start()
    capture.submit(model, version, config, request_id, inputs, outputs)   # on the event loop: never blocks
    capture.flush()                                      # wait until everything queued so far is stored
    capture.close()

Why a thread and a bounded queue: SQLite writes block and take milliseconds, and inference must never wait on
them. ``submit`` samples (per model ``tensorgate.capture.sample_rate``), then appends; when the queue is
full, in samples (``queue_size``) or in the bytes of the tensors they hold (``queue_bytes``), the sample is dropped
and counted in ``dropped`` (exported as ``tensorgate_capture_dropped_total``), the request itself is unaffected.
The writer drains up to ``batch_size`` items per transaction, so a busy server pays one commit per batch rather
than per request.

The arrays handed in are numpy views of the request and response buffers; they are only read (serialized) on the
writer thread, so capture copies nothing on the request path. That is why the queue is bounded in bytes too: each
queued sample keeps its request's and response's buffers alive until it is stored, and 10,000 image requests
waiting on a slow disk would pin gigabytes.
"""

from __future__ import annotations

import collections
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server.monitoring.store import Prediction, PredictionStore, is_busy
from tensorgate.server.settings import CAPTURE_QUEUE_BYTES, CAPTURE_QUEUE_SIZE

__all__ = ["Capture", "CaptureConfig"]

log = logging.getLogger(__name__)

BUSY_RETRY_S = (0.1, 0.5, 2.0)
"""Pauses before storing a batch again after SQLITE_BUSY (another process, e.g. a read-write tool, held the
database past the 30 s busy timeout): a lock held that long is let go in seconds, and the batch is kept, not lost."""
FAILURE_LOG_S = 60.0
"""While every batch fails (a full disk), how often the writer says so again, with the count lost meanwhile."""

SAMPLE_RATE = "tensorgate.capture.sample_rate"
CAPTURE_INPUTS = "tensorgate.capture.inputs"
PREDICTION_OUTPUT = "tensorgate.prediction.output"


def parameter(config: mc.ModelConfig, key: str) -> str | None:
    """A config.pbtxt ``parameters`` string value, stripped; None when absent."""
    if key not in config.parameters:
        return None
    return config.parameters[key].string_value.strip()


def prediction_output(config: mc.ModelConfig) -> str | None:
    """The output quality reads a prediction from: ``tensorgate.prediction.output``, else the model's first output
    (config order, which does not depend on what a caller asked for); None when the config lists no outputs."""
    named = parameter(config, PREDICTION_OUTPUT)
    if named:
        return named
    return config.output[0].name if config.output else None


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    """Per-model capture settings from config.pbtxt parameters."""

    sample_rate: float = 1.0
    inputs: bool = True
    prediction: str | None = None
    """The model's prediction output (`prediction_output`), which a captured request computes even when its
    caller did not ask for it, so that its feedback can be judged; None when the model has no such output."""

    def computing(self, outputs: list[str]) -> list[str]:
        """The outputs a captured request runs with: those asked for, and the prediction output."""
        if self.prediction is None or self.prediction in outputs:
            return outputs
        return [*outputs, self.prediction]

    @classmethod
    def from_config(cls, config: mc.ModelConfig) -> CaptureConfig:
        """Read the parameters; a malformed value is logged and replaced by the default (the model still serves)."""
        rate, inputs = 1.0, True
        raw = parameter(config, SAMPLE_RATE)
        if raw is not None:
            try:
                rate = float(raw)
                if not 0.0 <= rate <= 1.0:
                    raise ValueError
            except ValueError:
                log.warning(
                    "model '%s': parameter '%s' must be a number in 0..1, got %r; using 1.0",
                    config.name,
                    SAMPLE_RATE,
                    raw,
                )
                rate = 1.0
        raw = parameter(config, CAPTURE_INPUTS)
        if raw is not None:
            if raw.lower() in ("true", "1", "yes"):
                inputs = True
            elif raw.lower() in ("false", "0", "no"):
                inputs = False
            else:
                log.warning(
                    "model '%s': parameter '%s' must be true or false, got %r; using true",
                    config.name,
                    CAPTURE_INPUTS,
                    raw,
                )
        prediction = prediction_output(config)
        names = [o.name for o in config.output]
        if prediction is not None and prediction not in names:
            # Asking the model for it would fail every captured request; quality says why (not captured).
            log.warning(
                "model '%s': parameter '%s' names output '%s', which the model does not have (its outputs: %s)",
                config.name,
                PREDICTION_OUTPUT,
                prediction,
                ", ".join(names) or "none",
            )
            prediction = None
        return cls(rate, inputs, prediction)


class Capture:
    """Samples answered requests into a bounded queue that a writer thread stores in batches."""

    def __init__(
        self,
        store: PredictionStore,
        *,
        queue_size: int = CAPTURE_QUEUE_SIZE,
        queue_bytes: int = CAPTURE_QUEUE_BYTES,
        batch_size: int = 256,
        poll_s: float = 0.05,
    ) -> None:
        if queue_size < 1 or batch_size < 1 or queue_bytes < 1:
            raise ValueError(
                f"queue_size, queue_bytes and batch_size must be at least 1, got {queue_size}, {queue_bytes} and "
                f"{batch_size}"
            )
        self.store = store
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes
        self.batch_size = batch_size
        self.poll_s = poll_s
        # NOTE: a deque, not queue.Queue: append/popleft are atomic and cost ~50 ns, where Queue.put_nowait takes
        # a lock and notifies a condition (~1-2 us) on every request. The writer polls every `poll_s` instead of
        # being woken per item; flush() and close() wake it at once.
        self._queue: collections.deque[object] = collections.deque()
        self._wake = threading.Event()
        self._configs: dict[tuple[str, int], tuple[mc.ModelConfig, CaptureConfig]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._random = random.random
        # Queued bytes are _bytes_in - _bytes_out: each counter has one writer (the loop, the writer thread), so
        # neither needs a lock.
        self._bytes_in = 0
        self._bytes_out = 0
        self.dropped = 0
        """Samples dropped because the queue was full (read by the metrics collector; only the loop writes it)."""
        self.captured = 0
        """Samples the writer stored."""
        self.failed = 0
        """Samples lost to a store error (logged)."""
        # The writer thread's own: the run of failures it is in (`_failed`).
        self._failing_since: float | None = None
        self._failure_logged = 0.0
        self._lost_since_log = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tensorgate-capture", daemon=True)
        self._thread.start()

    def config_of(self, name: str, version: int, config: mc.ModelConfig) -> CaptureConfig:
        """The capture settings of a loaded version, parsed once per config object (a reload brings a new one)."""
        key = (name, version)
        cached = self._configs.get(key)
        if cached is not None and cached[0] is config:
            return cached[1]
        parsed = CaptureConfig.from_config(config)
        self._configs[key] = (config, parsed)
        return parsed

    def sample(self, model: str, version: int, config: mc.ModelConfig) -> CaptureConfig | None:
        """The model's capture settings when this request is to be captured, else None. Decided before the
        request runs, so that a captured one also computes the prediction output (`CaptureConfig.computing`)."""
        settings = self.config_of(model, version, config)
        rate = settings.sample_rate
        if rate <= 0.0 or (rate < 1.0 and self._random() >= rate):
            return None
        return settings

    def submit(
        self,
        model: str,
        version: int,
        config: mc.ModelConfig,
        request_id: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
    ) -> None:
        """Queue one answered request if sampled (`sample`, then `enqueue`)."""
        settings = self.sample(model, version, config)
        if settings is not None:
            self.enqueue(settings, model, version, config, request_id, inputs, outputs)

    def enqueue(
        self,
        settings: CaptureConfig,
        model: str,
        version: int,
        config: mc.ModelConfig,
        request_id: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
    ) -> None:
        """Queue one sampled request; drops (and counts) it when the queue is full, in samples or in bytes. Never
        blocks.

        Called from the event loop only (one producer), so the length check and the append cannot race.
        """
        size = sum(a.nbytes for a in outputs.values())
        if settings.inputs:
            size += sum(a.nbytes for a in inputs.values())
        if len(self._queue) >= self.queue_size or self._bytes_in - self._bytes_out + size > self.queue_bytes:
            self.dropped += 1
            return
        if config.max_batch_size <= 0:
            # No batch axis: the whole request is one row (its first dimension is the model's own, not rows).
            inputs = {name: a[None] for name, a in inputs.items()}
            outputs = {name: a[None] for name, a in outputs.items()}
        self._bytes_in += size
        self._queue.append(
            (request_id, model, str(version), time.time(), inputs if settings.inputs else None, outputs, size)
        )

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every sample queued before this call is stored (blocking: call it off the event loop).

        Feedback calls it first, so that a label sent right after its prediction finds the prediction stored.
        """
        if self._thread is None or not self._thread.is_alive():
            return not self._queue
        done = threading.Event()
        self._queue.append(done)  # a marker, not a sample: it does not count against the size
        self._wake.set()
        return done.wait(timeout)

    def _take(self) -> list[object]:
        items: list[object] = []
        queue = self._queue
        while queue and len(items) < self.batch_size:
            items.append(queue.popleft())
        return items

    def _run(self) -> None:
        while True:
            items = self._take()
            if not items:
                if self._stopping:
                    return
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            batch = [
                Prediction(i[0], i[1], i[2], i[3], None if i[4] is None else dict(i[4]), dict(i[5]))
                for i in items
                if isinstance(i, tuple)
            ]
            self._store(batch)
            self._bytes_out += sum(i[6] for i in items if isinstance(i, tuple))  # their buffers are let go now
            for i in items:
                if isinstance(i, threading.Event):
                    i.set()

    def _store(self, batch: list[Prediction]) -> None:
        if not batch:  # only flush markers: nothing was written, so nothing says that writes work again
            return
        for pause in (*BUSY_RETRY_S, None):
            try:
                self.store.insert(batch)
                self.captured += len(batch)
                self._stored()
                return
            except Exception as exc:  # noqa: BLE001 - the writer must outlive one bad batch
                if pause is not None and is_busy(exc):
                    log.warning("capture: the store is busy (%s); storing %d prediction(s) again", exc, len(batch))
                    time.sleep(pause)
                    continue
                self.failed += len(batch)
                self._failed(exc, len(batch))
                return

    def _failed(self, exc: Exception, lost: int) -> None:
        """Log a failed batch: the first of a run of failures, then a count every FAILURE_LOG_S. A full disk fails
        every batch, up to one per `poll_s`, and a traceback each would bury the log (the count is in /metrics)."""
        now = time.monotonic()
        self._lost_since_log += lost
        if self._failing_since is not None and now - self._failure_logged < FAILURE_LOG_S:
            return
        if self._failing_since is None:
            self._failing_since = now
            # A database error says it all ("database or disk is full"); anything else is a bug: its traceback.
            log.error(
                "capture: storing %d prediction(s) failed (%s); they are lost, as are the next ones until a write "
                "works again (logged every %.0fs while it fails; tensorgate_capture_failed_total counts them)",
                lost,
                exc,
                FAILURE_LOG_S,
                exc_info=None if isinstance(exc, sqlite3.Error) else exc,
            )
        else:
            log.error(
                "capture: storing still fails (%s): %d prediction(s) lost in the last %.0fs",
                exc,
                self._lost_since_log,
                now - self._failure_logged,
            )
        self._failure_logged = now
        self._lost_since_log = 0

    def _stored(self) -> None:
        """After a failure run, say that capture works again (once)."""
        if self._failing_since is not None:
            log.warning(
                "capture: storing works again after %.0fs of failures (%d prediction(s) lost since the last log)",
                time.monotonic() - self._failing_since,
                self._lost_since_log,
            )
            self._failing_since = None
            self._lost_since_log = 0

    def close(self, timeout: float = 10.0) -> None:
        """Store what is queued, then stop the writer (the store stays open: its owner closes it)."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake.set()
        thread.join(timeout)
        if thread.is_alive():
            log.warning(
                "capture: the writer did not finish within %.0fs; %d sample(s) unsaved", timeout, len(self._queue)
            )
        self._thread = None
