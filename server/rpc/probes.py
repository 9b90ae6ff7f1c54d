"""Authorization for the standard probe services (grpc.health.v1 and server reflection), when asked for.

By default (`--auth-probes open`) health checks and reflection answer anyone who completes the handshake: a
kubelet or load balancer probe carries no bearer token and often no client certificate of its own. With
`--auth-probes policy` they go through the same check as the inference service, in one server interceptor:

    grpc.health.v1.Health/Check, /Watch           API group `health`   (as ServerLive, ServerReady, ModelReady)
    grpc.reflection.*.ServerReflection/*          API group `metadata` (it describes the API, as ServerMetadata)

Reflection sits in `metadata` because what it reveals is the service's schema, the same kind of thing that
ServerMetadata and ModelMetadata reveal; an identity that may read metadata may discover the API too.

The identity comes from `Authorizer.identify` (verified client certificate, else bearer token, else `anonymous`),
so a missing or unknown token answers UNAUTHENTICATED and an identity without the group PERMISSION_DENIED naming
the identity and the RPC, exactly as on the inference service, and denials are counted in the same metric. Probes
are not counted against the per-identity in-flight cap and do not pass the drain gate: a draining server must still
answer NOT_SERVING to its probes.

A stream is checked again while it is open, since a policy reload may revoke its caller: reflection before each
request message it reads, and Health.Watch, which may sit for hours between two updates, before each update it
writes and every RECHECK_S in between (the check is what notices a changed policy file). Either ends with the
check's status (PERMISSION_DENIED) once the caller has lost the right, as ModelStreamInfer's messages are
refused one by one.

Only the probe services are wrapped; every other method is handed through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from contextvars import Token
from typing import Any, TypeVar

import grpc
from grpc import aio

from tensorgate.server.auth.identity import CURRENT_IDENTITY
from tensorgate.server.auth.policy import Authorizer
from tensorgate.server.errors import TensorgateError
from tensorgate.server.rpc.errors import refuse

Req = TypeVar("Req")
Resp = TypeVar("Resp")

# The services wrapped; `probe_rpc` gives each method its name in the policy's RPC_GROUPS.
_HEALTH = "grpc.health.v1.Health"
_REFLECTION = ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")
RECHECK_S = 1.0
"""How often an open Health.Watch checks its caller between two updates (as often as the policy file is)."""


def probe_rpc(method: str) -> str | None:
    """The policy's name for a probe method ("/grpc.health.v1.Health/Check" -> "Health.Check"); None otherwise."""
    service, _, name = method.lstrip("/").rpartition("/")
    if service == _HEALTH and name in ("Check", "Watch"):
        return f"Health.{name}"
    if service in _REFLECTION:
        return "ServerReflectionInfo"
    return None


class ProbeAuthorization(aio.ServerInterceptor):
    """Puts the health and reflection services under `auth`'s policy (see the module docstring).

    The identity is only known inside the call (the TLS session and metadata are on the ServicerContext), so the
    interceptor wraps the service's own behaviour with a check that runs first, keeping its async shape.
    """

    def __init__(self, auth: Authorizer) -> None:
        self._auth = auth

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Req, Resp] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Req, Resp] | None:
        handler = await continuation(handler_call_details)
        rpc = probe_rpc(handler_call_details.method)
        if rpc is None or handler is None:
            return handler
        kind = ("stream_" if handler.request_streaming else "unary_") + (
            "stream" if handler.response_streaming else "unary"
        )
        behavior = getattr(handler, kind)
        wrap = {
            "unary_unary": grpc.unary_unary_rpc_method_handler,
            "unary_stream": grpc.unary_stream_rpc_method_handler,
            "stream_unary": grpc.stream_unary_rpc_method_handler,
            "stream_stream": grpc.stream_stream_rpc_method_handler,
        }[kind]
        return wrap(
            self._guard(rpc, behavior, handler.request_streaming, handler.response_streaming),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _check(self, rpc: str, context: aio.ServicerContext[Any, Any]) -> Token[str] | None:
        """Identify and authorize, or abort the call with the error's status; returns the contextvar token that
        the caller resets once the call is over (log lines below see who is calling)."""
        token = None
        try:
            token = CURRENT_IDENTITY.set(self._auth.identify(context))
            self._auth.check(rpc)
        except TensorgateError as exc:
            if token is not None:
                CURRENT_IDENTITY.reset(token)
            await refuse(context, exc.code, exc.message)
        return token

    def _guard(
        self, rpc: str, behavior: Callable[..., Any], request_streaming: bool, response_streaming: bool
    ) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behavior):

            async def generator(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                token = await self._check(rpc, context)
                try:
                    if request_streaming:  # reflection: each request message is checked
                        request = self._rechecked(rpc, request)
                    async for reply in behavior(request, context):
                        yield reply
                except TensorgateError as exc:
                    await refuse(context, exc.code, exc.message)
                finally:
                    _reset(token)

            return generator
        if inspect.iscoroutinefunction(behavior):

            async def coroutine(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
                token = await self._check(rpc, context)
                try:
                    if response_streaming:  # it writes its replies with context.write (Health.Watch)
                        return await self._watched(rpc, behavior, request, context)
                    return await behavior(request, context)
                finally:
                    _reset(token)

            return coroutine
        # A synchronous servicer would run on grpc's thread pool, where this check cannot abort: fail the call
        # rather than serve it unchecked. (tensorgate registers the asyncio health and reflection servicers.)
        raise TypeError(f"{rpc}: only asyncio servicers can be put under the authorization policy")

    async def _rechecked(self, rpc: str, requests: AsyncIterable[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            self._auth.check(rpc)  # raises for a caller a reloaded policy no longer allows
            yield request

    async def _watched(
        self, rpc: str, behavior: Callable[..., Any], request: Any, context: aio.ServicerContext[Any, Any]
    ) -> Any:
        """Run a stream that writes its replies, checking its caller before each write and every RECHECK_S; on a
        denial it stops and the call ends with the denial's status."""
        task = asyncio.ensure_future(behavior(request, _CheckedWrites(context, lambda: self._auth.check(rpc))))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=RECHECK_S)
                if done:
                    return task.result()
                self._auth.check(rpc)
        except TensorgateError as exc:
            await refuse(context, exc.code, exc.message)
        finally:
            task.cancel()  # a denial, or the caller went away: the stream's own cleanup runs as it ends


class _CheckedWrites:
    """A call's context whose `write` checks the caller first; everything else is the context's own."""

    def __init__(self, context: aio.ServicerContext[Any, Any], check: Callable[[], None]) -> None:
        self._context = context
        self._check = check

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def write(self, message: Any) -> None:
        self._check()
        await self._context.write(message)


def _reset(token: Token[str] | None) -> None:
    # A generator closed from another context cannot reset; the call's own task ends with it anyway.
    if token is not None:
        with contextlib.suppress(ValueError):
            CURRENT_IDENTITY.reset(token)


__all__ = ["ProbeAuthorization", "probe_rpc"]
