"""The boundary every inference-service RPC passes: the drain gate, the caller's identity and the authorization
check, then mapping exceptions to gRPC statuses.

Domain errors carry their own status code and message. Anything else is a bug: it is logged with a reference id
and the caller gets INTERNAL with that id only, never a stack trace or an internal message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, NoReturn, Protocol, TypeVar, cast

import grpc
from grpc import aio
from opentelemetry import context as otel_context

from tensorgate.protos.tensors import PERMANENT_METADATA
from tensorgate.server.auth.identity import CURRENT_IDENTITY
from tensorgate.server.auth.policy import RPC_GROUPS, Authorizer
from tensorgate.server.errors import CONTROL_ESCAPES, TensorgateError
from tensorgate.server.repository.rollout import ROUTED_VERSION
from tensorgate.server.rpc.drain import DrainGate
from tensorgate.server.rpc.malformed import Malformed
from tensorgate.server.telemetry.tracing import CALL_TIMEOUT, Tracing, cancelled_code

log = logging.getLogger(__name__)
access_log = logging.getLogger("tensorgate.access")

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
    # tensorgate.v1.Monitoring (server/rpc/monitoring.py)
    "SubmitFeedback": ("model", None),
    "SubmitFeedbackBatch": ("model", None),
    "GetModelQuality": ("model", "version"),
    "GetModelDrift": ("model", "version"),
    "ListAlerts": ("model", None),
    # tensorgate.v1.Rollout (server/rpc/rollout.py)
    "GetRollout": ("model", None),
}


def model_of(rpc: str, request: object) -> tuple[str, str] | None:
    """(model, version) that a call's request names, or None for an RPC that names no model."""
    fields = _MODEL_FIELDS.get(rpc)
    if fields is None:
        return None
    model_field, version_field = fields
    return getattr(request, model_field, ""), getattr(request, version_field, "") if version_field else ""


def authorize(auth: Authorizer, rpc: str, request: object) -> None:
    """Check a unary call against the policy, before anything in its request is decoded."""
    named = model_of(rpc, request)
    if named is None:
        auth.check(rpc)
        return
    auth.check(rpc, *named)


S = TypeVar("S", bound=Gated)


def internal_message(exc: BaseException, where: str) -> str:
    """Log an unexpected exception and return the generic text the caller may see."""
    ref = uuid.uuid4().hex[:12]
    log.error("internal error in %s (ref %s, identity '%s')", where, ref, CURRENT_IDENTITY.get(), exc_info=exc)
    return f"internal error (ref {ref}); details are in the server log"


STATUS_MESSAGE_BYTES = 4096
"""The most a status message may take in its header once percent-encoded, as gRPC sends it: a client refuses a
header over 8 KiB (reporting that instead of the error), and text the caller sent (a region's name, a datatype)
can make a message of any length. Names (`shown`) are cut before this applies, so it rarely does."""


def _encoded_size(message: str) -> int:
    data = message.encode("utf-8")
    # grpc-message percent-encodes every byte outside printable ASCII, and "%" itself, as three bytes (a character
    # takes at most 4 bytes of UTF-8: at most 12 encoded).
    return len(data) + 2 * sum(1 for b in data if b < 0x20 or b > 0x7E or b == 0x25)


def fit_status_message(message: str) -> str:
    """`message` with its control characters escaped (a newline as `\\n`), cut to STATUS_MESSAGE_BYTES once
    encoded. Clients log the message they get, and it quotes text the caller sent (a model's, a tensor's or a
    region's name): a newline there would forge a line in that log, a terminal escape recolour whoever reads it."""
    if not message.isprintable():
        message = message.translate(CONTROL_ESCAPES)
    if len(message) * 12 <= STATUS_MESSAGE_BYTES or _encoded_size(message) <= STATUS_MESSAGE_BYTES:
        return message
    suffix = f"... (message cut, {len(message)} characters)"
    budget, kept = STATUS_MESSAGE_BYTES - len(suffix), 0
    for i, char in enumerate(message):
        budget -= _encoded_size(char)
        if budget < 0:
            break
        kept = i + 1
    return message[:kept] + suffix


def status_of(exc: Exception, where: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, TensorgateError):
        return exc.code, fit_status_message(exc.message)
    return grpc.StatusCode.INTERNAL, internal_message(exc, where)


def _aborted_code(context: aio.ServicerContext[Any, Any]) -> str:
    status = context.code()
    return status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"


def request_attributes(rpc: str, request: object) -> dict[str, str]:
    """What the request names (model, version, request id), for its span from the start: a call that fails before
    validation (NOT_FOUND, PERMISSION_DENIED, RESOURCE_EXHAUSTED) is still found by model. Never tensor values."""
    model, version = model_of(rpc, request) or ("", "")
    request_id = getattr(request, "id", "")
    out = {"tensorgate.model.name": model, "tensorgate.model.version": version, "tensorgate.request.id": request_id}
    return {k: v for k, v in out.items() if v and isinstance(v, str)}


def access_log_line(
    rpc: str, request: object, code: str, started_ns: int, response: object = None, error: object = None
) -> None:
    """One debug line per call: who asked for what, how it ended and how long it took; never the payload. A
    stream's messages are ModelInferRequests, named as ModelInfer's are. The version is the request's; when it left
    that to the server, the one that answered (the response's), the one its error names (a request refused as
    invalid once the server had picked a version), or the one it was sent to (ROUTED_VERSION)."""
    model, version = model_of("ModelInfer" if rpc == "ModelStreamInfer" else rpc, request) or ("", "")
    version = (
        version
        or getattr(response, "model_version", "")
        or str(getattr(error, "version", None) or "")
        or ROUTED_VERSION.get()  # a call that ended before its answer, a timeout or a cancel, had one picked
        or ""
    )
    access_log.debug(
        "%s model=%s version=%s id=%s status=%s latency_ms=%.3f",
        rpc,
        model or "-",
        version or "-",
        getattr(response, "id", "") or getattr(request, "id", "") or "-",  # the id the server gave one sent without
        code,
        (time.perf_counter_ns() - started_ns) / 1e6,
    )


def refused_before_handler(
    tracing: Tracing | None,
    rpc: str,
    context: aio.ServicerContext[Any, Any],
    request: object,
    exc: TensorgateError,
    started_ns: int,
) -> None:
    """The access line and server span of a call refused before its handler ran (a draining server; a unary call
    without a valid token, refused unread by rpc/token_gate.py): a refused call has both, the line in the span's
    trace. Such calls had their line and no span, so a trace search by status missed what the log showed."""
    span = token = None
    if tracing is not None:
        span, token = tracing.start_rpc(rpc, context.invocation_metadata())
        if request is not None and span.is_recording():
            span.set_attributes(request_attributes(rpc, request))
    try:
        if access_log.isEnabledFor(logging.DEBUG):
            access_log_line(rpc, request, exc.code.name, started_ns)
    finally:
        if span is not None:
            Tracing.end_rpc(span, token, exc.code.name, exc)


NO_RETRY = (("grpc-retry-pushback-ms", "-1"),)
"""gRPC's server pushback (gRFC A6): a negative value stops a client's configured retries of this call."""

RETRIED_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED})
"""Codes that clients' retry policies retry, and tensorgate answers before a request runs (not ready, draining,
queue full): such a refusal goes out without a response message (`refuse`), or no client would retry it."""


def retried(exc: BaseException, status: grpc.StatusCode) -> bool:
    """Whether a refusal should reach the client as one its retry policy may send again: a code it retries, work
    not done, and a request that could pass another time."""
    return status in RETRIED_CODES and not getattr(exc, "ran", False) and not getattr(exc, "permanent", False)


async def refuse(context: aio.ServicerContext[Any, Any], status: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with `status` and no response message (Trailers-Only), which gRPC's retry policies retry
    (gRFC A6): a unary handler that returns after `set_code` makes grpc.aio send an empty message first, and a call
    that got a message is committed, never retried. Raises the AbortError that gRPC expects.

    gRPC keeps that error on the call's state, and its traceback holds the frames it went through (the request
    among their locals) and the state itself: a cycle that would keep each refused call whole until a full garbage
    collection. The traceback and the error it was raised while handling are dropped once the call is over: by the
    call's task, not `context.add_done_callback`, whose callbacks gRPC keeps on the state bound to the context,
    itself a cycle (state, context and error) left by every refused call."""
    try:
        await context.abort(status, message)
    except aio.AbortError as aborted:
        error: BaseException = aborted  # (`aborted` is unbound when the except clause ends)

        def forget(_task: object) -> None:
            error.__traceback__ = None
            error.__context__ = error.__cause__ = None

        task = asyncio.current_task()  # the call's: gRPC runs a handler in the task that ends with the call
        if task is not None:
            task.add_done_callback(forget)
        raise


def unary(
    fn: Callable[[S, Req, aio.ServicerContext[Req, Resp]], Coroutine[Any, Any, Resp]],
) -> Callable[[S, Req, aio.ServicerContext[Req, Resp]], Coroutine[Any, Any, Resp]]:
    rpc = fn.__name__
    # Health checks (ServerLive, ServerReady, ModelReady) are probes, polled every few seconds: never traced.
    untraced = RPC_GROUPS.get(rpc) == "health"

    @functools.wraps(fn)
    async def wrapper(self: S, request: Req, context: aio.ServicerContext[Req, Resp]) -> Resp:
        started = time.perf_counter_ns()
        try:
            self.gate.enter(request)  # a draining server still takes a request that continues a live sequence
        except TensorgateError as exc:
            # A client sent away by a stop shows in the log and the traces too.
            refused_before_handler(
                None if untraced else getattr(self, "tracing", None), rpc, context, request, exc, started
            )
            await refuse(context, exc.code, exc.message)
        token, admitted, response = None, None, None
        tracing: Tracing | None = None if untraced else getattr(self, "tracing", None)
        span = span_token = None
        code, error = "OK", cast(BaseException | None, None)
        timeout = context.time_remaining()
        timeout_token = CALL_TIMEOUT.set(timeout)  # for the servicer's counts of a cancelled call
        try:
            if tracing is not None:
                span, span_token = tracing.start_rpc(rpc, context.invocation_metadata())
                if span.is_recording():
                    span.set_attributes(request_attributes(rpc, request))
            if self.auth.enabled:
                identity = self.auth.identify(context)
                token = CURRENT_IDENTITY.set(identity)
                if span is not None:
                    Tracing.set_identity(span, identity)
                authorize(self.auth, rpc, request)
                admitted = identity if self.auth.admit(identity) else None
            if span is not None and tracing is not None:
                tracing.count(span, rpc)
            if isinstance(request, Malformed):  # bytes that did not parse (rpc/malformed.py)
                raise request.error(rpc)
            response = await fn(self, request, context)
            return response
        except aio.AbortError as exc:
            code, error = _aborted_code(context), exc
            raise
        except BaseException as exc:  # noqa: BLE001 - this is the boundary
            error = exc
            if not isinstance(exc, Exception):  # cancelled: the caller went away, or its deadline passed
                code = cancelled_code(context.time_remaining(), timeout)
                raise
            status, message = status_of(exc, rpc)
            code = status.name
            if retried(exc, status):
                await refuse(context, status, message)
            # Else the status is set and the call returns, rather than `context.abort` (whose error gRPC keeps on
            # the call's state: see `refuse`). grpc.aio then sends an empty message before the status, which
            # clients ignore, and which keeps their retry policies from sending the call again.
            context.set_code(status)
            context.set_details(message)
            if getattr(exc, "ran", False):
                context.set_trailing_metadata(NO_RETRY)
            elif getattr(exc, "permanent", False):  # the client's retry_safe says so (pushback alone reads as ran)
                context.set_trailing_metadata((*NO_RETRY, PERMANENT_METADATA))
            return cast(Resp, None)
        finally:
            if access_log.isEnabledFor(logging.DEBUG):  # while span and identity are current: the line has both
                access_log_line(rpc, request, code, started, response, error)
            if admitted is not None:
                self.auth.release(admitted)
            if token is not None:
                CURRENT_IDENTITY.reset(token)
            CALL_TIMEOUT.reset(timeout_token)
            self.gate.exit()
            if span is not None:
                Tracing.end_rpc(span, span_token, code, error)
            # The error's traceback holds this frame, and the frame would hold the error: a cycle that keeps the
            # request and its tensors until a full garbage collection, which a busy server may not run for
            # thousands of calls. Broken here, a failed call's memory goes when the call does, as a served one's.
            error = None

    return wrapper


def stream(
    fn: Callable[[S, AsyncIterator[Req], aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]],
) -> Callable[[S, AsyncIterator[Req], aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]]:
    rpc = fn.__name__

    @functools.wraps(fn)
    async def wrapper(
        self: S, requests: AsyncIterator[Req], context: aio.ServicerContext[Req, Resp]
    ) -> AsyncIterator[Resp]:
        started = time.perf_counter_ns()
        try:
            self.gate.enter()
        except TensorgateError as exc:
            refused_before_handler(getattr(self, "tracing", None), rpc, context, None, exc, started)
            await refuse(context, exc.code, exc.message)
        token, admitted = None, None
        tracing: Tracing | None = getattr(self, "tracing", None)
        span, rpc_context = None, None
        code, error = "OK", cast(BaseException | None, None)
        if tracing is not None:
            # The span is made current around each step of the handler, never across a yield: this generator may be
            # closed from another task's context (finalised after the client went away), where a token attached
            # before a yield cannot be detached (OpenTelemetry logs an error). The tasks the servicer starts per
            # message are created inside a step, so they copy the span and put their own spans under it.
            span, span_token = tracing.start_rpc(rpc, context.invocation_metadata())
            rpc_context = otel_context.get_current()
            Tracing.release(span_token)
        timeout = context.time_remaining()
        # For the servicer's counts of a cancelled message: the tasks it starts per message copy the context.
        timeout_token = CALL_TIMEOUT.set(timeout)
        try:
            if self.auth.enabled:
                identity = self.auth.identify(context)
                # Set for the whole stream: tasks the servicer starts per message copy the context and see it too.
                token = CURRENT_IDENTITY.set(identity)
                if span is not None:
                    Tracing.set_identity(span, identity)
                admitted = identity if self.auth.admit(identity) else None
            if span is not None and tracing is not None:
                tracing.count(span, rpc)
            responses = fn(self, requests, context)
            if rpc_context is None:
                async for item in responses:
                    yield item
            else:
                while True:
                    step = otel_context.attach(rpc_context)
                    try:
                        item = await anext(responses)
                    except StopAsyncIteration:
                        break
                    finally:
                        otel_context.detach(step)
                    yield item
        except aio.AbortError as exc:
            code, error = _aborted_code(context), exc
            raise
        except BaseException as exc:  # noqa: BLE001 - this is the boundary
            error = exc
            if not isinstance(exc, Exception):  # cancelled: the caller went away, or its deadline passed
                code = cancelled_code(context.time_remaining(), timeout)
                raise
            status, message = status_of(exc, rpc)
            code = status.name
            await refuse(context, status, message)
        finally:
            if admitted is not None:
                self.auth.release(admitted)
            if token is not None:
                # A generator closed from another context cannot reset; the RPC's own task ends with it anyway.
                with contextlib.suppress(ValueError):
                    CURRENT_IDENTITY.reset(token)
            with contextlib.suppress(ValueError):
                CALL_TIMEOUT.reset(timeout_token)
            self.gate.exit()
            if access_log.isEnabledFor(logging.DEBUG):
                access_log_line(rpc, None, code, started)
            if span is not None:
                Tracing.end_rpc(span, None, code, error)
            error = None  # the cycle through this frame (see `unary`)

    return wrapper


__all__ = [
    "access_log",
    "access_log_line",
    "authorize",
    "internal_message",
    "refused_before_handler",
    "request_attributes",
    "status_of",
    "stream",
    "unary",
]
