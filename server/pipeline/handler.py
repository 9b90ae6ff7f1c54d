"""The transport-free inference path: find the model, validate, schedule, shape the response.

The servicer calls this with decoded requests; tests and future transports can too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from opentelemetry import context as otel_context
from opentelemetry import trace

from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos.tensors import FINAL_RESPONSE, from_numpy
from tensorgate.server.backends.base import (
    RunsRemotely,
    SequenceFlags,
    StreamsResponses,
    sequence_id_of,
    upstream_parameters,
)
from tensorgate.server.errors import (
    InvalidRequestError,
    ServerUnavailableError,
    TensorgateError,
    UnimplementedError,
    model_ref,
    with_prefix,
)
from tensorgate.server.pipeline.cache import ResponseCache, heavy
from tensorgate.server.pipeline.classify import top_k
from tensorgate.server.pipeline.ensemble import fit_batching, needed_steps, run_plan
from tensorgate.server.pipeline.types import InferRequest, InferResponse
from tensorgate.server.pipeline.validate import check_input, reshape_out, validate_request
from tensorgate.server.repository.ensemble import EnsemblePlan, Step
from tensorgate.server.repository.manager import LoadedModel, ModelRepository
from tensorgate.server.repository.rollout import ROUTED_VERSION, SHADOW_DEADLINE_S, Rollout
from tensorgate.server.repository.schema import ModelSchema
from tensorgate.server.scheduling.sequencer import Place
from tensorgate.server.telemetry.statistics import ExecutionTimes
from tensorgate.server.telemetry.tracing import CALL_TIMEOUT, Tracing, cancelled_code

if TYPE_CHECKING:
    from tensorgate.server.monitoring.capture import Capture, CaptureConfig

log = logging.getLogger(__name__)

Resolved = Mapping[tuple[str, str], LoadedModel]
"""An ensemble request's step models by (name, version as its plan names it), found once when it starts."""

# Ids for requests sent without one: UUID-shaped and unique, a random prefix per process and a counter.
# str(uuid.uuid4()) per request cost 5.6 us (os.urandom and UUID formatting), as much as decoding the request.
_ID_PREFIX = str(uuid.uuid4())[:24]
_ID_COUNTER = itertools.count()


def _new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFFFFFF:012x}"


def _int_parameter(req: InferRequest, key: str, version: str) -> int | None:
    """Scheduling parameters arrive as int64 or uint64 (tritonclient sends uint64); anything else is a mistake."""
    value = req.parameters.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequestError(req.model, version, f"parameter '{key}' must be a non-negative integer")
    return value


def _sequence_flags(req: InferRequest, version: str) -> SequenceFlags | None:
    """The request's `sequence_id` (`sequence_id_of`) and its `sequence_start` / `sequence_end` flags; None without
    a correlation ID."""
    params = req.parameters
    start, end = params.get("sequence_start", False), params.get("sequence_end", False)
    for key, value in (("sequence_start", start), ("sequence_end", end)):
        if not isinstance(value, bool):
            raise InvalidRequestError(req.model, version, f"parameter '{key}' must be a bool")
    sequence_id = sequence_id_of(params)
    if sequence_id is None:
        if params.get("sequence_id") not in (None, 0, ""):
            raise InvalidRequestError(req.model, version, "parameter 'sequence_id' must be an integer or a string")
        return None
    return SequenceFlags(sequence_id, bool(start), bool(end))


def _split_key(req: InferRequest) -> str:
    """What places a request that names no version in its model's rollout split: its sequence's id when it has
    one, since every step of a sequence must reach the version that holds the sequence's state (split by their
    own ids, steps landed on a version where their sequence was never started), and its own id otherwise."""
    sequence_id = sequence_id_of(req.parameters) if "sequence_id" in req.parameters else None
    return req.id if sequence_id is None else f"sequence {sequence_id}"


_SERVER_FAILURES = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN}
)
"""Failures that are the version's doing, which the rollout's error gate counts: it failed to run, or to run in
time. A request refused as invalid, or too many at once (RESOURCE_EXHAUSTED), would fail on the stable version
as well: counting those would roll a canary back for its callers' mistakes or the load."""


def _failed_on_server(exc: BaseException, req: InferRequest) -> bool:
    """Whether a request's failure counts against the version that ran it (`_SERVER_FAILURES`): an unexpected
    exception is INTERNAL at the boundary; a cancel is a deadline passed when gRPC cancelled at the caller's
    deadline (`cancelled_code`: a version too slow for its callers), not when the caller hung up. The server's
    own refusals (ServerUnavailableError: draining, a version being unloaded, an upstream shutting down) are not
    the version's doing."""
    if isinstance(exc, ServerUnavailableError):
        return False
    if isinstance(exc, TensorgateError):
        return exc.code in _SERVER_FAILURES
    if isinstance(exc, Exception):
        return True
    if isinstance(exc, asyncio.CancelledError):
        remaining = None if req.deadline is None else req.deadline - time.monotonic()
        return cancelled_code(remaining, CALL_TIMEOUT.get()) == "DEADLINE_EXCEEDED"
    return False


def _classify(response: InferResponse, classifications: dict[str, int], schema: ModelSchema) -> None:
    """Replace the outputs asked for as classes by their top k (validation has checked their datatypes)."""
    for i, (name, _, array) in enumerate(response.outputs):
        k = classifications.get(name)
        if k is not None:
            batched = schema.max_batch_size > 0
            response.outputs[i] = (name, "BYTES", top_k(array, k, schema.outputs[name].labels, batched))


class InferenceHandler:
    def __init__(self, repository: ModelRepository, tracing: Tracing | None = None) -> None:
        self._repository = repository
        self._tracing = tracing
        self.capture: Capture | None = None
        """Set by the server when monitoring is on: answered requests are sampled into it (never waits)."""
        self.cache: ResponseCache | None = None
        """Set by the server with --response-cache-bytes: answers of models whose config enables response_cache."""
        self._shadows: set[asyncio.Task[None]] = set()
        """Shadow runs in progress (`_shadow`), held so that none is collected before it ends, and for `close`."""
        self._closed = False

    def _validate(
        self, model: LoadedModel, req: InferRequest, version: str, request_span: trace.Span | None
    ) -> tuple[dict[str, np.ndarray], int, list[str]]:
        """Validation in its own span, under the request's, with what identifies the request."""
        # Not sampled: under ParentBased sampling (the server's, and an SDK TracerProvider's default) its children
        # would not be either.
        if request_span is None or not request_span.is_recording():
            return validate_request(model.schema, req, version)
        assert self._tracing is not None
        request_span.set_attributes(
            {"tensorgate.model.name": model.name, "tensorgate.model.version": version, "tensorgate.request.id": req.id}
        )
        started = time.time_ns()
        error: Exception | None = None
        try:
            return validate_request(model.schema, req, version)
        except Exception as exc:
            error = exc
            raise
        finally:
            self._tracing.record_child(request_span, "validate", started, error)
            error = None  # held by this frame, which the error's traceback holds: a cycle that outlives the call

    async def infer(self, req: InferRequest) -> InferResponse:
        """Run one request (under its RPC's span, when tracing is on); raises TensorgateError subclasses that
        carry their gRPC status."""
        started = time.perf_counter_ns()
        if not req.id:  # every response carries an id, so that feedback can name the prediction later
            req.id = _new_request_id()
        model = self._repository.get(req.model, req.version, _split_key(req))
        version = str(model.version)
        if not req.version:
            ROUTED_VERSION.set(version)
        if model.config.model_transaction_policy.decoupled:  # refused before it counts, as Triton refuses it
            raise UnimplementedError(
                f"{model_ref(model.name, version)} is decoupled (any number of responses per request): send its "
                "requests over ModelStreamInfer"
            )
        # The request's span, looked up once: the batch links to it and remote backends hear its decision.
        span = trace.get_current_span() if self._tracing is not None else None
        # A request refused as invalid is no inference: ModelStatistics leaves it out, as Triton's does (it fails
        # before its statistics are taken); /metrics counts it by status code.
        inputs, rows, outputs = self._validate(model, req, version, span)
        priority = _int_parameter(req, "priority", version)
        timeout_us = _int_parameter(req, "timeout", version)
        # A request to be captured also computes the model's prediction output, so that its feedback can be
        # judged whichever outputs its caller asked for; the response carries only those (`_respond`). Its cache
        # key then names that output too: a captured request's answer holds it, cached or not.
        sampled = None if self.capture is None else self.capture.sample(model.name, model.version, model.config)
        computed = outputs if sampled is None else sampled.computing(outputs)
        # The rollout's error gate hears how a request routed to its canary or stable version ends; a request
        # refused above (invalid) never ran there, and would be refused by the other version too.
        rollout = model.rollout
        judged = rollout if rollout is not None and not req.version and rollout.judges(model.version) else None
        try:
            results, times = await self._execute_cached(
                model, inputs, req.datatypes, computed, rows, req, priority, timeout_us, span, started
            )
            response = self._respond(model, version, req, outputs, results)
        except BaseException as exc:
            # CancelledError included: a caller that cancels, or a deadline gRPC enforces before the queue's own
            # timer, is a failed request too (a plain `except Exception` lost those from ModelStatistics).
            model.stats.record_failure(time.perf_counter_ns() - started)
            if judged is not None:
                judged.outcome(model.version, _failed_on_server(exc, req))
            raise
        if judged is not None and times is not None:  # a cached answer says nothing of the version
            judged.outcome(model.version, False)
        if times is not None:  # None: answered from the cache, counted there as Triton counts a hit
            model.stats.record_request(rows, time.perf_counter_ns() - started, times)
        self._answered(model, req, inputs, results, span, times, sampled)
        if rollout is not None and not req.version and model.version == rollout.stable and rollout.shadows(req.id):
            self._shadow(rollout, req, started)
        return response

    def _shadow(self, rollout: Rollout, req: InferRequest, started: int) -> None:
        """Run a request the stable version answered on the shadow version too, in the background: its caller
        has its answer already and never hears of this run. A sequence's request is not mirrored (it would move
        the shadow's sequence state). Past shadow_max_in_flight runs of the model at once it is dropped: the
        shadow must not take the machine from the live path."""
        if "sequence_id" in req.parameters or self._closed:
            return
        version = str(rollout.shadow)
        if rollout.shadow_in_flight >= rollout.spec.shadow_max_in_flight:
            rollout.shadow_runs[version, "dropped"] += 1
            return
        rollout.shadow_in_flight += 1
        # The time the caller allowed its request (a shadow slower than that would fail it live), from now, and at
        # most SHADOW_DEADLINE_S: a shadow that never answers gives its place back.
        now = time.monotonic()
        budget = SHADOW_DEADLINE_S
        if req.deadline is not None:
            budget = min(budget, req.deadline - now + (time.perf_counter_ns() - started) / 1e9)
        # Its own request: no shared memory or classification; the same id, so that a label for the request
        # judges the shadow's prediction too.
        mirror = dataclasses.replace(
            req, version=version, deadline=now + budget, shared_outputs=None, classifications=None
        )
        task = asyncio.get_running_loop().create_task(self._run_shadow(rollout, mirror))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _run_shadow(self, rollout: Rollout, req: InferRequest) -> None:
        otel_context.attach(otel_context.Context())  # not under the caller's span (the task's own context copy)
        assert req.deadline is not None  # `_shadow` sets it
        try:
            # Cut off at its deadline as gRPC cuts off a caller's call: the scheduler lets a batch that runs go on.
            async with asyncio.timeout(req.deadline - time.monotonic()):
                await self.infer(req)
        except Exception as exc:  # noqa: BLE001 - the shadow's failure is counted, never the caller's
            rollout.shadow_runs[req.version, "failed"] += 1
            log.debug("shadow run of model '%s' version %s failed: %s", req.model, req.version, exc)
        except asyncio.CancelledError:  # the server is stopping (`close`)
            rollout.shadow_runs[req.version, "failed"] += 1
            raise
        else:
            rollout.shadow_runs[req.version, "ok"] += 1
        finally:
            rollout.shadow_in_flight -= 1

    async def close(self) -> None:
        """Cancel the shadow runs still going and wait for them to end, and start no more: the server's stop calls
        it once no call runs, before it detaches the capture they write to and closes the models they run on.
        They are background work nobody waits for, so the drain's grace is not spent on them."""
        self._closed = True
        running = list(self._shadows)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    def _execute_cached(
        self,
        model: LoadedModel,
        inputs: dict[str, np.ndarray],
        datatypes: dict[str, str],
        outputs: list[str],
        rows: int,
        req: InferRequest,
        priority: int | None,
        timeout_us: int | None,
        span: trace.Span | None,
        started: int,
    ) -> Awaitable[tuple[dict[str, np.ndarray], ExecutionTimes | None]]:
        """`_execute`, through the model's response cache when its answers are cached (`_cached`: None for the
        times of a hit), for a request and an ensemble step alike. Without a cache it hands back `_execute`'s
        coroutine itself, adding no frame to the request path."""
        identity = self._cache_identity(model, req) if self.cache is not None else None
        if identity is None:
            return self._execute(model, inputs, outputs, rows, req, priority, timeout_us, span)
        run = functools.partial(self._execute, model, inputs, outputs, rows, req, priority, timeout_us, span)
        return self._cached(model, identity, inputs, datatypes, outputs, started, run)

    def _cache_identity(
        self, model: LoadedModel, req: InferRequest, resolved: Resolved | None = None
    ) -> tuple[str, int, str] | None:
        """What a cached answer of `model` depends on (`_identity`), or None when its answers are not cached: the
        model's response cache is off, or the request is of a sequence (its answer depends on the state). A model
        that runs on an upstream, or an ensemble with such a step, sends the request's parameters there (an LLM's
        temperature, say), so its answer depends on them too: they are part of its identity. Triton's key leaves
        parameters out, as a local ONNX model's answer never depends on them. `resolved`: for an ensemble that is
        a step of another, the models the request holds (`_step_model`)."""
        if not model.config.response_cache.enable or "sequence_id" in req.parameters:
            return None
        identity = self._identity(model, resolved)
        forwarded = upstream_parameters(req.parameters)
        if identity is None or forwarded is None or not self._runs_remotely(model, resolved):
            return identity
        name, version, signature = identity
        return name, version, f"{signature}\0{sorted((k, type(v).__name__, v) for k, v in forwarded.items())!r}"

    def _runs_remotely(self, model: LoadedModel, resolved: Resolved | None = None) -> bool:
        """Whether `model`, or a step of it, runs on an upstream server (ensembles within it included)."""
        backend = model.backend
        if isinstance(backend, RunsRemotely) and backend.runs_remotely:
            return True
        if model.plan is None:
            return False
        try:
            return any(self._runs_remotely(self._step_model(key, resolved), resolved) for key in model.plan.models)
        except TensorgateError:  # a step no longer there: the request fails where any other would
            return True

    def _step_model(self, key: tuple[str, str], resolved: Resolved | None) -> LoadedModel:
        """An ensemble step's model: the one the request holds, when it holds them, else the one served now. A nested
        ensemble's answer is computed by the models its outer request found when it started; looked up afresh, a
        step model reloaded since would give the key its new files while the answer came from the old ones, and
        the cache would then serve that old answer to requests for the new model."""
        # `_resolve` holds every step of the ensembles within too: a key missing there is a bug, not a fallback.
        return self._repository.get(*key) if resolved is None else resolved[key]

    async def _cached(
        self,
        model: LoadedModel,
        identity: tuple[str, int, str],
        inputs: dict[str, np.ndarray],
        datatypes: dict[str, str],
        outputs: list[str],
        started: int,
        run: Callable[[], Awaitable[tuple[dict[str, np.ndarray], ExecutionTimes]]],
    ) -> tuple[dict[str, np.ndarray], ExecutionTimes | None]:
        """`run()`, the model's execution, through its response cache: a hit is its cached outputs and None for
        the times (counted here, as Triton counts a hit: a success without inference); a miss runs and is stored.
        A miss counts whatever the model then does, so that hits and misses add up to the lookups. Keys and
        copies of large tensors are made on a worker thread (cache.heavy)."""
        cache = self.cache
        assert cache is not None
        lookup = time.perf_counter_ns()
        if heavy(inputs.values()):
            # While the key is made on a thread, a reload or unload may retire this version: held, its scheduler
            # takes the request it accepted (queued below in the same loop step as the release) before it closes,
            # instead of refusing it as "being unloaded" though the model still serves.
            scheduler = model.scheduler
            if scheduler is not None:
                scheduler.hold()
            try:
                key = await asyncio.to_thread(cache.key, identity, inputs, datatypes, outputs)
            finally:
                if scheduler is not None:
                    scheduler.release()
        else:
            key = cache.key(identity, inputs, datatypes, outputs)
        cached = cache.get(key)
        if cached is not None:
            now = time.perf_counter_ns()
            model.stats.record_cache_hit(now - started, now - lookup)
            return cached, None
        lookup_ns = time.perf_counter_ns() - lookup
        try:
            results, times = await run()
        except BaseException:
            model.stats.record_cache_miss(lookup_ns)
            raise
        inserting = time.perf_counter_ns()
        if heavy(results.values()):
            cache.put(key, await asyncio.to_thread(cache.entry, results))
        else:
            cache.put(key, cache.entry(results))
        model.stats.record_cache_miss(lookup_ns + time.perf_counter_ns() - inserting)
        return results, times

    def check_input(self, model: str, version: str, tensor: str, datatype: str, shape: tuple[int, ...]) -> None:
        """Before a large tensor is decoded (codec.LARGE_ELEMENTS): the model is served and takes it, so that a
        request it cannot take costs no work per element. The request's id is not known here (the server may make
        it later), so one that names no version may still go to a canary (repository/rollout.py): it passes when the
        canary takes it, and the version chosen checks it in full."""
        loaded = self._repository.get(model, version)
        try:
            check_input(loaded.schema, loaded.name, str(loaded.version), tensor, datatype, shape)
        except TensorgateError:
            rollout = loaded.rollout
            if version or rollout is None or rollout.canary is None or rollout.share <= 0:
                raise
            canary = self._repository.get(model, str(rollout.canary))
            with contextlib.suppress(TensorgateError):
                check_input(canary.schema, canary.name, str(canary.version), tensor, datatype, shape)
                return
            raise

    def decoupled(self, model: str, version: str) -> bool:
        """Whether a stream's request goes to a decoupled model (`relay`); False for a model that is not served
        (the request then fails on the usual path, with why)."""
        try:
            return self._repository.get(model, version).config.model_transaction_policy.decoupled
        except TensorgateError:
            return False

    async def relay(
        self, req: InferRequest, message: pb.ModelInferRequest
    ) -> AsyncGenerator[pb.ModelInferResponse, None]:
        """A decoupled model's request (over ModelStreamInfer): validated as any other, then `message`, the
        request as the caller sent it, goes to the backend, and each of the upstream's responses comes back as it
        arrives, under this model's name. The model is held meanwhile, so that an unload waits for the request
        (within its grace period). Statistics count the request once, with its whole time as compute, and each
        response by its index (Triton's response_stats)."""
        started = time.perf_counter_ns()
        if not req.id:
            req.id = message.id = _new_request_id()
        model = self._repository.get(req.model, req.version)
        version = req.version = str(model.version)  # the caller counts the request under the version that served
        backend, scheduler = model.backend, model.scheduler
        if not isinstance(backend, StreamsResponses) or scheduler is None:
            raise UnimplementedError(f"{model_ref(model.name, version)} cannot answer a decoupled request")
        span = trace.get_current_span() if self._tracing is not None else None
        _, rows, _ = self._validate(model, req, version, span)
        if req.shared_outputs or any("shared_memory_region" in t.parameters for t in message.inputs):
            raise InvalidRequestError(
                model.name, version, "shared memory is not supported for a decoupled model's tensors"
            )
        stats, index, last = model.stats, 0, started
        try:
            backend.admit(req.deadline)
        except TensorgateError:
            # A failed request, as one refused by a full queue is, but no response of its failed: none was asked
            # of the upstream, and a refusal counted at index 0 would shorten the time to first response.
            stats.record_failure(time.perf_counter_ns() - started)
            raise
        scheduler.hold()
        try:
            context = None if span is None else Tracing.context_of(span)
            # Closed at once if the caller stops taking responses: its upstream call ends then, not at collection.
            async with contextlib.aclosing(backend.stream(message, req.deadline, context)) as responses:
                async for response in responses:
                    arrived = time.perf_counter_ns()
                    response.model_name, response.model_version = model.name, version
                    yield response
                    # Counted once the caller took it (a response too large to send fails at its own index).
                    stats.record_response(index, arrived - last, empty=_empty_final(response))
                    index, last = index + 1, arrived
        except BaseException as exc:
            now = time.perf_counter_ns()
            stats.record_response_failure(index, now - last, cancelled=isinstance(exc, asyncio.CancelledError))
            stats.record_failure(now - started)
            raise
        finally:
            scheduler.release()
        total = time.perf_counter_ns() - started
        times = ExecutionTimes(0, 0, total, 0, rows)
        model.stats.record_execution(rows, times)
        model.stats.record_request(rows, total, times)

    def _respond(
        self, model: LoadedModel, version: str, req: InferRequest, outputs: list[str], results: dict[str, np.ndarray]
    ) -> InferResponse:
        schema = model.schema
        response = InferResponse(
            model=model.name,
            version=version,
            id=req.id,
            outputs=[
                (
                    name,
                    schema.outputs[name].datatype.name,
                    reshape_out(results[name], schema.outputs[name], schema.max_batch_size),
                )
                for name in outputs
            ],
        )
        if req.classifications is not None:
            _classify(response, req.classifications, schema)
        return response

    def _answered(
        self,
        model: LoadedModel,
        req: InferRequest,
        inputs: dict[str, np.ndarray],
        results: dict[str, np.ndarray],
        span: trace.Span | None,
        times: ExecutionTimes | None,
        sampled: CaptureConfig | None,
    ) -> None:
        """What follows an answer, from the model or the response cache (`times` None): capture (`sampled`: the
        request's capture settings when it is to be captured) and span."""
        if sampled is not None:
            assert self.capture is not None
            self.capture.enqueue(sampled, model.name, model.version, model.config, req.id, inputs, results)
        if span is not None and span.is_recording():
            if times is None:
                span.set_attribute("tensorgate.cache.hit", True)
            else:
                span.set_attributes(
                    {
                        "tensorgate.batch.size": times.batch_rows,
                        "tensorgate.execution_provider": model.backend.execution_provider,
                    }
                )

    def _identity(self, model: LoadedModel, resolved: Resolved | None = None) -> tuple[str, int, str] | None:
        """What a cached answer depends on besides the request: the model's files, and an ensemble's steps' too (a
        composing model reloaded with new files must not be answered for by the old one's outputs). None when a
        step's model is not there: the request goes on uncached and fails, counted, where any other would."""
        try:
            return model.name, model.version, "/".join(self._signatures(model, resolved))
        except TensorgateError:
            return None

    def _signatures(self, model: LoadedModel, resolved: Resolved | None = None) -> list[str]:
        """The model's file signature, then those of every model its steps run, ensembles within it included."""
        if model.plan is None:
            return [model.signature]
        out = [model.signature]
        for key in model.plan.models:
            out.extend(self._signatures(self._step_model(key, resolved), resolved))
        return out

    def _execute(
        self,
        model: LoadedModel,
        inputs: dict[str, np.ndarray],
        outputs: list[str],
        rows: int,
        req: InferRequest,
        priority: int | None,
        timeout_us: int | None,
        span: trace.Span | None,
    ) -> Coroutine[Any, Any, tuple[dict[str, np.ndarray], ExecutionTimes]]:
        """Validated inputs through the model's scheduler, or an ensemble's steps (for a request or a step). It
        hands back the coroutine to await, adding no frame to the request path."""
        scheduler = model.scheduler
        if scheduler is None:
            return self._run_ensemble(model, inputs, outputs, rows, req, priority, timeout_us, span)
        remote = model.remote_sequences
        sequences = model.sequencer or remote
        if sequences is not None:
            flags = _sequence_flags(req, str(model.version))
            context = None if span is None else Tracing.context_of(span)
            if remote is not None:  # a remote sequence model's request takes its id and parameters upstream too
                return remote.submit(
                    inputs,
                    outputs,
                    rows,
                    req.deadline,
                    flags,
                    span=context,
                    request_id=req.id,
                    parameters=req.parameters,
                )
            assert model.sequencer is not None
            return model.sequencer.submit(
                inputs, outputs, rows, req.deadline, flags, span=context, timeout_us=timeout_us
            )
        return scheduler.submit(
            inputs,
            outputs,
            rows,
            req.deadline,
            priority=priority,
            timeout_us=timeout_us,
            span=None if span is None else Tracing.context_of(span),
            request_id=req.id,  # a remote model's go upstream (a local one's scheduler ignores them)
            parameters=req.parameters,
        )

    async def _run_ensemble(
        self,
        model: LoadedModel,
        inputs: dict[str, np.ndarray],
        outputs: list[str],
        rows: int,
        req: InferRequest,
        priority: int | None,
        timeout_us: int | None,
        span: trace.Span | None,
        resolved: dict[tuple[str, str], LoadedModel] | None = None,
    ) -> tuple[dict[str, np.ndarray], ExecutionTimes]:
        """An ensemble's steps, each validated and queued as a request to its composing model, which batches it with
        its other traffic and counts it in its own statistics. The ensemble's queue and compute times are the sums
        of its steps'; each step is a child of the request's span. A step's error names the ensemble, as Triton's
        does ("in ensemble 'name', ...").

        `resolved`: for an ensemble that is a step of another, the models its request found when it started."""
        plan = model.plan
        assert plan is not None
        spent = [0, 0, 0, 0]
        traced = span is not None and span.is_recording()
        # Every step's model, found and held once, when the request starts (as Triton does), those of ensembles
        # among the steps too: an unload or a version swap while it runs must neither fail a later step nor mix
        # versions within one request.
        try:
            models = resolved if resolved is not None else self._resolve(plan, {})
        except TensorgateError as exc:
            # A step's model unloaded an instant before the ensemble is (its refresh runs after the unload): the
            # caller asked for the ensemble, so the error names it, as a failed step's does.
            raise with_prefix(exc, f"in ensemble '{model.name}', ") from exc
        held = [] if resolved is not None else [m.scheduler for m in models.values() if m.scheduler is not None]
        for scheduler in held:
            scheduler.hold()
        # A sequence model's place for this request is taken now, as the request arrives: a sequence's requests
        # reach that model in the order they reached the server, however long the steps before it take.
        # Only for the steps that will run: a sequence model that the outputs asked for do not need is left alone.
        places: dict[tuple[str, str], Place] = {}
        try:
            for step in needed_steps(plan, outputs):
                key = (step.model, step.version)
                m = models[key]
                if m.sequencer is not None and key not in places:
                    places[key] = m.sequencer.enter(_sequence_flags(req, str(m.version)), rows)
        except BaseException:
            self._leave(models, places)
            for scheduler in held:
                scheduler.release()
            raise

        # Rows of the request that made each tensor, 0 when its model does not batch (fit_batching).
        batches = dict.fromkeys(inputs, rows if model.schema.max_batch_size > 0 else 0)

        async def run_step(step: Step, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            started_ns = time.time_ns()
            error: BaseException | None = None
            place = places.pop((step.model, step.version), None)  # a model in two steps: the first has it
            try:
                composing = models[(step.model, step.version)]
                version = str(composing.version)
                schema = composing.schema
                batching = schema.max_batch_size > 0
                for name, array in feed.items():
                    spec = schema.inputs.get(name)
                    if spec is not None:
                        feed[name] = fit_batching(array, spec.dims, batching, batches[step.inputs[name]])
                sub = InferRequest(
                    model=step.model,
                    version=version,
                    id=req.id,
                    inputs=feed,
                    datatypes={name: from_numpy(array.dtype).name for name, array in feed.items()},
                    requested_outputs=list(step.outputs),
                )
                step_inputs, step_rows, step_outputs = validate_request(composing.schema, sub, version)
                started = time.perf_counter_ns()
                times: ExecutionTimes | None
                try:
                    if place is not None:
                        assert composing.sequencer is not None
                        context = None if span is None else Tracing.context_of(span)
                        results, times = await composing.sequencer.run(
                            place,
                            step_inputs,
                            step_outputs,
                            step_rows,
                            req.deadline,
                            span=context,
                            timeout_us=timeout_us,
                        )
                    elif composing.plan is not None:
                        # A composing ensemble answers from its own response cache too, as a request sent to it
                        # would; on a miss its steps run on the models this request holds.
                        nested = functools.partial(
                            self._run_ensemble,
                            composing,
                            step_inputs,
                            step_outputs,
                            step_rows,
                            req,
                            priority,
                            timeout_us,
                            span,
                            models,
                        )
                        identity = self._cache_identity(composing, req, models) if self.cache is not None else None
                        if identity is None:
                            results, times = await nested()
                        else:
                            results, times = await self._cached(
                                composing, identity, step_inputs, sub.datatypes, step_outputs, started, nested
                            )
                    else:
                        # A step's model answers from its own response cache, as Triton's composing models do.
                        results, times = await self._execute_cached(
                            composing,
                            step_inputs,
                            sub.datatypes,
                            step_outputs,
                            step_rows,
                            req,
                            priority,
                            timeout_us,
                            span,
                            started,
                        )
                except BaseException:
                    composing.stats.record_failure(time.perf_counter_ns() - started)
                    raise
                if times is not None:  # None: answered from the cache (counted by _cached), no queue or compute
                    composing.stats.record_request(step_rows, time.perf_counter_ns() - started, times)
                    spent[0] += times.queue_ns
                    spent[1] += times.compute_input_ns
                    spent[2] += times.compute_infer_ns
                    spent[3] += times.compute_output_ns
                for name in step_outputs:
                    batches[step.outputs[name]] = step_rows if batching else 0
                return {
                    step.outputs[name]: reshape_out(results[name], schema.outputs[name], schema.max_batch_size)
                    for name in step_outputs
                }
            except TensorgateError as exc:
                error = exc
                raise with_prefix(exc, f"in ensemble '{model.name}', ") from exc
            except BaseException as exc:
                error = exc
                raise
            finally:
                if place is not None:
                    self._leave(models, {(step.model, step.version): place})
                if traced:
                    assert span is not None and self._tracing is not None
                    self._tracing.record_child(span, f"ensemble step {step.index} {step.model}", started_ns, error)
                error = None  # the cycle through this frame (see `_validate`)

        try:
            results = await run_plan(plan, inputs, outputs, run_step)
            batching = model.schema.max_batch_size > 0
            for name, array in results.items():
                results[name] = fit_batching(array, model.schema.outputs[name].dims, batching, batches[name])
        finally:
            self._leave(models, places)  # the places of steps that never ran (an earlier step failed)
            for scheduler in held:
                scheduler.release()
        times = ExecutionTimes(spent[0], spent[1], spent[2], spent[3], batch_rows=rows)
        # As Triton's ensemble counts itself: one execution of the request's rows per request that succeeded, with
        # the sums of its steps' compute times, so that ModelStatistics' batch_stats (perf_analyzer) show it too.
        model.stats.record_execution(max(rows, 1), times)
        return results, times

    def _resolve(
        self, plan: EnsemblePlan, into: dict[tuple[str, str], LoadedModel]
    ) -> dict[tuple[str, str], LoadedModel]:
        """The models of an ensemble's steps, and of the steps of ensembles among them, as served now."""
        for key in plan.models:
            if key not in into:
                found = into[key] = self._repository.get(*key)
                if found.plan is not None:
                    self._resolve(found.plan, into)
        return into

    @staticmethod
    def _leave(models: dict[tuple[str, str], LoadedModel], places: dict[tuple[str, str], Place]) -> None:
        for key, place in places.items():
            sequencer = models[key].sequencer
            assert sequencer is not None
            sequencer.leave(place)


def _empty_final(response: pb.ModelInferResponse) -> bool:
    """The response that only marks its request's end (the final flag, no outputs), which Triton counts apart."""
    params = response.parameters
    return not response.outputs and FINAL_RESPONSE in params and params[FINAL_RESPONSE].bool_param
