"""What the sync and asyncio clients share for ``tensorgate.v1.Monitoring``: request builders and result types."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np

from tensorgate.client._common import version_str
from tensorgate.client.errors import TensorgateClientError
from tensorgate.protos import monitoring_pb2 as mpb
from tensorgate.protos.service import make_stub_class
from tensorgate.protos.tensors import BY_NAME

__all__ = [
    "Alert",
    "ClassQuality",
    "FeatureDrift",
    "FeedbackStatus",
    "ModelDrift",
    "ModelQuality",
    "MonitoringStub",
    "alerts_result",
    "describe_failure",
    "drift_result",
    "feedback",
    "quality_result",
    "window_request",
]

MONITORING_SERVICE = "tensorgate.v1.Monitoring"
MonitoringStub = make_stub_class(MONITORING_SERVICE)

Label = int | float | str | bytes | Sequence[Any] | np.ndarray
"""Ground truth of one request: one value (single-row request) or one per row; numbers or text."""


def describe_failure(exc: TensorgateClientError) -> str:
    """A failed Monitoring call as the commands print it, ``CODE: details``. A server without ``--data-dir`` has
    no Monitoring service at all, and gRPC's words for that ("Method not found!") do not say what to change."""
    text = f"{exc.code.name}: {exc.details}"
    if exc.code == grpc.StatusCode.UNIMPLEMENTED and "--data-dir" not in exc.details:  # tensorgate's own says so
        text += (
            f" (monitoring is off: the server has no {MONITORING_SERVICE} service; "
            "start `tensorgate serve` with --data-dir DIR)"
        )
    return text


def feedback(request_id: str, label: Label) -> mpb.Feedback:
    """A ``Feedback`` item: numbers go in ``values``, text (str/bytes) in ``labels``. Raises TypeError otherwise."""
    try:
        array = np.asarray(label).reshape(-1)
    except ValueError:  # numpy's "inhomogeneous shape" says nothing of feedback
        raise TypeError(
            f"feedback for request '{request_id}': the label must be one value, or a flat list of one value per row"
        ) from None
    if array.size == 0:
        raise TypeError(f"feedback for request '{request_id}': the label is empty")
    if array.dtype.kind in "biuf" or array.dtype == BY_NAME["BF16"].np_dtype:
        return mpb.Feedback(request_id=request_id, values=array.astype(np.float64).tolist())
    if array.dtype.kind in "US" or array.dtype == object:
        texts = [v.decode() if isinstance(v, bytes) else v for v in array.tolist()]
        if all(isinstance(t, str) for t in texts):
            return mpb.Feedback(request_id=request_id, labels=texts)
    raise TypeError(f"feedback for request '{request_id}': labels must be numbers or text, got {array.dtype}")


def batch_request(model: str, items: Iterable[tuple[str, Label]]) -> mpb.SubmitFeedbackBatchRequest:
    return mpb.SubmitFeedbackBatchRequest(model=model, items=[feedback(rid, label) for rid, label in items])


def stream_method(stub: Any) -> Any:
    """The SubmitFeedbackStream multicallable of a ``MonitoringStub`` (its attributes are made at run time)."""
    return stub.SubmitFeedbackStream


def stream_requests(
    model: str, items: Iterable[tuple[str, Label]], bad: list[Exception]
) -> Iterator[mpb.SubmitFeedbackRequest]:
    """The messages of SubmitFeedbackStream. An item that cannot be encoded ends the request stream and lands in
    ``bad``, to be raised once the statuses of the items before it are in (gRPC would swallow it)."""
    try:
        for request_id, label in items:
            yield mpb.SubmitFeedbackRequest(model=model, feedback=feedback(request_id, label))
    except Exception as exc:  # noqa: BLE001 - re-raised by the caller after the responses
        bad.append(exc)


async def astream_requests(
    model: str, items: Iterable[tuple[str, Label]] | AsyncIterable[tuple[str, Label]], bad: list[Exception]
) -> AsyncIterator[mpb.SubmitFeedbackRequest]:
    """``stream_requests`` for the asyncio client: ``items`` may also be an async iterable."""
    try:
        if isinstance(items, AsyncIterable):
            async for request_id, label in items:
                yield mpb.SubmitFeedbackRequest(model=model, feedback=feedback(request_id, label))
        else:
            for request_id, label in items:
                yield mpb.SubmitFeedbackRequest(model=model, feedback=feedback(request_id, label))
    except Exception as exc:  # noqa: BLE001 - re-raised by the caller after the responses
        bad.append(exc)


WindowRequest = TypeVar("WindowRequest", mpb.GetModelQualityRequest, mpb.GetModelDriftRequest)


def window_request(
    kind: type[WindowRequest], model: str, version: str | int | None, count: int | None, seconds: float | None
) -> WindowRequest:
    """GetModelQuality's or GetModelDrift's request: a model version and a window of its last predictions."""
    window = mpb.Window(count=count or 0, seconds=seconds or 0.0)
    return kind(model=model, version=version_str(version), window=window)


@dataclass(frozen=True)
class FeedbackStatus:
    """The outcome of one batch or stream item: ``code`` OK, NOT_FOUND (unknown id) or INVALID_ARGUMENT."""

    request_id: str
    code: grpc.StatusCode
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def status(msg: mpb.FeedbackStatus) -> FeedbackStatus:
    return FeedbackStatus(msg.request_id, _CODES.get(msg.code, grpc.StatusCode.UNKNOWN), msg.message)


def statuses(msg: mpb.SubmitFeedbackBatchResponse) -> list[FeedbackStatus]:
    return [status(s) for s in msg.statuses]


@dataclass(frozen=True)
class ClassQuality:
    label: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class ModelQuality:
    """Quality over a window: ``metrics`` (accuracy, f1_macro, mae, label_coverage, ...), per-class figures and
    the confusion matrix (rows: true class, columns: predicted, in ``class_labels`` order)."""

    model: str
    version: str
    task: str
    predictions: int
    labelled: int
    rows: int
    metrics: dict[str, float]
    classes: tuple[ClassQuality, ...] = ()
    class_labels: tuple[str, ...] = ()
    confusion: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))


def quality_result(msg: mpb.ModelQuality) -> ModelQuality:
    n = len(msg.class_labels)
    return ModelQuality(
        model=msg.model,
        version=msg.version,
        task=msg.task,
        predictions=msg.predictions,
        labelled=msg.labelled,
        rows=msg.rows,
        metrics=dict(msg.metrics),
        classes=tuple(ClassQuality(c.label, c.precision, c.recall, c.f1, c.support) for c in msg.classes),
        class_labels=tuple(msg.class_labels),
        confusion=np.asarray(list(msg.confusion), dtype=np.int64).reshape(n, n),
    )


@dataclass(frozen=True)
class FeatureDrift:
    """One feature's drift: ``psi`` against the reference, and the two-sample test's ``statistic`` and ``p_value``
    (KS for "numeric" and "score" features, chi-square for "categorical" ones); ``drifted`` after Bonferroni."""

    name: str
    kind: str
    psi: float
    statistic: float
    p_value: float
    drifted: bool


@dataclass(frozen=True)
class ModelDrift:
    """Drift of a window of ``samples`` rows against the model's reference profile: the summary (``psi_max``,
    ``psi_mean``, ``drifted_share`` of the features, ``score_drift``: the PSI of the output scores), one
    ``FeatureDrift`` per feature, and the tensors ``skipped`` (not compared, each with why)."""

    model: str
    version: str
    samples: int
    drifted: bool
    psi_max: float
    psi_mean: float
    drifted_share: float
    score_drift: float
    features: tuple[FeatureDrift, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)


def drift_result(msg: mpb.ModelDrift) -> ModelDrift:
    return ModelDrift(
        model=msg.model,
        version=msg.version,
        samples=msg.samples,
        drifted=msg.drifted,
        psi_max=msg.psi_max,
        psi_mean=msg.psi_mean,
        drifted_share=msg.drifted_share,
        score_drift=msg.score_drift,
        features=tuple(FeatureDrift(f.name, f.kind, f.psi, f.statistic, f.p_value, f.drifted) for f in msg.features),
        skipped=dict(msg.skipped),
    )


@dataclass(frozen=True)
class Alert:
    """A rule firing for a model version: ``value`` is the latest window's (NaN while the window has too few
    samples to judge), ``timestamp`` when it started firing, in seconds since the epoch (as ``time.time()``)."""

    rule: str
    model: str
    version: str
    state: str
    value: float
    threshold: float
    timestamp: float


def alerts_result(msg: mpb.ListAlertsResponse) -> list[Alert]:
    return [Alert(a.rule, a.model, a.version, a.state, a.value, a.threshold, a.timestamp) for a in msg.alerts]
