"""Quality of a model over a window of captured predictions joined with their ground truth.

    spec = TaskSpec.from_config(config)              # task and how to read a prediction, from config.pbtxt
    report = compute_quality(spec, store.predictions("digits", "1", limit=1000))
    report.metrics["accuracy"], report.metrics["f1_macro"], report.confusion

How a prediction is read (parameters ``tensorgate.prediction.output`` / ``.kind`` / ``.threshold``):
``label`` takes the output's values as they are (e.g. the digits model's INT64 ``label``); ``argmax`` takes the
index of the largest score per row (class probabilities or logits); ``threshold`` turns one score per row (or
the second column of a two-column output) into 1 when it is at least the threshold, else 0. Without parameters the
model's first output is used (capture computes it for every captured request, asked for or not): as a label when
it holds integers, by argmax when it holds floats with several columns, and by threshold when a classifier's floats
have one column (a sigmoid's probability), where a whole number is taken as it is (a class written as a float).

Class labels compare as drift's categories do: by text, whole numbers without ".0" (so feedback "3", 3 and 3.0 all
match an INT64 output 3). A regression row whose prediction or label is NaN or infinite is left out of mae/rmse
(one NaN would make them NaN, and an alert on them could then neither fire nor resolve) and counted:
``nonfinite_share`` is its share of the labelled rows.

The classification metrics follow scikit-learn's definitions exactly (``accuracy_score``,
``precision_recall_fscore_support`` with ``average="macro"`` over the labels seen in truth or prediction, and 0 for
a class with no predicted or no true samples), so tests can compare the two on the same pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server.monitoring.capture import PREDICTION_OUTPUT, parameter, prediction_output
from tensorgate.server.monitoring.drift import category_keys
from tensorgate.server.monitoring.store import Prediction

__all__ = [
    "ClassQuality",
    "QualityReport",
    "TaskSpec",
    "compute_quality",
    "label_domain",
    "predicted_values",
    "prediction_reading",
]

TASKS = ("classification", "regression")
KINDS = ("argmax", "label", "threshold")


class TaskSpecError(ValueError):
    """A prediction that cannot be read as the model's parameters say; the message names model and parameter."""


@dataclass(frozen=True, slots=True)
class TaskSpec:
    model: str
    task: str = "classification"
    output: str | None = None
    """``tensorgate.prediction.output``, else the model's first output; None (a config without outputs): the first
    captured output."""
    kind: str | None = None
    """None: label for integer outputs, argmax for multi-column float outputs, threshold for a classifier's
    one-column float output (whole numbers as they are), the value itself otherwise."""
    threshold: float = 0.5

    @classmethod
    def from_config(cls, config: mc.ModelConfig) -> TaskSpec:
        """Read ``tensorgate.task`` and ``tensorgate.prediction.*``; raises TaskSpecError on malformed values."""
        name = config.name
        task = (parameter(config, "tensorgate.task") or "classification").lower()
        if task not in TASKS:
            raise TaskSpecError(f"model '{name}': parameter 'tensorgate.task' must be one of {TASKS}, got {task!r}")
        kind = parameter(config, "tensorgate.prediction.kind")
        if kind is not None and kind not in KINDS:
            raise TaskSpecError(
                f"model '{name}': parameter 'tensorgate.prediction.kind' must be one of {KINDS}, got {kind!r}"
            )
        raw = parameter(config, "tensorgate.prediction.threshold")
        threshold = 0.5
        if raw is not None:
            try:
                threshold = float(raw)
            except ValueError:
                raise TaskSpecError(
                    f"model '{name}': parameter 'tensorgate.prediction.threshold' must be a number, got {raw!r}"
                ) from None
        return cls(name, task, prediction_output(config), kind, threshold)


def predicted_values(spec: TaskSpec, outputs: dict[str, np.ndarray]) -> np.ndarray:
    """One predicted value per row (1-D), read from a prediction's outputs as ``spec`` says."""
    kind, rows = prediction_reading(spec, outputs)
    if kind == "score_or_class":
        return _score_or_class(rows[:, 0], spec.threshold)
    if kind == "argmax":
        return np.asarray(rows.argmax(axis=1))
    if kind == "threshold":
        scores = rows[:, 1] if rows.shape[1] == 2 else rows[:, 0]
        return (scores.astype(np.float64) >= spec.threshold).astype(np.int64)
    return rows[:, 0]


def label_domain(spec: TaskSpec, outputs: dict[str, np.ndarray]) -> str | None:
    """What ground truth can ever match a prediction read from ``outputs``, so that feedback that cannot is refused
    rather than counted as a class of its own: "number" (regression, or a float output taken as it is), "class"
    (whole-number classes: argmax, threshold, a classifier's one float column, an integer output), None (anything:
    text or boolean predictions). Raises TaskSpecError when the prediction output was not captured."""
    if spec.task == "regression":
        return "number"
    kind, rows = prediction_reading(spec, outputs)
    if kind != "label" or rows.dtype.kind in "iu":
        return "class"
    return "number" if rows.dtype.kind == "f" else None


def prediction_reading(spec: TaskSpec, outputs: dict[str, np.ndarray]) -> tuple[str, np.ndarray]:
    """How a prediction is read (``KINDS``, or "score_or_class" for a classifier's one float column) and its output
    as rows."""
    if not outputs:
        raise TaskSpecError(f"model '{spec.model}': the prediction has no outputs")
    name = spec.output if spec.output is not None else next(iter(outputs))
    if name not in outputs:
        raise TaskSpecError(
            f"model '{spec.model}': prediction output '{name}' ({PREDICTION_OUTPUT}, else the model's first output) "
            f"was not captured; captured: {sorted(outputs)}"
        )
    value = np.asarray(outputs[name])
    if value.ndim == 0:
        value = value.reshape(1)
    rows = value.reshape(value.shape[0], -1)
    if spec.kind is not None:
        return spec.kind, rows
    if spec.task == "classification" and value.dtype.kind == "f":
        return ("score_or_class" if rows.shape[1] == 1 else "argmax"), rows
    return "label", rows


def _score_or_class(column: np.ndarray, threshold: float) -> np.ndarray:
    """A classifier's one float column holds a score (a sigmoid's probability) or a class written as a float. A
    value that is not a whole number can only be a score: it is thresholded (each probability read as its own class
    gave accuracy 0 over hundreds of "classes"); a whole number is the class itself (0.0 and 1.0 read the same
    either way), and NaN stays NaN rather than pass for class 0."""
    values = column.astype(np.float64)
    score = np.isfinite(values) & (values != np.floor(values))
    return np.where(score, (values >= threshold).astype(np.float64), values)


def _class_order(label: str) -> tuple[int, float, str]:
    """Numeric labels in numeric order ("10" after "9"), then text."""
    try:
        number = float(label)
    except ValueError:
        return (1, 0.0, label)
    return (0, number, label) if math.isfinite(number) else (1, 0.0, label)


@dataclass(slots=True)
class ClassQuality:
    label: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(slots=True)
class QualityReport:
    model: str
    version: str
    task: str
    predictions: int
    """Captured requests in the window."""
    labelled: int
    """Of those, requests with joined ground truth whose prediction could be read (``unreadable`` are not)."""
    rows: int = 0
    """Labelled rows (prediction/label pairs) the metrics are computed on."""
    nonfinite: int = 0
    """Regression: labelled rows left out because their prediction or label is NaN or infinite."""
    metrics: dict[str, float] = field(default_factory=dict)
    classes: list[ClassQuality] = field(default_factory=list)
    class_labels: list[str] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)
    """Rows: true class, columns: predicted class, both in ``class_labels`` order."""
    unreadable: int = 0
    """Requests with ground truth captured without the prediction output (e.g. before the server computed it for
    every captured request): they cannot be judged, so they count neither in ``labelled`` nor in label_coverage."""


def pairs(spec: TaskSpec, window: Sequence[Prediction]) -> tuple[list[object], list[object], int]:
    """(true, predicted) per labelled row in window order, and the number of labelled requests captured without
    the prediction output. Skipped: those, a label whose row count differs, and (regression) a label that is not
    a number. Only when no labelled request has the output at all is that an error: then the task spec names the
    wrong output."""
    y_true: list[object] = []
    y_pred: list[object] = []
    missing: TaskSpecError | None = None
    unreadable = 0
    found = False
    for p in window:
        if p.label is None:
            continue
        try:
            predicted = predicted_values(spec, p.outputs)
        except TaskSpecError as exc:
            missing = missing or exc
            unreadable += 1
            continue
        found = True
        truth = np.asarray(p.label).reshape(-1)
        if truth.shape[0] != predicted.shape[0]:
            continue
        if spec.task == "regression":
            try:
                truth = truth.astype(np.float64)
                predicted = predicted.astype(np.float64)
            except (TypeError, ValueError):
                continue
        y_true.extend(truth.tolist())
        y_pred.extend(predicted.tolist())
    if missing is not None and not found:
        raise missing
    return y_true, y_pred, unreadable


def compute_quality(spec: TaskSpec, window: Sequence[Prediction], version: str = "") -> QualityReport:
    """The quality metrics of one window (see the module docstring for the definitions)."""
    y_true, y_pred, unreadable = pairs(spec, window)
    labelled = sum(1 for p in window if p.label is not None) - unreadable
    report = QualityReport(spec.model, version, spec.task, len(window), labelled, unreadable=unreadable)
    if window:
        report.metrics["label_coverage"] = labelled / len(window)
    report.rows = len(y_true)
    if spec.task == "regression":
        t = np.asarray(y_true, dtype=np.float64)
        p = np.asarray(y_pred, dtype=np.float64)
        finite = np.isfinite(t) & np.isfinite(p)
        report.rows = int(finite.sum())
        report.nonfinite = len(t) - report.rows
        if len(t):
            report.metrics["nonfinite_share"] = report.nonfinite / len(t)
        if report.rows:
            e = p[finite] - t[finite]
            report.metrics["mae"] = float(np.mean(np.abs(e)))
            report.metrics["rmse"] = float(math.sqrt(float(np.mean(e * e))))
        return report
    if not y_true:
        return report
    truth = category_keys(np.asarray(y_true, dtype=object))
    pred = category_keys(np.asarray(y_pred, dtype=object))
    labels = sorted(set(truth) | set(pred), key=_class_order)
    index = {label: i for i, label in enumerate(labels)}
    n = len(labels)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, ([index[v] for v in truth], [index[v] for v in pred]), 1)
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    actual = confusion.sum(axis=1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(actual > 0, tp / actual, 0.0)
        denominator = predicted + actual
        f1 = np.where(denominator > 0, 2 * tp / denominator, 0.0)
    report.metrics["accuracy"] = float(tp.sum() / len(truth))
    report.metrics["precision_macro"] = float(precision.mean())
    report.metrics["recall_macro"] = float(recall.mean())
    report.metrics["f1_macro"] = float(f1.mean())
    report.class_labels = labels
    report.confusion = confusion.tolist()
    report.classes = [
        ClassQuality(str(label), float(precision[i]), float(recall[i]), float(f1[i]), int(actual[i]))
        for i, label in enumerate(labels)
    ]
    return report
