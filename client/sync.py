"""The blocking client, over a ``grpc.Channel``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorgate.client import _common, _monitoring, _rollout
from tensorgate.client._common import InferResult, ModelMetadata
from tensorgate.client.config import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TIMEOUT_S,
    ChannelSettings,
    RetryPolicy,
    TLSConfig,
)
from tensorgate.client.errors import Cancelled, from_rpc_error
from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import model_config_pb2 as mc
from tensorgate.protos import monitoring_pb2 as mpb
from tensorgate.protos.tensors import ParamValue

__all__ = ["InferenceClient"]


class InferenceClient:
    """A blocking client of a KServe V2 / Triton gRPC server (tensorgate, Triton, MLServer).

    Usage::

        with InferenceClient("127.0.0.1:8001") as client:
            result = client.infer("add_sub", {"INPUT0": x, "INPUT1": y})
            print(result["OUTPUT0"])

    Every call has a deadline: ``timeout`` seconds per call, else the client's ``timeout`` (30 s by default).
    Failed calls raise a ``TensorgateClientError`` subclass (``tensorgate.client.errors``). ``retry`` turns on
    gRPC's retries of UNAVAILABLE / RESOURCE_EXHAUSTED (see ``RetryPolicy``); ``tls`` a TLS or mTLS channel.
    ``headers`` go with every call as gRPC metadata, e.g. ``{"authorization": f"Bearer {token}"}`` for a server
    whose authorization policy maps tokens to identities (without TLS the token crosses the network in clear).
    ``load_balancing="round_robin"`` spreads calls over every address the ``url`` names (``ipv4:A:8001,B:8001``,
    or a DNS name of several replicas), so that a retry goes to the next replica; not for sequence models (see
    ``ChannelSettings.load_balancing``).
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
        options = settings.options()
        if tls is None:
            self._channel = grpc.insecure_channel(url, options=options)
        else:
            self._channel = grpc.secure_channel(url, tls.credentials(), options=options)
        self._closed = False
        self._stub = GRPCInferenceServiceStub(self._channel)
        self._monitoring = _monitoring.MonitoringStub(self._channel)
        self._rollout = _rollout.RolloutStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # ----- plumbing ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, method: str) -> Iterator[None]:
        """How every call fails, in one place: gRPC's status as its typed error, and a call on a closed client
        as Cancelled (gRPC raises ValueError), like a call that was running when the client closed."""
        if self._closed:
            raise Cancelled("the client is closed", method=method)
        try:
            yield
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, method) from exc
        except ValueError:
            if not self._closed:
                raise
            raise Cancelled("the client is closed", method=method) from None  # closed by another thread meanwhile

    def _call(self, method: str, request: Any, timeout: float | None, headers: Mapping[str, str] | None = None) -> Any:
        stub = next(s for s in (self._stub, self._monitoring, self._rollout) if hasattr(s, method))
        multicallable = getattr(stub, method)
        deadline = self._deadline(timeout)
        metadata = _common.call_metadata(self._headers, headers)
        with self._errors(method):
            return multicallable(request, timeout=deadline, metadata=metadata)

    def _deadline(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else _common.check_timeout(timeout)

    def close(self) -> None:
        """Close the channel; calls still running, and any made later, raise Cancelled."""
        self._closed = True
        self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- inference -----------------------------------------------------------------------------------------

    def infer(
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
        """Run ``model`` on ``inputs`` (datatypes from the numpy dtypes; str/bytes/object arrays are BYTES).

        ``outputs`` names the outputs to return (default: all); ``version`` picks a version (default: the
        server's choice); ``priority`` is the request parameter of Triton's priority levels (1 highest).
        ``class_counts`` asks for outputs as their top k classes (Triton's classification extension): each comes
        back as BYTES "value:index[:label]", best first, one row per batch row. Those outputs are requested
        alongside ``outputs``; like ``outputs``, naming any output means only the named ones come back.
        ``sequence_id`` (an integer or a string), ``sequence_start`` and ``sequence_end`` place the request in a
        sequence of a stateful model (Triton's sequence batcher): the first request sets ``sequence_start``, the
        last ``sequence_end``. A sequence's requests run in the order the server receives them, so send them one
        after another, or in order over ``stream_infer``.
        ``parameters`` go with the request as its parameters (bool, int, float or str; e.g. Triton's "timeout", a
        queue timeout in microseconds, or what a custom backend reads); the ones the arguments above set are
        refused there. ``headers`` go with this call as gRPC metadata, over the client's ``headers`` of the same
        names (e.g. a per-user ``authorization``).
        """
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
        return _common.infer_result(self._call("ModelInfer", request, timeout, headers))

    # ----- health, metadata, statistics ----------------------------------------------------------------------

    def live(self, timeout: float | None = None) -> bool:
        return bool(self._call("ServerLive", pb.ServerLiveRequest(), timeout).live)

    def ready(self, model: str | None = None, version: str | int | None = None, timeout: float | None = None) -> bool:
        """Whether the server (``model=None``) or a model version can serve; an unknown model is not ready."""
        if model is None:
            return bool(self._call("ServerReady", pb.ServerReadyRequest(), timeout).ready)
        request = pb.ModelReadyRequest(name=model, version=_common.version_str(version))
        return bool(self._call("ModelReady", request, timeout).ready)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The ``grpc.health.v1`` status name of ``service`` ("" = the whole server): "SERVING", "NOT_SERVING"..."""
        deadline = self._deadline(timeout)
        with _common.health_service(service), self._errors("Health.Check"):
            reply = self._health.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=deadline,
                metadata=_common.call_metadata(self._headers),
            )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def metadata(self, model: str, version: str | int | None = None, timeout: float | None = None) -> ModelMetadata:
        request = pb.ModelMetadataRequest(name=model, version=_common.version_str(version))
        return _common.model_metadata(self._call("ModelMetadata", request, timeout))

    def config(self, model: str, version: str | int | None = None, timeout: float | None = None) -> mc.ModelConfig:
        """The model's effective Triton ``ModelConfig`` (a protobuf message)."""
        request = pb.ModelConfigRequest(name=model, version=_common.version_str(version))
        config: mc.ModelConfig = self._call("ModelConfig", request, timeout).config
        return config

    def statistics(
        self, model: str | None = None, version: str | int | None = None, timeout: float | None = None
    ) -> pb.ModelStatisticsResponse:
        """Triton's ``ModelStatisticsResponse`` for one model, or every loaded model with ``model=None``."""
        request = pb.ModelStatisticsRequest(name=model or "", version=_common.version_str(version))
        response: pb.ModelStatisticsResponse = self._call("ModelStatistics", request, timeout)
        return response

    # ----- repository ----------------------------------------------------------------------------------------

    def load(
        self,
        model: str,
        config: mc.ModelConfig | Mapping[str, Any] | str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Load (or reload) a model; ``config`` overrides its config.pbtxt (a ModelConfig, dict or JSON text)."""
        self._call("RepositoryModelLoad", _common.load_request(model, config), timeout)

    def unload(self, model: str, timeout: float | None = None, *, unload_dependents: bool = False) -> None:
        """Unload a model; with ``unload_dependents``, an ensemble's composing models that its load brought in and
        that nothing else needs go with it."""
        self._call("RepositoryModelUnload", _common.unload_request(model, unload_dependents), timeout)

    # ----- monitoring (tensorgate.v1.Monitoring; the server needs --data-dir) --------------------------------

    def submit_feedback(
        self, model: str, request_id: str, label: _monitoring.Label, timeout: float | None = None
    ) -> None:
        """Join the ground truth of one answered request (``InferResult.id``): one label, or one per row.

        Returns once the server has committed it; an unknown id raises ``NotFound``.
        """
        request = mpb.SubmitFeedbackRequest(model=model, feedback=_monitoring.feedback(request_id, label))
        self._call("SubmitFeedback", request, timeout)

    def submit_feedback_batch(
        self, model: str, items: Iterable[tuple[str, _monitoring.Label]], timeout: float | None = None
    ) -> list[_monitoring.FeedbackStatus]:
        """Many ``(request_id, label)`` at once; one status per item (an unknown id fails only its own item)."""
        reply = self._call("SubmitFeedbackBatch", _monitoring.batch_request(model, items), timeout)
        return _monitoring.statuses(reply)

    def submit_feedback_stream(
        self, model: str, items: Iterable[tuple[str, _monitoring.Label]], timeout: float | None = None
    ) -> Iterator[_monitoring.FeedbackStatus]:
        """Stream ``(request_id, label)`` items (a generator is read as the call goes); yield one status per item,
        in order, each once the server has committed it (an unknown id or a bad label fails only its own item).

        ``timeout`` (or the client's default) is the deadline of the whole stream. A failure of the stream itself is
        raised as the typed error of its status; an item that cannot be encoded (TypeError) ends the stream: the
        statuses of the items before it are yielded, then it is raised.
        """
        bad: list[Exception] = []
        deadline = self._deadline(timeout)
        with self._errors("SubmitFeedbackStream"):
            call = _monitoring.stream_method(self._monitoring)(
                _monitoring.stream_requests(model, items, bad),
                timeout=deadline,
                metadata=_common.call_metadata(self._headers),
            )
            try:
                for msg in call:
                    yield _monitoring.status(msg)
            finally:
                call.cancel()  # no-op once the stream ended; stops it when the caller leaves the loop early
        if bad:
            raise bad[0]

    def model_quality(
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
        return _monitoring.quality_result(self._call("GetModelQuality", request, timeout))

    def model_drift(
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
        return _monitoring.drift_result(self._call("GetModelDrift", request, timeout))

    def alerts(self, model: str | None = None, timeout: float | None = None) -> list[_monitoring.Alert]:
        """The alerts firing now (of one model, or all)."""
        reply = self._call("ListAlerts", mpb.ListAlertsRequest(model=model or ""), timeout)
        return _monitoring.alerts_result(reply)

    def rollout(self, model: str, timeout: float | None = None) -> _rollout.RolloutState:
        """Where the model's rollout split stands: the canary's share, its ramp's step and what that waits for
        (NOT_FOUND for a model without ``tensorgate.rollout.*`` parameters)."""
        return _rollout.state_result(self._call("GetRollout", mpb.GetRolloutRequest(model=model), timeout))
