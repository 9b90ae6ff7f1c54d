"""The asyncio client, over a ``grpc.aio.Channel``: the same calls as ``InferenceClient``, awaited, plus streams."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import grpc
import grpc.aio
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorgate.client import _common, _monitoring, _rollout, _stream_writer
from tensorgate.client._common import InferResult, ModelMetadata, StreamRequest
from tensorgate.client.config import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TIMEOUT_S,
    ChannelSettings,
    RetryPolicy,
    TLSConfig,
)
from tensorgate.client.errors import Cancelled, StreamItemError, from_rpc_error
from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import model_config_pb2 as mc
from tensorgate.protos import monitoring_pb2 as mpb
from tensorgate.protos.tensors import ParamValue

__all__ = ["AsyncInferenceClient"]


class _Stubs(NamedTuple):
    channel: grpc.aio.Channel
    loop: asyncio.AbstractEventLoop
    inference: GRPCInferenceServiceStub
    monitoring: Any  # _monitoring.MonitoringStub, a class made at import
    rollout: Any  # _rollout.RolloutStub, the same
    health: health_pb2_grpc.HealthStub


class AsyncInferenceClient:
    """The asyncio twin of ``InferenceClient``; it may be made anywhere (at import time too, as web apps keep one
    in a module) and connects in the event loop of its first call, to which its calls then belong.

    Usage::

        async with AsyncInferenceClient("127.0.0.1:8001") as client:
            result = await client.infer("add_sub", {"INPUT0": x, "INPUT1": y})
            async for item in client.stream_infer([("add_sub", inputs) for inputs in batches]):
                ...

    Deadlines, typed errors, retries, TLS, ``headers`` and ``load_balancing`` work as in ``InferenceClient``.
    """

    def __init__(
        self,
        url: str = "127.0.0.1:8001",
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        tls: TLSConfig | None = None,
        retry: RetryPolicy | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        keepalive_time_s: float | None = 60.0,
        channel_options: Sequence[tuple[str, Any]] = (),
        headers: Mapping[str, str] | None = None,
        load_balancing: str = "pick_first",
    ) -> None:
        self.url = _common.check_url(url)
        self.timeout = _common.check_timeout(timeout)
        self._headers = _common.check_headers(headers)
        settings = ChannelSettings(
            tls=tls,
            retry=retry,
            max_message_bytes=max_message_bytes,
            keepalive_time_s=keepalive_time_s,
            load_balancing=load_balancing,
            extra_options=tuple(channel_options),
        )
        self._options = settings.options()
        self._credentials = None if tls is None else tls.credentials()  # read now: a bad file fails here
        self._stubs: _Stubs | None = None
        self._connecting = threading.Lock()  # the first calls of two loops' threads, at once, make one channel
        self._closed = False

    # ----- plumbing ------------------------------------------------------------------------------------------

    def _connect(self) -> _Stubs:
        """The channel of the running loop, made on the first call: grpc.aio binds a channel to the loop it is
        made in, so one made with the client outside a loop (or in another) fails every call. A loop that has
        ended (``asyncio.run`` returned) leaves its channel unusable, and the next loop gets a new one; two live
        loops cannot share a client.

        The channel of an ended loop cannot be awaited (``close()`` is a coroutine of that loop); grpc.aio's
        ``Channel.__del__`` closes it when the new one replaces it here and the last reference goes."""
        loop = asyncio.get_running_loop()
        stubs = self._stubs
        if stubs is not None and stubs.loop is loop:
            return stubs
        with self._connecting:  # else each thread, its loop open, could make a channel and lose the other's
            stubs = self._stubs
            if stubs is not None and stubs.loop is not loop and not stubs.loop.is_closed():
                raise RuntimeError(
                    f"AsyncInferenceClient({self.url!r}) is in use in another event loop, which is still open: "
                    "grpc.aio channels belong to one loop; make a client per event loop (or per thread that runs one)"
                )
            # Not this loop's (only this thread runs it, and it is here): none yet, or one of an ended loop.
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(self.url, options=self._options)
            else:
                channel = grpc.aio.secure_channel(self.url, self._credentials, options=self._options)
            stubs = _Stubs(
                channel,
                loop,
                GRPCInferenceServiceStub(channel),
                _monitoring.MonitoringStub(channel),
                _rollout.RolloutStub(channel),
                health_pb2_grpc.HealthStub(channel),
            )
            self._stubs = stubs
            return stubs

    @contextlib.contextmanager
    def _errors(self, method: str) -> Iterator[None]:
        """How every call fails, in one place: gRPC's status as its typed error, and a call on a closed client,
        or one running when it closed, as Cancelled."""
        if self._closed:
            raise Cancelled("the client is closed", method=method)
        try:
            yield
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, method) from exc
        except grpc.aio.UsageError:
            if not self._closed:
                raise
            raise Cancelled("the client is closed", method=method) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and (task is None or not task.cancelling()):
                # grpc.aio cancels the calls of a channel being closed: that is this call's failure (as the sync
                # client reports it), not a cancellation of the caller's task, which `except Exception` would miss.
                raise Cancelled("the client was closed while the call ran", method=method) from None
            raise

    async def _call(
        self, method: str, request: Any, timeout: float | None, headers: Mapping[str, str] | None = None
    ) -> Any:
        deadline = self._deadline(timeout)
        metadata = _common.call_metadata(self._headers, headers)
        with self._errors(method):
            stubs = self._connect()
            stub = next(s for s in (stubs.inference, stubs.monitoring, stubs.rollout) if hasattr(s, method))
            multicallable = getattr(stub, method)
            return await multicallable(request, timeout=deadline, metadata=metadata)

    def _deadline(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else _common.check_timeout(timeout)

    async def close(self) -> None:
        """Close the channel; calls still running, and any made later, raise Cancelled. A client that never
        called has no channel to close; one whose loop has ended has nothing left to close."""
        stubs = self._stubs
        if stubs is not None and stubs.loop is not asyncio.get_running_loop() and not stubs.loop.is_closed():
            self._connect()  # raises: the channel's loop is another, still open
        self._closed = True
        self._stubs = None
        if stubs is not None and not stubs.loop.is_closed():
            await stubs.channel.close()

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----- inference -----------------------------------------------------------------------------------------

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        version: str | int | None = None,
        request_id: str | None = None,
        priority: int | None = None,
        timeout: float | None = None,
        class_counts: Mapping[str, int] | None = None,
        sequence_id: int | str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
        *,
        parameters: Mapping[str, ParamValue] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> InferResult:
        """See ``InferenceClient.infer``."""
        request = _common.infer_request(
            model,
            inputs,
            outputs=outputs,
            version=version,
            request_id=request_id,
            priority=priority,
            class_counts=class_counts,
            sequence_id=sequence_id,
            sequence_start=sequence_start,
            sequence_end=sequence_end,
            parameters=parameters,
        )
        return _common.infer_result(await self._call("ModelInfer", request, timeout, headers))

    async def stream_infer(
        self,
        requests: Iterable[StreamRequest] | AsyncIterable[StreamRequest],
        timeout: float | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[InferResult | StreamItemError]:
        """Send ``requests`` over one ModelStreamInfer stream; yield a result per request as the server answers.

        Each request is ``(model, inputs)`` or a dict of ``infer``'s arguments. tensorgate and Triton answer in
        request order (for a model that is not decoupled); other servers may not, so ``.id`` is there to match
        them (a request without ``request_id`` gets ``<stream>-<index>``: a prefix drawn for each stream, then its
        index in the stream, "0", "1", ...; unique beyond the stream, as feedback on captured requests needs).

        A request that fails is *yielded* as a ``StreamItemError`` (with ``.request_id``), not raised, because
        raising would end the iteration and lose the results still on their way; the stream goes on. A failure
        of the stream itself (server down, deadline of the whole stream, which is ``timeout`` or the client's
        default) is raised as the typed error of its status. A request item that cannot be encoded (TypeError)
        ends the request stream: the results of the requests before it are yielded, then it is raised.
        ``headers`` go with the stream as gRPC metadata, over the client's of the same names.
        """
        bad: list[Exception] = []

        stream = secrets.token_hex(6)

        async def messages() -> AsyncIterator[pb.ModelInferRequest]:
            index = 0
            try:
                if isinstance(requests, AsyncIterable):
                    async for item in requests:
                        yield _common.stream_request(item, index, stream)
                        index += 1
                else:
                    for item in requests:
                        yield _common.stream_request(item, index, stream)
                        index += 1
            except Exception as exc:  # noqa: BLE001 - grpc would swallow it; re-raised after the responses
                bad.append(exc)

        deadline = self._deadline(timeout)
        metadata = _common.call_metadata(self._headers, headers)
        with self._errors("ModelStreamInfer"):
            call = self._connect().inference.ModelStreamInfer(timeout=deadline, metadata=metadata)
            writer = _stream_writer.start(call, messages())
            try:
                async for response in call:
                    reply = response.infer_response
                    if response.error_message:
                        code, ran, permanent = _common.stream_item_status(reply)
                        yield StreamItemError(
                            response.error_message,
                            request_id=reply.id,
                            model=reply.model_name,
                            version=reply.model_version,
                            code=code,
                            ran=ran,
                            permanent=permanent,
                        )
                    else:
                        yield _common.infer_result(reply)
            finally:
                await _stream_writer.stop(call, writer)
        if bad:
            raise bad[0]

    # ----- health, metadata, statistics ----------------------------------------------------------------------

    async def live(self, timeout: float | None = None) -> bool:
        return bool((await self._call("ServerLive", pb.ServerLiveRequest(), timeout)).live)

    async def ready(
        self, model: str | None = None, version: str | int | None = None, timeout: float | None = None
    ) -> bool:
        """Whether the server (``model=None``) or a model version can serve; an unknown model is not ready."""
        if model is None:
            return bool((await self._call("ServerReady", pb.ServerReadyRequest(), timeout)).ready)
        request = pb.ModelReadyRequest(name=model, version=_common.version_str(version))
        return bool((await self._call("ModelReady", request, timeout)).ready)

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        """The ``grpc.health.v1`` status name of ``service`` ("" = the whole server): "SERVING", "NOT_SERVING"..."""
        deadline = self._deadline(timeout)
        with _common.health_service(service), self._errors("Health.Check"):
            reply = await self._connect().health.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=deadline,
                metadata=_common.call_metadata(self._headers),
            )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    async def metadata(
        self, model: str, version: str | int | None = None, timeout: float | None = None
    ) -> ModelMetadata:
        request = pb.ModelMetadataRequest(name=model, version=_common.version_str(version))
        return _common.model_metadata(await self._call("ModelMetadata", request, timeout))

    async def config(
        self, model: str, version: str | int | None = None, timeout: float | None = None
    ) -> mc.ModelConfig:
        """The model's effective Triton ``ModelConfig`` (a protobuf message)."""
        request = pb.ModelConfigRequest(name=model, version=_common.version_str(version))
        config: mc.ModelConfig = (await self._call("ModelConfig", request, timeout)).config
        return config

    async def statistics(
        self, model: str | None = None, version: str | int | None = None, timeout: float | None = None
    ) -> pb.ModelStatisticsResponse:
        """Triton's ``ModelStatisticsResponse`` for one model, or every loaded model with ``model=None``."""
        request = pb.ModelStatisticsRequest(name=model or "", version=_common.version_str(version))
        response: pb.ModelStatisticsResponse = await self._call("ModelStatistics", request, timeout)
        return response

    # ----- repository ----------------------------------------------------------------------------------------

    async def load(
        self,
        model: str,
        config: mc.ModelConfig | Mapping[str, Any] | str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Load (or reload) a model; ``config`` overrides its config.pbtxt (a ModelConfig, dict or JSON text)."""
        await self._call("RepositoryModelLoad", _common.load_request(model, config), timeout)

    async def unload(self, model: str, timeout: float | None = None, *, unload_dependents: bool = False) -> None:
        """Unload a model; with ``unload_dependents``, an ensemble's composing models that its load brought in and
        that nothing else needs go with it."""
        await self._call("RepositoryModelUnload", _common.unload_request(model, unload_dependents), timeout)

    # ----- monitoring (tensorgate.v1.Monitoring; the server needs --data-dir) --------------------------------

    async def submit_feedback(
        self, model: str, request_id: str, label: _monitoring.Label, timeout: float | None = None
    ) -> None:
        """Join the ground truth of one answered request (``InferResult.id``): one label, or one per row.

        Returns once the server has committed it; an unknown id raises ``NotFound``.
        """
        request = mpb.SubmitFeedbackRequest(model=model, feedback=_monitoring.feedback(request_id, label))
        await self._call("SubmitFeedback", request, timeout)

    async def submit_feedback_batch(
        self, model: str, items: Iterable[tuple[str, _monitoring.Label]], timeout: float | None = None
    ) -> list[_monitoring.FeedbackStatus]:
        """Many ``(request_id, label)`` at once; one status per item (an unknown id fails only its own item)."""
        reply = await self._call("SubmitFeedbackBatch", _monitoring.batch_request(model, items), timeout)
        return _monitoring.statuses(reply)

    async def submit_feedback_stream(
        self,
        model: str,
        items: Iterable[tuple[str, _monitoring.Label]] | AsyncIterable[tuple[str, _monitoring.Label]],
        timeout: float | None = None,
    ) -> AsyncIterator[_monitoring.FeedbackStatus]:
        """See ``InferenceClient.submit_feedback_stream``; ``items`` may also be an async iterable."""
        bad: list[Exception] = []
        deadline = self._deadline(timeout)
        with self._errors("SubmitFeedbackStream"):
            call = _monitoring.stream_method(self._connect().monitoring)(
                timeout=deadline, metadata=_common.call_metadata(self._headers)
            )
            writer = _stream_writer.start(call, _monitoring.astream_requests(model, items, bad))
            try:
                async for msg in call:
                    yield _monitoring.status(msg)
            finally:
                await _stream_writer.stop(call, writer)
        if bad:
            raise bad[0]

    async def model_quality(
        self,
        model: str,
        version: str | int | None = None,
        *,
        count: int | None = None,
        seconds: float | None = None,
        timeout: float | None = None,
    ) -> _monitoring.ModelQuality:
        """Quality over the last ``count`` predictions and/or ``seconds`` (neither: the server's default window)."""
        request = _monitoring.window_request(mpb.GetModelQualityRequest, model, version, count, seconds)
        return _monitoring.quality_result(await self._call("GetModelQuality", request, timeout))

    async def model_drift(
        self,
        model: str,
        version: str | int | None = None,
        *,
        count: int | None = None,
        seconds: float | None = None,
        timeout: float | None = None,
    ) -> _monitoring.ModelDrift:
        """Drift of a window against the model's reference profile (FAILED_PRECONDITION without one)."""
        request = _monitoring.window_request(mpb.GetModelDriftRequest, model, version, count, seconds)
        return _monitoring.drift_result(await self._call("GetModelDrift", request, timeout))

    async def alerts(self, model: str | None = None, timeout: float | None = None) -> list[_monitoring.Alert]:
        """The alerts firing now (of one model, or all)."""
        reply = await self._call("ListAlerts", mpb.ListAlertsRequest(model=model or ""), timeout)
        return _monitoring.alerts_result(reply)

    async def rollout(self, model: str, timeout: float | None = None) -> _rollout.RolloutState:
        """Where the model's rollout split stands: the canary's share, its ramp's step and what that waits for
        (NOT_FOUND for a model without ``tensorgate.rollout.*`` parameters)."""
        reply = await self._call("GetRollout", mpb.GetRolloutRequest(model=model), timeout)
        return _rollout.state_result(reply)
