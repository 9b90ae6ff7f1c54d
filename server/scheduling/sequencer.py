"""Sequences (stateful models) in front of a model's batcher, with Triton's sequence batcher semantics.

A sequence's requests run one at a time, in the order they arrived: each waits for the one before it to finish,
then goes to the model's Scheduler with its control tensors and the state its predecessor left. The Scheduler
batches it with other sequences' requests, never with another of its own (a sequence has one request there at a
time), so every batching and deadline rule of the Scheduler holds for sequences too.

A live sequence belongs to the identity that started it (the caller's mTLS or token identity, server/auth): a
request of another identity for its ID, START included, is refused with PERMISSION_DENIED and leaves the
sequence as it was, so that two callers allowed the same model cannot continue or end each other's sequences.
Without authentication every caller is `anonymous`, and nothing changes. Once a sequence has ended its ID is free.

A request that fails leaves the state as it was; the sequence goes on. A sequence ends with its END request (when
it arrives, as in Triton: a failed END ends it too), or when it has had nothing to run for
max_sequence_idle_microseconds; its state is dropped then, and a later request without START is refused. At most
`max_sequences` hold a slot at once; a new sequence beyond that waits (backlog) until one ends.

While a request of a sequence that holds a slot waits here, the sequencer holds its Scheduler: an unload lets
those requests run (within the grace period) even when they still wait behind an earlier request of their
sequence. An unload starts with `drain`: sequences in the backlog fail at once with UNAVAILABLE (they never ran),
and no slot is handed out any more, so no sequence starts that the unload would then cut short.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from opentelemetry.trace import SpanContext

from tensorgate.server.auth.identity import CURRENT_IDENTITY, identity_key
from tensorgate.server.backends.base import SequenceFlags, SequenceId
from tensorgate.server.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    ServerUnavailableError,
    TensorgateError,
    model_ref,
)
from tensorgate.server.repository.sequence import SequenceSpec
from tensorgate.server.scheduling.scheduler import Outputs, Scheduler
from tensorgate.server.telemetry.statistics import ExecutionTimes

log = logging.getLogger(__name__)


def require_id(model: str, version: int, flags: SequenceFlags | None) -> SequenceFlags:
    """A request to a sequence model, local or remote, must name its sequence (0 and "" name none, as in Triton)."""
    if flags is None:
        raise InvalidRequestError(
            model, str(version), "a sequence model needs a non-zero or non-empty correlation ID (sequence_id)"
        )
    return flags


Owner = tuple[str | None, str]
"""Who started a sequence: `identity_key` of the caller's identity."""


class SequenceOwnerError(TensorgateError):
    """A request for a sequence that another identity started (PERMISSION_DENIED); its owner is not named."""

    code = grpc.StatusCode.PERMISSION_DENIED

    def __init__(self, model: str, version: int, sequence_id: SequenceId, identity: str) -> None:
        super().__init__(
            f"{model_ref(model, version)}: sequence {sequence_id!r} was started by another identity; identity "
            f"'{identity}' may not send requests into it (use a sequence ID of its own)"
        )
        self.model, self.version, self.sequence_id, self.identity = model, version, sequence_id, identity


def check_owner(model: str, version: int, sequence_id: SequenceId, owner: Owner | None) -> Owner:
    """The caller (its identity, set at the RPC boundary) as the owner of the sequence it sends a request to;
    SequenceOwnerError when `owner`, that of the live sequence with this ID, is another identity."""
    identity = CURRENT_IDENTITY.get()
    me = identity_key(identity)
    if owner is not None and owner != me:
        error = SequenceOwnerError(model, version, sequence_id, identity)
        log.warning("refused: %s", error.message)
        raise error
    return me


@dataclass(slots=True, eq=False)
class _Sequence:
    id: SequenceId
    state: dict[str, np.ndarray]
    slot: asyncio.Future[None]
    """Done once the sequence may run (it holds one of the max_sequences slots)."""
    tail: asyncio.Future[None] | None = None
    """Done when its latest request has finished: the next one waits for it."""
    pending: int = 0
    ended: bool = False
    """Its END request has arrived: no request may follow it without START."""
    idle: asyncio.TimerHandle | None = None
    succeeded: bool = False
    """Started again before it ended: its successor took its slot, which its release must not free."""
    unheld: list[Place] = dataclasses.field(default_factory=list)
    """Places taken while the sequence waited for its slot (they do not hold the Scheduler yet): they take their
    hold when the slot is granted. Shared with a successor that waits for the same slot."""
    owner: Owner = (None, "")
    """The identity that started it: the only one whose requests it takes."""


def _holds_slot(seq: _Sequence) -> bool:
    return seq.slot.done() and not seq.slot.cancelled() and seq.slot.exception() is None


class Refusal:
    """A sequence model's refusal of what waits behind an earlier request of its sequence, once the server's stop
    runs out of grace (`refuse`): at once, since the request before it may be running (upstream, for a remote
    model) and the stop cancels every call soon after; refused, such a request never reaches the Scheduler, and
    its caller is told so, as the Scheduler's queued requests are. One for local and remote sequence models."""

    __slots__ = ("_woken", "why")

    def __init__(self) -> None:
        self.why: str | None = None
        """Why waiting requests fail now, once refused."""
        self._woken: asyncio.Future[None] | None = None
        """Resolved by `refuse`, to wake the requests waiting (made by the first to wait, on its loop)."""

    def refuse(self, why: str) -> None:
        self.why = why
        if self._woken is not None and not self._woken.done():
            self._woken.set_result(None)

    async def wait(self, previous: asyncio.Future[None]) -> None:
        """Until `previous` (the request before) is over, or the refusal; asyncio.wait cancels neither future,
        whatever happens to the request waiting."""
        if self.why is not None:
            return
        if self._woken is None:
            self._woken = asyncio.get_running_loop().create_future()
        await asyncio.wait((previous, self._woken), return_when=asyncio.FIRST_COMPLETED)

    def check(self, ref: str) -> None:
        """UNAVAILABLE "<ref> <why>" once refused: what has not reached the Scheduler does not run."""
        if self.why is not None:
            raise ServerUnavailableError(f"{ref} {self.why}")


@dataclass(slots=True, eq=False)
class Place:
    """A request's place in its sequence (`Sequencer.enter`)."""

    seq: _Sequence
    flags: SequenceFlags
    previous: asyncio.Future[None] | None
    """Done when the request before it in the sequence is over."""
    done: asyncio.Future[None]
    """Set once this request is over and the one before it too: what the next one waits for."""
    holds: bool
    """Its sequence held a slot when it arrived: it holds the Scheduler until it is over."""
    left: bool = False


def _corrid_value(sequence_id: int, dtype: np.dtype[Any]) -> int:
    """The ID as a signed CORRID control takes it. IDs travel as uint64, and a client's negative one (tritonclient
    sends int64_param) arrives as its two's complement past 2**63 - 1: a signed control gets the number the client
    sent (-5, not 18446744073709551611), as Triton copies the bits; an INT32 one then holds it when it fits."""
    if sequence_id >= 2**63 and np.issubdtype(dtype, np.signedinteger):
        return sequence_id - 2**64
    return sequence_id


class Sequencer:
    """Orders, feeds and remembers the sequences of one model version; its Scheduler runs the requests."""

    def __init__(self, model: str, version: int, scheduler: Scheduler, spec: SequenceSpec, batched: bool) -> None:
        self._model = model
        self._version = version
        self._ref = model_ref(model, version)
        self._scheduler = scheduler
        self._spec = spec
        self._batched = batched
        self._loop = asyncio.get_running_loop()
        self._sequences: dict[SequenceId, _Sequence] = {}
        self._holding = 0
        """Sequences holding a slot."""
        self._backlog: collections.deque[_Sequence] = collections.deque()
        self._holding_requests = 0
        """Requests of slot-holding sequences accepted and not finished: while > 0, the Scheduler is held."""
        self._waiting = 0
        self._refusal = Refusal()
        """Refuses what has not reached the Scheduler at a stop out of grace (`reject_waiting`)."""
        self._closed = False
        self._draining = False
        self._state_outputs = [s.output_name for s in spec.states]
        # Control tensors of one request, made once: a batch stacks them like any input.
        lead = (1, 1) if batched else (1,)
        self._flags: list[tuple[str, str, np.ndarray, np.ndarray]] = []
        """(kind, input name, false, true) of the START, END and READY controls."""
        for c in spec.controls:
            if c.kind in ("START", "END", "READY"):
                false, true = np.full(lead, c.false, dtype=c.dtype), np.full(lead, c.true, dtype=c.dtype)
                false.flags.writeable = true.flags.writeable = False
                self._flags.append((c.kind, c.name, false, true))
        self._corrid = next(((c.name, c.dtype) for c in spec.controls if c.kind == "CORRID"), None)
        self._lead = lead

    @property
    def active(self) -> int:
        """Sequences holding a slot or waiting for one (a sequence started again before it ended counts once)."""
        return self._holding + len(self._backlog)

    @property
    def backlog(self) -> int:
        """Sequences waiting for a slot."""
        return len(self._backlog)

    @property
    def waiting(self) -> int:
        """Requests queued here, before the Scheduler's: behind an earlier request of their sequence, or in the
        backlog (the model's queue depth counts them, as a remote sequence model's does)."""
        return self._waiting

    def live(self, sequence_id: SequenceId) -> bool:
        """Whether a request without START may follow in `sequence_id` (started, and not ended or gone idle): a
        draining server still takes such requests, so that a sequence its client is in the middle of can end."""
        seq = self._sequences.get(sequence_id)
        return seq is not None and not seq.ended

    # ----- requests ----------------------------------------------------------------------------------------

    def enter(self, flags: SequenceFlags | None, rows: int) -> Place:
        """Take a request's place in its sequence, when it arrives: a sequence runs its requests in the order of
        their places. Every place must be left (`leave`), whether or not it ran. Raises INVALID_ARGUMENT for a
        request without correlation ID, a non-START request of a sequence that is not active, and a request of
        more than one row to a batching model."""
        self._check(flags, rows)
        assert flags is not None
        seq = self._begin(flags)
        place = Place(seq, flags, seq.tail, self._loop.create_future(), False)
        seq.tail = place.done
        seq.pending += 1
        if _holds_slot(seq):
            self._hold(place)
        elif not seq.slot.done():
            seq.unheld.append(place)
        if seq.idle is not None:
            seq.idle.cancel()
            seq.idle = None
        return place

    async def run(
        self,
        place: Place,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        rows: int,
        deadline: float | None,
        *,
        span: SpanContext | None = None,
        timeout_us: int | None = None,
    ) -> tuple[Outputs, ExecutionTimes]:
        """Run the request at `place` once the requests before it in its sequence have run; the Scheduler's
        errors, UNAVAILABLE when the model was unloaded while the sequence waited for a slot, and DEADLINE_EXCEEDED
        when it waited for one longer than the request's `timeout` (as Triton's backlog honours it)."""
        seq, previous = place.seq, place.previous
        # Queue time counts from here: an ensemble's step takes its place on arrival, and the ensemble counts the
        # time of the steps before it on its own.
        started = time.perf_counter_ns()
        if (previous is not None and not previous.done()) or not seq.slot.done():
            self._waiting += 1
            try:
                if not seq.slot.done():  # the slot first: only that wait is bounded by the timeout
                    try:
                        async with asyncio.timeout(timeout_us / 1e6 if timeout_us else None):
                            await asyncio.shield(seq.slot)
                    except TimeoutError:
                        if not seq.slot.done():  # (granted in the same loop step: it runs, and uses the slot)
                            raise DeadlineExceededError(
                                f"{self._ref}: the request's timeout ({timeout_us} us) passed while its sequence "
                                "waited for a slot"
                            ) from None
                if previous is not None and not previous.done():
                    await self._refusal.wait(previous)  # or until a stop out of grace refuses what waits
            finally:
                self._waiting -= 1
        seq.slot.result()  # raises when the model was unloaded while the sequence waited for a slot
        self._refusal.check(self._ref)
        waited = time.perf_counter_ns() - started
        feed = dict(inputs)
        self._controls(feed, place.flags)
        feed.update(seq.state)
        results, times = await self._scheduler.submit(feed, [*outputs, *self._state_outputs], rows, deadline, span=span)
        for state in self._spec.states:
            # A copy: a view would keep the whole batch's output alive for as long as the sequence lasts.
            value = results[state.output_name] if state.output_name in outputs else results.pop(state.output_name)
            if not self._closed:
                seq.state[state.input_name] = value.copy()
        return results, dataclasses.replace(times, queue_ns=times.queue_ns + waited)

    def _hold(self, place: Place) -> None:
        """The request's sequence holds a slot: the Scheduler is held until the request is over, so that an unload
        lets it run within the grace period."""
        place.holds = True
        self._holding_requests += 1
        if self._holding_requests == 1:
            self._scheduler.hold()

    def leave(self, place: Place) -> None:
        """The request at `place` is over (answered, failed, or never run): the next one of its sequence may go,
        once the ones before it have."""
        if place.left:
            return
        place.left = True
        seq, previous, done, held = place.seq, place.previous, place.done, place.holds
        if previous is None or previous.done():
            self._finished(seq, done, held)
        else:  # the caller left while an earlier request ran: the next one still waits for that one
            previous.add_done_callback(lambda _: self._finished(seq, done, held))

    async def submit(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        rows: int,
        deadline: float | None,
        flags: SequenceFlags | None,
        *,
        span: SpanContext | None = None,
        timeout_us: int | None = None,
    ) -> tuple[Outputs, ExecutionTimes]:
        """A request sent to this model: its place, taken now, then its run (`enter`, `run`, `leave`)."""
        place = self.enter(flags, rows)
        try:
            return await self.run(place, inputs, outputs, rows, deadline, span=span, timeout_us=timeout_us)
        finally:
            self.leave(place)

    def _check(self, flags: SequenceFlags | None, rows: int) -> None:
        version = str(self._version)
        flags = require_id(self._model, self._version, flags)
        if self._batched and rows != 1:
            raise InvalidRequestError(
                self._model, version, f"a sequence model takes one row per request (batch size 1), got {rows}"
            )
        if self._spec.string_ids is not None and isinstance(flags.id, str) != self._spec.string_ids:
            want = "a string" if self._spec.string_ids else "an integer"
            raise InvalidRequestError(
                self._model, version, f"sequence_id must be {want}: the model's CORRID control is typed so"
            )
        if self._corrid is not None and isinstance(flags.id, int):
            dtype = self._corrid[1]
            info = np.iinfo(dtype)  # type: ignore[type-var]
            value = _corrid_value(flags.id, dtype)
            if not info.min <= value <= info.max:
                raise InvalidRequestError(
                    self._model, version, f"sequence_id {value} does not fit the CORRID control ({dtype})"
                )

    def _begin(self, flags: SequenceFlags) -> _Sequence:
        seq = self._sequences.get(flags.id)
        # Before anything of the sequence changes: another identity's request leaves it as it was.
        owner = check_owner(self._model, self._version, flags.id, None if seq is None or seq.ended else seq.owner)
        if flags.start:
            initial = {s.input_name: s.initial[np.newaxis] if self._batched else s.initial for s in self._spec.states}
            if seq is not None and not seq.ended:
                # START again before END: as in Triton, the old sequence ends here, and the new one takes its slot
                # with fresh state, behind the old one's requests.
                log.warning(
                    "%s: sequence %r started again before it ended; the previous one ends early", self._ref, flags.id
                )
                seq.ended = seq.succeeded = True
                if seq.idle is not None:
                    seq.idle.cancel()
                    seq.idle = None
                seq = _Sequence(flags.id, initial, seq.slot, seq.tail, unheld=seq.unheld, owner=owner)
                self._sequences[flags.id] = seq
            else:
                seq = _Sequence(flags.id, initial, self._loop.create_future(), owner=owner)
                self._sequences[flags.id] = seq
                if self._draining:  # no slot is handed out once an unload has begun, even a free one
                    self._fail_slot(seq)
                elif self._holding < self._spec.max_sequences:
                    self._holding += 1
                    seq.slot.set_result(None)
                else:
                    self._backlog.append(seq)
        elif seq is None or seq.ended:
            raise InvalidRequestError(
                self._model,
                str(self._version),
                f"sequence {flags.id!r} is not active: its first request must set sequence_start (it may have "
                "ended, gone idle past max_sequence_idle_microseconds, or been cut off by a reload of the model)",
            )
        if flags.end:
            seq.ended = True
        return seq

    def _controls(self, feed: dict[str, np.ndarray], flags: SequenceFlags) -> None:
        for kind, name, false, true in self._flags:
            on = flags.start if kind == "START" else flags.end if kind == "END" else True
            feed[name] = true if on else false
        if self._corrid is not None:
            name, dtype = self._corrid
            value = flags.id.encode() if isinstance(flags.id, str) else _corrid_value(flags.id, dtype)
            feed[name] = np.full(self._lead, value, dtype=dtype)

    # ----- sequence lifetime (event loop) ------------------------------------------------------------------

    def _finished(self, seq: _Sequence, done: asyncio.Future[None], held: bool) -> None:
        done.set_result(None)
        seq.pending -= 1
        if held:
            self._holding_requests -= 1
            if self._holding_requests == 0:
                self._scheduler.release()
        if seq.pending or self._closed:
            return
        if not seq.slot.done() and any(waiting is seq for waiting in self._backlog):
            # Still in the backlog, and every caller has gone: nothing of it ran, so it is dropped rather than
            # given a slot it would hold, idle, until max_sequence_idle_microseconds. (Not one started again
            # behind a predecessor that shares its place: that one's requests still wait.)
            seq.ended = True
            self._release(seq)
            return
        if seq.ended:
            self._release(seq)
        else:
            seq.idle = self._loop.call_later(self._spec.idle_ns / 1e9, self._expire, seq)

    def _expire(self, seq: _Sequence) -> None:
        seq.idle = None
        if seq.pending == 0 and not seq.ended:
            log.info(
                "%s: sequence %r ended after %.3g s without requests (max_sequence_idle_microseconds)",
                self._ref,
                seq.id,
                self._spec.idle_ns / 1e9,
            )
            seq.ended = True
            self._release(seq)

    def _release(self, seq: _Sequence) -> None:
        """Drop the sequence's state and give its slot to the oldest sequence in the backlog."""
        if self._sequences.get(seq.id) is seq:
            del self._sequences[seq.id]
        seq.state.clear()
        if seq.idle is not None:
            seq.idle.cancel()
            seq.idle = None
        if seq.succeeded:
            return
        if seq.slot.done() and not _holds_slot(seq):  # failed by an unload before it got one
            return
        if not seq.slot.done():
            # The backlog holds the sequence, or the one it succeeded (they share the slot they wait for).
            for waiting in self._backlog:
                if waiting.slot is seq.slot:
                    self._backlog.remove(waiting)
                    break
            seq.slot.cancel()
            return
        self._holding -= 1
        while self._backlog and self._holding < self._spec.max_sequences and not self._draining:
            self._holding += 1
            granted = self._backlog.popleft()
            granted.slot.set_result(None)
            for place in granted.unheld:
                if not place.left:
                    self._hold(place)
            granted.unheld.clear()

    def _fail_slot(self, seq: _Sequence, why: str = "was unloaded before the request ran") -> None:
        if not seq.slot.done():  # (a slot shared with a successor is failed once)
            seq.slot.set_exception(ServerUnavailableError(f"{self._ref} {why}"))
            seq.slot.exception()  # read here: a sequence whose requests all left has nobody to read it

    def drain(self) -> None:
        """The model is being unloaded: the backlog fails now, and sequences holding a slot run what they have."""
        self._draining = True
        while self._backlog:
            self._fail_slot(self._backlog.popleft())

    def reject_waiting(self, why: str) -> None:
        """The server's stop ran out of grace: sequences still waiting for a slot, and requests waiting behind an
        earlier one of their sequence (which may be running), fail now with UNAVAILABLE "<model> <why>", as the
        Scheduler's queued requests do (they never ran, so their callers may start them again elsewhere), rather
        than be cut off with gRPC's bare cancel, which cannot tell them from work that ran."""
        self._draining = True
        self._refusal.refuse(why)
        while self._backlog:
            self._fail_slot(self._backlog.popleft(), why)

    def close(self) -> None:
        """The model is gone: sequences end, and those still waiting for a slot fail (never ran). A
        sequence started again before it ended may wait in the backlog without being the one its ID names."""
        self._closed = True
        for seq in [*self._sequences.values(), *self._backlog]:
            if seq.idle is not None:
                seq.idle.cancel()
                seq.idle = None
            self._fail_slot(seq)
            seq.state.clear()
        self._sequences.clear()
        self._backlog.clear()
        self._holding = 0
