"""Graceful drain: count RPCs in flight and refuse new ones with UNAVAILABLE once the server is stopping.

grpc's own `server.stop(grace)` cancels new calls (CANCELLED, which clients do not retry); refusing them here
with UNAVAILABLE first lets clients and load balancers retry on another replica while running calls finish.
"""

from __future__ import annotations

import asyncio

from tensorgate.server.errors import ServerUnavailableError

DRAINING = "the server is shutting down; retry on another replica"


class DrainGate:
    """Created on the event loop; `enter()`/`exit()` bracket every RPC of the inference service."""

    def __init__(self) -> None:
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._drain_started = asyncio.Event()
        self._hurried = asyncio.Event()
        self.draining = False

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def enter(self) -> None:
        if self.draining:
            raise ServerUnavailableError(DRAINING)
        self._in_flight += 1
        self._idle.clear()

    def exit(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    async def started(self) -> None:
        """Wait for the drain to start: an open stream then ends once it has answered what it started, rather than
        wait for messages that would hold the drain for its whole grace."""
        await self._drain_started.wait()

    @property
    def hurried(self) -> bool:
        return self._hurried.is_set()

    def hurry(self) -> None:
        """Stop waiting for running RPCs (a second stop signal): the drain, under way or still to come, ends now
        as if its grace were over."""
        self._hurried.set()

    async def drain(self, timeout: float) -> bool:
        """Refuse new RPCs and wait up to `timeout` seconds, or until `hurry()`, for running ones; True when all
        finished."""
        self.draining = True
        self._drain_started.set()
        idle = asyncio.ensure_future(self._idle.wait())
        hurried = asyncio.ensure_future(self._hurried.wait())
        try:
            await asyncio.wait((idle, hurried), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
            hurried.cancel()
        return self._in_flight == 0
