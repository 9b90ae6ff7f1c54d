"""The boundary every inference-service RPC passes: the drain gate, then mapping exceptions to gRPC statuses.

Domain errors carry their own status code and message. Anything else is a bug: it is logged with a reference id
and the caller gets INTERNAL with that id only, never a stack trace or an internal message.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Protocol, TypeVar

import grpc
from grpc import aio

from tensorgate.server.errors import TensorgateError
from tensorgate.server.rpc.drain import DrainGate

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class Gated(Protocol):
    """A servicer whose RPCs are counted for graceful drain."""

    gate: DrainGate


S = TypeVar("S", bound=Gated)


def internal_message(exc: BaseException, where: str) -> str:
    """Log an unexpected exception and return the generic text the caller may see."""
    ref = uuid.uuid4().hex[:12]
    log.error("internal error in %s (ref %s)", where, ref, exc_info=exc)
    return f"internal error (ref {ref}); details are in the server log"


def status_of(exc: Exception, where: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, TensorgateError):
        return exc.code, exc.message
    return grpc.StatusCode.INTERNAL, internal_message(exc, where)


def unary(
    fn: Callable[[S, Req, aio.ServicerContext[Req, Resp]], Coroutine[Any, Any, Resp]],
) -> Callable[[S, Req, aio.ServicerContext[Req, Resp]], Coroutine[Any, Any, Resp]]:
    @functools.wraps(fn)
    async def wrapper(self: S, request: Req, context: aio.ServicerContext[Req, Resp]) -> Resp:
        try:
            self.gate.enter()
        except TensorgateError as exc:
            await context.abort(exc.code, exc.message)
        try:
            return await fn(self, request, context)
        except aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - this is the boundary
            code, message = status_of(exc, fn.__name__)
            await context.abort(code, message)
            raise  # unreachable: abort raises
        finally:
            self.gate.exit()

    return wrapper


def stream(
    fn: Callable[[S, AsyncIterator[Req], aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]],
) -> Callable[[S, AsyncIterator[Req], aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]]:
    @functools.wraps(fn)
    async def wrapper(
        self: S, requests: AsyncIterator[Req], context: aio.ServicerContext[Req, Resp]
    ) -> AsyncIterator[Resp]:
        try:
            self.gate.enter()
        except TensorgateError as exc:
            await context.abort(exc.code, exc.message)
        try:
            async for item in fn(self, requests, context):
                yield item
        except aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            code, message = status_of(exc, fn.__name__)
            await context.abort(code, message)
        finally:
            self.gate.exit()

    return wrapper


__all__ = ["internal_message", "status_of", "stream", "unary"]
