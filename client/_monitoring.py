"""What the sync and asyncio clients share for ``tensorgate.v1.Monitoring``: request builders and result types."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from tensorgate.protos import monitoring_pb2 as mpb
from tensorgate.protos.service import make_stub_class

__all__ = ["FeedbackStatus", "ModelQuality", "MonitoringStub", "feedback", "quality_result", "window"]

MONITORING_SERVICE = "tensorgate.v1.Monitoring"
MonitoringStub = make_stub_class(MONITORING_SERVICE)

Label = int | float | str | bytes | Sequence[Any] | np.ndarray
"""Ground truth of one request: one value (single-row request) or one per row; numbers or text."""


def feedback(request_id: str, label: Label) -> mpb.Feedback:
    """A ``Feedback`` item: numbers go in ``values``, text (str/bytes) in ``labels``. Raises TypeError otherwise."""
    array = np.asarray(label).reshape(-1)
    if array.size == 0:
        raise TypeError(f"feedback for request '{request_id}': the label is empty")
    if array.dtype.kind in "biuf":
        return mpb.Feedback(request_id=request_id, values=array.astype(np.float64).tolist())
    if array.dtype.kind in "US" or array.dtype == object:
        texts = [v.decode() if isinstance(v, bytes) else v for v in array.tolist()]
        if all(isinstance(t, str) for t in texts):
            return mpb.Feedback(request_id=request_id, labels=texts)
    raise TypeError(f"feedback for request '{request_id}': labels must be numbers or text, got {array.dtype}")


def batch_request(model: str, items: Iterable[tuple[str, Label]]) -> mpb.SubmitFeedbackBatchRequest:
    return mpb.SubmitFeedbackBatchRequest(model=model, items=[feedback(rid, label) for rid, label in items])


def window(count: int | None, seconds: float | None) -> mpb.Window:
    return mpb.Window(count=count or 0, seconds=seconds or 0.0)


@dataclass(frozen=True)
class FeedbackStatus:
    """The outcome of one batch item: ``code`` OK, NOT_FOUND (unknown id) or INVALID_ARGUMENT."""

    request_id: str
    code: grpc.StatusCode
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def statuses(msg: mpb.SubmitFeedbackBatchResponse) -> list[FeedbackStatus]:
    return [FeedbackStatus(s.request_id, _CODES.get(s.code, grpc.StatusCode.UNKNOWN), s.message) for s in msg.statuses]


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
