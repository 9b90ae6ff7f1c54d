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

The upstream sees one caller, tensorgate, so tensorgate keeps callers out of each other's sequences, as the local
Sequencer does: a sequence belongs to the identity whose START request began it, and another identity's request
for that ID (START included) is refused with PERMISSION_DENIED before it goes upstream. The claim ends with a
successful END request, or once the sequence has had no request for the model's max_sequence_idle_microseconds
(the upstream's own idle time, which the served config carries), when the upstream drops it too; a claim never
ends earlier than the upstream's sequence. A request without START for an ID nobody claims goes upstream as
before, to be judged there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from opentelemetry.trace import SpanContext

from tensorgate.protos.tensors import ParamValue
from tensorgate.server.backends.base import SequenceFlags, SequenceId
from tensorgate.server.errors import model_ref
from tensorgate.server.repository.sequence import DEFAULT_IDLE_US
from tensorgate.server.scheduling.scheduler import Outputs, Scheduler
from tensorgate.server.scheduling.sequencer import Owner, Refusal, check_owner, require_id
from tensorgate.server.telemetry.statistics import ExecutionTimes


@dataclass(slots=True, eq=False)
class _Claim:
    """A started sequence's owner, until it ends or goes idle."""

    owner: Owner
    requests: int = 0
    """Its requests taken in and not over: while any is, it is not idle."""
    idle: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class Order:
    """What the successive versions of one remote sequence model share (see the module docstring)."""

    tails: dict[SequenceId, asyncio.Future[None]] = field(default_factory=dict)
    """Per sequence with a request in the model, the future its last request resolves when it is over."""
    claims: dict[SequenceId, _Claim] = field(default_factory=dict)
    """Per sequence started and not ended or idle, the identity that started it."""


class RemoteSequences:
    """The order of a remote sequence model's requests, per sequence; see the module docstring. `order` is
    shared by the model's successive versions (a new one when None)."""

    def __init__(
        self, model: str, version: int, scheduler: Scheduler, order: Order | None = None, idle_us: int = 0
    ) -> None:
        self._model = model
        self._version = version
        self._scheduler = scheduler
        self.order = Order() if order is None else order
        self._tails, self._claims = self.order.tails, self.order.claims
        self._idle_s = (idle_us or DEFAULT_IDLE_US) / 1e6
        """The upstream's max_sequence_idle_microseconds (0: Triton's default)."""
        self._requests = 0
        self._waiting = 0
        self._refusal = Refusal()
        """Refuses what waits behind an earlier request of its sequence at a stop out of grace (`reject_waiting`)."""

    @property
    def requests(self) -> int:
        """Requests taken in and not over: running, or waiting behind an earlier request of their sequence."""
        return self._requests

    @property
    def waiting(self) -> int:
        """Requests waiting behind an earlier request of their sequence (queued here, before the Scheduler's)."""
        return self._waiting

    def live(self, sequence_id: SequenceId) -> bool:
        """Whether `sequence_id` was started here and has not ended or gone idle (the Sequencer's `live`): a
        draining server still takes its requests."""
        return sequence_id in self._claims

    async def submit(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        rows: int,
        deadline: float | None,
        flags: SequenceFlags | None,
        *,
        span: SpanContext | None = None,
        request_id: str = "",
        parameters: Mapping[str, ParamValue] | None = None,
    ) -> tuple[Outputs, ExecutionTimes]:
        """Run the request once the one before it in its sequence is over; INVALID_ARGUMENT without a correlation
        ID, else whatever the Scheduler and the upstream answer (the upstream judges starts, ends and rows). Its id
        and parameters go upstream with it, as a stateless remote model's do (Scheduler.submit)."""
        flags = require_id(self._model, self._version, flags)
        claim = self._claim(flags)
        ended = False
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
                    await self._refusal.wait(previous)
                finally:
                    self._waiting -= 1
            self._refusal.check(model_ref(self._model, self._version))
            waited = time.perf_counter_ns() - started
            results, times = await self._scheduler.submit(
                inputs,
                outputs,
                rows,
                deadline,
                span=span,
                sequence=flags,
                request_id=request_id,
                parameters=parameters,
            )
            ended = flags.end
            return results, dataclasses.replace(times, queue_ns=times.queue_ns + waited)
        finally:
            if claim is not None:
                self._unclaim(flags.id, claim, ended)
            self._requests -= 1
            self._scheduler.release()
            if previous is None or previous.done():
                self._over(flags.id, done)
            else:  # the caller left while the request before it ran: the next one still waits for that one
                previous.add_done_callback(lambda _: self._over(flags.id, done))

    def reject_waiting(self, why: str) -> None:
        """The server's stop ran out of grace: requests still waiting behind an earlier one of their sequence fail
        with UNAVAILABLE "<model> <why>", as the Scheduler's queued requests do, rather than
        reach the upstream after their callers' predecessors were told that they did not run. At once: the
        request before one may be running upstream, and the server's stop cancels every call soon after."""
        self._refusal.refuse(why)

    def _claim(self, flags: SequenceFlags) -> _Claim | None:
        """The claim the request runs under: its sequence's, or a new one for a START; SequenceOwnerError for a
        sequence another identity claims, before anything is queued."""
        claim = self._claims.get(flags.id)
        owner = check_owner(self._model, self._version, flags.id, None if claim is None else claim.owner)
        if claim is None:
            if not flags.start:
                return None  # nobody here started it: the upstream says whether it is active
            claim = self._claims[flags.id] = _Claim(owner)
        if claim.idle is not None:
            claim.idle.cancel()
            claim.idle = None
        claim.requests += 1
        return claim

    def _unclaim(self, key: SequenceId, claim: _Claim, ended: bool) -> None:
        """A request of a claimed sequence is over: an END that the upstream took frees the ID; else the claim
        lasts until the sequence has been idle as long as the upstream waits before it drops it."""
        claim.requests -= 1
        if ended:
            self._drop(key, claim)
        elif claim.requests == 0 and self._claims.get(key) is claim:
            claim.idle = asyncio.get_running_loop().call_later(self._idle_s, self._expire, key, claim)

    def _expire(self, key: SequenceId, claim: _Claim) -> None:
        claim.idle = None
        if claim.requests == 0:
            self._drop(key, claim)

    def _drop(self, key: SequenceId, claim: _Claim) -> None:
        if claim.idle is not None:
            claim.idle.cancel()
            claim.idle = None
        if self._claims.get(key) is claim:
            del self._claims[key]

    def _over(self, key: SequenceId, done: asyncio.Future[None]) -> None:
        done.set_result(None)
        if self._tails.get(key) is done:
            del self._tails[key]


__all__ = ["Order", "RemoteSequences"]
