"""Graceful drain: count RPCs in flight and refuse new ones with UNAVAILABLE once the server is stopping.

grpc's own `server.stop(grace)` cancels new calls (CANCELLED, which clients do not retry); refusing them here
with UNAVAILABLE first lets clients and load balancers retry on another replica while running calls finish.

Sequences (stateful models) are drained as Triton's sequence batcher drains them: a request that continues or ends
a sequence live here is still taken (its state is here, so no other replica can run it), a request that starts
one is refused, and the drain waits for the live sequences to end (END, or their idle time) within the grace. A
START taken before the drain and still on its way to its sequence (`OnTheirWay`) counts as live until it has
arrived or failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos.tensors import parameters_of
from tensorgate.server.backends.base import SequenceFlags, SequenceId, sequence_id_of
from tensorgate.server.errors import ServerUnavailableError

DRAINING = "the server is shutting down; retry on another replica"

SEQUENCE_POLL_S = 0.05
"""How often a drain looks again at the live sequences it waits for, and the streams held open for theirs. A
sequence ends on its END request or when its idle time passes, both on the event loop; a look costs a few
dictionary lookups. One look for all: a look of each held stream's own made a task per stream (an Event's wait)
20 times a second, a good part of a core of the loop that serves those sequences once streams number thousands."""

SequenceKey = tuple[str, SequenceId]
"""(model the request named, sequence ID)."""


def sequence_step(request: pb.ModelInferRequest) -> SequenceFlags | None:
    """A request's `sequence_id`, `sequence_start` and `sequence_end`, read from the message (the drain judges
    a request before it is decoded); None without a correlation ID. Flags of a wrong type read as unset: the
    request path refuses them."""
    params = request.parameters
    if "sequence_id" not in params:
        return None
    values = parameters_of(params)
    sequence_id = sequence_id_of(values)
    if sequence_id is None:
        return None
    return SequenceFlags(sequence_id, values.get("sequence_start") is True, values.get("sequence_end") is True)


def cut_off(keys: Iterable[SequenceKey]) -> str:
    """UNAVAILABLE's message for the clients of sequences that a stop cut off: unlike a refused START, the
    sequence cannot go on elsewhere; it must start again there."""
    named = sorted(f"sequence {sequence_id!r} of model '{model}'" for model, sequence_id in keys)
    more = f" and {len(named) - 3} more" if len(named) > 3 else ""
    return f"{DRAINING}; {', '.join(named[:3])}{more} did not end before the server stopped: start it again there"


class _Way:
    """The requests of one sequence on their way (`OnTheirWay`)."""

    __slots__ = ("requests", "starts", "tail")

    def __init__(self, tail: asyncio.Future[None]) -> None:
        self.tail = tail
        """Done once the latest of them has arrived: the next one to set off waits for it."""
        self.requests = 0
        self.starts = 0


class OnTheirWay:
    """Requests of sequences that the server has taken and that have not reached their sequence yet: a large tensor
    of theirs is decoded on a worker thread (codec.LARGE_ELEMENTS) while the event loop reads on. The requests of
    the same sequence read after one wait for it (`join`, `arrived`): else a small one behind a large START reached
    the sequence first, and failed as "not active". A draining server counts a START on its way as live
    (DrainGate): its sequence starts here, so its next requests must be taken here, not sent elsewhere.

    `ways` is empty except while such requests are on their way: every other request looks at it alone, and pays
    nothing more."""

    __slots__ = ("ways",)

    def __init__(self) -> None:
        self.ways: dict[SequenceKey, _Way] = {}

    def join(self, key: SequenceKey, start: bool) -> tuple[asyncio.Future[None] | None, asyncio.Future[None]]:
        """A request of `key` sets off: the future of the one before it on its way (None when none is), which it
        awaits before it goes on to its sequence, and its own, for `arrived`."""
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        way = self.ways.get(key)
        previous = None
        if way is None:
            way = self.ways[key] = _Way(mine)
        else:
            previous, way.tail = way.tail, mine
        way.requests += 1
        way.starts += start
        return previous, mine

    def arrived(self, key: SequenceKey, start: bool, mine: asyncio.Future[None]) -> None:
        """The request `join` gave `mine` reaches its sequence now (nothing awaits between this and its sequence),
        or failed on its way: the one behind it goes on."""
        if not mine.done():
            mine.set_result(None)
        way = self.ways[key]
        way.requests -= 1
        way.starts -= start
        if not way.requests:
            del self.ways[key]

    def starting(self, key: SequenceKey) -> bool:
        """Whether a START of `key` is on its way."""
        way = self.ways.get(key)
        return way is not None and way.starts > 0


def _never(model: str, sequence_id: SequenceId) -> bool:
    return False


def _none() -> int:
    return 0


class DrainGate:
    """Created on the event loop; `enter()`/`exit()` bracket every RPC of the inference service. `live` says
    whether a sequence of a model is live (ModelRepository.sequence_live), `live_sequences` how many are (both:
    none without sequence models)."""

    def __init__(
        self,
        live: Callable[[str, SequenceId], bool] = _never,
        live_sequences: Callable[[], int] = _none,
    ) -> None:
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._drain_started = asyncio.Event()
        self._hurried = asyncio.Event()
        self._over = asyncio.Event()
        self._look = asyncio.Event()
        """Set, and replaced, at each look of the drain: streams held open for their sequences look then too."""
        self.draining = False
        self.live = live
        self.live_sequences = live_sequences
        self.refused = 0
        """Calls and stream messages the drain refused: the stop's log line counts those sent elsewhere."""
        self.on_their_way = OnTheirWay()
        """Requests of sequences still on their way to them: a START among them counts as live."""

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def enter(self, request: object = None) -> None:
        """Count an RPC in; UNAVAILABLE once draining, unless `request` continues a live sequence."""
        if self.draining:
            refusal = self.refusal(request)
            if refusal is not None:
                try:
                    raise refusal
                finally:  # else this frame, which the error's traceback holds, holds the error: a cycle
                    refusal = None
        self._in_flight += 1
        self._idle.clear()

    def exit(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    def refusal(self, request: object) -> ServerUnavailableError | None:
        """Why a draining server refuses `request`: any call, but an inference request without START in a sequence
        live here (or whose START is on its way), which it takes until the drain is over (its grace ended, or a
        second signal), and then refuses as cut off (`cut_off`). A request that starts a sequence is refused: it
        can start on another replica."""
        if isinstance(request, pb.ModelInferRequest):
            step = sequence_step(request)
            if step is not None and not step.start and self._continues(request.model_name, step.id):
                if not self._over.is_set():
                    return None
                self.refused += 1
                return ServerUnavailableError(cut_off([(request.model_name, step.id)]))
        self.refused += 1
        return ServerUnavailableError(DRAINING)

    def _continues(self, model: str, sequence_id: SequenceId) -> bool:
        """Whether a request without START to `sequence_id` of `model` continues a sequence of this server: one
        live, or one whose START was taken before the drain and is still on its way to it (its decode)."""
        if self.live(model, sequence_id):
            return True
        return bool(self.on_their_way.ways) and self.on_their_way.starting((model, sequence_id))

    async def started(self) -> None:
        """Wait for the drain to start: an open stream then ends once it has answered what it started, rather than
        wait for messages that would hold the drain for its whole grace."""
        await self._drain_started.wait()

    async def sequences_ended(self, keys: set[SequenceKey]) -> None:
        """Wait, once the drain has started, until none of the sequences in `keys` (those an open stream sends
        requests into) is live, or the drain is over; `keys` loses those that end. A stream in the middle of a
        sequence stays open for its next requests until then."""
        await self._drain_started.wait()
        while not self._over.is_set() and self.keep_live(keys):
            await self._look.wait()

    def keep_live(self, keys: set[SequenceKey]) -> bool:
        """Drop from `keys` the sequences no longer live, nor on their way to start; whether any is left."""
        for key in [k for k in keys if not self._continues(*k)]:
            keys.discard(key)
        return bool(keys)

    @property
    def hurried(self) -> bool:
        return self._hurried.is_set()

    def hurry(self) -> None:
        """Stop waiting for running RPCs (a second stop signal): the drain, under way or still to come, ends now
        as if its grace were over."""
        self._hurried.set()

    async def drain(self, timeout: float) -> bool:
        """Refuse new RPCs and wait up to `timeout` seconds, or until `hurry()`, for running ones and live
        sequences; True when all finished."""
        self.draining = True
        self._drain_started.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while not (self._hurried.is_set() or self.drained):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._look.set()  # held streams look at their sequences
                self._look = asyncio.Event()
                # Calls running (streams held for their sequences among them), or sequences live with none
                # running (their next requests may still come): look again in SEQUENCE_POLL_S either way.
                waits = (self._idle, self._hurried) if self._in_flight else (self._hurried,)
                await _first(waits, min(remaining, SEQUENCE_POLL_S))
        finally:
            self._over.set()
            self._look.set()
        return self.drained

    @property
    def drained(self) -> bool:
        # A request on its way holds the drain too: an END runs on without its stream (ModelStreamInfer).
        return self._in_flight == 0 and self.live_sequences() == 0 and not self.on_their_way.ways


async def _first(events: Iterable[asyncio.Event], timeout: float) -> None:
    """Until one of `events` is set, or `timeout` seconds."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
