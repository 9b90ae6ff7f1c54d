"""Refuse a call without a valid bearer token before its request message is read.

grpc reads and parses a unary call's whole message before the servicer runs, so the token check at the RPC
boundary (server/rpc/errors.py) came after up to --max-message-bytes of it had been taken in, parsed and held: a
caller with no token at all, sending large requests side by side, could take the server's memory to gigabytes
(16 concurrent 64 MiB requests took one from 120 MiB to 2.6 GiB), though every one was refused. Denial of service
by verified callers is out of the threat model; by callers without any credential it is not.

Metadata arrives before the message, so this interceptor reads the token there. A unary call whose token is
missing or unknown gets a handler that takes its request as a stream and never reads it: gRPC then stops at its
flow-control window instead of the message, and the call ends UNAUTHENTICATED through `Authorizer.identify`, which
counts and logs it as before. Calls with a valid token are handed through untouched, and so are streaming calls
(their boundary checks the token before reading a message) and the probe services, which answer without a token
unless --auth-probes policy puts them under the policy.

Installed only where tokens can apply: a policy file and no mTLS (under mTLS tokens are never consulted, and a
caller without a certificate has no connection).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc
from grpc import aio

from tensorgate.server.auth.policy import RPC_GROUPS, Authorizer
from tensorgate.server.errors import TensorgateError
from tensorgate.server.rpc.errors import refuse, refused_before_handler
from tensorgate.server.rpc.probes import probe_rpc
from tensorgate.server.telemetry.tracing import Tracing

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class TokenGate(aio.ServerInterceptor):
    """Refuses unary calls without a valid bearer token before their message is read (see the module docstring)."""

    def __init__(self, auth: Authorizer, tracing: Tracing | None = None) -> None:
        self._auth = auth
        self._tracing = tracing

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Req, Resp] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Req, Resp] | None:
        handler = await continuation(handler_call_details)
        if (
            handler is None
            or handler.unary_unary is None  # streams read their messages only once the boundary let them in
            or probe_rpc(handler_call_details.method) is not None
            or not self._auth.refuses_token(handler_call_details.invocation_metadata)
        ):
            return handler
        rpc = handler_call_details.method.rsplit("/", 1)[-1]
        # Health calls are probes, never traced (as at the RPC boundary): one polled without a token is no trace.
        tracing = None if RPC_GROUPS.get(rpc) == "health" else self._tracing
        return grpc.stream_unary_rpc_method_handler(
            _unread(self._auth, tracing, rpc, cast("Callable[..., Awaitable[Any]]", handler.unary_unary)),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _unread(
    auth: Authorizer, tracing: Tracing | None, rpc: str, behavior: Callable[..., Awaitable[Any]]
) -> Callable[[AsyncIterator[Any], aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    async def refused(requests: AsyncIterator[Any], context: aio.ServicerContext[Any, Any]) -> Any:
        started = time.perf_counter_ns()
        try:
            auth.identify(context)  # raises UNAUTHENTICATED, counted and logged as at the RPC boundary
        except TensorgateError as exc:
            # Its access line and span, as at the boundary (the message unread: nothing from it in either).
            refused_before_handler(tracing, rpc, context, None, exc, started)
            await refuse(context, exc.code, exc.message)
        # A policy reload made the token valid since the interceptor looked: serve the call as it came.
        async for request in requests:
            return await behavior(request, context)
        return None

    return refused


__all__ = ["TokenGate"]
