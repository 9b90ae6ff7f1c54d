"""GRPCInferenceService: each RPC decodes, calls the pipeline or repository, and encodes; nothing more.

Every method goes through one error mapper (server/rpc/errors.py). The RPC that tensorgate does not implement
(CUDA shared memory registration) is inherited from the generated base and answers UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from grpc import aio
from opentelemetry import trace

from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos.service import GRPCInferenceServiceServicer
from tensorgate.protos.tensors import FINAL_RESPONSE, PERMANENT, RAN, STATUS_CODE
from tensorgate.server import __version__
from tensorgate.server.auth.identity import CURRENT_IDENTITY
from tensorgate.server.auth.policy import Authorizer
from tensorgate.server.backends.base import backend_ready
from tensorgate.server.errors import (
    FailedPreconditionError,
    InvalidSettingError,
    ModelNotFoundError,
    ModelUnavailableError,
    ResourceExhaustedError,
    ServerUnavailableError,
    TensorgateError,
    model_ref,
)
from tensorgate.server.pipeline.handler import InferenceHandler
from tensorgate.server.pipeline.types import InferRequest
from tensorgate.server.repository.manager import ModelRepository
from tensorgate.server.rpc import codec, errors
from tensorgate.server.rpc.byte_budget import ByteBudget, ByteBudgetError, request_bytes
from tensorgate.server.rpc.drain import DRAINING, DrainGate, SequenceKey, cut_off, sequence_step
from tensorgate.server.rpc.malformed import Malformed
from tensorgate.server.rpc.shared_memory import RegionNotFoundError, SystemSharedMemory, encode_status
from tensorgate.server.telemetry import log_settings, trace_settings
from tensorgate.server.telemetry.tracing import Tracing, request_cut_code

if TYPE_CHECKING:
    from tensorgate.server.telemetry.metrics import RequestCounts

log = logging.getLogger(__name__)

SERVER_NAME = "tensorgate"
# Only what is really implemented: perf_analyzer reads this list to decide what to call. Triton 2.51 also lists
# binary_tensor_data (HTTP only) and cuda_shared_memory (registration is UNIMPLEMENTED here); system_shared_memory
# is added when it is on.
EXTENSIONS = (
    "classification",
    "logging",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "parameters",
    "schedule_policy",
    "sequence",
    "statistics",
    "trace",
)

Context = aio.ServicerContext[Any, Any]
_RELAYED = object()
"""Queued on a stream when a decoupled model's request has sent its last response (or its error)."""
_READY = object()
"""Queued on a stream when an answer to a request of a model that is not decoupled is done."""
STREAM_WINDOW = 512
"""Requests one ModelStreamInfer stream may have read and not yet answered (a decoupled model's: until its last
response is out), and apart from those, decoupled models' responses it may hold for the client. Past it the stream
reads no more requests, and decoupled requests read no more of their upstream's responses, until the client takes
answers: a client that stops reading stalls its own writes (HTTP/2 flow control) and the upstream's, instead of
making the server hold every answer. Well above what batching can use of one stream, so a pipelined client
(perf_analyzer --streaming) never waits on it."""

CARRIED_FORGET_AT = 64
"""Sequence keys a stream keeps before it first drops those no longer live (ModelStreamInfer's `carried`)."""


class _Window:
    """What a stream holds for its client, counted, and a wait for room under STREAM_WINDOW. A count and a future
    made only when something waits: a semaphore cost every message of a fast stream a coroutine."""

    __slots__ = ("held", "_room")

    def __init__(self) -> None:
        self.held = 0
        self._room: asyncio.Future[None] | None = None

    def release(self) -> None:
        self.held -= 1
        room = self._room
        if room is not None and not room.done():
            room.set_result(None)

    async def room(self) -> None:
        """Return once under the window; several may wait (each decoupled request of a stream)."""
        while self.held >= STREAM_WINDOW:
            if self._room is None or self._room.done():
                self._room = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._room)  # one waiter cancelled (its stream ended) leaves the others waiting


def _ends_sequence(request: pb.ModelInferRequest) -> bool:
    """Whether a request carries sequence_end (read without adding the key to the request's map)."""
    end = request.parameters.get("sequence_end")
    return end is not None and end.bool_param


def _stream_error(request: pb.ModelInferRequest, exc: Exception) -> tuple[pb.ModelStreamInferResponse, str]:
    """A stream's answer to one request that failed, and its status code's name: the error travels in the
    message, the stream stays open."""
    code, message = errors.status_of(exc, "ModelStreamInfer")
    response = pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )
    params = response.infer_response.parameters
    params[FINAL_RESPONSE].bool_param = True  # nothing follows an error
    params[STATUS_CODE].string_param = code.name  # the client's retry_safe needs it
    if getattr(exc, "ran", False):
        params[RAN].bool_param = True
    elif getattr(exc, "permanent", False):
        params[PERMANENT].bool_param = True
    return response, code.name


def _parsed(message: pb.ModelInferRequest | Malformed) -> tuple[pb.ModelInferRequest, TensorgateError | None]:
    """A stream's message, or for bytes that did not parse (rpc/malformed.py) an empty one and their refusal: the
    stream answers it in its turn and goes on, as for any bad message."""
    if isinstance(message, Malformed):
        return pb.ModelInferRequest(), message.error("ModelStreamInfer")
    return message, None


class _StreamShare:
    """A stream's messages in flight beyond its first, each counted against the caller's
    --max-in-flight-per-identity as a call of its own (the stream, counted at the RPC boundary, covers one). A
    stream counted as one call whatever it ran: under a cap of 1, one stream ran 200 requests at once and filled
    the model's queue ahead of every other identity (review 131)."""

    __slots__ = ("_auth", "_identity", "held")

    def __init__(self, auth: Authorizer, identity: str) -> None:
        self._auth = auth
        self._identity = identity
        self.held = 0
        """Calls of the cap this stream holds for its messages."""

    def admit(self, in_flight: int) -> None:
        """The stream has `in_flight` messages read and not answered, this one among them; ResourceExhaustedError
        (in-stream, counted as the cap's denials are) when the identity has no call left for it."""
        if in_flight - 1 > self.held:
            self._auth.admit(self._identity)
            self.held += 1

    def settle(self, in_flight: int) -> None:
        """Give back what the messages still in flight no longer need (all of it at the stream's end: 0)."""
        while self.held > max(0, in_flight - 1):
            self._auth.release(self._identity)
            self.held -= 1


class InferenceServicer(GRPCInferenceServiceServicer):
    def __init__(
        self,
        repository: ModelRepository,
        handler: InferenceHandler,
        *,
        model_control: str,
        is_ready: Callable[[], bool],
        gate: DrainGate,
        max_message_bytes: int | None = None,
        limits: codec.RequestLimits = codec.DEFAULT_LIMITS,
        auth: Authorizer | None = None,
        requests: RequestCounts | None = None,
        tracing: Tracing | None = None,
        shared_memory: SystemSharedMemory | None = None,
        log_format: str = "text",
        budget: ByteBudget | None = None,
    ) -> None:
        self.gate = gate
        self._on_their_way = gate.on_their_way
        self.budget = budget
        self._log_format = log_format
        self.shared_memory = shared_memory or codec.NO_SHARED_MEMORY
        self._extensions = EXTENSIONS + (("system_shared_memory",) if self.shared_memory.enabled else ())
        self.tracing = tracing
        self._requests = requests
        self.auth = auth or Authorizer()
        self._max_message_bytes = max_message_bytes
        self._limits = limits
        self._repository = repository
        self._handler = handler
        self._check_input = handler.check_input
        self._model_control = model_control
        self._is_ready = is_ready

    # ----- health and metadata -----------------------------------------------------------------------------

    @errors.unary
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @errors.unary
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    @errors.unary
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        try:
            model = self._repository.get(request.name, request.version)
        except (ModelNotFoundError, ModelUnavailableError):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=backend_ready(model.backend))  # a remote model's upstream may be down

    @errors.unary
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=self._extensions)

    @errors.unary
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        model = self._repository.get(request.name, request.version)
        versions = [m.version for m in self._repository.versions(request.name)]
        return codec.encode_model_metadata(model, versions)

    @errors.unary
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        model = self._repository.get(request.name, request.version)
        return pb.ModelConfigResponse(config=model.config)

    @errors.unary
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> pb.ModelStatisticsResponse:
        if not request.name:
            models = sorted(self._repository.loaded(), key=lambda m: (m.name, m.version))
        elif request.version:
            models = [self._repository.get(request.name, request.version)]
        else:
            models = self._repository.versions(request.name)
            if not models:  # known, but no version is ready: say why (loading, failed, unloaded), not "no stats"
                self._repository.get(request.name, "")
        return codec.encode_model_statistics(models)

    # ----- inference ---------------------------------------------------------------------------------------

    def _decode(
        self, request: pb.ModelInferRequest, deadline: float | None, in_turn: bool = False
    ) -> tuple[InferRequest, int] | None:
        """The request's tensors, decoded before the model is looked up (the hot path reads each field once), and
        their bytes for the byte budget (0 without one); a tensor error for a model that does not exist answers
        NOT_FOUND (or why it is not served), as Triton does. None when a large tensor needs work per element
        (codec.LARGE_ELEMENTS), or when a sequence's request may have to wait for one of its sequence on its way
        (drain.OnTheirWay; not `in_turn`, when it has): the caller then awaits `_decode_off_loop`. Written
        `self._decode(...) or await self._decode_off_loop(...)`, so that the hot path makes no coroutine for it."""
        if self._on_their_way.ways and not in_turn and "sequence_id" in request.parameters:
            return None
        try:
            req = codec.decode_infer_request(
                request, deadline, self._limits, self.shared_memory, self._check_input, on_loop=True
            )
        except codec.DecodeOffLoop:
            return None
        except TensorgateError:
            self._repository.get(request.model_name, request.model_version)  # raises NOT_FOUND or why not served
            raise
        return req, 0 if self.budget is None else request_bytes(req)

    def _decode_measured(self, request: pb.ModelInferRequest, deadline: float | None) -> tuple[InferRequest, int]:
        """On a worker thread: a large BYTES tensor's bytes are counted element by element, work for the thread too."""
        req = codec.decode_infer_request(request, deadline, self._limits, self.shared_memory, self._check_input)
        return req, 0 if self.budget is None else request_bytes(req)

    async def _decode_off_loop(self, request: pb.ModelInferRequest, deadline: float | None) -> tuple[InferRequest, int]:
        """A request `_decode` left: its large tensor decoded on a worker thread, and a sequence's request kept in
        its turn. A sequence takes its requests in the order they reach it, and a small request read behind a large
        one would reach it first: so a sequence's request here is on its way (drain.OnTheirWay) until it is
        decoded and the one of its sequence read before it has arrived; from there to its sequence nothing awaits.
        A START on its way also counts as live for a drain."""
        step = sequence_step(request)
        if step is None:  # (a correlation ID of 0 or "" names none)
            return self._decode(request, deadline, in_turn=True) or await self._decode_on_thread(request, deadline)
        key = (request.model_name, step.id)
        ways = self._on_their_way
        # None of its sequence on its way: on the loop, unless it is large.
        decoded = None if key in ways.ways else self._decode(request, deadline, in_turn=True)
        if decoded is not None:
            return decoded
        previous, mine = ways.join(key, step.start)
        try:
            if previous is not None:  # it waits for that one: on the loop if it can be
                decoded = self._decode(request, deadline, in_turn=True)
            decoded = decoded or await self._decode_on_thread(request, deadline)
            if previous is not None and not previous.done():
                await asyncio.shield(previous)  # (a cancelled wait leaves it to the one that set it)
        finally:
            if previous is None or previous.done():
                ways.arrived(key, step.start, mine)
            else:  # failed or cancelled first: the one behind it still waits for the one before it
                previous.add_done_callback(lambda _: ways.arrived(key, step.start, mine))
        return decoded

    async def _decode_on_thread(
        self, request: pb.ModelInferRequest, deadline: float | None
    ) -> tuple[InferRequest, int]:
        try:
            return await asyncio.to_thread(self._decode_measured, request, deadline)
        except TensorgateError:
            self._repository.get(request.model_name, request.model_version)
            raise

    def _admit(self, budget: ByteBudget, req: InferRequest, size: int) -> int:
        """Take the request's bytes from the byte budget; over it, a model the server does not have answers
        NOT_FOUND (or why it is not served) rather than a refusal that names it, as a decode error does."""
        try:
            return budget.admit(req.model, req.version, size)
        except ByteBudgetError:
            self._repository.get(req.model, req.version)
            raise

    def _check_size(self, msg: pb.ModelInferResponse | pb.ModelStreamInferResponse, model: str, version: str) -> None:
        """Refuse a response over the message limit before gRPC does: gRPC's own refusal names no model and, on
        ModelStreamInfer, ends the whole stream with every other request on it."""
        if self._max_message_bytes is None:
            return
        size = msg.ByteSize()
        if size > self._max_message_bytes:
            error = ResourceExhaustedError(
                f"{model_ref(model, version)}: the response takes {size} bytes, over the server's message limit "
                f"of {self._max_message_bytes} bytes (--max-message-bytes)"
            )
            error.ran = True  # the model has run: a retry would run it again for the same refusal
            raise error

    # Requests are counted for /metrics (tensorgate_inference_requests_total) once they are past the RPC boundary's
    # admission (drain, identity, authorization, in-flight cap): refusals there have their own counters.

    @errors.unary
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        deadline = codec.monotonic_deadline(context.time_remaining())
        budget, taken = self.budget, 0
        try:
            req, size = self._decode(request, deadline) or await self._decode_off_loop(request, deadline)
            if budget is not None:
                taken = self._admit(budget, req, size)
            answer = await self._handler.infer(req)
            response = codec.encode_on_loop(answer, req.shared_outputs)
            if response is None:  # a large BYTES output (codec.encode_on_loop)
                response = await asyncio.to_thread(codec.encode_infer_response, answer, req.shared_outputs)
            self._check_size(response, response.model_name, response.model_version)
        except BaseException as exc:
            if self._requests is not None:
                self._requests.failed(request.model_name, request.model_version, exc, deadline)
            raise
        finally:
            if budget is not None:
                budget.release(taken)
        if self._requests is not None:
            self._requests.ok(response.model_name, response.model_version)
        return response

    async def _stream_infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelStreamInferResponse:
        budget, taken = self.budget, 0
        try:
            req, size = self._decode(request, deadline) or await self._decode_off_loop(request, deadline)
            if budget is not None:  # each message of a stream is admitted on its own, as a call is
                taken = self._admit(budget, req, size)
            answer = await self._handler.infer(req)
            result = codec.encode_on_loop(answer, req.shared_outputs)
            if result is None:  # a large BYTES output (codec.encode_on_loop)
                result = await asyncio.to_thread(codec.encode_infer_response, answer, req.shared_outputs)
            response = pb.ModelStreamInferResponse(infer_response=result)
            self._check_size(response, result.model_name, result.model_version)
        except BaseException as exc:
            if self._requests is not None:
                self._requests.failed(request.model_name, request.model_version, exc, deadline)
            raise
        finally:
            if budget is not None:
                budget.release(taken)
        if self._requests is not None:
            self._requests.ok(result.model_name, result.model_version)
        return response

    async def _stream_one(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelStreamInferResponse:
        """One request of a stream, in its own task; traced as a child span of the stream's server span. No
        context manager: this runs for every message of a stream, and one costs a generator per message."""
        started = time.perf_counter_ns()
        span, token = self._message_span(request)
        try:
            response, code, error = await self._stream_answer(request, deadline)
        except BaseException as exc:  # cancelled: its stream ended under it, or its deadline passed
            self._message_done(request, span, started, request_cut_code(deadline), exc, None)
            raise
        else:
            self._message_done(request, span, started, code, error, response.infer_response)
        finally:
            if token is not None:
                Tracing.release(token)
        return response

    @staticmethod
    def _message_done(
        request: pb.ModelInferRequest,
        span: trace.Span | None,
        started: int,
        code: str,
        error: BaseException | None,
        response: pb.ModelInferResponse | None,
    ) -> None:
        """A stream message's access line, written while its span is current (the line carries that span's ids),
        then its span ended as a unary call's is: status code and error type, ERROR only for server errors."""
        if errors.access_log.isEnabledFor(logging.DEBUG):
            errors.access_log_line("ModelStreamInfer", request, code, started, response, error)
        if span is not None:
            Tracing.end_rpc(span, None, code, error)

    async def _refused_one(self, request: pb.ModelInferRequest, refusal: Exception) -> pb.ModelStreamInferResponse:
        """The answer to a message refused before it ran (bytes that did not parse, one past the in-flight cap, one
        read while the server drains), as a task: it takes its turn among the answers before it. Its access line
        and span are a message's, as a refused ModelInfer call has them: the first two had neither, only the
        denial counter showed the second, and the third had its line but no span."""
        started = time.perf_counter_ns()
        span, token = self._message_span(request)
        answer, code = _stream_error(request, refusal)
        try:
            self._message_done(request, span, started, code, refusal, answer.infer_response)
        finally:
            if token is not None:
                Tracing.release(token)
        return answer

    def _message_span(self, request: pb.ModelInferRequest) -> tuple[trace.Span | None, object | None]:
        """The span of one request of a stream and the token that makes it current (release it when the request
        is done; `_message_done` ends the span). (None, None) when untraced, or when the stream is not sampled:
        under ParentBased sampling a child would not be, and the stream's span already carries that decision to
        the scheduler and to a remote backend."""
        tracing = self.tracing
        if tracing is None or not trace.get_current_span().is_recording():
            return None, None
        span = tracing.start_child("ModelStreamInfer request", errors.request_attributes("ModelInfer", request))
        return span, tracing.use(span)

    async def _relay(
        self,
        request: pb.ModelInferRequest,
        deadline: float | None,
        events: asyncio.Queue[Any],
        held: _Window,
    ) -> None:
        """A decoupled model's request of a stream, in its own task: each response goes on the stream as it
        arrives, whatever the other requests' answers wait for; then _RELAYED (the stream ends only after it).
        Responses count in `held` until the stream writes them: at the window, the request waits to read more."""
        started = time.perf_counter_ns()

        def send(message: pb.ModelStreamInferResponse) -> None:
            held.held += 1
            events.put_nowait(message)

        span, token = self._message_span(request)
        code, error, last = "OK", None, None
        try:
            try:
                if self.auth.enabled:  # a denial is counted as one, not as a request (as _stream_answer)
                    self.auth.check("ModelStreamInfer", request.model_name, request.model_version)
                last = await self._relay_counted(request, deadline, send, held)
            except Exception as exc:  # noqa: BLE001 - stream errors travel in the message, the stream stays open
                answer, code = _stream_error(request, exc)
                error, last = exc, answer.infer_response
                send(answer)
        except BaseException as exc:  # cancelled: its stream ended under it, or its deadline passed
            self._message_done(request, span, started, request_cut_code(deadline), exc, None)
            raise
        else:
            self._message_done(request, span, started, code, error, last)
        finally:
            error = None  # held by this frame, which the error's traceback holds: a cycle that outlives the call
            if token is not None:
                Tracing.release(token)
            events.put_nowait(_RELAYED)

    async def _relay_counted(
        self,
        request: pb.ModelInferRequest,
        deadline: float | None,
        send: Callable[[pb.ModelStreamInferResponse], None],
        held: _Window,
    ) -> pb.ModelInferResponse | None:
        """Relay a decoupled model's responses to `send`, counted for /metrics; the last response, if any. At
        the window the upstream is not read until the client takes responses (the upstream's writes stall)."""
        last = None
        budget, taken = self.budget, 0
        try:
            req, size = self._decode(request, deadline) or await self._decode_off_loop(request, deadline)
            if budget is not None:  # held until the last response: the upstream call keeps the request till then
                taken = self._admit(budget, req, size)
            # Closed at once when a response fails here (too large): the upstream call ends with it.
            async with contextlib.aclosing(self._handler.relay(req, request)) as responses:
                async for response in responses:
                    message = pb.ModelStreamInferResponse(infer_response=response)
                    self._check_size(message, response.model_name, response.model_version)
                    send(message)
                    last = response
                    if held.held >= STREAM_WINDOW:
                        await held.room()
        except BaseException as exc:  # cancelled too: the stream ended under it
            if self._requests is not None:
                self._requests.failed(request.model_name, request.model_version, exc, deadline)
            raise
        finally:
            if budget is not None:
                budget.release(taken)
        if self._requests is not None:
            self._requests.ok(req.model, req.version)  # the version that served it, set by relay
        return last

    async def _stream_answer(
        self, request: pb.ModelInferRequest, deadline: float | None
    ) -> tuple[pb.ModelStreamInferResponse, str, Exception | None]:
        """The answer to one request of a stream, its status code's name and the error, if any."""
        try:
            if self.auth.enabled:
                self.auth.check("ModelStreamInfer", request.model_name, request.model_version)
            response = await self._stream_infer(request, deadline)
        except Exception as exc:  # noqa: BLE001 - stream errors travel in the message, the stream stays open
            return (*_stream_error(request, exc), exc)
        # As Triton sets it: a model that is not decoupled answers once, so this is its request's last response.
        response.infer_response.parameters[FINAL_RESPONSE].bool_param = True
        return response, "OK", None

    @errors.stream
    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest | Malformed], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of one stream run concurrently (and batch together); responses go out in request order, as
        Triton answers a model that is not decoupled, so a client may match them by position as well as by `id`.
        A decoupled model's responses go out as they arrive, whatever the others wait for (match them by `id`)."""
        ordered: collections.deque[asyncio.Future[pb.ModelStreamInferResponse]] = collections.deque()
        """Answers to requests of models that are not decoupled, in request order: each goes out once it and those
        before it are done."""
        events: asyncio.Queue[Any] = asyncio.Queue()
        """What the writer wakes up for: _READY (an answer is done), a decoupled model's response (it goes out at
        once), _RELAYED, None (the reader's end) and `drained`."""
        tasks: set[asyncio.Task[Any]] = set()
        ending: set[asyncio.Task[Any]] = set()
        """Tasks of requests that end a sequence: not cancelled with the stream (see the end)."""
        relaying = 0
        """Decoupled requests whose responses may still come: the stream ends after them."""
        drained = object()
        """Queued when the server starts draining: the stream ends after the answers to what it has read."""
        unanswered = _Window()
        """Requests read whose (last) answer is not yet handed to gRPC: at the window the reader waits."""
        responses = _Window()
        """Decoupled models' responses queued and not yet handed to gRPC: at the window their requests wait."""
        refused_on_drain = False
        share = _StreamShare(self.auth, CURRENT_IDENTITY.get()) if self.auth.max_in_flight else None
        carried: set[SequenceKey] = set()
        """Sequences this stream sent requests into: a drain leaves the stream open while one of them is live, for
        its next requests. Those no longer live go when it has doubled (`forget_at`), so that a stream that lives
        on while sequences come and go, or that gives a stateless model sequence IDs, keeps no key per ID."""
        forget_at = CARRIED_FORGET_AT

        def answer_later(answer: asyncio.Future[pb.ModelStreamInferResponse]) -> None:
            ordered.append(answer)
            answer.add_done_callback(lambda _: events.put_nowait(_READY))

        async def read() -> None:
            nonlocal relaying, refused_on_drain, forget_at
            try:
                async for message in request_iterator:
                    unanswered.held += 1
                    request, refusal = _parsed(message)
                    step = sequence_step(request)
                    refused_by_drain = self.gate.refusal(request) if self.gate.draining else None
                    if refused_by_drain is not None:
                        # Shutting down: no new work on this stream, or the end of the grace period would cut it
                        # off unanswered. This message is refused (retry elsewhere); the stream ends once the
                        # requests it already runs are answered, so the drain need not wait out its grace. It
                        # ends with UNAVAILABLE, as when the drain starts between messages: the client had not
                        # ended it, and what it sends next is not read. Unless the stream is in the middle of a
                        # sequence: it stays open for that sequence's next requests.
                        answer_later(asyncio.create_task(self._refused_one(request, refused_by_drain)))
                        if not self.gate.keep_live(carried):
                            refused_on_drain = True
                            break
                        if unanswered.held >= STREAM_WINDOW:
                            await unanswered.room()
                        continue
                    if step is not None:
                        # An END's too: its sequence ends when the END reaches it, and one that fails before (bad
                        # input) leaves it live, the stream open for another END.
                        if len(carried) >= forget_at:  # before this one's key: a START is not live until it runs
                            self.gate.keep_live(carried)
                            forget_at = CARRIED_FORGET_AT + 2 * len(carried)
                        carried.add((request.model_name, step.id))
                    if share is not None and refusal is None:
                        try:
                            share.admit(unanswered.held)
                        except ResourceExhaustedError as exc:
                            refusal = exc
                    deadline = codec.monotonic_deadline(context.time_remaining())
                    task: asyncio.Task[Any]
                    if refusal is not None:
                        task = asyncio.create_task(self._refused_one(request, refusal))
                        answer_later(task)
                    elif self._handler.decoupled(request.model_name, request.model_version):
                        relaying += 1
                        task = asyncio.create_task(self._relay(request, deadline, events, responses))
                    else:
                        task = asyncio.create_task(self._stream_one(request, deadline))
                        answer_later(task)
                        if _ends_sequence(request):
                            ending.add(task)
                            task.add_done_callback(ending.discard)
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    if unanswered.held >= STREAM_WINDOW:  # read no more until the client takes answers
                        await unanswered.room()
            finally:
                events.put_nowait(None)

        async def end_on_drain() -> None:
            # A client keeps its stream open between requests: without this, an idle stream would hold the drain
            # until its grace ran out and then be cut off. Messages not read yet get the stream's UNAVAILABLE.
            # A stream in the middle of a sequence ends once its sequences have (or the grace has).
            await self.gate.started()
            await self.gate.sequences_ended(carried)
            events.put_nowait(drained)  # before the reader's end (its None), which the reader puts when cancelled
            reader.cancel()

        reader = asyncio.create_task(read())
        watcher = asyncio.create_task(end_on_drain())
        try:
            reading, cut = True, False
            while True:
                while ordered and ordered[0].done():
                    yield ordered.popleft().result()
                    unanswered.release()
                if share is not None:
                    share.settle(unanswered.held)
                if not (reading or ordered or relaying):
                    break
                item = await events.get()
                if item is None:
                    reading = False
                elif item is drained:
                    # Shutting down: the answers to what was read still go out, and so do the decoupled requests'
                    # responses; then the stream ends with UNAVAILABLE, unless the caller had ended it already.
                    cut, reading = reading, False
                elif item is _RELAYED:
                    relaying -= 1
                    unanswered.release()
                elif item is not _READY:
                    yield item  # a decoupled model's response
                    responses.release()
            if cut or refused_on_drain:
                # Sequences still live once the drain is over were cut off: their client must start them again.
                live = self.gate.keep_live(carried)
                raise ServerUnavailableError(cut_off(carried) if live else DRAINING)
            await reader  # surfaces a failure of the request stream itself
        finally:
            reader.cancel()
            watcher.cancel()
            if share is not None:
                share.settle(0)
            # A request read that ends a sequence runs on without its stream (within its deadline): cancelled before
            # its first step, it would never reach the sequencer, and the sequence would hold its slot until the
            # idle timeout (a client closing its stream right after sending END does that).
            for task in list(tasks):
                if task not in ending:
                    task.cancel()

    # ----- system shared memory (Triton's extension; off unless --shared-memory system) ----------------------

    @errors.unary
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Context
    ) -> pb.SystemSharedMemoryStatusResponse:
        self.shared_memory.require("SystemSharedMemoryStatus")
        return encode_status(self.shared_memory.status(request.name))

    @errors.unary
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Context
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self.shared_memory.require("SystemSharedMemoryRegister")
        self.shared_memory.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @errors.unary
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Context
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self.shared_memory.require("SystemSharedMemoryUnregister")
        self.shared_memory.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    # CUDA shared memory: no region can be registered (CudaSharedMemoryRegister stays UNIMPLEMENTED), so there is
    # none to list or unregister. Answering those two plainly matters: perf_analyzer unregisters both kinds when
    # it exits and reports a failure of either, whatever kind it used.

    @errors.unary
    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Context
    ) -> pb.CudaSharedMemoryStatusResponse:
        if request.name:
            raise RegionNotFoundError(
                f"CUDA shared memory region '{request.name}' is not registered (tensorgate has no CUDA shared memory)"
            )
        return pb.CudaSharedMemoryStatusResponse()

    @errors.unary
    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Context
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        return pb.CudaSharedMemoryUnregisterResponse()  # nothing registered; an unknown name is no error (Triton)

    # ----- repository --------------------------------------------------------------------------------------

    def _check_step(self, model: str, loading: bool) -> None:
        """An ensemble the caller loads reaches its step models: the caller must be allowed inference on each (an
        ensemble it uploads could otherwise expose any loaded model), and to load those its load would load.
        A denial is logged and counted, and answers PERMISSION_DENIED."""
        if not self.auth.enabled:
            return
        self.auth.check("ModelInfer", model)
        if loading:
            self.auth.check("RepositoryModelLoad", model)

    def _check_unload(self, model: str) -> None:
        """A composing model that unload_dependents would unload: the caller must be allowed to unload it by name
        (an ensemble it uploads could otherwise take down models it may not touch)."""
        self.auth.check("RepositoryModelUnload", model)

    def _require_control(self, rpc: str) -> None:
        if self._model_control != "explicit":
            refused = ServerUnavailableError(
                f"{rpc} needs --model-control-mode explicit (this server runs in '{self._model_control}' mode)"
            )
            refused.permanent = True  # the mode is the server's for its life: a retry policy's attempts would waste
            raise refused

    @errors.unary
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:
        if request.repository_name not in ("", self._repository.root.name):
            raise ModelNotFoundError(request.repository_name, None, "no such repository")
        # Off the loop: it stats every model directory, and the loop serves every other call meanwhile. A ready-only
        # index lists loaded models alone and needs no disk.
        on_disk = () if request.ready else await asyncio.to_thread(self._repository.names_on_disk)
        return codec.encode_repository_index(self._repository.index(request.ready, on_disk))

    @errors.unary
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        self._require_control("RepositoryModelLoad")
        files = codec.load_files(request)
        await self._repository.load(
            request.model_name, codec.load_config_override(request), files, check_step=self._check_step
        )
        return pb.RepositoryModelLoadResponse()

    @errors.unary
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        self._require_control("RepositoryModelUnload")
        await self._repository.unload(
            request.model_name,
            dependents=codec.unload_dependents(request),
            check=self._check_unload if self.auth.enabled else None,
        )
        return pb.RepositoryModelUnloadResponse()

    # ----- settings ----------------------------------------------------------------------------------------

    @errors.unary
    async def LogSettings(self, request: pb.LogSettingsRequest, context: Context) -> pb.LogSettingsResponse:
        """Triton's log settings: an empty request reads them, keys change them (the root log level). One
        process's: with --reuse-port, each process sharing the port has its own."""
        changes: dict[str, log_settings.LogValue] = {}
        for key, value in request.settings.items():
            choice = value.WhichOneof("parameter_choice")
            if choice is None:
                raise InvalidSettingError(f"log setting '{key}' has no value")
            changes[key] = getattr(value, choice)
        if changes:
            try:
                level = log_settings.plan(changes, self._log_format)
            except log_settings.LogSettingsError as exc:
                raise InvalidSettingError(str(exc)) from exc
            # Logged at whichever end of the change shows WARNING: a change to ERROR still leaves its own line.
            shown_before = logging.getLogger().isEnabledFor(logging.WARNING)
            if shown_before:
                log.warning("log settings changed by '%s': %s", CURRENT_IDENTITY.get(), changes)
            log_settings.apply(level, changes)
            if not shown_before:
                log.warning("log settings changed by '%s': %s", CURRENT_IDENTITY.get(), changes)
        settings = log_settings.current(self._log_format)
        response = pb.LogSettingsResponse()
        for key, v in settings.items():
            entry = response.settings[key]
            if isinstance(v, bool):
                entry.bool_param = v
            elif isinstance(v, int):
                entry.uint32_param = v
            else:
                entry.string_param = v
        return response

    @errors.unary
    async def TraceSetting(self, request: pb.TraceSettingRequest, context: Context) -> pb.TraceSettingResponse:
        """Triton's trace settings over the OpenTelemetry sampler: an empty request reads them, keys change them.
        They are the server's: a model name reads them (they apply to it) but cannot change them for it alone."""
        changes = {key: list(value.value) for key, value in request.settings.items()}
        state = None if self.tracing is None else self.tracing.sampling
        if changes:
            if request.model_name:
                raise InvalidSettingError(
                    f"trace settings are the server's: they cannot be changed for {model_ref(request.model_name)} "
                    "alone (send no model name)"
                )
            if self.tracing is None:
                raise FailedPreconditionError(
                    "tracing is off: start the server with --otlp-endpoint to trace, then change the sampling here"
                )
            initial = self.tracing.initial_sampling
            if state is None or initial is None:
                raise FailedPreconditionError(
                    "trace sampling belongs to the TracerProvider the embedding application gave the server"
                )
            try:
                state = trace_settings.apply(changes, state, initial)
            except trace_settings.TraceSettingsError as exc:
                raise InvalidSettingError(str(exc)) from exc
            self.tracing.set_sampling(state)
            log.warning("trace settings changed by '%s': %s", CURRENT_IDENTITY.get(), changes)
        elif request.model_name:
            self._repository.get(request.model_name, "")  # NOT_FOUND for a model the server does not have
        response = pb.TraceSettingResponse()
        injected = self.tracing is not None and state is None
        for key, values in trace_settings.current(state, injected=injected).items():
            response.settings[key].value.extend(values)
        return response


__all__ = ["EXTENSIONS", "SERVER_NAME", "InferenceServicer"]
