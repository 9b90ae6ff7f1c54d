"""A sequence (stateful) model on an upstream Triton: its requests go upstream one at a time per sequence, in the
order they reached tensorgate, each with its sequence's parameters (`sequence_id`, `sequence_start`,
`sequence_end`).

The upstream's sequence batcher owns everything else: the control tensors, the state, the slots, idle sequences
and batching across sequences. tensorgate's part is the order. Its Scheduler runs a remote model's requests on
several threads at once, so two requests of one sequence sent without waiting for each other's answer (a
stream, or a pipelining client) could otherwise reach the upstream swapped, and its state would be summed in the
wrong order. Each request waits for the answer to the one before it in its sequence; requests of different
sequences go concurrently, up to the model's instance count.

While a request waits here, the Scheduler is held, so that an unload lets it run within the grace period rather
than fail it after its predecessor was answered. The order outlives a reload: the versions of one model share it
(`Order`), so a request sent to the new version waits for its sequence's requests still running in the old one.
A request whose caller left while it ran lets the next go only once its batch is over (the Scheduler's `settled`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping, Sequence

import numpy as np
from opentelemetry.trace import SpanContext

from tensorgate.server.backends.base import SequenceFlags, SequenceId
from tensorgate.server.scheduling.scheduler import Outputs, Scheduler
from tensorgate.server.scheduling.sequencer import require_id
from tensorgate.server.telemetry.statistics import ExecutionTimes

Order = dict[SequenceId, "asyncio.Future[None]"]
"""Per sequence with a request in the model, the future its last request resolves when it is over."""


class RemoteSequences:
    """The order of a remote sequence model's requests, per sequence; see the module docstring. `order` is
    shared by the model's successive versions (a new one when None)."""

    def __init__(self, model: str, version: int, scheduler: Scheduler, order: Order | None = None) -> None:
        self._model = model
        self._version = version
        self._scheduler = scheduler
        self._tails: Order = {} if order is None else order
        self._requests = 0
        self._waiting = 0

    @property
    def requests(self) -> int:
        """Requests taken in and not over: running, or waiting behind an earlier request of their sequence."""
        return self._requests

    @property
    def waiting(self) -> int:
        """Requests waiting behind an earlier request of their sequence (queued here, before the Scheduler's)."""
        return self._waiting

    async def submit(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        rows: int,
        deadline: float | None,
        flags: SequenceFlags | None,
        *,
        span: SpanContext | None = None,
    ) -> tuple[Outputs, ExecutionTimes]:
        """Run the request once the one before it in its sequence is over; INVALID_ARGUMENT without a correlation
        ID, else whatever the Scheduler and the upstream answer (the upstream judges starts, ends and rows)."""
        flags = require_id(self._model, self._version, flags)
        previous = self._tails.get(flags.id)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tails[flags.id] = done
        self._scheduler.hold()
        self._requests += 1
        started = time.perf_counter_ns()
        try:
            if previous is not None and not previous.done():
                self._waiting += 1
                try:
                    await asyncio.shield(previous)
                finally:
                    self._waiting -= 1
            waited = time.perf_counter_ns() - started
            results, times = await self._scheduler.submit(inputs, outputs, rows, deadline, span=span, sequence=flags)
            return results, dataclasses.replace(times, queue_ns=times.queue_ns + waited)
        finally:
            self._requests -= 1
            self._scheduler.release()
            if previous is None or previous.done():
                self._over(flags.id, done)
            else:  # the caller left while the request before it ran: the next one still waits for that one
                previous.add_done_callback(lambda _: self._over(flags.id, done))

    def _over(self, key: SequenceId, done: asyncio.Future[None]) -> None:
        done.set_result(None)
        if self._tails.get(key) is done:
            del self._tails[key]


__all__ = ["Order", "RemoteSequences"]
