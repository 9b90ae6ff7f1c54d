"""Writing the requests of a grpc.aio stream so that the server's status survives the server ending it early.

grpc.aio (1.85 included) reports INTERNAL "Internal error from Core" for a client-streaming call when the server
ends the call while the client is still writing (an authorization refusal, a drain, an abort): the failed write
overwrites the status the server sent (grpc/grpc#36066). grpc's sync API and other gRPC implementations report
the server's own status, and so does this writer: a write that fails because the call is over ends the writing
and leaves the status to the reader. (A failed send means the call is ending: its status follows, once the reader
has taken the responses buffered before it, so a slow reader must not be raced with a timeout of our own.)

It uses two private attributes of grpc.aio's calls; with a grpcio that lacks them, it writes through the public
``write`` and the bug shows again (tests/test_auth_policy.py checks the status over repeated refusals).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio
from google.protobuf.message import Message
from grpc._cython import cygrpc  # type: ignore[attr-defined]


async def pump(call: grpc.aio.StreamStreamCall[Any, Any], messages: AsyncIterator[Message]) -> None:
    """Write every message on ``call``, then half-close it; return quietly once the call is over."""
    try:
        async for message in messages:
            if not await write(call, message):
                return
        await call.done_writing()  # a no-op on a call that is over
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError, cygrpc.InternalError):
        return  # the call ended meanwhile: the reader has its status
    except BaseException:
        call.cancel()  # the requests themselves failed: end the call, as grpc's own request consumer does
        raise


async def write(call: grpc.aio.StreamStreamCall[Any, Any], message: Message) -> bool:
    """Send one message; False when the call is over (its status is the reader's to report)."""
    cython_call = getattr(call, "_cython_call", None)
    metadata_sent = getattr(call, "_metadata_sent", None)
    if cython_call is None or metadata_sent is None:
        await call.write(message)
        return True
    if call.done():
        return False
    if not metadata_sent.is_set():
        await metadata_sent.wait()  # as grpc's own write: messages go after the call's metadata
        if call.done():
            return False
    try:
        await cython_call.send_serialized_message(message.SerializeToString())
    except cygrpc.InternalError:
        return False
    return True


def start(call: grpc.aio.StreamStreamCall[Any, Any], messages: AsyncIterator[Message]) -> asyncio.Task[None]:
    """Write ``messages`` on ``call`` in a task of their own, while the caller reads the responses."""
    return asyncio.ensure_future(pump(call, messages))


async def stop(call: grpc.aio.StreamStreamCall[Any, Any], writer: asyncio.Task[None]) -> None:
    """End the call and its writer: a no-op once the stream is over, a cancel when the reader leaves early."""
    call.cancel()
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
