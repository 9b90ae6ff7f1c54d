"""The boundary every inference-service RPC passes: the drain gate, the caller's identity and the authorization
check, then mapping exceptions to gRPC statuses.

Domain errors carry their own status code and message. Anything else is a bug: it is logged with a reference id
and the caller gets INTERNAL with that id only, never a stack trace or an internal message.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Protocol, TypeVar

import grpc
from grpc import aio

from tensorgate.server.auth.identity import CURRENT_IDENTITY
from tensorgate.server.auth.policy import Authorizer
from tensorgate.server.errors import TensorgateError
from tensorgate.server.rpc.drain import DrainGate

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class Gated(Protocol):
    """A servicer whose RPCs are counted for graceful drain and checked against the authorization policy."""

    gate: DrainGate
    auth: Authorizer


# Where each RPC's request names its model: (model field, version field). RPCs not listed name no model.
# ModelStreamInfer names one per message; the servicer checks each message itself.
_MODEL_FIELDS: dict[str, tuple[str, str | None]] = {
    "ModelInfer": ("model_name", "model_version"),
    "ModelReady": ("name", "version"),
    "ModelMetadata": ("name", "version"),
    "ModelConfig": ("name", "version"),
    "ModelStatistics": ("name", "version"),
    "RepositoryModelLoad": ("model_name", None),
    "RepositoryModelUnload": ("model_name", None),
}


def authorize(auth: Authorizer, rpc: str, request: object) -> None:
    """Check a unary call against the policy, before anything in its request is decoded."""
    fields = _MODEL_FIELDS.get(rpc)
    if fields is None:
        auth.check(rpc)
        return
    model_field, version_field = fields
    version = getattr(request, version_field) if version_field else ""
    auth.check(rpc, getattr(request, model_field), version)


S = TypeVar("S", bound=Gated)


def internal_message(exc: BaseException, where: str) -> str:
    """Log an unexpected exception and return the generic text the caller may see."""
    ref = uuid.uuid4().hex[:12]
    log.error("internal error in %s (ref %s, identity '%s')", where, ref, CURRENT_IDENTITY.get(), exc_info=exc)
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
        token, admitted = None, None
        try:
            if self.auth.enabled:
                identity = self.auth.identify(context)
                token = CURRENT_IDENTITY.set(identity)
                authorize(self.auth, fn.__name__, request)
                admitted = identity if self.auth.admit(identity) else None
            return await fn(self, request, context)
        except aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - this is the boundary
            code, message = status_of(exc, fn.__name__)
            await context.abort(code, message)
            raise  # unreachable: abort raises
        finally:
            if admitted is not None:
                self.auth.release(admitted)
            if token is not None:
                CURRENT_IDENTITY.reset(token)
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
        token, admitted = None, None
        try:
            if self.auth.enabled:
                identity = self.auth.identify(context)
                # Set for the whole stream: tasks the servicer starts per message copy the context and see it too.
                token = CURRENT_IDENTITY.set(identity)
                admitted = identity if self.auth.admit(identity) else None
            async for item in fn(self, requests, context):
                yield item
        except aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            code, message = status_of(exc, fn.__name__)
            await context.abort(code, message)
        finally:
            if admitted is not None:
                self.auth.release(admitted)
            if token is not None:
                # A generator closed from another context cannot reset; the RPC's own task ends with it anyway.
                with contextlib.suppress(ValueError):
                    CURRENT_IDENTITY.reset(token)
            self.gate.exit()

    return wrapper


__all__ = ["authorize", "internal_message", "status_of", "stream", "unary"]
